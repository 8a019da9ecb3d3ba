"""`captioner caption` per the CLI contract, and the Python API."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import captioner.api as api
from captioner import Captioner
from captioner.modelfile import ModelFileError

REPO = Path(__file__).resolve().parents[1]
DEMO = sorted((REPO / "demo" / "images").glob("*.jpg"))


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", "caption", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_one_bad_file_among_good_ones(tiny_model_file, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("this is not a picture")
    proc = run_cli(str(DEMO[0]), str(bad), str(DEMO[1]), "--model", str(tiny_model_file), "--beam-size", "2")
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"captioner: error: {bad}: ")
    lines = proc.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(DEMO[0]), str(DEMO[1])]
    assert all(line.split("\t")[1] for line in lines)


@pytest.mark.slow
def test_directories_globs_jsonl_and_n_best(tiny_model_file, tmp_path):
    proc = run_cli(str(REPO / "demo" / "images"), str(REPO / "demo" / "images" / "c*.jpg"), "--model",
                   str(tiny_model_file), "--format", "jsonl", "--beam-size", "3", "--n-best", "3")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in DEMO]  # deduplicated, in order
    for r in rows:
        assert set(r) == {"image", "caption", "log_prob", "alternatives"}
        assert len(r["alternatives"]) == 3 and r["alternatives"][0]["caption"] == r["caption"]
        scores = [a["score"] for a in r["alternatives"]]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_nothing_found_and_usage_errors(tiny_model_file, tmp_path):
    proc = run_cli(str(tmp_path / "missing.jpg"), "--model", str(tiny_model_file))
    assert proc.returncode == 1 and "no such file or directory" in proc.stderr
    assert run_cli("--model", str(tiny_model_file)).returncode == 2
    assert run_cli(str(DEMO[0]), "--beam-size", "2", "--n-best", "3").returncode == 2
    assert run_cli(str(DEMO[0]), "--bogus").returncode == 2


@pytest.mark.slow
def test_attention_maps_written(tiny_model_file, tmp_path):
    out = tmp_path / "maps"
    proc = run_cli(str(DEMO[0]), "--model", str(tiny_model_file), "--attention-maps", str(out))
    assert proc.returncode == 0, proc.stderr
    png = out / f"{DEMO[0].stem}.attention.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 224 * 2


@pytest.mark.slow
def test_caption_does_not_import_lightning(tiny_model_file):
    code = ("import sys; from captioner.cli import main; "
            f"rc = main(['caption', {str(DEMO[0])!r}, '--model', {str(tiny_model_file)!r}]); "
            "assert not any(m.startswith(('pytorch_lightning', 'lightning')) for m in sys.modules), 'lightning'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_api_structured_results_paths_and_pil(tiny_model_file, tmp_path):
    model = Captioner.load(tiny_model_file, device="cpu")
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    with Image.open(DEMO[1]) as im:
        pil = im.copy()
    results = model.caption([DEMO[0], bad, pil], beam_size=3, n_best=2, return_attention=True)
    assert [r.ok for r in results] == [True, False, True]
    assert "empty" in results[1].error
    assert results[0].alternatives[0].caption == results[0].caption and len(results[0].alternatives) == 2
    assert len(results[0].attention) == len(results[0].words) + 1
    # the same image as a path or as a PIL image gives the same caption
    assert model.caption(DEMO[1], beam_size=3)[0].caption == results[2].caption


def test_default_model_missing_says_so_and_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "DEFAULT_MODEL", tmp_path / "none.safetensors")
    with pytest.raises(ModelFileError, match="ships no default model; train one"):
        Captioner.load()


@pytest.mark.slow
def test_sampling_is_seeded(tiny_model_file):
    a = run_cli(str(DEMO[0]), "--model", str(tiny_model_file), "--sample", "--seed", "3", "--top-k", "5")
    b = run_cli(str(DEMO[0]), "--model", str(tiny_model_file), "--sample", "--seed", "3", "--top-k", "5")
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.slow
def test_model_decoding_settings_are_the_defaults(tiny_model_file, tmp_path):
    """A model file carries the decoding chosen on dev: the API and the CLI use it unless told
    otherwise; explicit options still win."""
    from captioner.decoding import DecodingConfig
    from captioner.modelfile import load_model, save_model

    model = load_model(tiny_model_file)
    model.decoding = DecodingConfig(beam_size=4, length_penalty=0.7)
    tuned = tmp_path / "tuned.safetensors"
    save_model(tuned, model)
    captioner = Captioner.load(tuned, device="cpu")
    assert (captioner.decoding.beam_size, captioner.decoding.length_penalty) == (4, 0.7)
    implicit = captioner.caption(DEMO[:2], n_best=4)
    explicit = captioner.caption(DEMO[:2], beam_size=4, length_penalty=0.7, n_best=4)
    assert [r.alternatives for r in implicit] == [r.alternatives for r in explicit]
    assert len(implicit[0].alternatives) == 4
    proc = run_cli(str(DEMO[0]), "--model", str(tuned), "--n-best", "4", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["caption"] == implicit[0].caption
    too_many = run_cli(str(DEMO[0]), "--model", str(tuned), "--n-best", "5")
    assert too_many.returncode == 2
    assert too_many.stderr.strip().splitlines()[-1].startswith("captioner: error: n_best 5 needs beam_size >= 5")


def test_bad_decoding_metadata_is_refused(tiny_model_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_model_file), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(tiny_model_file))
    for bad in ('{"beam_size": 0}', '{"beam_size": 2.5}', '{"length_penalty": "x"}', '{"temperature": 0}', '[3]'):
        path = tmp_path / "bad.safetensors"
        save_file(tensors, str(path), metadata={**meta, "decoding": bad})
        with pytest.raises(ModelFileError, match="damaged metadata: decoding"):
            Captioner.load(path, device="cpu")


def test_precision_option(tiny_model_file):
    """--precision float32 gives the float32 decoder's captions; a precision that does not exist
    is a usage error."""
    model = Captioner.load(tiny_model_file, device="cpu")
    expected = model.caption(DEMO[0], beam_size=2, precision="float32")[0].caption
    proc = run_cli(str(DEMO[0]), "--model", str(tiny_model_file), "--beam-size", "2", "--precision", "float32",
                   "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["caption"] == expected
    proc = run_cli(str(DEMO[0]), "--model", str(tiny_model_file), "--precision", "int4")
    assert proc.returncode == 2 and "--precision" in proc.stderr
