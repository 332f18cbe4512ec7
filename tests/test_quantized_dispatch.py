"""Quantized EP dispatch: the packed row format, its numerics, and the kernels vs references.

* layout: packed rows are e4m3 data, then scales, then zero padding to 16 bytes;
* numerics: unpack(pack(x)) is exactly the experts' own fake quantization of x along D
  (fp8 rowwise / mxfp8, bitwise), and quantizing that again along D changes nothing
  (idempotent), including rows whose re-derived scale doubles;
* Triton == reference, bitwise, through the interpreter (subprocess: ``TRITON_INTERPRET``
  must be set before triton is imported); on CUDA in a GPU test;
* bad input raises errors that name the fix.

The distributed behaviour (EP == single process, bytes on the wire) is in
tests/test_expert_parallel.py (``case_quantized_dispatch``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeq.kernels import dispatch_quant as K
from moeq.kernels.fp8_rowwise import quantize_rowwise_reference as hopper_fp8_rows
from moeq.kernels.mxfp8_hopper import fake_quant_rows_reference as hopper_mx_rows
from moeq.ops.quantized_dispatch import pack_rows, packed_row_bytes, unpack_to_padded
from moeq.numerics.fp8_rowwise import fp8_rowwise_fake_quantize, fp8_rowwise_quantize
from moeq.numerics.mxfp8 import mxfp8_fake_quantize, mxfp8_quantize

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("fp8", "mxfp8")
FAKE_QUANT = {"fp8": fp8_rowwise_fake_quantize, "mxfp8": mxfp8_fake_quantize}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def rows(n: int, d: int, seed: int, device="cpu") -> torch.Tensor:
    """bf16 rows with magnitudes over 2**+-20 per row and 2**+-4 per element, plus special rows:
    zeros, a tiny row (bf16 subnormal range), and a row whose amax rounds down to 224 on the e4m3 grid (its scale
    doubles when the dequantized row is quantized again)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.exp2(torch.randint(-20, 21, (n, 1), generator=g).float())
    x = x * torch.exp2(torch.rand(n, d, generator=g) * 8 - 4)
    if n >= 3:
        x[0] = 0.0
        x[1] = torch.randn(d, generator=g) * 2.0**-124  # MX blocks dequantize into bf16 subnormals
        x[2] = torch.rand(d, generator=g)
        x[2, :: 32] = 225.0  # every MX block and the FP8 row: amax 225 -> 224 after rounding
    return x.to(torch.bfloat16).to(device)


def test_packed_row_bytes_formula():
    for d in (16, 32, 48, 96, 2048, 7168):
        assert packed_row_bytes(d, "fp8") == (d + 4 + 15) // 16 * 16
        if d % 32 == 0:
            assert packed_row_bytes(d, "mxfp8") == (d + d // 32 + 15) // 16 * 16
    # D = 2048: about half of bf16's 2D bytes
    assert packed_row_bytes(2048, "fp8") / (2 * 2048) == pytest.approx(0.504, abs=1e-3)
    assert packed_row_bytes(2048, "mxfp8") / (2 * 2048) == pytest.approx(0.516, abs=1e-3)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("d", [32, 96])
def test_packed_layout_is_data_then_scales_then_zeros(recipe, d):
    x = rows(9, d, seed=d)
    p = pack_rows(x, recipe)
    assert p.dtype == torch.uint8 and p.shape == (9, packed_row_bytes(d, recipe))
    data, scale = (fp8_rowwise_quantize if recipe == "fp8" else mxfp8_quantize)(x, -1)
    assert torch.equal(p[:, :d], bits(data.contiguous()))
    nscale = 4 if recipe == "fp8" else d // 32
    assert torch.equal(p[:, d: d + nscale], scale.contiguous().view(torch.uint8).reshape(9, nscale))
    assert (p[:, d + nscale:] == 0).all()
    got_data, got_scale = K.decode_packed(p, d, recipe)
    assert torch.equal(bits(got_data), bits(data)) and torch.equal(bits(got_scale), bits(scale.contiguous()))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("seed", range(3))
def test_round_trip_is_experts_quantization_and_idempotent(recipe, seed):
    d = 64
    x = rows(33, d, seed)
    n = x.shape[0]
    dq = unpack_to_padded(pack_rows(x, recipe), torch.arange(n, dtype=torch.int32), d, recipe)
    fq = FAKE_QUANT[recipe]
    # what the experts would have computed from the original rows (emulated path) ...
    assert torch.equal(bits(dq), bits(fq(x, -1, torch.bfloat16)))
    # ... and the Hopper kernels' references (the GPU experts' numerics)
    if recipe == "fp8":
        q, inv = hopper_fp8_rows(x)
        assert torch.equal(bits(dq), bits((q.float() * inv[:, None]).to(torch.bfloat16)))
    else:
        assert torch.equal(bits(dq), bits(hopper_mx_rows(x)))
    # idempotent: the experts' quantization along D of the dequantized rows gives them back
    assert torch.equal(bits(fq(dq, -1, torch.bfloat16)), bits(dq))
    # ... and the rows with amax 225 -> 224 did take the doubled-scale branch
    if recipe == "fp8":
        s0, s1 = fp8_rowwise_quantize(x, -1)[1], fp8_rowwise_quantize(dq, -1)[1]
    else:
        s0, s1 = (bits(mxfp8_quantize(t, -1)[1]).float() for t in (x, dq))
        s0, s1 = torch.exp2(s0), torch.exp2(s1)
    assert torch.equal(s1[2], s0[2] / 2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_unpack_places_rows_and_zero_padding(recipe):
    d = 32
    x = rows(5, d, seed=7)
    p = pack_rows(x, recipe)
    source = torch.tensor([4, 0, -1, -1, 2, 1, 3, -1], dtype=torch.int32)
    out = unpack_to_padded(p, source, d, recipe)
    fq = FAKE_QUANT[recipe](x, -1, torch.bfloat16)
    for r, s in enumerate(source.tolist()):
        expect = fq[s] if s >= 0 else torch.zeros(d, dtype=torch.bfloat16)
        assert torch.equal(bits(out[r]), bits(expect)), r
    empty = unpack_to_padded(p[:0], torch.full((4,), -1, dtype=torch.int32), d, recipe)
    assert empty.shape == (4, d) and (bits(empty) == 0).all()
    assert pack_rows(x[:0], recipe).shape == (0, packed_row_bytes(d, recipe))


@pytest.mark.parametrize("recipe", RECIPES)
def test_non_finite_rows_stay_non_finite(recipe):
    x = rows(4, 64, seed=3)
    x[3, 5] = float("nan")
    x[2, 7] = float("inf")
    out = unpack_to_padded(pack_rows(x, recipe), torch.arange(4, dtype=torch.int32), 64, recipe)
    assert out[3, 5].isnan() and not out[2, 7].isfinite()
    assert out[:2].isfinite().all()


def test_bad_input_raises_clear_errors():
    x = rows(4, 32, seed=0)
    with pytest.raises(ValueError, match="'fp8' or 'mxfp8'"):
        pack_rows(x, "bf16")
    with pytest.raises(ValueError, match="unknown recipe"):
        pack_rows(x, "int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(rows(4, 48, seed=0), "mxfp8")
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_rows(torch.zeros(4, 24, dtype=torch.bfloat16), "fp8")
    with pytest.raises(TypeError, match="bfloat16"):
        pack_rows(x.to(torch.int32), "fp8")
    with pytest.raises(ValueError, match="2D"):
        pack_rows(x[0], "fp8")
    p = pack_rows(x, "fp8")
    src = torch.arange(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="same D and recipe"):
        unpack_to_padded(p, src, 64, "fp8")
    with pytest.raises(ValueError, match="int32"):
        unpack_to_padded(p, src.long(), 32, "fp8")


def test_custom_ops_pass_opcheck():
    x = rows(6, 64, seed=1)
    for recipe in RECIPES:
        torch.library.opcheck(torch.ops.moeq.pack_rows_quantized.default, (x, recipe))
        p = pack_rows(x, recipe)
        src = torch.tensor([1, -1, 0, 5, 4, -1, 3, 2], dtype=torch.int32)
        torch.library.opcheck(torch.ops.moeq.unpack_rows_to_padded.default, (p, src, 64, recipe))


# ----------------------------------------------------------------------------------
# Triton == reference, through the interpreter (subprocess)
# ----------------------------------------------------------------------------------


def test_triton_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--interpret"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "interpreter checks passed" in proc.stdout


def _twin_checks(recipe, n, d, num_out, seed, device="cpu"):
    x = rows(n, d, seed, device)
    pr, pt = K.pack_rows_reference(x, recipe), K.pack_rows_triton(x, recipe)
    assert torch.equal(pr, pt), (recipe, n, d, (pr != pt).nonzero()[:4].tolist())
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(-1, max(n, 1), (num_out,), generator=g).to(torch.int32).to(device)
    ur = K.unpack_to_padded_reference(pr, source, d, recipe)
    ut = K.unpack_to_padded_triton(pt, source, d, recipe)
    assert torch.equal(bits(ur), bits(ut)), (recipe, n, d)
    # non-finite rows: NaN / non-finite in the same places (their stored scale may differ)
    if n >= 4:
        x[3, 1] = float("nan")
        x[2, 0] = float("-inf")
        src = torch.arange(n, dtype=torch.int32, device=device)
        ur = K.unpack_to_padded_reference(K.pack_rows_reference(x, recipe), src, d, recipe)
        ut = K.unpack_to_padded_triton(K.pack_rows_triton(x, recipe), src, d, recipe)
        assert torch.equal(ur.isnan(), ut.isnan()) and torch.equal(ur.isfinite(), ut.isfinite())
        fin = ur.isfinite().all(-1)
        assert torch.equal(bits(ur[fin]), bits(ut[fin]))


def _run_interpreter_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    cases = [
        ("fp8", 7, 16, 11), ("fp8", 5, 48, 9), ("fp8", 9, 96, 12), ("fp8", 0, 16, 3),
        ("mxfp8", 7, 32, 11), ("mxfp8", 5, 96, 9), ("mxfp8", 6, 160, 8), ("mxfp8", 0, 32, 2),
    ]
    for i, (recipe, n, d, num_out) in enumerate(cases):
        _twin_checks(recipe, n, d, num_out, seed=i)
    print("interpreter checks passed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("d", [2048, 7168])
def test_gpu_triton_matches_reference_without_host_sync(recipe, d):
    _twin_checks(recipe, 300, d, 520, seed=d, device="cuda")
    x = rows(300, d, 1, "cuda")
    src = torch.randint(-1, 300, (520,), device="cuda", dtype=torch.int32)
    torch.cuda.set_sync_debug_mode("error")
    try:
        unpack_to_padded(pack_rows(x, recipe), src, d, recipe)
    finally:
        torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__" and "--interpret" in sys.argv:
    _run_interpreter_checks()


@pytest.mark.parametrize("recipe", RECIPES)
def test_unpack_in_float32_is_the_bf16_rows_widened(recipe):
    """A float32 model's experts get float32 rows: exactly the bf16 dequantized values."""
    x = rows(9, 64, seed=5).float()
    p = pack_rows(x, recipe)
    src = torch.tensor([3, -1, 0, 8, 1, 2, -1, 4, 5, 6, 7], dtype=torch.int32)
    out32 = unpack_to_padded(p, src, 64, recipe, out_dtype=torch.float32)
    assert out32.dtype == torch.float32
    assert torch.equal(out32, unpack_to_padded(p, src, 64, recipe).float())
    assert torch.equal(out32[src >= 0], FAKE_QUANT[recipe](x, -1, torch.bfloat16).float()[src[src >= 0].long()])
    with pytest.raises(TypeError, match="out_dtype must be torch.bfloat16 or torch.float32"):
        unpack_to_padded(p, src, 64, recipe, out_dtype=torch.float16)
