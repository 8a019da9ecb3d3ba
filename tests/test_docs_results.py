"""docs/results.jsonl holds every figure the docs report; these checks keep it well formed,
keep the default model's row equal to the scores its file carries, and keep the docs about
the product (no development-process vocabulary)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.jsonl"
DEFAULT_NAME = "flickr8k-att-gru512-scst-soup"

UNIT_INTERVAL = {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bleu4_min", "bleu4_max", "greedy_dev_bleu4_best",
                 "greedy_dev_bleu1_best", "ratio_to_encoder_only"}
COUNTS = {"distinct_captions", "distinct_words", "best_epoch", "epochs"}
NON_METRICS = {"id", "model", "release", "config", "split", "decoding", "members", "source", "kind", "note",
               "benchmark", "demo_captions", "demo_check", "demo_cat", "chosen_on_dev", "train_time",
               "greedy_dev_bleu4_by_epoch", "distinct_captions_by_epoch"}
BANNED = re.compile(r"\bses[s]ion|\bissu[e]\s+#?\d", re.IGNORECASE)  # [s], [e]: this line must not match itself


def load_rows() -> list[dict]:
    rows = []
    for number, line in enumerate(RESULTS.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"results.jsonl:{number}: empty line"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            pytest.fail(f"results.jsonl:{number}: not JSON ({exc})")
        assert isinstance(row, dict), f"results.jsonl:{number}: not an object"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_rows()


def metrics(row: dict) -> dict[str, object]:
    return {k: v for k, v in row.items() if k not in NON_METRICS}


def test_every_line_parses_and_ids_are_unique(rows):
    assert len(rows) > 100
    ids = [row.get("id") for row in rows]
    assert all(isinstance(i, str) and i for i in ids), "every row needs an id"
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, duplicates


def test_every_row_has_split_decoding_and_a_metric(rows):
    for row in rows:
        rid = row["id"]
        assert isinstance(row.get("split"), str) and row["split"], rid
        if row.get("kind") is None:  # quality rows: scored on a Flickr8k split
            assert row["split"] in ("dev", "test"), rid
        assert isinstance(row.get("decoding"), dict) and row["decoding"], rid
        for key in ("model", "source"):
            assert isinstance(row.get(key), str) and row[key], (rid, key)
        assert "release" in row and "config" in row, rid
        assert metrics(row), f"{rid}: no metric"


def test_metric_values_are_finite_and_in_range(rows):
    for row in rows:
        for key, value in metrics(row).items():
            where = f"{row['id']}: {key}={value!r}"
            assert isinstance(value, (int, float)) and not isinstance(value, bool), where
            assert math.isfinite(value) and value >= 0, where
            if key in UNIT_INTERVAL:
                assert 0 <= value <= 1, where
            if key == "cider_d":
                assert value <= 10, where
            if key in COUNTS:
                assert value == int(value), where
            if key in ("distinct_captions", "distinct_words"):
                assert value <= 1000, where  # a split has 1,000 images
        if "bleu4_min" in row:
            assert row["bleu4_min"] <= row["bleu4_max"], row["id"]


def test_default_model_row_matches_the_shipped_file(rows):
    from captioner.api import DEFAULT_MODEL
    from captioner.modelfile import load_model

    if not DEFAULT_MODEL.is_file():
        pytest.skip("this install ships no default model")
    model = load_model(DEFAULT_MODEL)
    beam = model.decoding.beam_size  # the row at the model's own default decoding
    stored = model.scores["test"][f"beam{beam}"]
    row_id = f"{DEFAULT_NAME}/int8/test/beam{beam}"
    row = next((r for r in rows if r["id"] == row_id), None)
    assert row is not None, f"no row {row_id}"
    assert row["model"] == DEFAULT_NAME and row["split"] == "test"
    assert model.name == DEFAULT_NAME
    assert row["decoding"]["beam_size"] == beam
    assert row["decoding"]["precision"] == model.scores.get("precision", "int8")
    assert row["decoding"]["length_penalty"] == model.scores.get("length_penalty", 0.0)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4"):
        assert abs(row[key] - stored[key]) <= 5e-5, (key, row[key], stored[key])
    for key in ("distinct_captions", "distinct_words"):
        if key in stored:
            assert row[key] == stored[key], (key, row[key], stored[key])


def product_docs() -> list[Path]:
    return sorted([*(ROOT / "docs").glob("*.md"), RESULTS, ROOT / "CHANGELOG.md"])


def readmes() -> list[Path]:
    found = [p for p in ROOT.rglob("README*.md")
             if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
             and "node_modules" not in p.parts]
    return sorted(found)


def banned_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
            for n, line in enumerate(text.splitlines(), 1) if BANNED.search(line)]


@pytest.mark.parametrize("path", product_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_the_product_not_how_it_was_made(path):
    if not path.exists():
        pytest.skip(f"{path.name} not written yet")
    assert not banned_lines(path)


@pytest.mark.parametrize("path", readmes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_readmes_describe_the_product_not_how_it_was_made(path):
    assert not banned_lines(path)
