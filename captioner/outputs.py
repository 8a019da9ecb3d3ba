"""Writing results safely: every file the package writes goes through here.

Three promises. Nothing outside the tool is replaced: an output path that exists and is not a
regular file (a device such as /dev/null, a FIFO, a directory, a socket) is refused, never
swapped for a regular file. Nothing a user has is destroyed: an output that is one of the
command's own inputs (`captioner export last.ckpt last.ckpt`) is refused. Work is never lost
to a bad output path: `check_output` runs before the work, trying the target's directory for
real, and every write is atomic (a temporary file in the same directory, fsynced, then
renamed over the target), so a crash leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from captioner.errors import OutputError, shown_path

__all__ = ["atomic_write", "atomic_write_text", "check_output", "describe_kind"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def describe_kind(mode: int) -> str:
    """'a directory', 'a character device', ... for a non-regular st_mode; '' for a regular file."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "" if stat.S_ISREG(mode) else "not a regular file"


def check_output(path: str | os.PathLike[str], what: str = "output",
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse, before any work, an output target that would replace something it must not or
    that cannot be written; returns it as a Path. Raises OutputError naming the path."""
    target = Path(path)
    shown = shown_path(target)
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise OutputError(f"{shown}: cannot write the {what} there ({exc.strerror or exc})") from None
    if info is not None:
        kind = describe_kind(info.st_mode)
        if kind:
            raise OutputError(f"{shown}: is {kind}; the {what} must be a regular file (it is never replaced)")
        if any(_same_file(source, target) for source in inputs):
            raise OutputError(f"{shown}: is also an input of this command; writing the {what} there would destroy it")
    _try_directory(target.parent if str(target.parent) else Path("."), shown, what)
    return target


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: not the same file
        return False


def _try_directory(directory: Path, shown: str, what: str) -> None:
    """Create and remove a temporary file where the output will go: the only true test."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".captioner-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{shown}: cannot write the {what} there ({exc.strerror or exc})") from None


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: all or nothing. The target is
    checked again here: between the check and the write it may have become a device."""
    path = Path(path)
    try:
        info = os.stat(path)
        if describe_kind(info.st_mode):
            raise OutputError(f"{shown_path(path)}: is {describe_kind(info.st_mode)}; not replaced")
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shared files unreadable to others
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
