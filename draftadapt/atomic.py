"""Atomic directory writes: build in a temp dir beside the target, fsync, swap in with os.replace.

A writer killed at any instant leaves either the old directory or the new one (a parked old one
is moved back by the next reader or writer). Used by every checkpoint writer (drafts, the run
state, the toy artefacts); knows nothing of what is written. Split from `checkpoint.py` so that
the draft modules can write atomically without importing the checkpoint formats above them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Callable

from . import faults


def recover_parked(out: str | os.PathLike) -> bool:
    """A writer killed between parking the old checkpoint and moving the new one in leaves no
    `out` but a `.out.old-*` dir: move the newest such dir back. Returns True when it did."""
    out = Path(out).absolute()
    if out.exists() or not out.parent.is_dir():
        return False
    parked = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not parked:
        return False
    os.replace(parked[-1], out)
    warnings.warn(f"{out} was missing after an interrupted write: restored the previous checkpoint from {parked[-1].name}",
                  stacklevel=3)
    return True


def sweep_leftovers(out: str | os.PathLike) -> list[str]:
    """Remove what writers killed mid-write left beside `out` - their temp dirs and, once `out` is
    whole again, parked old versions - after moving a parked checkpoint back if `out` is missing.
    At real sizes each is a whole checkpoint (GBs). Call only where no other writer can be at work
    on `out` (a resume); returns the names removed."""
    out = Path(out).absolute()
    recover_parked(out)
    stale = list(out.parent.glob(f".{out.name}.tmp-*"))
    if out.exists():
        stale += list(out.parent.glob(f".{out.name}.old-*"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in stale)


def readable_tempdir(out: Path) -> Path:
    """mkdtemp beside `out`, opened up to the umask's default (0755 under umask 022, as
    save_pretrained leaves a dir): mkdtemp's 0700 would hide an exported draft from another user
    or a serving container."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_dir(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) in a temp dir beside out_dir, fsync it, then swap it in with os.replace."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"checkpoint path {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_parked(out)
    tmp = readable_tempdir(out)
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():  # safetensors' save_file writes 0600: open files up like the dir
                os.chmod(f, 0o666 & ~_umask())
            _fsync(f)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A directory cannot be os.replace'd onto a non-empty one: park the old one, swap, drop it.
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}" if out.exists() else None
    if old is not None:
        os.replace(out, old)
        faults.kill_point("checkpoint_swap")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
