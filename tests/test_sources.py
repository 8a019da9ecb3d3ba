"""Dataset readers on tiny synthetic datasets (every malformed case) and on real Flickr8k."""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pytest

from captioner.data.sources import (
    DATASETS, DatasetError, DatasetWarning, Record, read_coco, read_dataset, read_flickr8k,
    read_flickr8k_kaggle, read_folder, read_karpathy,
)

SPLIT_OF = {"a.jpg": "train", "b.jpg": "train", "c.jpg": "dev", "d.jpg": "test"}


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _images(directory: Path, names) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")  # readers never decode images


def _token_lines(names) -> str:
    return "".join(f"{name}#{k}\t{name[0]} caption {k} .\n" for name in names for k in range(2))


def _split_lists(root: Path, split_of: dict[str, str] = SPLIT_OF) -> None:
    for split in ("train", "dev", "test"):
        names = [n for n, s in split_of.items() if s == split]
        _write(root / f"Flickr_8k.{split}Images.txt", "".join(f"{n}\n" for n in names))


@pytest.fixture
def flickr(tmp_path) -> Path:
    """A four-image Flickr8k: token file, three split lists, images/."""
    _write(tmp_path / "Flickr8k.token.txt", _token_lines(SPLIT_OF))
    _split_lists(tmp_path)
    _images(tmp_path / "images", SPLIT_OF)
    return tmp_path


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        call(*args, **kwargs)
    return str(info.value)


# --- Flickr8k -----------------------------------------------------------------------------

def test_flickr8k_reads_records(flickr):
    records = read_flickr8k(flickr)
    assert [r.image_id for r in records] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert [r.split for r in records] == ["train", "train", "dev", "test"]
    assert records[0] == Record("a.jpg", flickr / "images" / "a.jpg",
                                ("a caption 0 .", "a caption 1 ."), "train")


def test_record_is_frozen_and_hashable(flickr):
    record = read_flickr8k(flickr)[0]
    with pytest.raises(AttributeError):
        record.split = "dev"  # type: ignore[misc]
    assert len({record, record}) == 1


def test_flickr8k_original_image_folder_name(flickr):
    (flickr / "images").rename(flickr / "Flicker8k_Dataset")
    assert read_flickr8k(flickr)[0].path == flickr / "Flicker8k_Dataset" / "a.jpg"


def test_flickr8k_skips_bogus_key_and_unlisted_images_with_counts(flickr):
    extra = "2258277193_586949ec62.jpg.1#0\tpeople waiting\ne.jpg#0\tunlisted\nf.jpg#0\tno\n"
    _write(flickr / "Flickr8k.token.txt", _token_lines(SPLIT_OF) + extra)
    for name in ("e.jpg", "f.jpg"):  # unlisted, but on disk
        (flickr / "images" / name).write_bytes(b"")
    with pytest.warns(DatasetWarning) as caught:
        records = read_flickr8k(flickr)
    messages = [str(w.message) for w in caught]
    assert any("1 known bogus key" in m and "2258277193_586949ec62.jpg.1" in m for m in messages)
    assert any("kept 2 captioned images in no split list with no split" in m and "e.jpg" in m for m in messages)
    assert len(records) == 6 and [r.split for r in records if r.image_id in ("e.jpg", "f.jpg")] == ["", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        assert len(read_flickr8k(flickr, splits=["train", "dev", "test"])) == 4


def test_flickr8k_splits_filter_and_val_alias(flickr):
    assert [r.image_id for r in read_dataset("flickr8k", flickr, splits=["dev"])] == ["c.jpg"]
    assert [r.image_id for r in read_dataset("flickr8k", flickr, splits=["val", "test"])] == [
        "c.jpg", "d.jpg"]
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        read_dataset("flickr8k", flickr, splits=["holdout"])
    assert "no records in split(s) restval" in _error(read_dataset, "flickr8k", flickr,
                                                      splits=["restval"])


@pytest.mark.parametrize("line", ["a.jpg 0\tno hash\n", "a.jpg#0 no tab\n", "#0\tno name\n",
                                  "a.jpg#x\tbad index\n"])
def test_flickr8k_malformed_line(flickr, line):
    _write(flickr / "Flickr8k.token.txt", "a.jpg#0\tfine .\n" + line)
    message = _error(read_flickr8k, flickr)
    assert "Flickr8k.token.txt:2: expected '<image>#<n>\\t<caption>'" in message


@pytest.mark.parametrize("caption", ["", "   "])
def test_flickr8k_empty_caption(flickr, caption):
    _write(flickr / "Flickr8k.token.txt", f"a.jpg#0\tfine .\n\na.jpg#1\t{caption}\n")
    assert "Flickr8k.token.txt:3: empty caption" in _error(read_flickr8k, flickr)


def test_flickr8k_not_utf8(flickr):
    _write(flickr / "Flickr8k.token.txt", b"a.jpg#0\tfine .\na.jpg#1\tcaf\xe9 .\n")
    assert "Flickr8k.token.txt:2: not valid UTF-8" in _error(read_flickr8k, flickr)


def test_flickr8k_duplicate_in_split_list(flickr):
    _write(flickr / "Flickr_8k.trainImages.txt", "a.jpg\nb.jpg\na.jpg\n")
    message = _error(read_flickr8k, flickr)
    assert "Flickr_8k.trainImages.txt:3: duplicate image a.jpg (first on line 1)" in message


def test_flickr8k_image_in_two_split_lists(flickr):
    _write(flickr / "Flickr_8k.testImages.txt", "d.jpg\na.jpg\n")
    message = _error(read_flickr8k, flickr)
    assert ("Flickr_8k.testImages.txt:2: a.jpg is also listed in Flickr_8k.trainImages.txt"
            in message)


def test_flickr8k_listed_image_without_captions(flickr):
    _write(flickr / "Flickr_8k.devImages.txt", "c.jpg\nz.jpg\n")
    assert "1 image in the split lists have no captions: z.jpg" in _error(read_flickr8k, flickr)


def test_flickr8k_missing_split_list(flickr):
    (flickr / "Flickr_8k.devImages.txt").unlink()
    assert "missing split list(s) Flickr_8k.devImages.txt" in _error(read_flickr8k, flickr)


def test_flickr8k_wrong_root(tmp_path):
    missing = tmp_path / "nowhere"
    assert str(missing) in _error(read_dataset, "flickr8k", missing)
    message = _error(read_dataset, "flickr8k", tmp_path)
    assert str(tmp_path) in message and "Flickr8k.token.txt" in message
    _write(tmp_path / "file", "x")
    assert "not a directory" in _error(read_flickr8k, tmp_path / "file")


def test_flickr8k_without_image_directory(flickr):
    (flickr / "images").rename(flickr / "pictures")
    assert "no image directory" in _error(read_flickr8k, flickr)


def test_missing_images_refused_with_count_and_names(flickr):
    (flickr / "images" / "b.jpg").unlink()
    (flickr / "images" / "d.jpg").unlink()
    message = _error(read_dataset, "flickr8k", flickr)
    assert "2 of 4 captioned images missing on disk" in message
    assert "b.jpg" in message and "d.jpg" in message and "skip_missing" in message


def test_skip_missing_drops_with_counted_warning(flickr):
    (flickr / "images" / "b.jpg").unlink()
    with pytest.warns(DatasetWarning, match="1 of 4 captioned images missing"):
        records = read_dataset("flickr8k", flickr, skip_missing=True)
    assert [r.image_id for r in records] == ["a.jpg", "c.jpg", "d.jpg"]


def test_missing_check_only_covers_wanted_splits(flickr):
    (flickr / "images" / "a.jpg").unlink()
    assert [r.image_id for r in read_dataset("flickr8k", flickr, splits=["test"])] == ["d.jpg"]


def test_image_existence_is_one_directory_listing(tmp_path, monkeypatch):
    names = [f"{i:05d}.jpg" for i in range(3000)]
    split_of = {n: ("train", "dev", "test")[i % 3] for i, n in enumerate(names)}
    _write(tmp_path / "Flickr8k.token.txt", _token_lines(names))
    _split_lists(tmp_path, split_of)
    _images(tmp_path / "images", names)
    stats, scans = Counter(), Counter()
    real_stat, real_scandir = os.stat, os.scandir
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.update([1]) or real_stat(*a, **k))
    monkeypatch.setattr(os, "scandir", lambda p: scans.update([str(p)]) or real_scandir(p))
    assert len(read_flickr8k(tmp_path)) == 3000
    assert scans == Counter({str(tmp_path / "images"): 1})
    assert stats.total() < 20


# --- Flickr8k, Kaggle layout ----------------------------------------------------------------

def _kaggle(root: Path, rows: str) -> Path:
    _write(root / "captions.txt", "image,caption\n" + rows)
    _images(root / "Images", SPLIT_OF)
    return root


def test_kaggle_without_split_lists(tmp_path):
    _kaggle(tmp_path, 'b.jpg,"A dog, running ."\na.jpg,one\nb.jpg,two\nc.jpg,x\nd.jpg,y\n')
    records = read_flickr8k_kaggle(tmp_path)
    assert [r.image_id for r in records] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert records[1] == Record("b.jpg", tmp_path / "Images" / "b.jpg",
                                ("A dog, running .", "two"), "")


def test_kaggle_with_split_lists_and_bom(tmp_path):
    _kaggle(tmp_path, "a.jpg,one\nb.jpg,two\nc.jpg,x\nd.jpg,y\ne.jpg,unlisted\n")
    raw = (tmp_path / "captions.txt").read_bytes()
    (tmp_path / "captions.txt").write_bytes(b"\xef\xbb\xbf" + raw)
    _split_lists(tmp_path)
    (tmp_path / "Images" / "e.jpg").write_bytes(b"")
    with pytest.warns(DatasetWarning, match="kept 1 captioned image in no split list with no split: e.jpg"):
        records = read_dataset("flickr8k-kaggle", tmp_path)
    assert [r.split for r in records] == ["train", "train", "dev", "test", ""]


@pytest.mark.parametrize("rows,expected", [
    ("a.jpg,one\nb.jpg,\n", "captions.txt:3: empty caption"),
    ("a.jpg,one\nb.jpg\n", "captions.txt:3: expected 'image,caption'"),
    ("a.jpg,one\nb.jpg,two,three\n", "captions.txt:3: expected 'image,caption'"),
    ("a.jpg,one\n,two\n", "captions.txt:3: empty image name"),
])
def test_kaggle_malformed_rows(tmp_path, rows, expected):
    _kaggle(tmp_path, rows)
    assert expected in _error(read_flickr8k_kaggle, tmp_path)


def test_kaggle_bad_header_and_encoding(tmp_path):
    _write(tmp_path / "captions.txt", "file,text\na.jpg,one\n")
    _images(tmp_path / "Images", ["a.jpg"])
    assert "captions.txt:1: expected a header" in _error(read_flickr8k_kaggle, tmp_path)
    _write(tmp_path / "captions.txt", b"image,caption\na.jpg,one\na.jpg,\xff\xfe\n")
    assert "captions.txt:3: not valid UTF-8" in _error(read_flickr8k_kaggle, tmp_path)


# --- Karpathy split files -------------------------------------------------------------------

def _karpathy_entry(name: str, split: str, *raws: str, filepath: str | None = None) -> dict:
    entry = {"filename": name, "split": split, "imgid": 0,
             "sentences": [{"raw": raw, "tokens": ["ignored"]} for raw in raws]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def _karpathy(root: Path, entries: list[dict], name: str = "dataset_flickr8k.json") -> Path:
    return _write(root / name, json.dumps({"images": entries, "dataset": "flickr8k"}, indent=1))


def test_karpathy_reads_raw_sentences_and_maps_splits(tmp_path):
    path = _karpathy(tmp_path, [
        _karpathy_entry("b.jpg", "val", "B one .", " B  two . "),
        _karpathy_entry("a.jpg", "train", "A one ."),
        _karpathy_entry("c.jpg", "restval", "C one ."),
        _karpathy_entry("d.jpg", "test", "D one ."),
    ])
    _images(tmp_path / "images", SPLIT_OF)
    records = read_karpathy(path, tmp_path / "images")
    assert [(r.image_id, r.split) for r in records] == [
        ("a.jpg", "train"), ("b.jpg", "dev"), ("c.jpg", "restval"), ("d.jpg", "test")]
    assert records[1].captions == ("B one .", "B two .")
    # The dispatcher takes the directory or the JSON path, and finds images/ beside it.
    assert read_dataset("karpathy", tmp_path) == records == read_dataset("karpathy", path)


def test_karpathy_coco_filepath(tmp_path):
    path = _karpathy(tmp_path, [_karpathy_entry("COCO_val2014_1.jpg", "val", "x",
                                                filepath="val2014")], "dataset_coco.json")
    _images(tmp_path / "images" / "val2014", ["COCO_val2014_1.jpg"])
    (record,) = read_dataset("karpathy", path)
    assert record.path == tmp_path / "images" / "val2014" / "COCO_val2014_1.jpg"
    assert record.image_id == "COCO_val2014_1.jpg"


@pytest.mark.parametrize("entry,expected", [
    (_karpathy_entry("a.jpg", "train", ""), "images[1] (a.jpg) sentences[0]: empty caption"),
    (_karpathy_entry("a.jpg", "holdout", "x"), "images[1] (a.jpg): unknown split 'holdout'"),
    (_karpathy_entry("a.jpg", "train"), "images[1] (a.jpg): no sentences"),
    ({"filename": "a.jpg", "split": "train", "sentences": [{"tokens": ["x"]}]},
     "images[1] (a.jpg) sentences[0]: expected a string under 'raw'"),
    ({"split": "train"}, "images[1]: expected a string under 'filename'"),
    (_karpathy_entry("z.jpg", "train", "again"), "images[1] (z.jpg): image listed twice"),
])
def test_karpathy_malformed_entries(tmp_path, entry, expected):
    path = _karpathy(tmp_path, [_karpathy_entry("z.jpg", "train", "fine"), entry])
    message = _error(read_karpathy, path, tmp_path)
    assert "dataset_flickr8k.json" in message and expected in message


def test_karpathy_invalid_json_and_encoding(tmp_path):
    path = _write(tmp_path / "dataset_flickr8k.json", '{"images": [\n  {"filename": }\n]}')
    assert "dataset_flickr8k.json:2: invalid JSON" in _error(read_karpathy, path, tmp_path)
    _write(path, b'{"images": [\n{"filename": "caf\xe9.jpg"}]}')
    assert "dataset_flickr8k.json:2: not valid UTF-8" in _error(read_karpathy, path, tmp_path)
    _write(path, "[]")
    assert "expected a list under 'images'" in _error(read_karpathy, path, tmp_path)


def test_karpathy_root_must_hold_one_split_file(tmp_path):
    assert "no dataset_*.json" in _error(read_dataset, "karpathy", tmp_path)
    _karpathy(tmp_path, [], "dataset_flickr8k.json")
    _karpathy(tmp_path, [], "dataset_coco.json")
    message = _error(read_dataset, "karpathy", tmp_path)
    assert "dataset_coco.json, dataset_flickr8k.json" in message
    assert str(tmp_path / "x") in _error(read_dataset, "karpathy", tmp_path / "x")


# --- COCO captions files --------------------------------------------------------------------

def _coco(path: Path, images: dict[int, str], notes: list[tuple[int, str]]) -> Path:
    return _write(path, json.dumps({
        "images": [{"id": i, "file_name": name} for i, name in images.items()],
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(notes)],
    }))


def test_read_coco(tmp_path):
    path = _coco(tmp_path / "captions_val2014.json", {2: "b.jpg", 1: "a.jpg", 3: "c.jpg"},
                 [(2, "B one.\n"), (1, "A one."), (2, "B two.")])
    _images(tmp_path / "val2014", ["a.jpg", "b.jpg", "c.jpg"])
    with pytest.warns(DatasetWarning, match="1 image without captions: c.jpg"):
        records = read_coco(path, tmp_path / "val2014", "val")
    assert records == [Record("a.jpg", tmp_path / "val2014" / "a.jpg", ("A one.",), "dev"),
                       Record("b.jpg", tmp_path / "val2014" / "b.jpg", ("B one.", "B two."),
                              "dev")]


@pytest.mark.parametrize("notes,expected", [
    ([(9, "x")], "annotations[0]: image_id 9 is not in 'images'"),
    ([(1, " ")], "annotations[0]: empty caption"),
    ([(1, 7)], "annotations[0]: expected a string under 'caption'"),
])
def test_read_coco_malformed(tmp_path, notes, expected):
    path = _coco(tmp_path / "captions_train2014.json", {1: "a.jpg"}, notes)
    message = _error(read_coco, path, tmp_path, "train")
    assert "captions_train2014.json" in message and expected in message


def test_coco_dispatcher_reads_only_wanted_files(tmp_path):
    _coco(tmp_path / "annotations" / "captions_val2014.json", {1: "v.jpg"}, [(1, "val")])
    _write(tmp_path / "annotations" / "captions_train2014.json", "not json, never read")
    _images(tmp_path / "val2014", ["v.jpg"])
    (record,) = read_dataset("coco", tmp_path, splits=["dev"])
    assert record.split == "dev" and record.path == tmp_path / "val2014" / "v.jpg"
    assert "captions_train2014.json:1: invalid JSON" in _error(read_dataset, "coco", tmp_path)
    assert "no captions file for split(s) test" in _error(read_dataset, "coco", tmp_path,
                                                          splits=["test"])
    _write(tmp_path / "annotations" / "captions_val2017.json", "{}")
    assert "several years (2014, 2017)" in _error(read_dataset, "coco", tmp_path)


# --- plain folder ---------------------------------------------------------------------------

def test_folder_jsonl(tmp_path):
    _images(tmp_path, ["x.jpg", "y.png"])
    _images(tmp_path / "sub", ["z.jpg"])
    _write(tmp_path / "captions.jsonl", "\n".join([
        json.dumps({"image": "y.png", "caption": "first"}),
        "",
        json.dumps({"image": "x.jpg", "captions": ["one", "two"], "split": "val"}),
        json.dumps({"image": "y.png", "caption": "second"}),
        json.dumps({"image": "sub/z.jpg", "caption": "deep"}),
    ]) + "\n")
    records = read_dataset("folder", tmp_path)
    assert records == [
        Record("sub/z.jpg", tmp_path / "sub" / "z.jpg", ("deep",), ""),
        Record("x.jpg", tmp_path / "x.jpg", ("one", "two"), "dev"),
        Record("y.png", tmp_path / "y.png", ("first", "second"), ""),
    ]


def test_folder_csv(tmp_path):
    _images(tmp_path, ["x.jpg", "y.jpg"])
    _write(tmp_path / "captions.csv", 'image,caption\nx.jpg,"one, with comma"\ny.jpg,b\nx.jpg,c\n')
    records = read_folder(tmp_path)
    assert [(r.image_id, r.captions) for r in records] == [
        ("x.jpg", ("one, with comma", "c")), ("y.jpg", ("b",))]


@pytest.mark.parametrize("line,expected", [
    ('{"image": "x.jpg", "caption": ""}', ":2: empty caption"),
    ('{"image": "x.jpg", "captions": []}', ":2: empty 'captions' list"),
    ('{"image": "x.jpg", "captions": ["a", 3]}', ":2: captions must be strings"),
    ('{"caption": "no image"}', ":2: expected a string under 'image'"),
    ('{"image": "x.jpg", "caption": "x", "split": "nope"}', ":2: unknown split 'nope'"),
    ('{"image": "x.jpg", "caption": "x", "split": "test"}\n{"image": "x.jpg", "caption": "y", "split": "val"}',
     ":3: x.jpg is in split 'dev' here but in split 'test' on line 2 (one image in two splits)"),
    ('{"image": "x.jpg", "caption": ', ":2: invalid JSON"),
    ('["x.jpg", "caption"]', ":2: expected a string under 'image'"),
])
def test_folder_jsonl_malformed(tmp_path, line, expected):
    _images(tmp_path, ["x.jpg"])
    _write(tmp_path / "captions.jsonl", '{"image": "x.jpg", "caption": "ok"}\n' + line + "\n")
    assert f"captions.jsonl{expected}" in _error(read_folder, tmp_path)


def test_folder_problems(tmp_path):
    _images(tmp_path, ["x.jpg"])
    assert "no captions.jsonl or captions.csv" in _error(read_folder, tmp_path)
    _write(tmp_path / "captions.jsonl", b'{"image": "x.jpg", "caption": "\xc3("}\n')
    assert "captions.jsonl:1: not valid UTF-8" in _error(read_folder, tmp_path)
    _write(tmp_path / "captions.jsonl", '{"image": "gone.jpg", "caption": "x"}\n')
    assert "1 of 1 captioned image missing on disk" in _error(read_folder, tmp_path)
    with pytest.warns(DatasetWarning):
        assert "no captioned images" in _error(read_folder, tmp_path, skip_missing=True)
    _write(tmp_path / "captions.jsonl", "\n")
    assert "no captioned images" in _error(read_folder, tmp_path)
    _write(tmp_path / "captions.csv", "image,caption\n")
    assert "both captions.jsonl and captions.csv" in _error(read_folder, tmp_path)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'flickr9k'"):
        read_dataset("flickr9k", tmp_path)
    assert set(DATASETS) == {"flickr8k", "flickr8k-kaggle", "karpathy", "coco", "folder"}


# --- real Flickr8k --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_flickr8k(flickr8k_root) -> list[Record]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        everything = read_flickr8k(flickr8k_root)
    messages = [str(w.message) for w in caught]
    assert any("1 known bogus key" in m for m in messages)
    assert any("kept 91 captioned images in no split list" in m for m in messages)
    assert len(everything) == 8091 and sum(r.split == "" for r in everything) == 91
    return [r for r in everything if r.split]


def test_real_flickr8k_split_sizes(real_flickr8k):
    assert Counter(r.split for r in real_flickr8k) == {"train": 6000, "dev": 1000, "test": 1000}
    assert all(len(r.captions) == 5 for r in real_flickr8k)
    assert len({r.image_id for r in real_flickr8k}) == 8000
    assert not any(r.image_id.endswith(".1") for r in real_flickr8k)


def test_real_karpathy_agrees_with_flickr8k(real_flickr8k, flickr8k_root):
    karpathy = read_dataset("karpathy", flickr8k_root / "dataset_flickr8k.json")
    assert karpathy == real_flickr8k  # same ids, splits, paths and captions in the same order


def test_real_kaggle_agrees_with_flickr8k(real_flickr8k, flickr8k_root):
    with pytest.warns(DatasetWarning, match="kept 91 captioned images in no split list"):
        kaggle = read_dataset("flickr8k-kaggle", flickr8k_root)
    assert [r for r in kaggle if r.split] == real_flickr8k


def test_real_flickr8k_one_split(flickr8k_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        test = read_dataset("flickr8k", flickr8k_root, splits=["test"])
    assert len(test) == 1000 and {r.split for r in test} == {"test"}
