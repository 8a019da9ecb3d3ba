"""Every config in configs/ parses as its own header comment composes it, and each canonical
config trains a step on a tiny Flickr8k slice through the real `captioner train`."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from captioner.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
CANONICAL = sorted((REPO / "configs").glob("*.yaml"))


def composition(config: Path) -> list[str]:
    """The `--config` files of the `captioner train` command in the config's header comment."""
    header = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip().rstrip("\\").strip())
    text = " ".join(header)
    match = re.search(r"captioner train (.*?)(?:$|\.\s)", text)
    assert match, f"{config.name}: its header comment has no `captioner train --config ...` command"
    args = shlex.split(match.group(1))
    files = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert files and files[-1] == str(config.relative_to(REPO)), f"{config.name}: {files}"
    return [str(REPO / f) for f in files]


def run_train(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(["train", *args])
        except SystemExit as exc:  # --print_config exits
            code = int(exc.code or 0)
    return code, out.getvalue()


def test_the_canonical_set_is_there():
    names = {p.stem for p in CANONICAL}
    assert {"base", "lstm", "gru", "rnn", "lstm-attention", "gru-attention", "rnn-attention", "coco-karpathy",
            "flickr8k-att-gru512", "flickr8k-att-gru512-scst-cider", "flickr8k-att-gru512-scst-bleu"} <= names


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.stem != "base"], ids=lambda p: p.stem)
def test_every_config_parses_as_documented(config, monkeypatch):
    monkeypatch.chdir(REPO)
    args = []
    for path in composition(config):
        args += ["--config", path]
    code, printed = run_train("fit", *args, "--print_config")
    assert code == 0
    assert "model:" in printed and "decoder:" in printed and "data:" in printed


def test_a_repeated_key_is_refused(tmp_path, capsys):
    bad = tmp_path / "twice.yaml"
    bad.write_text("model:\n  optimization: {lr: 1.0e-3}\n  optimization: {lr: 2.0e-3}\n")
    code, _ = run_train("fit", "--config", str(REPO / "configs" / "base.yaml"), "--config", str(bad), "--print_config")
    assert code != 0
    assert "repeated key 'optimization'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache") / "flickr8k-lite0"


@pytest.mark.parametrize("config", [c for c in CANONICAL if c.stem != "base"], ids=lambda p: p.stem)
def test_canonical_configs_train_a_step(config, flickr8k_root, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = []
    for path in composition(config):
        args += ["--config", path]
    overrides = ["--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--data.dataset", "flickr8k", "--data.data_root", str(flickr8k_root),
                 "--data.feature_cache", str(tiny_cache), "--data.num_workers", "0",
                 "--data.train_limit", "12", "--data.val_limit", "4", "--data.batch_size", "4",
                 "--data.val_batch_size", "4"]
    if "scst" in config.stem:
        overrides += ["--model.init_decoder", "null"]  # a step from random weights: the loop, not the start
    code, printed = run_train("fit", *args, *overrides)
    assert code == 0
    assert "not written" in printed  # fast_dev_run never exports over a real model file
