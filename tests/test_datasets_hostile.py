"""Datasets cannot leak or escape: one spelling per image, one split per image, no image
name outside the dataset's folder, and repeated keys or entries refused, each as one
DatasetError line naming the file (and line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.data.sources import (
    DatasetError, Record, parse_split, read_coco, read_dataset, read_flickr8k, read_flickr8k_kaggle, read_folder,
    read_karpathy,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")  # readers never decode images


def error(call, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def flickr(root: Path, tokens: str, train: str = "a.jpg\n", dev: str = "b.jpg\n", test: str = "c.jpg\n") -> Path:
    write(root / "Flickr8k.token.txt", tokens)
    write(root / "Flickr_8k.trainImages.txt", train)
    write(root / "Flickr_8k.devImages.txt", dev)
    write(root / "Flickr_8k.testImages.txt", test)
    touch(root / "images", "a.jpg", "b.jpg", "c.jpg")
    return root


TOKENS = "a.jpg#0\ta dog .\nb.jpg#0\ta cat .\nc.jpg#0\ta cow .\n"


# --- one spelling per image -------------------------------------------------------------------

def test_three_spellings_of_one_name_are_one_image(tmp_path):
    root = flickr(tmp_path, "a.jpg#0\tone .\n./a.jpg#1\ttwo .\n.//a.jpg#2\tthree .\nb.jpg#0\tb .\nc.jpg#0\tc .\n")
    records = read_flickr8k(root)
    assert [r.image_id for r in records] == ["a.jpg", "b.jpg", "c.jpg"]
    assert records[0] == Record("a.jpg", root / "images" / "a.jpg", ("one .", "two .", "three ."), "train")


def test_folder_names_are_normalised(tmp_path):
    touch(tmp_path, "x.jpg", "sub/y.jpg")
    write(tmp_path / "captions.jsonl", "\n".join(json.dumps(line) for line in [
        {"image": "x.jpg", "caption": "one"},
        {"image": "./x.jpg", "caption": "two"},
        {"image": "sub/../sub//y.jpg", "caption": "deep"},
        {"image": str(tmp_path / "x.jpg"), "caption": "absolute, inside"},
    ]) + "\n")
    records = read_folder(tmp_path)
    assert records == [Record("sub/y.jpg", tmp_path / "sub" / "y.jpg", ("deep",), ""),
                       Record("x.jpg", tmp_path / "x.jpg", ("one", "two", "absolute, inside"), "")]


# --- one split per image ----------------------------------------------------------------------

def test_a_respelled_image_in_two_flickr8k_split_lists(tmp_path):
    root = flickr(tmp_path, TOKENS, test="c.jpg\n./a.jpg\n")
    message = error(read_flickr8k, root)
    assert message.startswith(f"{root / 'Flickr_8k.testImages.txt'}:2: a.jpg is also listed in "
                              "Flickr_8k.trainImages.txt:1")
    assert "two splits: train and test" in message


def test_a_respelled_image_twice_in_one_split_list(tmp_path):
    root = flickr(tmp_path, TOKENS, train="a.jpg\n\n.//a.jpg\n")
    assert error(read_flickr8k, root) == (f"{root / 'Flickr_8k.trainImages.txt'}:3: duplicate image a.jpg "
                                          "(first on line 1)")


def test_a_respelled_image_in_two_folder_splits(tmp_path):
    touch(tmp_path, "x.jpg")
    write(tmp_path / "captions.csv", "image,caption,split\nx.jpg,a dog,train\n./x.jpg,a dog again,test\n")
    assert error(read_folder, tmp_path) == (f"{tmp_path / 'captions.csv'}:3: x.jpg is in split 'test' here but "
                                            "in split 'train' on line 2 (one image in two splits)")


def test_a_row_without_a_split_takes_the_image_split(tmp_path):
    """Leaving the split out is not a second split (data/README.md's example does it)."""
    touch(tmp_path, "beach.jpg")
    write(tmp_path / "captions.jsonl", json.dumps({"image": "beach.jpg", "caption": "a dog"}) + "\n"
          + json.dumps({"image": "./beach.jpg", "caption": "a brown dog", "split": "train"}) + "\n"
          + json.dumps({"image": "beach.jpg", "caption": "a dog by the sea"}) + "\n")
    assert read_folder(tmp_path) == [Record("beach.jpg", tmp_path / "beach.jpg",
                                            ("a dog", "a brown dog", "a dog by the sea"), "train")]


def test_an_image_in_both_coco_files(tmp_path):
    for part, names in (("train2014", ["t.jpg", "both.jpg"]), ("val2014", ["both.jpg"])):
        write(tmp_path / "annotations" / f"captions_{part}.json", json.dumps({
            "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": i, "image_id": i, "caption": "x"} for i in range(len(names))]}))
        touch(tmp_path / part, *names)
    message = error(read_dataset, "coco", tmp_path)
    assert message.startswith(f"{tmp_path / 'annotations' / 'captions_val2014.json'}: both.jpg is also in "
                              f"{tmp_path / 'annotations' / 'captions_train2014.json'}")
    assert "two splits, train and dev" in message


def test_karpathy_respelled_twice_names_both_entries_and_splits(tmp_path):
    entries = [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},
               {"filename": "./a.jpg", "split": "test", "sentences": [{"raw": "y"}]}]
    path = write(tmp_path / "dataset_flickr8k.json", json.dumps({"images": entries}))
    assert error(read_karpathy, path, tmp_path) == (
        f"{path}: images[1] (./a.jpg): image listed twice (also images[0]: one image in two splits, train and test)")


def test_two_karpathy_names_of_one_file(tmp_path):
    touch(tmp_path / "images", "sub/x.jpg")
    entries = [{"filename": "sub/x.jpg", "split": "train", "sentences": [{"raw": "x"}]},
               {"filename": "x.jpg", "filepath": "sub", "split": "test", "sentences": [{"raw": "y"}]}]
    path = write(tmp_path / "dataset_coco.json", json.dumps({"images": entries}))
    message = error(read_karpathy, path, tmp_path / "images")
    assert "sub/x.jpg (split 'train') and x.jpg (split 'test') are the same image file" in message


# --- nothing outside the folder ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["../secret.jpg", "sub/../../secret.jpg", "/etc/passwd"])
def test_folder_names_cannot_leave_the_folder(tmp_path, name):
    root = tmp_path / "data"
    touch(root, "x.jpg")
    touch(tmp_path, "secret.jpg")
    write(root / "captions.jsonl", json.dumps({"image": "x.jpg", "caption": "fine"}) + "\n"
          + json.dumps({"image": name, "caption": "escape"}) + "\n")
    message = error(read_folder, root)
    assert message.startswith(f"{root / 'captions.jsonl'}:2: image {name!r}")
    assert "outside the image folder" in message


def test_csv_kaggle_and_token_names_cannot_leave_the_folder(tmp_path):
    touch(tmp_path / "f", "x.jpg")
    write(tmp_path / "f" / "captions.csv", "image,caption\nx.jpg,ok\n../x.jpg,escape\n")
    assert error(read_folder, tmp_path / "f").startswith(f"{tmp_path / 'f' / 'captions.csv'}:3: image '../x.jpg'")
    kaggle = tmp_path / "k"
    touch(kaggle / "Images", "x.jpg")
    write(kaggle / "captions.txt", "image,caption\nx.jpg,ok\n../../x.jpg,escape\n")
    assert error(read_flickr8k_kaggle, kaggle).startswith(f"{kaggle / 'captions.txt'}:3: image '../../x.jpg' points")
    root = flickr(tmp_path / "t", TOKENS + "../c.jpg#1\tescape .\n")
    assert error(read_flickr8k, root).startswith(f"{root / 'Flickr8k.token.txt'}:4: image '../c.jpg' points outside")
    root = flickr(tmp_path / "s", TOKENS, dev="b.jpg\n../b.jpg\n")
    assert error(read_flickr8k, root).startswith(f"{root / 'Flickr_8k.devImages.txt'}:2: image '../b.jpg'")


def test_json_names_cannot_leave_the_folder(tmp_path):
    entry = {"filename": "a.jpg", "filepath": "../elsewhere", "split": "train", "sentences": [{"raw": "x"}]}
    path = write(tmp_path / "dataset_coco.json", json.dumps({"images": [entry]}))
    assert error(read_karpathy, path, tmp_path / "images").startswith(f"{path}: images[0] (a.jpg): image ")
    coco = write(tmp_path / "captions_val2014.json", json.dumps({
        "images": [{"id": 1, "file_name": "/tmp/x.jpg"}], "annotations": []}))
    message = error(read_coco, coco, tmp_path / "val2014", "val")
    assert message.startswith(f"{coco}: images[0]: image '/tmp/x.jpg' is outside the image folder")


def test_names_that_are_no_file(tmp_path):
    touch(tmp_path, "x.jpg")
    for name, expected in ((".", "'.' is not an image file name"), ("a\u0000.jpg", "NUL byte")):
        write(tmp_path / "captions.jsonl", json.dumps({"image": name, "caption": "x"}) + "\n")
        assert expected in error(read_folder, tmp_path)


# --- repeated keys and entries ----------------------------------------------------------------

def test_a_repeated_flickr8k_key(tmp_path):
    root = flickr(tmp_path, TOKENS + "\n./a.jpg#0\tanother first caption .\n")
    assert error(read_flickr8k, root) == (f"{root / 'Flickr8k.token.txt'}:5: duplicate key a.jpg#0 "
                                          "(first on line 1)")


def test_the_same_caption_under_two_keys_is_kept(tmp_path):
    """Annotators sometimes wrote the same sentence (10 images of the real Flickr8k)."""
    root = flickr(tmp_path, TOKENS + "a.jpg#1\ta dog .\n")
    assert read_flickr8k(root)[0].captions == ("a dog .", "a dog .")


def test_two_captions_lists_for_one_image(tmp_path):
    touch(tmp_path, "x.jpg")
    lines = [{"image": "x.jpg", "captions": ["a", "b"]}, {"image": "x.jpg", "caption": "c"},
             {"image": "./x.jpg", "captions": ["a", "b"]}]
    write(tmp_path / "captions.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    assert error(read_folder, tmp_path) == (f"{tmp_path / 'captions.jsonl'}:3: repeated entry: x.jpg already has "
                                            "a \"captions\" list on line 1")
    write(tmp_path / "captions.jsonl", "".join(json.dumps(line) + "\n" for line in lines[:2]))
    assert read_folder(tmp_path)[0].captions == ("a", "b", "c")  # a list plus one-caption rows merge


def test_coco_repeats(tmp_path):
    touch(tmp_path / "val2014", "a.jpg", "b.jpg")

    note = {"id": 7, "image_id": 1, "caption": "x"}
    cases = [
        ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], [note],
         "images[1]: image id 1 listed twice"),
        ([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "./a.jpg"}], [note],
         "images[1]: a.jpg listed twice (also images[0])"),
        ([{"id": 1, "file_name": "a.jpg"}], [note, {**note, "caption": "y"}],
         "annotations[1]: annotation id 7 listed twice"),
    ]
    path = tmp_path / "captions_val2014.json"
    for images, notes, expected in cases:
        write(path, json.dumps({"images": images, "annotations": notes}))
        assert error(read_coco, path, tmp_path / "val2014", "val") == f"{path}: {expected}"
    write(path, json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [note, {**note, "id": 8}]}))
    assert read_coco(path, tmp_path / "val2014", "val")[0].captions == ("x", "x")  # same text: kept


# --- names of splits and datasets -------------------------------------------------------------

def test_parse_split():
    assert [parse_split(s) for s in ("train", " VAL", "dev", "test", "restval", "")] == [
        "train", "dev", "dev", "test", "restval", ""]
    with pytest.raises(DatasetError, match="unknown split 'holdout'; choose from train, dev, test, restval"):
        parse_split("holdout")


def test_unknown_dataset_is_a_dataset_error(tmp_path):
    assert error(read_dataset, "flickr9k", tmp_path).startswith("unknown dataset 'flickr9k'; choose from flickr8k")
