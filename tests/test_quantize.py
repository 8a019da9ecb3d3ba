"""int8 inference (captioner/model/quantize.py): close to float32, row-independent, CPU only,
inference only, and chosen by --precision."""
import pytest
import torch

from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.model.encoders import build_encoder
from captioner.model.ensemble import EnsembleDecoder
from captioner.model.quantize import (HIDDEN_RANGE, PinnedRangeInt8Linear, int8_supported, quantize_decoder,
                                      resolve_precision)
from captioner.model.search import beam_search

needs_int8 = pytest.mark.skipif(not int8_supported(), reason="this torch build has no x86 int8 kernels")
CPU = torch.device("cpu")


def decoder(cell="gru", attention=True, seed=0, vocab=300, layers=1):
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=vocab, feature_dim=64, cell=cell, attention=attention, embed_dim=32,
                        hidden_dim=48, attention_dim=40, dropout=0.0, num_layers=layers)
    return CaptionDecoder(cfg).eval().requires_grad_(False).fold_embedding()


def memory_of(dec, images=6, seed=1):
    torch.manual_seed(seed)
    grid = torch.rand(images, 9, 64) * 6  # ReLU6-like features in [0, 6]
    return dec.memory(grid, grid.mean(1))


@needs_int8
def test_pinned_linear_is_close_to_float_and_independent_of_the_other_rows():
    torch.manual_seed(0)
    weight, bias = torch.randn(500, 64) * 0.1, torch.randn(500)
    layer = PinnedRangeInt8Linear(weight, bias, HIDDEN_RANGE)
    x = torch.rand(40, 64) * 2 - 1
    together = layer(x)
    exact = x @ weight.T + bias
    assert together.shape == (40, 500)
    assert (together - exact).abs().max() < 0.03 * exact.abs().max()
    for rows in (slice(0, 1), slice(7, 10), slice(39, 40)):  # bit for bit, whatever else is in the batch
        assert torch.equal(layer(x[rows]), together[rows])
    # Without the pin, the scale follows the batch: one large row changes everyone's result.
    outlier = torch.cat([x[:3], torch.full((1, 64), 5.0)])
    assert not torch.equal(layer(outlier)[:3], together[:3])  # outside the range: only widens it
    assert (layer(outlier)[:3] - exact[:3]).abs().max() < 0.2 * exact.abs().max()


@needs_int8
@pytest.mark.parametrize("cell,attention,layers", [("gru", True, 1), ("lstm", True, 1), ("gru", False, 1),
                                                   ("rnn", False, 1), ("gru", True, 2), ("lstm", False, 2)])
def test_int8_decoder_steps_and_searches_close_to_float32(cell, attention, layers):
    dec = decoder(cell, attention, layers=layers)
    mem = memory_of(dec)
    state, tokens = dec.init_state(mem), torch.tensor([1, 5, 9, 2, 7, 11])
    expected, _, _ = dec.step(tokens, state, mem)
    reference = beam_search(dec, mem, beam_size=3, max_length=12)
    assert quantize_decoder(dec, feature_range=(0.0, 6.0)) is dec and dec.quantized
    assert isinstance(dec.output, PinnedRangeInt8Linear)
    assert (dec.context_gates is not None) == (attention and layers == 1)  # two layers: nn.GRU takes the context
    got, _, _ = dec.step(tokens, state, mem)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    int8 = beam_search(dec, mem, beam_size=3, max_length=12)
    assert torch.allclose(int8.log_probs, reference.log_probs, rtol=0.01, atol=0.1)


@needs_int8
def test_without_a_feature_range_the_context_product_stays_float32():
    dec = quantize_decoder(decoder(), feature_range=None)  # an encoder with unbounded features
    assert dec.context_gates is None and isinstance(dec.attention.gate, PinnedRangeInt8Linear)
    mem = memory_of(dec)
    out, _, _ = dec.step(torch.tensor([1, 5, 9, 2, 7, 11]), dec.init_state(mem), mem)
    assert torch.isfinite(out).all()


@needs_int8
def test_int8_is_for_inference_only():
    for layers in (1, 2):
        with pytest.raises(ValueError, match="fold_embedding"):
            quantize_decoder(CaptionDecoder(decoder(layers=layers).config).eval())  # never folded
    with pytest.raises(ValueError, match="fold_embedding"):
        quantize_decoder(decoder(layers=2).train().eval())  # folded, then trained: no longer frozen
    dec = quantize_decoder(decoder())
    with pytest.raises(RuntimeError, match="inference only"):
        dec.train()
    dec.eval()  # eval stays allowed


@needs_int8
def test_a_two_layer_model_file_captions_in_int8(tmp_path):
    """The CPU default (int8) for a `model.num_layers: 2` decoder: loads and captions like float32."""
    from conftest import REPO, make_tiny_model_file
    from captioner.api import Captioner

    path = make_tiny_model_file(tmp_path / "two-layer.safetensors", layers=2)
    images = sorted((REPO / "demo" / "images").glob("*.jpg"))
    int8 = Captioner.load(path, device="cpu")
    assert int8.precision == "int8" and int8.decoder.quantized
    got = int8.caption(images, beam_size=3)
    expected = Captioner.load(path, device="cpu", precision="float32").caption(images, beam_size=3)
    assert all(r.ok and r.words for r in got)
    for a, b in zip(got, expected):
        assert abs(a.log_prob - b.log_prob) < 0.05 * abs(b.log_prob) + 0.1


@needs_int8
def test_an_ensemble_quantizes_every_member():
    ens = EnsembleDecoder([decoder("gru", True, seed=0), decoder("gru", False, seed=1)])
    quantize_decoder(ens, feature_range=(0.0, 6.0))
    assert all(m.quantized and isinstance(m.output, PinnedRangeInt8Linear) for m in ens.members)


def test_precision_resolution():
    auto = resolve_precision("auto", CPU)
    assert auto == ("int8" if int8_supported() else "float32")
    assert resolve_precision("auto", torch.device("cuda")) == "float32"  # int8 kernels are CPU ones
    assert resolve_precision("float32", CPU) == "float32"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int4", CPU)


def test_precision_without_int8_kernels(monkeypatch):
    import captioner.model.quantize as quantize
    monkeypatch.setattr(quantize, "int8_supported", lambda: False)
    assert quantize.resolve_precision("auto", CPU) == "float32"
    with pytest.raises(ValueError, match="no x86 int8 kernels.*--precision float32"):
        quantize.resolve_precision("int8", CPU)


def test_encoder_feature_range():
    assert build_encoder("efficientnet-lite0", pretrained=False).feature_range == (0.0, 6.0)  # ReLU6
    assert build_encoder("mobilenet_v3_large", pretrained=False).feature_range is None  # Hardswish
