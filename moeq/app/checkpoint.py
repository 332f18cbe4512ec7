"""Checkpoint files of ``moeq train``: written atomically, verified by a content checksum.

File layout: ``MAGIC`` (16 bytes), the SHA-256 of the payload (32 bytes), then the
payload, a ``torch.save`` of the state dict. Writing goes to a temporary file in the same
directory, is flushed and fsynced, then renamed over the old file (and the directory
fsynced), so a crash at any moment leaves either the old checkpoint or the new one, never
a mix. Reading checks the header and the checksum before unpickling (with
``weights_only=True``), so a truncated, bit-flipped, empty or foreign file is refused
with one clear line instead of loading garbage or failing deep inside ``torch.load``.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Union

import torch

__all__ = ["MAGIC", "CheckpointError", "save_checkpoint", "load_checkpoint"]

MAGIC = b"MOEQ-CKPT\x00\x00\x00\x00\x00v1"  # 16 bytes: name, padding, format version
_DIGEST_BYTES = hashlib.sha256().digest_size
_HEADER_BYTES = len(MAGIC) + _DIGEST_BYTES


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (the message says why and what to do)."""


def save_checkpoint(path: Union[str, os.PathLike], state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically.

    Creates the parent directory. The previous file at ``path``, if any, is replaced only
    once the new one is completely on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(hashlib.sha256(payload).digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; not every platform can open a directory
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(
    path: Union[str, os.PathLike], *, required_keys: Iterable[str] = (), map_location=None
) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` and check it is whole.

    Args:
        path: the checkpoint file.
        required_keys: keys the state must hold.
        map_location: as for ``torch.load``.
    Returns:
        the state dict.
    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError (a ValueError), one line naming the file: a directory, an empty
        or truncated file, a file without moeq's header (random bytes, text, a plain
        ``torch.save`` file, a checkpoint of another program), a checksum mismatch (bits
        changed after writing), an unreadable payload, or missing keys.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file: pass the run's --out-dir")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written completely; train again")
    if not data.startswith(MAGIC):
        raise CheckpointError(
            f"{path} is not a moeq checkpoint (no moeq header: a file written by another program, or by a "
            f"moeq version before checksummed checkpoints); point --out-dir at a moeq train run"
        )
    if len(data) <= _HEADER_BYTES:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes): train again")
    digest, payload = data[len(MAGIC): _HEADER_BYTES], memoryview(data)[_HEADER_BYTES:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its content does not match its checksum (bits changed on disk or "
            f"in a copy); restore a good copy or train again"
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is one clear line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be read: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a moeq train state")
    missing = [k for k in required_keys if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(map(repr, missing))}: it is not a moeq train checkpoint"
        )
    return state
