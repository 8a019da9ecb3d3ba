"""Model file: round trip (format version 3: name, release, default decoding, stored
precision, fine-tuned encoder), older versions, atomic writes, and refusal of anything
untrusted or inconsistent. Hostile inputs in bulk: test_model_file_validation.py."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import rewrite_model_file
from safetensors import safe_open

from captioner.decoding import DecodingConfig
from captioner.errors import ModelFileError, OutputError
from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.modelfile import FORMAT_VERSION, ModelFile, load_model, save_model
from captioner.text import Vocabulary
from captioner.version import __version__

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PREP = {"size": 224, "resize": "squash", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def tiny_model(attention=False) -> ModelFile:
    vocab = Vocabulary.build(["a dog runs on grass", "a cat sits"], min_freq=1)
    cfg = DecoderConfig(vocab_size=len(vocab), feature_dim=1280, attention=attention, embed_dim=6,
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
    assert loaded.scores == {"bleu4": 0.1} and loaded.encoder == model.encoder
    assert loaded.encoder_state is None and loaded.ensemble == []
    for k, v in model.decoder_state.items():
        assert torch.equal(loaded.decoder_state[k], v)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not mkstemp's 0600


def test_version_3_records_name_release_and_default_decoding(tmp_path):
    model = tiny_model()
    model.name = "flickr8k-gru-tiny"
    model.decoding = DecodingConfig(beam_size=5, n_best=2, length_penalty=0.3, precision="float32")
    path = tmp_path / "m.safetensors"
    save_model(path, model)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format_version"] == FORMAT_VERSION == "3"
    assert meta["name"] == "flickr8k-gru-tiny" and meta["captioner_version"] == __version__
    assert json.loads(meta["decoding"]) == model.decoding.to_dict()
    loaded = load_model(path)
    assert (loaded.name, loaded.version, loaded.decoding) == ("flickr8k-gru-tiny", __version__, model.decoding)
    model.version = "0.9.0"  # re-saving keeps the release that made the file
    save_model(path, model)
    assert load_model(path).version == "0.9.0"


@pytest.mark.parametrize("dtype,code", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_weights_stored_at_half_precision_load_as_float32(tmp_path, dtype, code):
    model = tiny_model(attention=True)
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_model(full, model)
    save_model(half, model, dtype=dtype)
    with safe_open(str(half), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {code}
    assert half.stat().st_size < 0.75 * full.stat().st_size
    loaded = load_model(half)
    for key, value in model.decoder_state.items():
        assert loaded.decoder_state[key].dtype == torch.float32
        assert torch.equal(loaded.decoder_state[key], value.to(dtype).float())


def test_version_2_files_load_with_default_decoding_for_what_they_lack(tmp_path):
    """The shipped default model is a version 2 file: no name, no release, and a decoding
    of only beam_size and length_penalty; the other decoding fields take their defaults."""
    path = tmp_path / "m.safetensors"
    save_model(path, tiny_model())

    def as_version_2(meta):
        for key in ("name", "captioner_version"):
            del meta[key]
        meta.update(format_version="2", decoding=json.dumps({"beam_size": 3, "length_penalty": 0.5}))

    old = rewrite_model_file(path, tmp_path / "v2.safetensors", as_version_2)
    loaded = load_model(old)
    assert (loaded.name, loaded.version) == ("", "")
    assert loaded.decoding == DecodingConfig(beam_size=3, length_penalty=0.5)
    no_decoding = rewrite_model_file(old, tmp_path / "v1.safetensors",
                                     lambda m: (m.pop("decoding"), m.update(format_version="1")))
    assert load_model(no_decoding).decoding == DecodingConfig()


def test_a_fine_tuned_encoder_travels_in_the_file(tmp_path):
    from captioner.model.encoders import build_encoder, encoder_feature_dim, encoder_preprocessing

    torch.manual_seed(3)
    encoder = build_encoder("efficientnet-lite0", pretrained=False)
    vocab = Vocabulary.build(["a dog runs"], min_freq=1)
    cfg = DecoderConfig(vocab_size=len(vocab), feature_dim=encoder_feature_dim("efficientnet-lite0"), embed_dim=4,
                        hidden_dim=4)
    spec = {"name": "efficientnet-lite0", "preprocessing": encoder_preprocessing("efficientnet-lite0").to_dict(),
            "finetuned": True}
    path = tmp_path / "tuned.safetensors"
    save_model(path, ModelFile(CaptionDecoder(cfg).state_dict(), cfg, vocab, spec, encoder.state_dict()))
    loaded = load_model(path)
    assert loaded.encoder["finetuned"] and set(loaded.encoder_state) == set(encoder.state_dict())
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.encoder_state[key], value)
    missing = rewrite_model_file(path, tmp_path / "no-encoder.safetensors",
                                 tensor_change=lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.")])
    with pytest.raises(ModelFileError, match="weights do not match the config: missing encoder."):
        load_model(missing)
    untuned = rewrite_model_file(path, tmp_path / "untuned.safetensors",
                                 lambda m: m.update(encoder=json.dumps({**spec, "finetuned": False})))
    with pytest.raises(ModelFileError, match="unexpected tensors encoder."):
        load_model(untuned)


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


def test_saving_never_replaces_what_is_not_a_regular_file(tmp_path):
    fifo, directory = tmp_path / "pipe.safetensors", tmp_path / "dir.safetensors"
    os.mkfifo(fifo)
    directory.mkdir()
    for target, kind in ((fifo, "a FIFO"), (directory, "a directory")):
        with pytest.raises(OutputError, match=f"{target}: is {kind}; not replaced"):
            save_model(target, tiny_model())
    assert fifo.is_fifo() and directory.is_dir() and not list(directory.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "pipe.safetensors"]


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
        assert str(exc.value).startswith(f"{bad}: ") and "\n" not in str(exc.value)
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


def test_wrong_version_tampered_and_disagreeing_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, tiny_model())
    cases = {
        "version": (lambda m: m.update(format_version="99"), None, "version '99' is not supported"),
        "format": (lambda m: m.update(format="other"), None, "not a captioner model file"),
        "vocab": (lambda m: m.update(vocabulary=json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "x"]})),
                  None, "vocabulary has 5 words but the decoder expects"),
        "metadata": (lambda m: m.update(decoder="{broken"), None, "damaged metadata: decoder"),
        "decoding": (lambda m: m.update(decoding=json.dumps({"beam_size": 3, "mirror": True})), None,
                     "damaged metadata: decoding: unknown decoding settings: mirror"),
        "scores": (lambda m: m.update(scores="[1, 2]"), None, "damaged metadata: scores: must be a JSON object"),
        "v1 ensemble": (lambda m: m.update(format_version="1", ensemble=m["decoder"]), None,
                        "damaged metadata: ensemble"),
        "missing": (None, lambda t: t.pop("decoder.output.bias"),
                    "weights do not match the config: missing decoder.output.bias"),
        "stray": (None, lambda t: t.update({"decoder.extra": torch.zeros(2)}), "unexpected tensors decoder.extra"),
        "shape": (None, lambda t: t.update({"decoder.output.bias": torch.zeros(3)}),
                  r"weight decoder.output.bias has shape \(3,\), the config implies"),
        "dtype": (None, lambda t: t.update({"decoder.output.bias": t["decoder.output.bias"].long()}),
                  "weight decoder.output.bias has dtype I64"),
        "float64": (None, lambda t: t.update({"decoder.output.bias": t["decoder.output.bias"].double()}),
                    "has dtype F64"),
        "nan": (None, lambda t: t["decoder.output.bias"].fill_(float("nan")), "decoder.output.bias contains NaN"),
        "inf": (None, lambda t: t["decoder.embedding.weight"].__setitem__((4, 0), float("inf")),
                "decoder.embedding.weight contains NaN or infinity"),
    }
    for name, (meta_change, tensor_change, message) in cases.items():
        bad = rewrite_model_file(path, tmp_path / f"{name}.safetensors", meta_change, tensor_change)
        with pytest.raises(ModelFileError, match=message) as info:
            load_model(bad)
        assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value), name
