"""Every model file is validated before anything is allocated.

Hostile or damaged files are generated here at run time from a real tiny model file: sizes
of the wrong type or absurd value, unknown encoders, bad preprocessing and decoding, encoder
weights that do not fit, NaN weights, deep JSON, pickles and zip checkpoints in disguise, and
paths that are not regular files. Each gives exactly one `ModelFileError`, one line that
starts with the path; an absurd size is refused from the metadata and the header alone,
without the memory it asks for.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_tiny_model_file, rewrite_model_file

from captioner.errors import ModelFileError
from captioner.modelfile import MAX_DECODER_SIZES, MAX_MEMBERS, MAX_METADATA_CHARS, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model_file(tmp_path_factory.mktemp("valid") / "base.safetensors", seed=4)


def refused(path: Path, pattern: str) -> str:
    """Load `path`: exactly one ModelFileError, one line starting with the path, matching `pattern`."""
    with pytest.raises(Exception) as info:
        load_model(path)
    error = info.value
    message = str(error)
    assert type(error) is ModelFileError, f"{type(error).__name__}: {message}"
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), message
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert re.search(pattern, message), message
    return message


def edit(key: str, change):
    """A metadata change: `change` edits the parsed JSON of field `key` in place."""
    def apply(meta: dict[str, str]) -> None:
        data = json.loads(meta[key])
        change(data)
        meta[key] = json.dumps(data)
    return apply


def setting(key: str, **values):
    return edit(key, lambda data: data.update(values))


DAMAGED = "damaged metadata: "
METADATA_CASES = {
    "size as a string": (setting("decoder", hidden_dim="32"),
                         DAMAGED + r"decoder: hidden_dim must be a positive integer, got '32'"),
    "size as a float": (setting("decoder", hidden_dim=32.0),
                        DAMAGED + r"decoder: hidden_dim must be a positive integer, got 32\.0"),
    "size as a bool": (setting("decoder", num_layers=True),
                       DAMAGED + r"decoder: num_layers must be a positive integer"),
    "negative size": (setting("decoder", embed_dim=-16), DAMAGED + r"decoder: embed_dim must be a positive integer"),
    "hidden_dim 200000": (setting("decoder", hidden_dim=200_000),
                          DAMAGED + r"decoder: hidden_dim 200000 is above the limit of 4096"),
    "vocab_size 10^12": (setting("decoder", vocab_size=10 ** 12),
                         DAMAGED + r"decoder: vocab_size 1000000000000 is above the limit"),
    "nine layers": (setting("decoder", num_layers=9), DAMAGED + r"decoder: num_layers 9 is above the limit of 8"),
    "unknown decoder key": (setting("decoder", sample_prob=0.25), DAMAGED + r"decoder: .*sample_prob"),
    "unknown cell": (setting("decoder", cell="transformer"), DAMAGED + r"decoder: cell must be one of"),
    "decoder not an object": (lambda m: m.update(decoder="[1, 2]"), DAMAGED + r"decoder: must be a JSON object"),
    "unknown encoder": (setting("encoder", name="vgg99"), DAMAGED + r"encoder: unknown encoder 'vgg99'"),
    "a size variant of earlier releases": (setting("encoder", name="efficientnet-lite0-320"),
                                           r"unknown encoder 'efficientnet-lite0-320'"),
    "missing preprocessing": (edit("encoder", lambda d: d.pop("preprocessing")),
                              DAMAGED + r"encoder: no preprocessing"),
    "preprocessing size 30000": (edit("encoder", lambda d: d["preprocessing"].update(size=30000)),
                                 DAMAGED + r"encoder: preprocessing size must be an integer from 16 to 1024, "
                                 r"got 30000"),
    "preprocessing std 0": (edit("encoder", lambda d: d["preprocessing"].update(std=[0.0, 1.0, 1.0])),
                            r"encoder: preprocessing std must be positive"),
    "preprocessing not an object": (setting("encoder", preprocessing=224),
                                    r"encoder: preprocessing must be a JSON object"),
    "finetuned not a bool": (setting("encoder", finetuned="yes"), r"encoder: finetuned must be true or false"),
    "extra encoder key": (setting("encoder", weights="http://example.invalid/w.pth"),
                          r"encoder: must be \{name, preprocessing, finetuned\}"),
    "stored beam of 10^9": (setting("decoding", beam_size=10 ** 9),
                            DAMAGED + r"decoding: decoding beam_size must be between 1 and 32, got 1000000000"),
    "stored max_length of 10^8": (setting("decoding", max_length=10 ** 8),
                                  r"decoding: decoding max_length must be between 1 and 200"),
    "stored temperature 1e-300": (setting("decoding", temperature=1e-300),
                                  r"decoding: decoding temperature must be between"),
    "stored n_best above beam": (setting("decoding", beam_size=2, n_best=3),
                                 r"decoding: n_best 3 needs beam_size >= 3"),
    "stored precision int4": (setting("decoding", precision="int4"),
                              r"decoding: decoding precision must be one of auto, float32, int8"),
    "decoding not an object": (lambda m: m.update(decoding="3"),
                               DAMAGED + r"decoding: decoding must be a JSON object"),
    "vocabulary not JSON": (lambda m: m.update(vocabulary="{words"), DAMAGED + r"vocabulary: not a vocabulary JSON"),
    "vocabulary with duplicates": (edit("vocabulary", lambda d: d["words"].append(d["words"][5])),
                                   DAMAGED + r"vocabulary: vocabulary has duplicate words"),
    "ensemble not a list": (lambda m: m.update(ensemble='{"a": 1}'),
                            DAMAGED + r"ensemble: must be a list of at most 7"),
    f"{MAX_MEMBERS + 1} members": (lambda m: m.update(ensemble=json.dumps([json.loads(m["decoder"])] * MAX_MEMBERS)),
                                   DAMAGED + r"ensemble: must be a list of at most 7 decoder configs"),
    "member with another vocabulary": (
        lambda m: m.update(ensemble=json.dumps([{**json.loads(m["decoder"]), "vocab_size": 99}])),
        r"vocabulary has \d+ words but the ensemble member 1 expects 99"),
    "scores not an object": (lambda m: m.update(scores='"x"'), DAMAGED + r"scores: must be a JSON object"),
    "metadata field too long": (lambda m: m.update(training=json.dumps({"notes": "x" * MAX_METADATA_CHARS})),
                                DAMAGED + r"training: 16,777,\d+ characters \(at most 16,777,216\)"),
    "no format": (lambda m: m.pop("format"), r"not a captioner model file \(format="),
    "another format": (lambda m: m.update(format="x" * 1000), r"not a captioner model file \(format='x{40}'\)$"),
    "format version 4": (lambda m: m.update(format_version="4"), r"model format version '4' is not supported"),
    "no decoder": (lambda m: m.pop("decoder"), DAMAGED + r"decoder: .*missing 'decoder'"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_bad_metadata_is_refused(base, tmp_path, case):
    change, pattern = METADATA_CASES[case]
    refused(rewrite_model_file(base, tmp_path / "bad.safetensors", change), pattern)


def test_json_nested_200k_deep_is_refused_quickly(base, tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    for key in ("decoder", "decoding", "training"):
        path = rewrite_model_file(base, tmp_path / f"deep-{key}.safetensors", lambda m, key=key: m.update({key: deep}))
        start = time.perf_counter()
        refused(path, f"damaged metadata: {key}: ")
        assert time.perf_counter() - start < 5.0


NO_ALLOCATION = """
import json, resource, sys, time
from captioner.errors import ModelFileError
from captioner.modelfile import load_model
load_model(sys.argv[1])  # the imports and a valid file first: only the hostile loads are measured
answers = []
for path in sys.argv[2:]:
    peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:
        load_model(path)
        outcome = "loaded"
    except ModelFileError as exc:
        outcome = str(exc)
    answers.append([outcome, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak])
print(json.dumps(answers))
"""


def test_absurd_sizes_are_refused_without_allocating(base, tmp_path):
    """hidden_dim 200000 (a 1 GB init layer) is refused by the metadata bounds; every size at
    its bound (a 1.6 GB embedding, 8 layers of 4096) passes them and is refused from the
    tensor header, its shapes computed on the meta device. Both in milliseconds, and the
    process's peak memory does not move."""
    huge = rewrite_model_file(base, tmp_path / "huge.safetensors", setting("decoder", hidden_dim=200_000))
    vocab_words = 100_000  # a vocabulary as large as the bound allows, so the sizes agree

    def at_the_bounds(meta):
        words = json.loads(meta["vocabulary"])["words"][:4] + [f"w{i}" for i in range(vocab_words - 4)]
        meta["vocabulary"] = json.dumps({"words": words})
        sizes = {**MAX_DECODER_SIZES, "feature_dim": json.loads(meta["decoder"])["feature_dim"]}
        meta["decoder"] = json.dumps({**json.loads(meta["decoder"]), **sizes, "attention": True, "cell": "lstm"})

    bounds = rewrite_model_file(base, tmp_path / "bounds.safetensors", at_the_bounds)
    run = subprocess.run([sys.executable, "-c", NO_ALLOCATION, str(base), str(huge), str(bounds)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (huge_outcome, huge_seconds, huge_kib), (bounds_outcome, bounds_seconds, bounds_kib) = json.loads(run.stdout)
    assert huge_outcome == f"{huge}: damaged metadata: decoder: hidden_dim 200000 is above the limit of 4096"
    assert bounds_outcome.startswith(f"{bounds}: weights do not match the config: missing decoder.")
    assert huge_seconds < 5 and bounds_seconds < 10
    assert huge_kib < 100 * 1024 and bounds_kib < 200 * 1024  # ru_maxrss is in KiB on Linux


def lite0_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from captioner.model.encoders import build_encoder

    torch.manual_seed(seed)
    return build_encoder("efficientnet-lite0", pretrained=False).state_dict()


def fine_tuned(base: Path, target: Path, encoder_tensors: dict[str, torch.Tensor]) -> Path:
    def tuned(meta):
        meta["encoder"] = json.dumps({**json.loads(meta["encoder"]), "finetuned": True})

    return rewrite_model_file(base, target, tuned,
                              lambda t: t.update({f"encoder.{k}": v.contiguous() for k, v in encoder_tensors.items()}))


def test_fine_tuned_encoder_tensors_that_do_not_fit_are_refused_from_the_header(base, tmp_path):
    from captioner.model.encoders import build_encoder

    with torch.device("meta"):
        names = build_encoder("efficientnet-lite0", pretrained=False).state_dict()
    small = {k: torch.zeros(1, dtype=v.dtype) for k, v in names.items()}  # every name, no shape right
    refused(fine_tuned(base, tmp_path / "shapes.safetensors", small),
            r"weight encoder\.\S+ has shape \(1,\), the config implies \(")
    refused(fine_tuned(base, tmp_path / "none.safetensors", {}),
            r"weights do not match the config: missing encoder\.")
    partial = {k: v for i, (k, v) in enumerate(small.items()) if i % 2}
    refused(fine_tuned(base, tmp_path / "half.safetensors", partial), r"missing encoder\.")


def test_nan_in_a_fine_tuned_encoder_is_refused(base, tmp_path):
    state = lite0_state()
    good = fine_tuned(base, tmp_path / "good.safetensors", state)
    assert load_model(good).encoder_state is not None  # the same file without the NaN loads
    key = "body.8._depthwise_conv.weight"
    state[key].view(-1)[7] = float("nan")
    refused(fine_tuned(base, tmp_path / "nan.safetensors", state), rf"weight encoder\.{re.escape(key)} contains NaN")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_decoder_weight_is_refused(base, tmp_path, value):
    def poison(tensors):
        tensors["decoder.rnn.weight_hh_l0"].view(-1)[3] = value

    refused(rewrite_model_file(base, tmp_path / "bad.safetensors", tensor_change=poison),
            r"weight decoder\.rnn\.weight_hh_l0 contains NaN or infinity")


def test_a_half_precision_file_loads_as_float32_and_captions_like_its_original(base, tmp_path):
    from captioner.api import Captioner

    half = tmp_path / "half.safetensors"
    save_model(half, load_model(base), dtype=torch.float16)
    assert half.stat().st_size < 0.6 * base.stat().st_size
    loaded, original = load_model(half), load_model(base)
    for key, value in original.decoder_state.items():
        assert loaded.decoder_state[key].dtype == torch.float32
        torch.testing.assert_close(loaded.decoder_state[key], value, rtol=1e-3, atol=1e-4)
    images = sorted((REPO / "demo" / "images").glob("*.jpg"))
    want = Captioner.load(base, device="cpu").caption(images, beam_size=3, precision="float32")
    got = Captioner.load(half, device="cpu").caption(images, beam_size=3, precision="float32")
    assert [r.caption for r in got] == [r.caption for r in want] and all(r.words for r in got)
    for a, b in zip(got, want):
        assert a.log_prob == pytest.approx(b.log_prob, abs=0.02)


def test_a_pickle_named_safetensors_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "x.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    refused(path, r"a pickle or zip checkpoint, not a safetensors model file; it was not loaded")
    assert not marker.exists()


def test_a_zip_torch_checkpoint_named_safetensors_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    torch.save({"state_dict": {"decoder.output.bias": torch.zeros(3)}}, path)
    assert path.read_bytes()[:2] == b"PK"
    refused(path, r"a pickle or zip checkpoint, not a safetensors model file")


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
                                     (2 ** 62).to_bytes(8, "little") + b"{}", b"hello world, not a model"])
def test_bytes_that_are_not_safetensors_are_refused(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    refused(path, r"not a valid safetensors model file|not a captioner model file")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    outcome: dict[str, BaseException] = {}

    def load():
        try:
            load_model(fifo)
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked reader go
        pytest.fail("load_model blocked on a FIFO")
    assert isinstance(outcome.get("error"), ModelFileError)
    refused(fifo, r"not a regular file")


def test_a_directory_and_a_device_are_refused(tmp_path):
    directory = tmp_path / "model.safetensors"
    directory.mkdir()
    refused(directory, r"is a directory, not a model file")
    refused(Path("/dev/null"), r"not a regular file \(a model file is one \.safetensors file\)")


def test_a_path_with_a_line_break_stays_one_line(tmp_path):
    odd = tmp_path / "two\nlines.safetensors"
    with pytest.raises(ModelFileError) as info:
        load_model(odd)
    assert str(info.value) == f"{tmp_path}/two\\nlines.safetensors: no such model file"


def test_a_bad_training_field_is_named_in_the_message(base, tmp_path):
    refused(rewrite_model_file(base, tmp_path / "bad.safetensors", lambda m: m.update(training='"x"')),
            r"damaged metadata: training: must be a JSON object")


@pytest.mark.parametrize("change", [setting("decoding", temperature=10 ** 400),
                                    edit("encoder", lambda d: d["preprocessing"].update(mean=[10 ** 400, 0.5, 0.5]))],
                         ids=["temperature", "preprocessing mean"])
def test_an_integer_too_large_for_a_float_is_refused(base, tmp_path, change):
    refused(rewrite_model_file(base, tmp_path / "big.safetensors", change), r"damaged metadata")


def test_a_decoder_that_does_not_fit_its_encoder_is_refused(base, tmp_path):
    def narrow(meta):  # a consistent decoder of feature_dim 8 behind EfficientNet-Lite0 (1280 channels)
        meta["decoder"] = json.dumps({**json.loads(meta["decoder"]), "feature_dim": 8})

    def resize(tensors):
        from captioner.model.decoder import CaptionDecoder, DecoderConfig
        config = json.loads(json.dumps(load_model(base).decoder_config.to_dict()))
        decoder = CaptionDecoder(DecoderConfig(**{**config, "feature_dim": 8}))
        tensors.clear()
        tensors.update({f"decoder.{k}": v.contiguous() for k, v in decoder.state_dict().items()})

    refused(rewrite_model_file(base, tmp_path / "narrow.safetensors", narrow, resize), r"feature")
