"""Command-line paths (files, directories, globs) as a stream of images to caption.

Streaming, so that a tree of a million files starts captioning at once and its paths are
never all held in memory: only the directories on the current branch are listed, plus one
small key per file already given out (each file is given out once). The order is
deterministic: arguments in the order given; inside a directory, its entries sorted by
name, depth first (the order of sorting every path by its components).

Hostile trees cannot hang or loop it: directory symbolic links are followed but every
directory is entered at most once per argument (a link to an ancestor, or a folder holding
links to itself, ends there); globs are expanded by this walker, not by `glob` (which
follows link loops for ever); files that are not regular (a FIFO named x.jpg) are reported,
never opened; an unreadable directory is one problem line.
"""
from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from captioner.images import IMAGE_EXTENSIONS, file_type_reason

__all__ = ["Found", "find_images", "iter_images"]

_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Found:
    """One result: an image to load (`problem` is None) or a problem to report as
    "PATH: problem". `path` is the image, or the argument, file or directory at fault;
    `given` is the argument it came from, as typed."""

    given: str
    path: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def iter_images(paths: Iterable[str]) -> Iterator[Found]:
    """Expand files, directories and globs lazily, each image file once.

    A file named explicitly is kept whatever its extension (`load_image` judges content);
    directories (searched recursively) and globs (`*`, `?`, `[...]`, `**` for any depth)
    contribute only files with an image extension, skipping hidden names such as macOS
    "._x.jpg" resource forks. An argument that yields nothing gives one problem.
    """
    seen: set[int] = set()
    for given in paths:
        yield from _expand(given, seen)


def find_images(paths: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """All of `iter_images` at once: (images in order, [(path, problem)])."""
    images: list[Path] = []
    problems: list[tuple[str, str]] = []
    for found in iter_images(paths):
        if found.ok:
            images.append(Path(found.path))
        else:
            problems.append((found.path, found.problem or ""))
    return images, problems


def _expand(given: str, seen: set[int]) -> Iterator[Found]:
    """One argument -> its images and problems, counting matches before deduplication (an
    argument whose images were all given out already is not "empty")."""
    try:
        info = os.stat(given)
    except OSError as exc:
        if os.path.lexists(given):  # a broken or looping symbolic link
            yield Found(given, given, _stat_problem(exc))
        elif _MAGIC.search(given):
            yield from _expand_glob(given, seen)
        else:
            yield Found(given, given, "no such file or directory")
        return
    if stat.S_ISDIR(info.st_mode):
        counter = _Counter()
        yield from _walk(given, _clean(given), info, None, seen, counter)
        if not counter.matches and not counter.unreadable_top:
            yield Found(given, given, "no images found in directory")
        return
    reason = file_type_reason(info.st_mode)
    if reason:
        yield Found(given, given, reason)
    elif _first(info, seen):
        yield Found(given, _clean(given))


class _Counter:
    """Per-argument tallies that decide its "found nothing" problem."""

    def __init__(self) -> None:
        self.matches = 0
        self.unreadable_top = False


def _expand_glob(pattern: str, seen: set[int]) -> Iterator[Found]:
    """Walk from the pattern's literal leading directory, matching the rest component by
    component: `*`, `?` and `[...]` never cross '/', `**` alone matches zero or more
    directories. A matched directory contributes all its images, as a named one does."""
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    base = os.sep.join(parts[:first]) or (os.sep if pattern.startswith(os.sep) else ".")
    rest = [part for part in parts[first:] if part not in ("", ".")]
    dirs_only = pattern.endswith(os.sep)
    glob = _Glob(rest, dirs_only)
    counter = _Counter()
    try:
        info = os.stat(base)
    except OSError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        yield from _walk(pattern, _clean(base), info, glob, seen, counter)
    if counter.matches == 0 and not counter.unreadable_top:
        reason = "no images match this pattern" if glob.matched else "no such file or directory"
        yield Found(pattern, pattern, reason)


class _Glob:
    """A pattern after its literal directory, as a set of positions (an NFA): descending
    into a name moves every position that matches it one step on."""

    def __init__(self, parts: list[str], dirs_only: bool) -> None:
        self.parts = parts
        self.dirs_only = dirs_only
        self.regexes = [None if p == "**" else re.compile(fnmatch.translate(p)) for p in parts]
        self.hidden_ok = [p.startswith(".") for p in parts]
        self.matched = False  # anything at all matched, image or not

    def start(self) -> frozenset[int]:
        return self._closure({0})

    def step(self, states: frozenset[int], name: str) -> frozenset[int]:
        hidden = name.startswith(".")
        after = set()
        for i in states:
            if i == len(self.parts):
                continue
            if self.regexes[i] is None:
                if not hidden:
                    after.add(i)  # `**` takes this directory and may take more
            elif (not hidden or self.hidden_ok[i]) and self.regexes[i].match(name):
                after.add(i + 1)
        return self._closure(after)

    def done(self, states: frozenset[int]) -> bool:
        return len(self.parts) in states

    def _closure(self, states: set[int]) -> frozenset[int]:
        out = set(states)
        for i in sorted(states):
            while i < len(self.parts) and self.regexes[i] is None:  # `**` may match nothing
                i += 1
                out.add(i)
        return frozenset(out)


def _walk(given: str, top: str, info: os.stat_result, glob: _Glob | None, seen: set[int],
          counter: _Counter) -> Iterator[Found]:
    """Depth-first below `top`. With `glob` None every image below counts; otherwise each
    directory carries the pattern positions reached, until one matches the pattern whole
    (then all below counts). A directory is entered once per set of positions, so links
    back to an ancestor end the walk there."""
    entered: set[tuple[int, int, frozenset[int] | None]] = set()
    states = glob.start() if glob else None
    if glob and glob.done(states):  # "dir/**" matches dir itself
        glob.matched, states = True, None
    stack: list[tuple[str, frozenset[int] | None, Iterator[os.DirEntry[str]]]] = []
    problem = _enter(stack, entered, given, top, info, states)
    if problem:
        counter.unreadable_top = True
        yield Found(given, given, problem.problem)
    while stack:
        directory, states, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = entry.name
        if states is None:
            if name.startswith("."):
                continue
            below, whole = None, True
        else:
            below = glob.step(states, name)
            if not below:
                continue
            whole = glob.done(below)
        path = name if directory == "." else f"{directory.rstrip(os.sep)}{os.sep}{name}"
        try:
            is_dir = entry.is_dir()  # follows links; from the directory listing when it can
        except OSError:
            is_dir = False
        if is_dir:
            if whole and glob:
                glob.matched = True
            try:
                problem = _enter(stack, entered, given, path, entry.stat(),
                                 None if whole else below)
            except OSError as exc:
                problem = Found(given, path, _stat_problem(exc))
            if problem:
                yield problem
            continue
        if not whole or (glob and glob.dirs_only and states is not None):
            continue
        if glob:
            glob.matched = True
        if not _is_image_name(name):
            continue
        try:
            file_info = entry.stat()
        except OSError as exc:
            yield Found(given, path, _stat_problem(exc))
            continue
        reason = file_type_reason(file_info.st_mode)
        if reason:
            yield Found(given, path, reason)
            continue
        counter.matches += 1
        if _first(file_info, seen):
            yield Found(given, path)


def _enter(stack: list, entered: set, given: str, path: str, info: os.stat_result,
           states: frozenset[int] | None) -> Found | None:
    """Push `path`'s sorted listing, unless entered already this way; a problem if unreadable."""
    key = (info.st_dev, info.st_ino, states)
    if key in entered:
        return None
    entered.add(key)
    try:
        with os.scandir(path) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        return Found(given, path, f"cannot read directory ({exc.strerror or exc})")
    stack.append((path, states, iter(entries)))
    return None


def _clean(path: str) -> str:
    """The path as `pathlib` spells it ("a//b/" -> "a/b", "./a" -> "a"), as printed before."""
    return str(Path(path))


def _first(info: os.stat_result, seen: set[int]) -> bool:
    """True the first time a file (device, inode) is seen: hard links and symbolic links to
    one file, or a file named twice, are captioned once."""
    key = (info.st_dev << 64) | info.st_ino
    if key in seen:
        return False
    seen.add(key)
    return True


def _stat_problem(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "broken symbolic link (its target does not exist)"
    return f"cannot read ({exc.strerror or exc})"


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[0] != "." and name[dot:].lower() in IMAGE_EXTENSIONS
