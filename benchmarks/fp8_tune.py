"""Tile sweep of the FP8 strip quantization passes (kernels/fp8_strips.py) on the device.

For each source kind (weights, a plain activation, SwiGLU forward, SwiGLU backward with
routing weights) and each copy (row, column): every candidate tile is checked bitwise
against the default tiles' output, timed, and the fastest becomes that kind's entry of
``fp8_strips.STRIP_CONFIGS`` for the rest of this process (what ``moe_layer.py
--tune-fp8-strips`` then times; the chosen tiles are recorded in its results and copied
into the module's defaults by hand). The two-pass kernels of kernels/fp8_rowwise.py are
timed beside them. Candidate kernels are compiled in parallel worker processes first.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import time

import torch

ROW_CANDIDATES = [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)]
COL_CANDIDATES = [(64, 64, 4, False), (128, 32, 4, False), (32, 128, 4, False), (64, 64, 4, True), (128, 32, 4, True),
                  (128, 64, 8, True), (256, 32, 8, False)]
F8 = torch.float8_e4m3fn


def _sources(E, D, H, M, dev, seed=0):
    from moeq.kernels import fp8_rowwise as k

    g = torch.Generator(device=dev).manual_seed(seed)
    counts = torch.full((E,), (M // E) // 16 * 16)
    counts[0] += M - int(counts.sum())
    offs = counts.cumsum(0).to(torch.int32).to(dev)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g).bfloat16()  # noqa: E731
    w = torch.rand(M, device=dev, generator=g)
    return offs, {
        # kind: list of (mode, src, aux, offs, groups, row_weights, weight_row, weight_col, want_dw, bytes of one read)
        "weight": [(k.MODE_PLAIN, rnd(E * 2 * H, D), None, None, E, None, False, False, False),
                   (k.MODE_PLAIN, rnd(E * D, H), None, None, E, None, False, False, False)],
        "plain": [(k.MODE_PLAIN, rnd(M, D), None, offs, E, w, False, True, False)],
        "swiglu": [(k.MODE_SWIGLU, rnd(M, 2 * H), None, offs, E, None, False, False, False)],
        "swiglu_bwd": [(k.MODE_SWIGLU_BWD, rnd(M, 2 * H), rnd(M, H), offs, E, w, True, True, True)],
    }


def _call(src_args, row, col, tiles):
    from moeq.kernels import fp8_strips as s

    mode, src, aux, offs, ng, w, wr, wc, dw = src_args
    return s._dual_quantize_strips_impl(mode, src, aux, offs, ng, row, col, tiles=tiles, row_weights=w,
                                        weight_row_copy=wr and row, weight_col_copy=wc and col, want_dw=dw and row)


def _warm(job):
    shape, kind, copy, tiles = job
    try:
        E, D, H, _ = shape
        _, srcs = _sources(E, D, H, 2048, "cuda")
        for a in srcs[kind]:
            _call(a, copy == "row", copy == "col", tiles)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported by the timed run
        return f"{kind} {copy} {tiles}: {type(e).__name__}: {str(e)[:160]}"


def compile_in_workers(warm, jobs, what: str) -> None:
    """Run ``warm(job)`` for every job in spawned worker processes, so Triton's on-disk
    cache holds the kernels before the timed process asks for them; ``warm`` returns None
    or an error line, printed here."""
    t0 = time.time()
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(14, os.cpu_count() or 4), mp_context=ctx) as ex:
        errors = [r for r in ex.map(warm, jobs) if r]
    print(f"# precompiled {len(jobs)} {what} in {time.time() - t0:.0f}s; {len(errors)} failed", flush=True)
    for e in errors:
        print("#   " + e, flush=True)


def _precompile(shape, default):
    jobs = [(shape, kind, "row", (r, default[kind][1])) for kind in default for r in ROW_CANDIDATES]
    jobs += [(shape, kind, "col", (default[kind][0], c)) for kind in default for c in COL_CANDIDATES]
    compile_in_workers(_warm, jobs, "strip kernels")


def _same(a, b):
    # every output bitwise, except the routing-weight gradient (index 5): a float32 sum
    # over the row whose order follows the tile width
    for i, (x, y) in enumerate(zip(a, b)):
        if i == 5:
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()) if y.numel() else 0.0):
                return False
            continue
        if x.dtype == F8:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        if not torch.equal(torch.nan_to_num(x.float(), 7.0), torch.nan_to_num(y.float(), 7.0)):
            return False
    return True


def tune_strips(shape, log=None, bench=None):
    """Sweep, check and pick strip tiles for ``shape`` = (E, D, H, M); sets STRIP_CONFIGS.

    Returns {kind: {"row": (tiles, ms), "col": (tiles, ms), "two_pass_ms": ms, "bytes": n}}."""
    from triton.testing import do_bench

    from moeq.kernels import fp8_rowwise as k
    from moeq.kernels import fp8_strips as s

    bench = bench or (lambda f: do_bench(f, warmup=10, rep=40, return_mode="median"))
    E, D, H, M = shape
    default = dict(s.STRIP_CONFIGS)
    _precompile(shape, default)
    _, srcs = _sources(E, D, H, M, "cuda")
    report = {}
    for kind, args_list in srcs.items():
        entry = {}
        for copy in ("row", "col"):
            row, col = copy == "row", copy == "col"
            want = [_call(a, row, col, default[kind]) for a in args_list]
            best = None
            for cand in (ROW_CANDIDATES if row else COL_CANDIDATES):
                tiles = (cand, default[kind][1]) if row else (default[kind][0], cand)
                try:
                    got = [_call(a, row, col, tiles) for a in args_list]
                    if not all(_same(g, w) for g, w in zip(got, want)):
                        entry.setdefault("mismatch", []).append((copy, cand))
                        continue
                    ms = bench(lambda: [_call(a, row, col, tiles) for a in args_list])
                    if best is None or ms < best[1]:
                        best = (cand, ms)
                except Exception as e:
                    entry.setdefault("errors", []).append(f"{copy} {cand}: {type(e).__name__}: {str(e)[:120]}")
            entry[copy] = best
        if all(a[5] is None and not a[8] for a in args_list):  # the two-pass kernels have no routing extras
            entry["two_pass_ms"] = bench(lambda: [k.dual_quantize_impl(a[0], a[1], a[2], a[3], a[4], True, True)
                                                  for a in args_list])
        nbytes = 0
        for a in args_list:
            src, aux = a[1], a[2]
            nbytes += src.numel() * src.element_size() + (aux.numel() * aux.element_size() if aux is not None else 0)
        entry["bytes_one_read"] = nbytes
        if entry.get("row") and entry.get("col"):
            s.STRIP_CONFIGS[kind] = (entry["row"][0], entry["col"][0])
        report[kind] = entry
        print(f"# strips {kind}: {entry}", flush=True)
    return report
