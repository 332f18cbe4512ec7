"""Training text as bytes: the Python standard library's own sources by default (no download)."""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch

DEFAULT_CORPUS_BYTES = 8 * 2**20


def stdlib_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> bytes:
    """Concatenated ``*.py`` sources of this Python's standard library, in sorted order,
    up to ``max_bytes``. Deterministic for a given Python install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources found under {root}: pass --data PATH")
    return b"\n".join(chunks)[:max_bytes]


def files_corpus(paths: Iterable[Union[str, os.PathLike]], max_bytes: Optional[int] = None) -> bytes:
    """Bytes of the given text files, or of every file under given directories."""
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"--data {p}: no such file or directory")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out.extend(f.read_bytes() for f in files)
    data = b"\n".join(out)
    if len(data) < 2:
        raise ValueError(f"--data {', '.join(map(str, paths))}: no text found (need at least 2 bytes)")
    return data[:max_bytes] if max_bytes else data


def batches(
    data: bytes, batch_size: int, seq_len: int, *, seed: int = 0, device: Union[str, torch.device] = "cpu"
) -> Iterator[torch.Tensor]:
    """Endless random windows of ``seq_len + 1`` bytes: yields (batch_size, seq_len + 1) int64.

    A fixed seed gives the same batches, so recipes can be compared on the same data."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if buf.numel() <= seq_len + 1:
        raise ValueError(f"corpus of {buf.numel()} bytes is shorter than seq_len + 1 = {seq_len + 1}")
    g = torch.Generator().manual_seed(seed)
    span = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, buf.numel() - seq_len - 1, (batch_size, 1), generator=g)
        yield buf[starts + span].long().to(device, non_blocking=True)
