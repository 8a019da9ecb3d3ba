"""Every benchmark script runs end to end at tiny sizes (a few images, the tiny model, a
feature cache of a handful of images) and prints the JSON keys the README's figures come
from, so the benchmarks cannot rot. Timings here mean nothing; only the plumbing is checked.

Scripts run in-process through their `main(argv)` (one torch import for all), except what
is about processes by nature: cold start and peak memory spawn their own subprocesses.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO, make_tiny_model_file

BENCH = REPO / "benchmarks"
MACHINE_KEYS = {"cpu_count", "torch", "device", "torch_threads"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, argv: list[str], capsys) -> dict:
    result = load(name).main([str(a) for a in argv])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result)), "stdout must be exactly the returned JSON"
    assert printed["benchmark"] == name
    assert MACHINE_KEYS <= set(printed["machine"])
    assert "sizes" in printed
    return printed


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Timings do not matter here, and on a busy 2-core machine two torch threads per
    process fight over the cores (10x slower). Subprocesses get the same through the env."""
    import os

    import torch
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench-models")
    return {"attention": make_tiny_model_file(d / "tiny-attention.safetensors", attention=True),
            "plain": make_tiny_model_file(d / "tiny-plain.safetensors", attention=False)}


@pytest.fixture(scope="module")
def tiny_cache(flickr8k_root, tmp_path_factory) -> Path:
    """Features of the first 3 train, 1 dev and 3 test images (what the scripts below use)."""
    from captioner.data.extract import extract_features
    from captioner.data.sources import read_dataset
    from captioner.model.encoders import build_encoder

    records = read_dataset("flickr8k", flickr8k_root, splits=["train", "dev", "test"])
    chosen = []
    for split, n in (("train", 3), ("dev", 1), ("test", 3)):
        chosen += [r for r in records if r.split == split][:n]
    out = tmp_path_factory.mktemp("bench-cache") / "cache"
    extract_features(build_encoder("efficientnet-lite0"), [r.path for r in chosen], [r.image_id for r in chosen],
                     out, batch_size=8, workers=0, progress=False)
    return out


def test_caption_throughput(tiny_models, flickr8k_root, capsys):
    out = run("caption_throughput", ["--model", tiny_models["attention"], "--images", 3, "--batch-size", 2,
                                     "--beams", "1,3", "--repeats", 1, "--warmup", 0], capsys)
    assert set(out["images_per_s"]) >= {"encoder_only", "beam1", "beam3", "search_only_beam3",
                                        "load_and_preprocess_only"}
    # the float32 decoder timed beside the int8 one (the CPU default where int8 kernels exist)
    expected = {"beam1", "beam3"} | ({"beam3_float32"} if out["precision"] == "int8" else set())
    assert set(out["ratio_to_encoder_only"]) == expected
    assert out["sizes"]["float32_beams"] == ([3] if out["precision"] == "int8" else [])
    # one round: the median of paired ratios is that round's ratio, the ratio of the medians
    paired, unpaired = out["ratio_to_encoder_only"]["beam3"], out["ratio_of_median_throughputs"]["beam3"]
    assert abs(paired - unpaired) <= 0.01 * unpaired
    assert out["sizes"]["images"] == 3 and isinstance(out["target"]["met"], bool)


def test_batched_beam(tiny_models, tiny_cache, capsys):
    out = run("batched_beam", ["--model", tiny_models["attention"], "--features", tiny_cache, "--images", 3,
                               "--batch-size", 3, "--repeats", 1, "--warmup", 0], capsys)
    assert out["captions_equal"] is True and out["captions_compared"] == 3
    assert out["speedup"] > 0 and set(out["images_per_s"]) == {"batched", "one_at_a_time"}


def test_single_image(tiny_models, flickr8k_root, capsys):
    out = run("single_image", ["--model", tiny_models["attention"], "--images", 2, "--repeats", 1], capsys)
    assert set(out["ms_per_call"]) == {"encoder_only", "caption"}
    assert out["ratio_to_encoder_only"] > 0 and isinstance(out["target"]["met"], bool)


def test_batched_beam_refuses_to_touch_a_cache_without_the_images(tiny_models, tiny_cache, capsys):
    with pytest.raises(SystemExit, match="lacks"):
        load("batched_beam").main(["--model", str(tiny_models["plain"]), "--features", str(tiny_cache),
                                   "--images", "5"])


def test_training(tiny_cache, capsys):
    out = run("training", ["--features", tiny_cache, "--train-images", 2, "--batch-size", 5], capsys)
    for mode in ("features", "images"):
        epoch = out["epochs"][mode]
        assert epoch["steps"] == 2 and epoch["samples"] == 10 and epoch["epoch_s"] > 0
    assert out["speedup_features_over_images"] > 0


def test_training_never_rebuilds_an_existing_cache(tmp_path, flickr8k_root, capsys):
    """The DataModule would rebuild an incomplete cache (say one another process is still
    writing) for just the benchmark's images; the script must stop instead, touching nothing."""
    busy = tmp_path / "busy-cache"
    busy.mkdir()
    (busy / "index.json").write_text('{"complete": false}')
    (busy / "grid.f16").write_bytes(b"\0" * 64)
    before = {f.name: f.read_bytes() for f in busy.iterdir()}
    with pytest.raises(SystemExit, match="not touching it"):
        load("training").main(["--features", str(busy), "--train-images", "2", "--modes", "features"])
    assert {f.name: f.read_bytes() for f in busy.iterdir()} == before


def test_image_decoding(tiny_models, flickr8k_root, capsys):
    out = run("image_decoding", ["--model", tiny_models["plain"], "--large-images", 1, "--size", "640x480",
                                 "--small-images", 2, "--repeats", 1, "--warmup", 0], capsys)
    assert set(out["images_per_s"]) >= {"large_with_draft", "large_without_draft", "small_224"}
    assert out["sizes"]["output_tensor"] == [3, 224, 224]
    assert out["draft_speedup"] > 0


@pytest.mark.slow
def test_cold_start(tiny_models, capsys):
    out = run("cold_start", ["--model", tiny_models["plain"], "--runs", 1, "--warmup", 0,
                             "--no-import-profile"], capsys)
    assert out["lightning_imported"] is False, out["lightning_modules"]
    assert out["ratio"] > 0 and out["caption_output"].startswith(str(REPO / "demo" / "images"))


def test_cold_start_import_report():
    stderr = ("import time: self [us] | cumulative | imported package\n"
              "import time:       100 |       5000 | torch\n"
              "import time:        50 |         50 |   pytorch_lightning.core\n"
              "import time:        10 |       9000 | captioner.api\n")
    modules, slowest = load("cold_start").import_report(stderr)
    assert modules == ["torch", "pytorch_lightning.core", "captioner.api"]
    assert slowest == [{"module": "captioner.api", "cumulative_ms": 9.0}, {"module": "torch", "cumulative_ms": 5.0}]


@pytest.mark.slow
def test_memory(tiny_models, tiny_cache, tmp_path, capsys):
    out = run("memory", ["--model", tiny_models["plain"], "--parts", "caption,train,cache",
                         "--caption-images", 2, "--features", tiny_cache, "--train-images", 3,
                         "--train-steps", 2, "--cache-images", 1000, "--cache-batches", 3,
                         "--cache-batch-size", 4, "--scratch", tmp_path], capsys)
    assert set(out["peak_rss_mb"]) == {"caption", "train", "cache"}
    assert all(v > 0 for v in out["peak_rss_mb"].values())
    cache = out["parts"]["cache"]
    assert cache["cache_bytes"] == 1000 * (49 * 1280 + 1280) * 2 and cache["cleaned_up"] is True
    assert out["parts"]["train"]["steps"] == 2 and out["parts"]["caption"]["captioned"] == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_recipe(tmp_path, capsys):
    """The whole-recipe benchmark on a generated 12-image folder dataset, one epoch."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(data / f"im{i}.jpg")
        caption = ["a dog runs on the grass", "a man rides a red bike"][i % 2]
        lines.append(json.dumps({"image": f"im{i}.jpg", "captions": [caption] * 5,
                                 "split": "train" if i < 9 else "dev"}))
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = run("recipe", ["--dataset", "folder", "--data-root", data, "--workdir", tmp_path / "work",
                         "--max-epochs", 1, "--feature-workers", 0, "--feature-batch-size", 4], capsys)
    assert out["features"]["images"] == 12 and out["features"]["seconds"] > 0
    assert out["training"]["epochs_run"] == 1 and out["training"]["best_epoch"] == 0
    assert out["recipe_seconds_to_best"] > out["features"]["seconds"]
    assert isinstance(out["target_met"], bool) and out["budget_seconds"] == 1800
    with pytest.raises(SystemExit, match="exists"):  # never reuses (or clobbers) a cache
        load("recipe").main(["--dataset", "folder", "--data-root", str(data), "--workdir", str(tmp_path / "work")])


def test_profile_caption(tiny_models, flickr8k_root, capsys):
    spec = importlib.util.spec_from_file_location("profile_caption", BENCH / "profile_caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--model", str(tiny_models["plain"]), "--images", "2", "--batch-size", "2", "--top", "3"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    shares = result["stage_share_of_wall"]
    assert set(shares) == {"encoder", "search", "decode_preprocess_and_rest"}
    assert 0 < shares["encoder"] < 1 and len(result["top_ops_self_cpu"]) == 3


HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ONNX, reason="the onnx extra is not installed (pip install 'captioner[onnx]')")
def test_encoder_backends(tiny_models, flickr8k_root, tmp_path, capsys):
    out = run("encoder_backends", ["--model", tiny_models["attention"], "--backends", "eager_fp32,onnxruntime_fp32",
                                   "--images", 4, "--batch-size", 2, "--latency-images", 1, "--repeats", 1,
                                   "--warmup", 0, "--top1-images", 2, "--bleu-images", 2, "--bleu-min-ratio", 0,
                                   "--caption-images", 2, "--workdir", tmp_path / "work"], capsys)
    eager, onnx = out["backends"]["eager_fp32"], out["backends"]["onnxruntime_fp32"]
    assert eager["throughput_ratio"] == 1 and onnx["available"] and onnx["throughput_ratio"] > 0
    assert onnx["grid_max_abs_diff"] < 1e-3 and onnx["top1"]["demo_same_as_eager"]
    assert out["caption_end_to_end"]["images"] == 2 and out["caption_end_to_end"]["captions_identical"] >= 1


@pytest.mark.slow
def test_end_to_end(tmp_path, monkeypatch, capsys):
    """This checkout against itself as the baseline, two images: every variant runs, start-up
    is reported apart, the captions of the eager runs agree with the baseline's."""
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))
    out = run("end_to_end", ["--images", 2, "--repeats", 1, "--warmup", 0, "--baseline-checkout", REPO,
                             "--baseline-name", "itself"], capsys)
    variants = out["variants"]
    assert out["baseline"] == "itself" and variants["itself"]["speedup_vs_baseline"] == 1
    assert variants["this checkout, eager encoder"]["captions_same_as_baseline"] == 2
    assert all(v["one_image_s"] > 0 and v["images_per_s"] > 0 for v in variants.values())
    assert ("this checkout, ONNX Runtime encoder" in variants) == HAVE_ONNX
