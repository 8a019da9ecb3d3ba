"""Shared fixtures. Real-data tests find Flickr8k through CAPTIONER_DATA (default
../shared/datasets); they skip with a reason when it is absent, except under CI=true, where a
missing dataset is a failure."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("CAPTIONER_DATA", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    return make_tiny_model_file(tmp_path_factory.mktemp("models") / "tiny-attention.safetensors")
