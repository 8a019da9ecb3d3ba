"""Model file: round trip, and refusal of anything untrusted or inconsistent."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.modelfile import ModelFile, ModelFileError, load_model, save_model
from captioner.text import Vocabulary

PREP = {"size": 224, "resize": "squash", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def tiny_model(attention=False) -> ModelFile:
    vocab = Vocabulary.build(["a dog runs on grass", "a cat sits"], min_freq=1)
    cfg = DecoderConfig(vocab_size=len(vocab), feature_dim=8, attention=attention, embed_dim=6,
                        hidden_dim=6, attention_dim=5)
    torch.manual_seed(0)
    dec = CaptionDecoder(cfg)
    return ModelFile(dec.state_dict(), cfg, vocab, {"name": "efficientnet-lite0", "preprocessing": PREP,
                                                    "finetuned": False}, scores={"bleu4": 0.1})


def test_round_trip(tmp_path):
    model = tiny_model(attention=True)
    path = tmp_path / "m.safetensors"
    save_model(path, model)
    loaded = load_model(path)
    assert loaded.vocabulary.words == model.vocabulary.words
    assert loaded.decoder_config == model.decoder_config
    assert loaded.scores == {"bleu4": 0.1}
    for k, v in model.decoder_state.items():
        assert torch.equal(loaded.decoder_state[k], v)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not mkstemp's 0600


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_model(path, tiny_model())
    before = path.read_bytes()
    import captioner.modelfile as mf

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mf, "save_file", boom)
    with pytest.raises(OSError):
        save_model(path, tiny_model())
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("evil.ckpt", "evil.pt", "evil.safetensors"):
        bad = tmp_path / name
        bad.write_bytes(pickle.dumps({"state_dict": Evil()}))
        with pytest.raises(ModelFileError) as exc:
            load_model(bad)
        assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    assert not marker.exists()


def test_truncated_and_missing_and_directory(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, tiny_model())
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a valid safetensors"):
        load_model(tmp_path / "cut.safetensors")
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="directory"):
        load_model(tmp_path)


def _rewrite(path, out, metadata_change=None, tensor_change=None):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if metadata_change:
        metadata_change(meta)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_wrong_version_tampered_and_disagreeing_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, tiny_model())
    cases = {
        "version": (lambda m: m.update(format_version="99"), None, "version '99' is not supported"),
        "format": (lambda m: m.update(format="other"), None, "not a captioner model file"),
        "vocab": (lambda m: m.update(vocabulary=json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "x"]})),
                  None, "vocabulary has 5 words but the decoder expects"),
        "metadata": (lambda m: m.update(decoder="{broken"), None, "damaged metadata"),
        "missing": (None, lambda t: t.pop("decoder.output.bias"), "do not match its config"),
        "shape": (None, lambda t: t.update({"decoder.output.bias": torch.zeros(3)}), "has shape"),
        "nan": (None, lambda t: t["decoder.output.bias"].fill_(float("nan")), "NaN"),
    }
    for name, (meta_change, tensor_change, message) in cases.items():
        bad = _rewrite(path, tmp_path / f"{name}.safetensors", meta_change, tensor_change)
        with pytest.raises(ModelFileError, match=message):
            load_model(bad)
