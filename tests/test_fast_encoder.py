"""The optional ONNX Runtime encoder (captioner/model/fast_encoder.py): the same Features as
the eager encoder, a reused export cache, and a clean fall back to the eager encoder whenever
it cannot be used."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from captioner.model import fast_encoder as fe
from captioner.model.encoders import build_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # e.g. blocked with sys.modules[module] = None
        return False


HAVE_ONNX = all(_installed(m) for m in ("onnxruntime", "onnx", "onnxscript"))
# The export takes 10-40 s, so the tests that need it run in the slow tier.
_SKIP_WITHOUT_ONNX = pytest.mark.skipif(not HAVE_ONNX, reason="the onnx extra is not installed "
                                        "(pip install 'captioner[onnx]': onnxruntime, onnx, onnxscript)")


def needs_onnx(test):
    return pytest.mark.slow(_SKIP_WITHOUT_ONNX(test))


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(scope="module")
def fast(lite0, cache_dir):
    if not HAVE_ONNX:
        pytest.skip("the onnx extra is not installed (pip install 'captioner[onnx]': onnxruntime, onnx, onnxscript)")
    made = fe.fast_encoder(lite0, cache_dir=cache_dir)  # exports once for the module (10-40 s)
    assert made is not None, fe.unavailable_reason(lite0, cache_dir=cache_dir)
    return made


@pytest.fixture(scope="module")
def photos(lite0):
    from pathlib import Path

    from captioner.images import load_image
    demo = sorted((Path(__file__).resolve().parents[1] / "demo" / "images").glob("*.jpg"))
    assert demo, "demo/images/*.jpg missing"
    return torch.stack([lite0.preprocessing.transform()(load_image(p)) for p in demo])


@needs_onnx
def test_same_features_as_eager_on_real_photos(lite0, fast, photos):
    """Measured ~5e-5 at most (float32 in another order); the ImageNet head agrees."""
    with torch.inference_mode():
        want, got = lite0(photos), fast(photos)
    assert got.grid.shape == want.grid.shape == (len(photos), lite0.grid_size, lite0.feature_dim)
    assert got.pooled.shape == want.pooled.shape and got.grid.dtype == torch.float32
    torch.testing.assert_close(got.grid, want.grid, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got.pooled, want.pooled, atol=1e-4, rtol=1e-4)
    from captioner.model.backbones import load_efficientnet_lite
    head = load_efficientnet_lite()._fc
    with torch.inference_mode():
        assert torch.equal(head(got.pooled).argmax(1), head(want.pooled).argmax(1))
    with torch.inference_mode():  # any batch size, one image included
        torch.testing.assert_close(fast(photos[:1]).pooled, want.pooled[:1], atol=1e-4, rtol=1e-4)


@needs_onnx
def test_reads_like_the_encoder(lite0, fast):
    assert fast.feature_range == lite0.feature_range == (0.0, 6.0)
    assert (fast.feature_dim, fast.grid_size, fast.preprocessing, fast.name) == (
        lite0.feature_dim, lite0.grid_size, lite0.preprocessing, lite0.name)
    assert fast.backend == "onnxruntime" and fast.encoder is lite0


@needs_onnx
def test_cached_export_is_reused_without_the_exporter(lite0, fast, cache_dir, monkeypatch):
    path = cache_dir / fe.onnx_file_name(lite0)
    assert fast.source == str(path) and path.is_file()
    monkeypatch.setattr(fe, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # the exporter is not needed any more
    again = fe.fast_encoder(lite0, cache_dir=cache_dir)
    assert again is not None and again.source == str(path)


@needs_onnx
def test_other_weights_get_another_cache_file(lite0):
    other = build_encoder("efficientnet-lite0", pretrained=False)
    assert fe.onnx_file_name(other) != fe.onnx_file_name(lite0)
    assert fe.onnx_file_name(lite0).startswith("efficientnet-lite0-224px-")


@needs_onnx
def test_inputs_it_was_not_exported_for_go_to_the_eager_encoder(lite0, fast):
    small = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(fast(small).pooled, lite0(small).pooled)
        assert torch.equal(fast(small).grid, lite0(small).grid)


def test_unavailable_without_onnxruntime(lite0, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert fe.fast_encoder(lite0) is None
    assert "onnxruntime is not installed" in fe.unavailable_reason(lite0)


def test_unavailable_without_the_exporter_and_no_cached_file(lite0, tmp_path, monkeypatch):
    if not _installed("onnxruntime"):
        pytest.skip("onnxruntime is not installed")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert "onnxscript" in fe.unavailable_reason(lite0, cache_dir=tmp_path)
    assert fe.fast_encoder(lite0, cache_dir=tmp_path) is None


def test_eager_backend_training_and_bad_names(monkeypatch):
    encoder = build_encoder("efficientnet-lite0", pretrained=False)
    assert fe.fast_encoder(encoder, backend="eager") is None
    assert fe.unavailable_reason(encoder, "eager") == "the eager encoder was asked for"
    encoder.trainable_tail(1)
    assert "being trained" in fe.unavailable_reason(encoder)
    assert fe.fast_encoder(encoder) is None
    with pytest.raises(ValueError, match="encoder backend must be one of"):
        fe.fast_encoder(encoder, backend="tensorrt")


@needs_onnx
def test_a_failed_export_or_a_mismatch_falls_back_with_a_warning(lite0, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter\nbroke")

    monkeypatch.setattr(fe, "export_onnx", broken)
    with pytest.warns(RuntimeWarning, match="using the eager encoder: RuntimeError: exporter broke"):
        assert fe.fast_encoder(lite0, cache_dir=tmp_path) is None
    monkeypatch.undo()


@needs_onnx
def test_features_that_differ_from_eager_are_refused(lite0, cache_dir, fast, monkeypatch):
    monkeypatch.setattr(fe, "_matches_eager", lambda *a: 0.5)
    assert fe.fast_encoder(lite0, cache_dir=cache_dir) is not None  # a cached file is not re-checked
    with pytest.warns(RuntimeWarning, match="differ from the eager encoder's by 0.5"):
        assert fe.fast_encoder(lite0, cache_dir=cache_dir, verify=True) is None
    assert (cache_dir / fe.onnx_file_name(lite0)).is_file()  # it was not this call's export: kept


@needs_onnx
def test_a_bad_fresh_export_is_deleted(lite0, fast, cache_dir, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(fe, "export_onnx", lambda encoder, path: shutil.copy(cache_dir / fe.onnx_file_name(lite0), path))
    monkeypatch.setattr(fe, "_matches_eager", lambda *a: float("nan"))
    with pytest.warns(RuntimeWarning, match="differ from the eager encoder's by nan"):
        assert fe.fast_encoder(lite0, cache_dir=tmp_path) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAVE_ONNX, reason="the onnx extra is not installed")
def test_a_cache_path_that_is_not_a_regular_file_is_left_alone(lite0, tmp_path):
    import os
    fifo = tmp_path / fe.onnx_file_name(lite0)
    os.mkfifo(fifo)
    with pytest.warns(RuntimeWarning, match="is not a regular file; not replaced"):
        assert fe.fast_encoder(lite0, cache_dir=tmp_path) is None
    assert fifo.is_fifo()


# ---------------------------------------------------------------------- through the Python API


def test_the_backend_name_is_checked(tiny_model_file, monkeypatch):
    from captioner import Captioner
    from captioner.errors import UsageError

    with pytest.raises(UsageError, match="unknown encoder backend 'tensorrt'"):
        Captioner.load(tiny_model_file, device="cpu", encoder_backend="tensorrt")
    monkeypatch.setenv("CAPTIONER_ENCODER_BACKEND", "gpu-please")
    with pytest.raises(UsageError, match=r"\$CAPTIONER_ENCODER_BACKEND: unknown encoder backend 'gpu-please'"):
        Captioner.load(tiny_model_file, device="cpu")


def test_without_onnxruntime_auto_is_eager_and_onnxruntime_is_refused(tiny_model_file, monkeypatch):
    from captioner import Captioner
    from captioner.errors import UsageError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    demo = sorted((REPO / "demo" / "images").glob("*.jpg"))[:2]
    auto = Captioner.load(tiny_model_file, device="cpu", encoder_backend="auto")
    eager = Captioner.load(tiny_model_file, device="cpu", encoder_backend="eager")
    assert auto.encoder_backend_in_use == eager.encoder_backend_in_use == "eager"
    assert [r.caption for r in auto.caption(demo)] == [r.caption for r in eager.caption(demo)]
    required = Captioner.load(tiny_model_file, device="cpu", encoder_backend="onnxruntime")
    with pytest.raises(UsageError, match="encoder backend onnxruntime cannot run: onnxruntime is not installed"):
        required.caption(demo)  # before any image is read


def test_cli_refuses_an_unknown_backend(tiny_model_file):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "captioner", "caption", str(REPO / "demo" / "images"),
                           "--model", str(tiny_model_file), "--encoder-backend", "tpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--encoder-backend" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_knows_the_same_backends():
    from captioner.cli import ENCODER_BACKENDS
    assert ENCODER_BACKENDS == fe.BACKENDS


@needs_onnx
def test_the_default_model_captions_alike_through_onnxruntime(fast, cache_dir, monkeypatch):
    """The shipped model through the API on the demo photos: the export of the module's
    fixture is reused from the cache; captions are the eager encoder's (measured: 255 of 256
    Flickr8k test captions identical, BLEU-4 within 4e-5)."""
    from captioner import Captioner

    monkeypatch.setenv("CAPTIONER_CACHE", str(cache_dir.parent))
    assert fe.default_cache_dir() == cache_dir.parent / "encoders"
    monkeypatch.setattr(fe, "default_cache_dir", lambda: cache_dir)
    import captioner.api as api
    monkeypatch.setattr(api, "default_cache_dir", lambda: cache_dir)
    monkeypatch.setattr(fe, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    demo = sorted((REPO / "demo" / "images").glob("*.jpg"))
    onnx = Captioner.load(device="cpu", encoder_backend="auto")
    eager = Captioner.load(device="cpu", encoder_backend="eager")
    assert onnx.encoder_backend_in_use == "onnxruntime" and eager.encoder_backend_in_use == "eager"
    same = sum(a.caption == b.caption for a, b in zip(onnx.caption(demo), eager.caption(demo)))
    assert same >= len(demo) - 1, "float32 in another order may flip one near-tie, not more"


@needs_onnx
def test_a_damaged_cached_file_is_exported_again(lite0, fast, cache_dir, tmp_path, monkeypatch):
    import shutil
    good = cache_dir / fe.onnx_file_name(lite0)
    exports = []

    def export(encoder, path):
        exports.append(path)
        shutil.copy(good, path)  # stands in for the 10-40 s export of the same weights
        return path

    monkeypatch.setattr(fe, "export_onnx", export)
    damaged = tmp_path / fe.onnx_file_name(lite0)
    damaged.write_bytes(b"\x08\x07 this is not an ONNX model" * 100)
    again = fe.fast_encoder(lite0, cache_dir=tmp_path)
    assert again is not None and exports == [damaged]
    assert damaged.read_bytes() == good.read_bytes()
