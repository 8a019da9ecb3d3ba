"""iter_images / find_images on ordinary and hostile trees, all generated here."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from captioner import discovery
from captioner.discovery import Found, find_images, iter_images
from captioner.images import ImageLoadError, load_image


def _within(seconds: float, fn, *args):
    """fn(*args) in a thread; fail instead of hanging the suite if it does not return."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _photo(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _relative(paths, root: Path) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


@pytest.fixture
def tree(tmp_path) -> Path:
    for name in ["b.jpg", "a.PNG", "notes.txt", ".hidden.jpg", "sub/c.JPEG", "sub/deeper/d.webp",
                 ".git/e.jpg", "empty/readme.md"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())  # distinct contents: distinct files
    return tmp_path


# --- ordinary trees ----------------------------------------------------------------------------

def test_find_images_expands_directories_recursively_and_sorted(tree):
    found, problems = find_images([str(tree)])
    assert _relative(found, tree) == ["a.PNG", "b.jpg", "sub/c.JPEG", "sub/deeper/d.webp"]
    assert all(isinstance(p, Path) for p in found)
    assert problems == []


def test_find_images_keeps_explicit_files_and_reports_misses(tree):
    given = [str(tree / "notes.txt"), str(tree / "nope.jpg"), str(tree / "empty"),
             str(tree / "b.jpg")]
    found, problems = find_images(given)
    assert found == [tree / "notes.txt", tree / "b.jpg"]
    assert problems == [(given[1], "no such file or directory"),
                        (given[2], "no images found in directory")]


def test_find_images_globs_and_dedup(tree):
    found, problems = find_images([str(tree / "**" / "*.*"), str(tree / "b.jpg"),
                                   f"{tree}/./b.jpg", str(tree / "*.gif")])
    assert _relative(found, tree) == ["a.PNG", "b.jpg", "sub/c.JPEG", "sub/deeper/d.webp"]
    assert problems == [(str(tree / "*.gif"), "no such file or directory")]


def test_find_images_glob_matching_only_non_images(tree):
    found, problems = find_images([str(tree / "*.txt")])
    assert found == [] and problems == [(str(tree / "*.txt"), "no images match this pattern")]


def test_order_is_path_order_per_directory_not_listing_order(tmp_path):
    names = ["z.jpg", "a/x.jpg", "a-b.jpg", "a.jpg", "B.jpg", "a/b/c.jpg", "a0.png"]
    for name in names:
        _photo(tmp_path / name)
    found = [f.path for f in iter_images([str(tmp_path)])]
    assert found == [str(p) for p in sorted(Path(tmp_path, n) for n in names)]  # by components
    assert _relative(found, tmp_path) == ["B.jpg", "a/b/c.jpg", "a/x.jpg", "a-b.jpg", "a.jpg",
                                          "a0.png", "z.jpg"]


def test_paths_are_spelled_as_pathlib_does(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert [f.path for f in iter_images(["sub//", "./b.jpg"])] == [
        "sub/c.JPEG", "sub/deeper/d.webp", "b.jpg"]
    assert [f.path for f in iter_images(["."])][:2] == ["a.PNG", "b.jpg"]
    assert [f.path for f in iter_images(["*.jpg", "./sub/*.JPEG"])] == ["b.jpg", "sub/c.JPEG"]


def test_hidden_names_are_skipped_when_walking_but_kept_when_named(tree):
    named = str(tree / ".git" / "e.jpg")
    assert [f.path for f in iter_images([named])] == [named]
    assert [f.path for f in iter_images([str(tree / ".git")])] == [named]  # a named folder
    found = [f.path for f in iter_images([str(tree / "**" / "*.jpg")])]
    assert found == [str(tree / "b.jpg")]
    assert [f.problem for f in iter_images([str(tree / ".*.jpg")])] == [
        "no images match this pattern"]  # matched, but hidden files are not taken as images
    _photo(tree / "sub" / ".thumbs" / "t.jpg")
    assert [f.path for f in iter_images([f"{tree}/*/.thumbs/*.jpg"])] == [
        str(tree / "sub" / ".thumbs" / "t.jpg")]  # a hidden folder the pattern names


def test_ico_is_picked_up_when_walking(tmp_path):
    Image.new("RGBA", (16, 16), (1, 2, 3, 255)).save(tmp_path / "favicon.ico")
    assert _relative([f.path for f in iter_images([str(tmp_path)])], tmp_path) == ["favicon.ico"]


def test_glob_wildcards_stay_within_one_component(tmp_path):
    for name in ["a1.jpg", "a2.jpg", "ab.jpg", "x/a3.jpg", "x/y/a4.jpg", "x/y/z/a5.jpg"]:
        _photo(tmp_path / name)
    base = str(tmp_path)

    def matched(pattern: str) -> list[str]:
        return _relative([f.path for f in iter_images([f"{base}/{pattern}"]) if f.ok], tmp_path)

    assert matched("a?.jpg") == ["a1.jpg", "a2.jpg", "ab.jpg"]
    assert matched("a[0-9].jpg") == ["a1.jpg", "a2.jpg"]
    assert matched("a[!0-9].jpg") == ["ab.jpg"]
    assert matched("*.jpg") == ["a1.jpg", "a2.jpg", "ab.jpg"]  # `*` does not cross '/'
    assert matched("*/a*.jpg") == ["x/a3.jpg"]
    assert matched("x/**/a*.jpg") == ["x/a3.jpg", "x/y/a4.jpg", "x/y/z/a5.jpg"]  # ** = 0+ dirs
    assert matched("**/y/*.jpg") == ["x/y/a4.jpg"]
    assert matched("x/*") == ["x/a3.jpg", "x/y/a4.jpg", "x/y/z/a5.jpg"]  # a matched folder: all
    assert matched("x/*/") == ["x/y/a4.jpg", "x/y/z/a5.jpg"]  # trailing '/': folders only


def test_streaming_starts_before_the_tree_is_listed(tmp_path, monkeypatch):
    for i in range(30):
        for j in range(5):
            (tmp_path / f"d{i:02d}").mkdir(exist_ok=True)
            (tmp_path / f"d{i:02d}" / f"{j}.jpg").write_bytes(b"x")
    listed = []
    real_scandir = os.scandir

    def counting_scandir(path):
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(discovery.os, "scandir", counting_scandir)
    stream = iter_images([str(tmp_path)])
    first = next(stream)
    assert first.path == str(tmp_path / "d00" / "0.jpg")
    assert len(listed) == 2  # the top folder and the first subfolder, not 31
    assert sum(1 for _ in stream) == 30 * 5 - 1


def test_each_file_once_across_hard_links_symlinks_and_repeats(tree):
    os.link(tree / "b.jpg", tree / "hard.jpg")
    os.symlink(tree / "a.PNG", tree / "soft.png")
    found, problems = find_images([str(tree), str(tree / "b.jpg"), str(tree)])
    assert _relative(found, tree) == ["a.PNG", "b.jpg", "sub/c.JPEG", "sub/deeper/d.webp"]
    assert problems == []  # a folder whose images were all given already is not "empty"


# --- hostile trees -----------------------------------------------------------------------------

def test_fifo_named_jpg_in_a_folder_is_reported_not_opened(tmp_path):
    good = [_photo(tmp_path / "a.jpg"), _photo(tmp_path / "c.png", (0, 0, 255))]
    os.mkfifo(tmp_path / "x.jpg")  # no writer: opening it would block for ever

    def caption_all():
        results = []
        for found in iter_images([str(tmp_path)]):
            if not found.ok:
                results.append((found.path, found.problem))
                continue
            try:
                results.append((found.path, load_image(found.path).size))
            except ImageLoadError as exc:
                results.append((found.path, exc.reason))
        return results

    assert _within(5, caption_all) == [
        (str(good[0]), (8, 8)), (str(good[1]), (8, 8)),
        (str(tmp_path / "x.jpg"), "not a regular file (FIFO)")]


def test_fifo_and_device_named_explicitly_are_one_line_each(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    given = [str(tmp_path / "pipe.jpg"), "/dev/null"]
    found = _within(5, list, iter_images(given))
    assert found == [Found(given[0], given[0], "not a regular file (FIFO)"),
                     Found("/dev/null", "/dev/null", "not a regular file (character device)")]


def test_folder_with_two_symlinks_to_itself_terminates(tmp_path):
    loop = tmp_path / "loop"
    _photo(loop / "a.jpg")
    _photo(loop / "sub" / "b.jpg")
    os.symlink(".", loop / "self1")
    os.symlink(loop, loop / "self2")
    os.symlink("..", loop / "sub" / "up")
    for given in [str(loop), f"{loop}/**/*.jpg", f"{loop}/**"]:
        found, problems = _within(5, find_images, [given])
        assert _relative(found, loop) == ["a.jpg", "sub/b.jpg"] and problems == [], given
    # Matched folders are walked in name order, so "self1" comes before "sub".
    assert _relative(find_images([f"{loop}/*"])[0], loop) == ["a.jpg", "self1/sub/b.jpg"]
    # Exactly three folders deep: only through the links, and still each image once.
    found, _ = _within(5, find_images, [f"{loop}/*/*/*/*.jpg"])
    assert _relative(found, loop) == ["self1/self1/self1/a.jpg", "self1/self1/sub/b.jpg"]


def test_symlink_to_an_ancestor_terminates(tmp_path):
    top = tmp_path / "top"
    _photo(top / "one.jpg")
    _photo(top / "mid" / "two.jpg")
    os.symlink("../..", top / "mid" / "back")  # -> tmp_path, the parent of the folder given
    found, problems = _within(5, find_images, [str(top), f"{top}/**/*.jpg"])
    real = [os.path.realpath(p) for p in found]
    assert sorted(real) == sorted({os.path.realpath(top / "one.jpg"),
                                   os.path.realpath(top / "mid" / "two.jpg")})
    assert problems == []


def test_walk_of_a_deep_loop_is_fast(tmp_path):
    # Python's glob.glob(recursive=True) follows such links into ever longer paths, for minutes.
    _photo(tmp_path / "a.jpg")
    for i in range(4):
        os.symlink(".", tmp_path / f"link{i}")
    start = time.monotonic()
    found, _ = _within(5, find_images, [f"{tmp_path}/**/*.jpg"])
    assert _relative(found, tmp_path) == ["a.jpg"]
    assert time.monotonic() - start < 1


def test_broken_and_looping_symlinks_are_one_line_each(tmp_path):
    _photo(tmp_path / "ok.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    found = list(iter_images([str(tmp_path)]))
    assert [(f.path, f.problem) for f in found] == [
        (str(tmp_path / "broken.jpg"), "broken symbolic link (its target does not exist)"),
        (str(tmp_path / "loop.jpg"), "cannot read (Too many levels of symbolic links)"),
        (str(tmp_path / "ok.jpg"), None)]
    named = list(iter_images([str(tmp_path / "broken.jpg")]))
    assert [f.problem for f in named] == ["broken symbolic link (its target does not exist)"]


def _refuse_listing(monkeypatch, refused: Path) -> None:
    """Make one directory unreadable (chmod does not stop root, so refuse in scandir)."""
    real_scandir = os.scandir

    def scandir(path):
        if os.path.realpath(path) == os.path.realpath(refused):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(discovery.os, "scandir", scandir)


def test_unreadable_subfolder_is_one_line_and_the_rest_is_walked(tree, monkeypatch):
    _refuse_listing(monkeypatch, tree / "sub")
    found = list(iter_images([str(tree)]))
    assert [(Path(f.path).relative_to(tree).as_posix(), f.problem) for f in found] == [
        ("a.PNG", None), ("b.jpg", None), ("sub", "cannot read directory (Permission denied)")]


def test_unreadable_folder_given_is_one_line(tree, monkeypatch):
    _refuse_listing(monkeypatch, tree)
    assert find_images([str(tree)]) == (
        [], [(str(tree), "cannot read directory (Permission denied)")])
