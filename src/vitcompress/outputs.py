"""Outputs that never lose the user's work.

Every command that writes a run directory or a file:

- checks its destination before any work starts (:func:`check_output_dir`,
  :func:`check_output_file`): not under a file, in a writable place, not a special file, not
  one of the command's own inputs, not an ordinary folder that is no run;
- holds a lock on it while it works (:func:`output_lock`): a second writer fails at once with
  one line naming the holder; the lock is ``flock`` on a small file beside the output, so the
  kernel releases it when its process dies (kill -9 included) and it never blocks forever;
- builds it beside its destination (``<out>.partial``) and moves it into place only when it is
  complete (:func:`commit_dir`); ``--force`` replaces an old result only then, so a command
  that fails leaves the old result as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from vitcompress.errors import VitcompressError

PARTIAL = ".partial"  # a run being built: <out>.partial beside <out>
RUN_FILES = ("config.json", "metrics.json", "model.safetensors", "model.packed", "train_state.pt")


def partial_dir(out: Path) -> Path:
    """Where the run for ``out`` is built (and where an interrupted training waits)."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_place(path: Path, what: str) -> None:
    """``path`` can be created: no file stands where a folder of it should be, and the
    nearest existing folder above it is writable."""
    path = Path(path).absolute()
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise VitcompressError(f"{what} {path}: {parent} is a file, not a folder")
    base = _nearest_existing(path.parent)
    if not os.access(base, os.W_OK | os.X_OK):
        raise VitcompressError(f"{what} {path}: cannot write in {base} (permission denied)")


def is_run(path: Path) -> bool:
    """Whether ``path`` is a vitcompress run directory (finished or not)."""
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def check_output_dir(
    out: Path, *, force: bool, inputs: Iterable[Path] = (), resume: bool = False
) -> None:
    """Refuse, in one line and before any work, a run directory ``out`` that this command must
    not write: one of its ``inputs`` (or inside one, or holding one), a file, an ordinary folder
    with other things in it, or a finished / interrupted run without ``force`` / ``resume``."""
    out = Path(out)
    check_writable_place(out, "--out")
    here = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if here == src or src in here.parents or here in src.parents:
            raise VitcompressError(
                f"--out {out} is (or holds, or lies inside) {inp}, which this command reads; "
                "write the result elsewhere"
            )
    if out.exists() and not out.is_dir():
        raise VitcompressError(f"--out {out} is a file, not a run directory")
    if resume:
        return
    if out.is_dir() and any(out.iterdir()):
        if not is_run(out):
            raise VitcompressError(
                f"--out {out} is a folder with other things in it, not a vitcompress run; "
                "give a new or empty folder"
            )
        finished = (out / "metrics.json").is_file()
        if not force:
            what = "a finished run" if finished else "an interrupted run (use --resume)"
            raise VitcompressError(f"{out} already holds {what}; pass --force to replace it")
    partial = partial_dir(out)
    if partial.exists() and not force and (partial / "train_state.pt").is_file():
        raise VitcompressError(
            f"{partial} holds an interrupted training for {out}: --resume continues it, "
            "--force starts over"
        )


def check_output_file(path: Path, *, inputs: Iterable[Path] = ()) -> None:
    """Refuse an output file that is a folder or a special file (a device, a FIFO), one of the
    command's inputs, or that cannot be created; an existing regular file is replaced."""
    path = Path(path)
    check_writable_place(path, "--out")
    for inp in inputs:
        if inp is not None and path.resolve() == Path(inp).resolve():
            raise VitcompressError(f"--out {path} is the input it is made from")
    if path.exists() or path.is_symlink():
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            raise VitcompressError(f"--out {path} is a folder; give a file name")
        if stat.S_ISLNK(mode):
            raise VitcompressError(f"--out {path} is a symbolic link; give a plain file name")
        if not stat.S_ISREG(mode):
            raise VitcompressError(f"--out {path} is a special file (device, FIFO or socket)")


def _lock_path(out: Path) -> Path:
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock on output ``out`` (a run directory or a file) for the ``with`` block.

    Raises:
        VitcompressError: another process holds it (one line naming its pid, host, command).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, no protection
        yield
        return
    path = _lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
            except (json.JSONDecodeError, KeyError, TypeError):
                who = "another process"
            raise VitcompressError(f"{out} is being written by {who}") from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["vitcompress", *sys.argv[1:]])[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def fresh_partial(out: Path) -> Path:
    """An empty ``<out>.partial`` to build the run in (a leftover of a failed run is removed:
    only this command, under the output's lock, writes there)."""
    partial = partial_dir(out)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


@contextlib.contextmanager
def building(out: Path, keep_resumable: bool = False) -> Iterator[Path]:
    """A fresh ``<out>.partial`` to build the run in, moved to ``out`` when the block ends
    without an error; on an error it is removed, unless ``keep_resumable`` and it holds a
    training that ``--resume`` can continue."""
    partial = fresh_partial(out)
    try:
        yield partial
    except BaseException:
        if not (keep_resumable and (partial / "train_state.pt").is_file()):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    commit_dir(partial, out)


def commit_dir(partial: Path, out: Path) -> None:
    """Move the complete run ``partial`` to ``out``, replacing what was there only now."""
    out = Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "PARTIAL",
    "check_output_dir",
    "check_output_file",
    "building",
    "check_writable_place",
    "commit_dir",
    "fresh_partial",
    "is_run",
    "output_lock",
    "partial_dir",
]
