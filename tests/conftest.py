"""Shared fixtures. Real-data tests find Flickr8k through CAPTIONER_DATA (default
../shared/datasets); they skip with a reason when it is absent, except under CI=true, where a
missing dataset is a failure."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests compare captions with the eager encoder's, byte for byte; the ONNX Runtime encoder
# (used by default where the onnx extra is installed) has its own tests in test_fast_encoder.py.
os.environ.setdefault("CAPTIONER_ENCODER_BACKEND", "eager")


def data_root() -> Path:
    return Path(os.environ.get("CAPTIONER_DATA", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="package")
def flickr8k_root() -> Path:
    root = data_root() / "flickr8k"
    if not (root / "Flickr8k.token.txt").is_file() or not (root / "images").is_dir():
        message = f"Flickr8k not found at {root} (set CAPTIONER_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


def make_tiny_model_file(path: Path, attention: bool = True, seed: int = 0, layers: int = 1) -> Path:
    """A real-format model file: the real EfficientNet-Lite0 spec with a small random decoder.
    Its captions are nonsense, but every code path (loading, search, attention maps) is real."""
    import torch

    from captioner.model.decoder import CaptionDecoder, DecoderConfig
    from captioner.model.encoders import encoder_feature_dim, encoder_preprocessing
    from captioner.modelfile import ModelFile, save_model
    from captioner.text import Vocabulary

    vocab = Vocabulary.build(["a dog runs on the grass", "a man rides a red bike", "two girls play"],
                             min_freq=1)
    cfg = DecoderConfig(vocab_size=len(vocab), feature_dim=encoder_feature_dim("efficientnet-lite0"),
                        attention=attention, embed_dim=16, hidden_dim=32, attention_dim=16, dropout=0.0,
                        num_layers=layers)
    torch.manual_seed(seed)
    decoder = CaptionDecoder(cfg)
    encoder = {"name": "efficientnet-lite0",
               "preprocessing": encoder_preprocessing("efficientnet-lite0").to_dict(), "finetuned": False}
    save_model(path, ModelFile(decoder.state_dict(), cfg, vocab, encoder))
    return path


@pytest.fixture(scope="package")
def tiny_model_file(tmp_path_factory) -> Path:
    return make_tiny_model_file(tmp_path_factory.mktemp("models") / "tiny-attention.safetensors")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the module's tests, restored after it. Their tensors are tiny:
    a second thread only adds hand-off latency, which grows 10-40x when the cores are busy
    with other work (measured: a 12-step int8 beam search, 16 ms on one thread, 680 ms on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rewrite_model_file(source: Path, target: Path, metadata_change=None, tensor_change=None) -> Path:
    """A copy of the model file `source` at `target` with its metadata dict and/or its tensors
    dict changed in place by the given functions (for building damaged or hostile files)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as fh:
        metadata = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if metadata_change:
        metadata_change(metadata)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(target), metadata=metadata)
    return target
