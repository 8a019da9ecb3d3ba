"""The inference fast path (captioner/model/inference.py): a FastDecoder computes the textbook
CaptionDecoder's function (float32: up to rounding; int8: closely), a caption never depends
on the batch it is searched in, a FastDecoder is for inference only, and precision is
resolved for the device."""
import pytest
import torch

from captioner.errors import DeviceError
from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.model.encoders import build_encoder
from captioner.model.ensemble import EnsembleDecoder
from captioner.model.inference import (HIDDEN_RANGE, FastDecoder, PinnedRangeInt8Linear, fast_decoder,
                                       int8_supported, resolve_precision)
from captioner.model.search import beam_search, greedy, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_int8 = pytest.mark.skipif(not int8_supported(), reason="this torch build has no x86 int8 kernels")
CPU = torch.device("cpu")
SHAPES = [(cell, attention, layers) for cell in ("lstm", "gru", "rnn") for attention in (False, True)
          for layers in (1, 2)]


def decoder(cell="gru", attention=True, seed=0, vocab=300, layers=1) -> CaptionDecoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=vocab, feature_dim=64, cell=cell, attention=attention, embed_dim=32,
                        hidden_dim=48, attention_dim=40, dropout=0.0, num_layers=layers)
    return CaptionDecoder(cfg).eval()


def features(images=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(images, 9, 64, generator=g) * 6  # ReLU6-like features in [0, 6]
    return grid, grid.mean(1)


def steps(dec, memory, tokens, n=5):
    """n greedy steps from `tokens`: every step's logits, attention and final state."""
    state, outs = dec.init_state(memory), []
    for _ in range(n):
        logits, state, alpha = dec.step(tokens, state, memory)
        outs.append((logits, alpha))
        tokens = logits.argmax(-1)
    return outs, state


@pytest.mark.parametrize("cell,attention,layers", SHAPES)
def test_float32_fast_decoder_computes_the_textbook_function(cell, attention, layers):
    """Same logits, states and attention at every step up to float rounding, and beam search
    finds the same captions, for every cell, with and without attention, 1 and 2 layers."""
    dec = decoder(cell, attention, layers=layers, vocab=40)
    fast = fast_decoder(dec, "float32")
    assert isinstance(fast, FastDecoder) and fast.config == dec.config
    grid, pooled = features()
    with torch.no_grad():
        plain_mem, fast_mem = dec.memory(grid, pooled), fast.memory(grid, pooled)
        tokens = torch.tensor([1, 5, 9, 2, 7, 11])
        want, want_state = steps(dec, plain_mem, tokens)
        got, got_state = steps(fast, fast_mem, tokens)
        for (a_logits, a_alpha), (b_logits, b_alpha) in zip(want, got):
            torch.testing.assert_close(b_logits, a_logits, atol=1e-5, rtol=1e-5)
            assert (a_alpha is None) == (b_alpha is None) == (not attention)
            if attention:
                torch.testing.assert_close(b_alpha, a_alpha, atol=1e-6, rtol=1e-5)
        for a, b in zip(want_state, got_state):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        plain = beam_search(dec, plain_mem, beam_size=3, max_length=12, n_best=3, return_attention=attention)
        quick = beam_search(fast, fast_mem, beam_size=3, max_length=12, n_best=3, return_attention=attention)
    assert torch.equal(quick.tokens, plain.tokens)
    torch.testing.assert_close(quick.log_probs, plain.log_probs, atol=1e-4, rtol=1e-5)
    if attention:
        torch.testing.assert_close(quick.attention, plain.attention, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_fast_memory_holds_twice_the_textbook_projection(cell):
    """The sigmoid form's energies read 2 W_v v: a FastDecoder's grid_proj is twice the
    textbook one, while the grid and the pooled features are the caller's."""
    dec = decoder(cell)
    fast = fast_decoder(dec)
    grid, pooled = features()
    with torch.no_grad():
        plain, quick = dec.memory(grid, pooled), fast.memory(grid, pooled)
    torch.testing.assert_close(quick.grid_proj, 2 * plain.grid_proj)
    assert quick.grid is grid and quick.pooled is pooled
    with pytest.raises(ValueError, match="needs the feature grid"):
        fast.memory(None, pooled)
    without = fast_decoder(decoder(cell, attention=False)).memory(None, pooled)
    assert without.grid is None and without.grid_proj is None


def test_fast_decoder_runs_sampling_like_the_textbook_decoder():
    """Search methods other than beam search run on it too: same seed, same draws."""
    dec = decoder("lstm", vocab=40)
    fast = fast_decoder(dec)
    grid, pooled = features()
    with torch.no_grad():
        want = sample(dec, dec.memory(grid, pooled), 10, num_samples=3, generator=torch.Generator().manual_seed(4))
        got = sample(fast, fast.memory(grid, pooled), 10, num_samples=3, generator=torch.Generator().manual_seed(4))
        assert torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-4, rtol=1e-5)
        assert torch.equal(greedy(fast, fast.memory(grid, pooled), 10).tokens,
                           greedy(dec, dec.memory(grid, pooled), 10).tokens)


def test_fast_ensemble_captions_like_the_textbook_ensemble():
    members = [decoder("gru", True, seed=0, vocab=40), decoder("lstm", False, seed=1, vocab=40, layers=2)]
    plain = EnsembleDecoder(members).eval()
    fast = fast_decoder(plain)
    assert isinstance(fast, EnsembleDecoder) and all(isinstance(m, FastDecoder) for m in fast.members)
    grid, pooled = features()
    with torch.no_grad():
        want = beam_search(plain, plain.memory(grid, pooled), beam_size=3, max_length=12, n_best=2)
        got = beam_search(fast, fast.memory(grid, pooled), beam_size=3, max_length=12, n_best=2)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-4, rtol=1e-5)


def test_a_fast_decoder_is_for_inference_only():
    dec = decoder()
    fast = fast_decoder(dec)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    assert fast.eval() is fast and not fast.training  # eval stays allowed
    ensemble = fast_decoder(EnsembleDecoder([decoder(seed=0), decoder(seed=1)]))
    with pytest.raises(RuntimeError, match="inference only"):
        ensemble.train()
    torch.manual_seed(5)  # a decoder still in training mode, with dropout: wrapped, it computes its eval function
    training = CaptionDecoder(DecoderConfig(vocab_size=40, feature_dim=64, cell="lstm", attention=True, embed_dim=32,
                                            hidden_dim=48, attention_dim=40, dropout=0.5)).train()
    wrapped = fast_decoder(training)
    grid, pooled = features()
    tokens = torch.tensor([1, 5, 9, 2, 7, 11])
    with torch.no_grad():
        fast_mem = wrapped.memory(grid, pooled)
        first, _, _ = wrapped.step(tokens, wrapped.init_state(fast_mem), fast_mem)
        again, _, _ = wrapped.step(tokens, wrapped.init_state(fast_mem), fast_mem)
        mem = training.eval().memory(grid, pooled)
        textbook, _, _ = training.step(tokens, training.init_state(mem), mem)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, textbook, atol=1e-5, rtol=1e-5)
    for precision in ("auto", "float16", "int4"):  # resolve "auto" first; nothing else exists
        with pytest.raises(ValueError, match="precision must be float32 or int8"):
            fast_decoder(dec, precision)


# ---- int8 --------------------------------------------------------------------------------

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
    # A value outside the pinned range widens it (so changes the others) but stays close.
    outlier = torch.cat([x[:3], torch.full((1, 64), 5.0)])
    assert not torch.equal(layer(outlier)[:3], together[:3])
    assert (layer(outlier)[:3] - exact[:3]).abs().max() < 0.2 * exact.abs().max()


def test_pinned_linear_refuses_an_empty_range():
    with pytest.raises(ValueError, match="low < high"):
        PinnedRangeInt8Linear(torch.randn(4, 8), None, (1.0, 1.0))
    with pytest.raises(ValueError, match="at least 2 inputs"):
        PinnedRangeInt8Linear(torch.randn(4, 1), None, (-1.0, 1.0))


@needs_int8
@pytest.mark.parametrize("cell,attention,layers", [("gru", True, 1), ("lstm", True, 1), ("gru", False, 1),
                                                   ("rnn", False, 1), ("gru", True, 2), ("lstm", False, 2)])
def test_int8_steps_and_searches_close_to_float32(cell, attention, layers):
    dec = decoder(cell, attention, layers=layers)
    grid, pooled = features()
    tokens = torch.tensor([1, 5, 9, 2, 7, 11])
    with torch.no_grad():
        mem = dec.memory(grid, pooled)
        expected, _, _ = dec.step(tokens, dec.init_state(mem), mem)
        reference = beam_search(dec, mem, beam_size=3, max_length=12)
        int8 = fast_decoder(dec, "int8", feature_range=(0.0, 6.0))
        assert isinstance(int8.output, PinnedRangeInt8Linear)
        assert (int8.context_gates is not None) == (attention and layers == 1)  # two layers: nn.GRU takes the context
        fast_mem = int8.memory(grid, pooled)
        got, _, _ = int8.step(tokens, int8.init_state(fast_mem), fast_mem)
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()
        searched = beam_search(int8, fast_mem, beam_size=3, max_length=12)
        torch.testing.assert_close(searched.log_probs, reference.log_probs, rtol=0.01, atol=0.1)
        # The textbook decoder it wraps is left as it was: same function, float32 layers.
        assert type(dec.output) is torch.nn.Linear
        torch.testing.assert_close(dec.step(tokens, dec.init_state(mem), mem)[0], expected, atol=0, rtol=0)


@needs_int8
def test_without_a_feature_range_the_context_product_stays_float32():
    dec = fast_decoder(decoder(), "int8", feature_range=None)  # an encoder with unbounded features
    assert dec.context_gates is None and isinstance(dec.gate, PinnedRangeInt8Linear)
    grid, pooled = features()
    with torch.no_grad():
        mem = dec.memory(grid, pooled)
        out, _, _ = dec.step(torch.tensor([1, 5, 9, 2, 7, 11]), dec.init_state(mem), mem)
    assert torch.isfinite(out).all()


@needs_int8
@pytest.mark.parametrize("cell,layers", [("gru", 1), ("lstm", 1), ("gru", 2)])
def test_an_int8_caption_never_depends_on_its_batch(cell, layers):
    """The pinned activation range: searched with 5 other images or alone, each image gets
    the same caption with the same log-probability."""
    dec = fast_decoder(decoder(cell, layers=layers), "int8", feature_range=(0.0, 6.0))
    grid, pooled = features(images=6)
    grid[3] *= 0.05  # one image with much smaller features than its neighbours
    pooled = grid.mean(1)
    with torch.no_grad():
        together = beam_search(dec, dec.memory(grid, pooled), beam_size=3, max_length=12, n_best=2)
        for i in range(6):
            alone = beam_search(dec, dec.memory(grid[i:i + 1], pooled[i:i + 1]), beam_size=3, max_length=12,
                                n_best=2)
            width = alone.tokens.shape[2]
            assert torch.equal(alone.tokens[0], together.tokens[i, :, :width])
            assert (together.tokens[i, :, width:] == 0).all()
            torch.testing.assert_close(alone.log_probs[0], together.log_probs[i], atol=1e-5, rtol=0)


@needs_int8
def test_an_ensemble_runs_every_member_in_int8():
    ens = fast_decoder(EnsembleDecoder([decoder("gru", True, seed=0), decoder("gru", False, seed=1)]), "int8",
                       feature_range=(0.0, 6.0))
    assert all(isinstance(m, FastDecoder) and isinstance(m.output, PinnedRangeInt8Linear) for m in ens.members)
    grid, pooled = features()
    with torch.no_grad():
        result = beam_search(ens, ens.memory(grid, pooled), beam_size=3, max_length=10)
    assert torch.isfinite(result.log_probs).all()


@needs_int8
def test_a_two_layer_model_file_captions_in_int8(tmp_path):
    """The CPU default (auto: int8) for a `num_layers: 2` decoder loads and captions like float32."""
    from conftest import REPO, make_tiny_model_file

    from captioner.api import Captioner

    path = make_tiny_model_file(tmp_path / "two-layer.safetensors", layers=2)
    images = sorted((REPO / "demo" / "images").glob("*.jpg"))
    captioner = Captioner.load(path, device="cpu")
    assert captioner.decoding.precision == "auto"
    int8 = captioner.decoder_for("auto")
    assert int8 is captioner.decoder_for("int8")  # built once per precision
    assert isinstance(int8, FastDecoder) and isinstance(int8.output, PinnedRangeInt8Linear)
    got = captioner.caption(images, beam_size=3)
    expected = captioner.caption(images, beam_size=3, precision="float32")
    assert all(r.ok and r.words for r in got)
    for a, b in zip(got, expected):
        assert abs(a.log_prob - b.log_prob) < 0.05 * abs(b.log_prob) + 0.1


# ---- precision ---------------------------------------------------------------------------

def test_precision_resolution():
    auto = resolve_precision("auto", CPU)
    assert auto == ("int8" if int8_supported() else "float32")
    assert resolve_precision("auto", torch.device("cuda")) == "float32"  # int8 kernels are CPU ones
    assert resolve_precision("float32", CPU) == "float32"
    assert resolve_precision("float32", torch.device("cuda")) == "float32"
    with pytest.raises(DeviceError, match="int8 runs on the CPU only, not on cuda"):
        resolve_precision("int8", torch.device("cuda"))


def test_precision_without_int8_kernels(monkeypatch):
    import captioner.model.inference as inference
    monkeypatch.setattr(inference, "int8_supported", lambda: False)
    assert inference.resolve_precision("auto", CPU) == "float32"
    with pytest.raises(DeviceError, match="no x86 int8 kernels.*use float32") as info:
        inference.resolve_precision("int8", CPU)
    assert "\n" not in str(info.value)


def test_encoder_feature_range():
    assert build_encoder("efficientnet-lite0", pretrained=False).feature_range == (0.0, 6.0)  # ReLU6
    assert build_encoder("mobilenet_v3_large", pretrained=False).feature_range is None  # Hardswish
