"""`captioner recipe flickr8k` end to end on a tiny slice with tiny epochs: every stage runs,
the model file it ships says what it is, and a rerun resumes instead of starting over."""
from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors import safe_open

from captioner.modelfile import load_model
from captioner.recipe import MODEL_NAME, PAIR_NAME, SOUP_WEIGHTS
from captioner.version import __version__

pytestmark = pytest.mark.slow


def recipe(tmp_path, root, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "captioner", "recipe", "flickr8k", "--data-root", str(root),
                           "--workdir", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"),
                           "--limit", "12", "--max-epochs", "1", *extra],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_recipe_runs_every_stage_and_resumes(tmp_path, flickr8k_root):
    proc = recipe(tmp_path, flickr8k_root)
    stages = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("recipe: stage")]
    assert stages[:4] == ["features", "xe", "scst-cider", "scst-bleu"]
    assert stages[4:] == ["soup:", "decoding:", "ship:", "ensemble:", "decoding:", "ship:"]
    out = tmp_path / "work" / f"{MODEL_NAME}.safetensors"
    model = load_model(out)
    assert model.name == MODEL_NAME and model.version == __version__
    assert len(model.members) == 1  # one decoder: the two self-critical ones averaged weight by weight
    cider_weight, bleu_weight = model.training["weights"]  # the mix chosen on dev
    assert round(bleu_weight, 6) in SOUP_WEIGHTS and cider_weight + bleu_weight == pytest.approx(1.0)
    pair = load_model(tmp_path / "work" / f"{PAIR_NAME}.safetensors")
    assert pair.name == PAIR_NAME and len(pair.members) == 2
    with safe_open(str(out), framework="pt") as fh:  # stored as float16, scored as stored
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    assert model.decoding.beam_size in (1, 3, 5) and model.decoding.length_penalty == 0.0
    assert set(model.scores["dev"]) == set(model.scores["test"]) == {"beam1", "beam3", "beam5"}
    assert all(0.0 <= model.scores["test"]["beam1"][k] <= 1.0 for k in ("bleu1", "bleu4"))
    # the choice is dev's: the chosen beam has the best dev BLEU-4
    dev = {int(k[4:]): v["bleu4"] for k, v in model.scores["dev"].items()}
    assert dev[model.decoding.beam_size] == max(dev.values())

    # Finished: a rerun does nothing.
    assert "nothing to do" in recipe(tmp_path, flickr8k_root).stdout

    # Killed after training: the trained stages are kept, only the rest runs again.
    out.unlink()
    (tmp_path / "work" / f"{PAIR_NAME}.safetensors").unlink()
    (tmp_path / "work" / "scst-bleu" / "model.safetensors").unlink()
    again = recipe(tmp_path, flickr8k_root).stdout
    assert "stage xe:" in again and "exists, skipped" in again
    assert "stage scst-bleu (resuming" in again  # from its last.ckpt
    assert load_model(out).name == MODEL_NAME
