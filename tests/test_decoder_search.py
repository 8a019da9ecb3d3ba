"""Decoder and search behaviour on small random models (fast, no data needed)."""
import itertools
import math

import pytest
import torch

from captioner.decoding import DecodingConfig
from captioner.model.decoder import CaptionDecoder, DecoderConfig, Memory, SoftAttention
from captioner.model.search import (NEVER_WRITTEN, bar_end, beam_search, decode, draw, end_barring, greedy,
                                    length_penalty, repeat_state, sample)
from captioner.text import Vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = [(cell, att) for cell in ("lstm", "gru", "rnn") for att in (False, True)]


def make(cell="lstm", attention=False, layers=1, vocab=40, seed=0):
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=vocab, feature_dim=16, cell=cell, attention=attention, embed_dim=8,
                        hidden_dim=12, attention_dim=10, num_layers=layers, dropout=0.0)
    dec = CaptionDecoder(cfg).eval()
    grid = torch.randn(5, 6, 16)
    return dec, dec.memory(grid, grid.mean(1))


def padded_batch(vocab=40):
    lengths = torch.tensor([7, 4, 3, 6, 5])
    caps = torch.randint(4, vocab, (5, 7))
    caps[:, 0] = Vocabulary.start_id
    for i, n in enumerate(lengths):
        caps[i, n - 1] = Vocabulary.end_id
        caps[i, n:] = Vocabulary.pad_id
    return caps, lengths


def count_rows(dec):
    """Wrap dec.step to record the rows of every call."""
    rows, step = [], dec.step
    dec.step = lambda tokens, state, memory: (rows.append(tokens.shape[0]), step(tokens, state, memory))[1]
    return rows


@pytest.mark.parametrize("layers", [1, 2])  # one layer: steps run torch.*_cell on the module's weights
@pytest.mark.parametrize("cell,attention", CONFIGS)
def test_teacher_forcing_equals_step_by_step(cell, attention, layers):
    dec, mem = make(cell, attention, layers=layers)
    caps, lengths = padded_batch()
    logits, targets, alphas = dec(mem, caps, lengths)
    state, outs = dec.init_state(mem), []
    for t in range(caps.shape[1] - 1):
        out, state, _ = dec.step(caps[:, t], state, mem)
        outs.append(out)
    mask = torch.arange(caps.shape[1] - 1)[None] < (lengths - 1)[:, None]
    assert logits.shape == (int((lengths - 1).sum()), 40)
    assert torch.allclose(torch.stack(outs, 1)[mask], logits, atol=1e-5)
    assert torch.equal(targets, caps[:, 1:][mask])
    if attention:
        assert alphas.shape == (5, 6, 6)
        valid = alphas.sum(-1)[mask]
        assert torch.allclose(valid, torch.ones_like(valid), atol=1e-5)  # a distribution per word
        assert alphas[~mask].abs().sum() == 0  # no attention computed on padding
    else:
        assert alphas is None


def test_padding_does_not_change_results():
    dec, mem = make("lstm", True)
    caps, lengths = padded_batch()
    logits, _, _ = dec(mem, caps, lengths)
    wider = torch.cat([caps, torch.zeros(5, 4, dtype=torch.long)], 1)
    logits2, _, _ = dec(mem, wider, lengths)
    assert torch.allclose(logits, logits2, atol=1e-6)


@pytest.mark.parametrize("cell,attention", CONFIGS)
def test_k_rows_per_image_share_the_memory_row(cell, attention):
    """Beams/samples step against one memory row per image: the same results as against the
    memory copied for every row (what search did before), and a row count that does not
    divide into the images is an error, not a silent broadcast."""
    dec, mem = make(cell, attention)
    k = 3
    copied = Memory(*(None if x is None else x.repeat_interleave(k, dim=0) for x in mem))
    state = repeat_state(dec.init_state(mem), k)
    tokens = torch.randint(4, 40, (5 * k,))
    shared, expected = dec.step(tokens, state, mem), dec.step(tokens, state, copied)
    for a, b in zip((shared[0], *shared[1]), (expected[0], *expected[1])):
        assert torch.allclose(a, b, atol=1e-6)
    if attention:
        assert shared[2].shape == (5 * k, 6) and torch.allclose(shared[2], expected[2], atol=1e-6)
        with pytest.raises(ValueError, match="14 decoder rows cannot share the memory of 5 images"):
            dec.step(tokens[:14], tuple(s[:, :14] for s in state), mem)


def test_rnn_cell_is_plain_tanh_rnn():
    dec, mem = make("rnn")
    assert isinstance(dec.rnn, torch.nn.RNN) and dec.rnn.nonlinearity == "tanh"
    h0 = dec.init_state(mem)[0]
    tok = torch.full((5,), Vocabulary.start_id)
    _, (h1,), _ = dec.step(tok, (h0,), mem)
    r = dec.rnn
    manual = torch.tanh(dec.embedding(tok) @ r.weight_ih_l0.T + r.bias_ih_l0 + h0[0] @ r.weight_hh_l0.T + r.bias_hh_l0)
    assert torch.allclose(h1[0], manual, atol=1e-6)


def test_attention_is_show_attend_and_tell_soft_attention():
    """SoftAttention over K rows per image is the textbook attention of each row against its
    image's grid: same context, weights and gradients (Xu et al. 2015: alpha =
    softmax(w . tanh(W_v v + W_h h) + b), context = sigmoid(W_b h) * sum(alpha v))."""
    torch.manual_seed(0)
    att = SoftAttention(feature_dim=16, hidden_dim=12, attention_dim=10)
    grid, hidden = torch.randn(3, 6, 16, requires_grad=True), torch.randn(6, 12, requires_grad=True)  # K = 2

    context, alpha = att(grid, att.project_grid(grid), hidden)
    rows_grid = grid.repeat_interleave(2, dim=0)
    energy = torch.tanh(att.encoder_proj(rows_grid) + att.hidden_proj(hidden)[:, None, :])
    ref_alpha = torch.softmax(att.score(energy).squeeze(2), dim=1)
    ref_context = torch.sigmoid(att.gate(hidden)) * (ref_alpha[:, :, None] * rows_grid).sum(1)
    assert torch.allclose(alpha, ref_alpha, atol=1e-6) and torch.allclose(context, ref_context, atol=1e-6)

    ours = torch.autograd.grad(context.square().sum(), [grid, hidden, *att.parameters()], allow_unused=True)
    ref = torch.autograd.grad(ref_context.square().sum(), [grid, hidden, *att.parameters()], allow_unused=True)
    for a, b in zip(ours, ref):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="cell"):
        DecoderConfig(vocab_size=10, feature_dim=4, cell="transformer")
    with pytest.raises(ValueError, match="dropout"):
        DecoderConfig(vocab_size=10, feature_dim=4, dropout=1.0)


@pytest.mark.parametrize("field,value", [
    ("hidden_dim", 0), ("hidden_dim", -3), ("hidden_dim", 32.0), ("hidden_dim", "32"), ("hidden_dim", True),
    ("vocab_size", None), ("num_layers", 1.5), ("embed_dim", [8]), ("attention", 1), ("attention", "yes"),
    ("dropout", True), ("dropout", -0.1), ("dropout", "0.1"), ("dropout", float("nan")),
])
def test_config_refuses_values_of_the_wrong_kind(field, value):
    """Sizes are positive integers (not bools, floats or strings), attention a bool, dropout
    a number in [0, 1): a config read from a file cannot smuggle in another type."""
    settings = {"vocab_size": 10, "feature_dim": 4, field: value}
    with pytest.raises(ValueError, match=field):
        DecoderConfig(**settings)
    assert DecoderConfig(vocab_size=10, feature_dim=4, dropout=0).to_dict()["dropout"] == 0  # an int is a number


@pytest.mark.parametrize("cell,attention", CONFIGS)
def test_beam_size_one_equals_greedy_argmax(cell, attention):
    dec, mem = make(cell, attention)
    result = beam_search(dec, mem, beam_size=1, max_length=12)
    # reference: a plain argmax loop over step()
    state, tok = dec.init_state(mem), torch.full((5,), Vocabulary.start_id)
    ref = []
    for _ in range(12):
        logits, state, _ = dec.step(tok, state, mem)
        logits[:, [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]] = float("-inf")
        tok = logits.argmax(-1)
        ref.append(tok)
    ref = torch.stack(ref, 1)
    for i in range(5):
        n = int(result.lengths[i, 0])
        assert torch.equal(result.tokens[i, 0, :n], ref[i, :n])
    assert torch.equal(greedy(dec, mem, 12).tokens, result.tokens)


def test_beams_sorted_and_n_best_shapes():
    dec, mem = make("gru", True)
    r = beam_search(dec, mem, beam_size=5, max_length=10, n_best=5, alpha=0.7, return_attention=True)
    assert r.tokens.shape[:2] == (5, 5) and r.attention.shape[:2] == (5, 5)
    assert (r.scores[:, :-1] >= r.scores[:, 1:]).all()
    assert torch.allclose(r.scores, r.log_probs / length_penalty(r.lengths, 0.7))


def test_answer_even_when_no_beam_ends():
    dec, mem = make("lstm")
    with torch.no_grad():
        dec.output.bias[Vocabulary.end_id] = -1e4  # <end> is never chosen
    r = beam_search(dec, mem, beam_size=3, max_length=6, n_best=3)
    assert r.tokens.shape == (5, 3, 6)
    assert (r.lengths == 6).all() and torch.isfinite(r.log_probs).all()


def test_batch_equals_one_at_a_time():
    dec, mem = make("lstm", True)
    together = beam_search(dec, mem, beam_size=4, max_length=10, n_best=2)
    for i in range(5):
        single = type(mem)(*(t[i:i + 1] for t in mem))
        alone = beam_search(dec, single, beam_size=4, max_length=10, n_best=2)
        n = alone.tokens.shape[2]
        assert torch.equal(alone.tokens[0], together.tokens[i, :, :n])
        assert torch.allclose(alone.log_probs[0], together.log_probs[i], atol=1e-5)


def test_finished_images_leave_the_batch():
    """An image whose n-best can no longer change stops costing decoder rows; the others'
    results are those of searching each image alone."""
    dec, mem = make("gru", True)
    with torch.no_grad():
        dec.output.bias[Vocabulary.end_id] = 0.5  # captions end, at different steps per image
    rows = count_rows(dec)
    together = beam_search(dec, mem, beam_size=3, max_length=20, alpha=1.0, return_attention=True)
    assert rows[0] == 5  # the first step: one row per image (its 3 beams start identical)
    assert rows[1] == 15 and rows[1:] == sorted(rows[1:], reverse=True) and rows[-1] < 15
    assert all(r % 3 == 0 for r in rows[1:])  # whole images leave: 3 beams each
    for i in range(5):
        alone = beam_search(dec, type(mem)(*(t[i:i + 1] for t in mem)), beam_size=3, max_length=20,
                            alpha=1.0, return_attention=True)
        n = alone.tokens.shape[2]
        assert torch.equal(alone.tokens[0], together.tokens[i, :, :n])
        assert torch.allclose(alone.scores[0], together.scores[i], atol=1e-5)
        assert torch.allclose(alone.attention[0], together.attention[i, :, :n], atol=1e-5)


def test_images_leaving_in_stages_keep_their_own_results_and_the_callers_memory():
    """Images leave at five different steps; the stayers are moved into the leavers' places
    in search's own copy of the memory. Each image's answer is still its own, and the
    caller's memory tensors are never written."""
    torch.manual_seed(1)
    cfg = DecoderConfig(vocab_size=40, feature_dim=16, cell="gru", attention=True, embed_dim=8,
                        hidden_dim=12, attention_dim=10, dropout=0.0)
    dec = CaptionDecoder(cfg).eval()
    grid = torch.randn(12, 6, 16) * 3
    mem = dec.memory(grid, grid.mean(1))
    with torch.no_grad():
        dec.output.bias[Vocabulary.end_id] = 0.5
    untouched = [t.clone() for t in mem]
    rows = count_rows(dec)
    together = beam_search(dec, mem, beam_size=3, max_length=20, alpha=1.0, return_attention=True)
    assert len(set(rows[1:])) >= 5  # 36 -> ... -> 3: several compactions
    assert all(torch.equal(a, b) for a, b in zip(untouched, mem))
    for i in range(12):
        alone = beam_search(dec, type(mem)(*(t[i:i + 1] for t in mem)), beam_size=3, max_length=20,
                            alpha=1.0, return_attention=True)
        n = alone.tokens.shape[2]
        assert torch.equal(alone.tokens[0], together.tokens[i, :, :n])
        assert torch.allclose(alone.attention[0], together.attention[i, :, :n], atol=1e-5)


def test_n_best_answer_is_the_top_of_the_wider_search():
    """Without a length penalty, stopping once the n best finished captions are settled
    loses nothing: the n-best answer is exactly the top n of the search that settles all K,
    and a smaller n costs fewer decoder rows."""
    dec, mem = make("lstm", True)
    with torch.no_grad():
        dec.output.bias[Vocabulary.end_id] = 0.2  # captions of 5 to 15 tokens
    rows = count_rows(dec)
    full = beam_search(dec, mem, beam_size=4, max_length=15, n_best=4)
    assert len(set(full.lengths[:, 0].tolist())) >= 3
    cost = {4: sum(rows)}
    for n in (1, 2):
        rows[:] = []
        early = beam_search(dec, mem, beam_size=4, max_length=15, n_best=n)
        cost[n] = sum(rows)
        width = early.tokens.shape[2]
        assert torch.equal(early.tokens, full.tokens[:, :n, :width])
        assert (full.tokens[:, :n, width:] == Vocabulary.pad_id).all()
        torch.testing.assert_close(early.scores, full.scores[:, :n])
    assert cost[1] < cost[2] < cost[4], cost


def brute_force_n_best(dec, mem, max_length, alpha, n):
    """Every caption of at most max_length tokens (<end> included) over the writable words,
    scored exactly as beam search scores finished ones: [(score, log_prob, tokens)] per image."""
    vocab = dec.config.vocab_size
    words = [w for w in range(vocab) if w not in NEVER_WRITTEN and w != Vocabulary.end_id]
    images = mem.pooled.shape[0]
    answers = []
    for i in range(images):
        single = Memory(*(None if x is None else x[i:i + 1] for x in mem))
        found = []
        for length in range(max_length):
            for prefix in itertools.product(words, repeat=length):
                tokens = [*prefix, Vocabulary.end_id]
                state, previous, total = dec.init_state(single), Vocabulary.start_id, 0.0
                for token in tokens:
                    logits, state, _ = dec.step(torch.tensor([previous]), state, single)
                    total += float(torch.log_softmax(logits, -1)[0, token])
                    previous = token
                found.append((total / float(length_penalty(torch.tensor(len(tokens)), alpha)), total, tokens))
        answers.append(sorted(found, key=lambda x: -x[0])[:n])
    return answers


@pytest.mark.parametrize("alpha", [0.0, -1.0])
@pytest.mark.parametrize("cell,attention", [("gru", True), ("lstm", False)])
def test_a_beam_wide_enough_for_every_caption_finds_the_exact_n_best(cell, attention, alpha):
    """Three writable tokens (two words and <end>), captions of at most 4 tokens: a beam of
    24 holds every hypothesis, so beam search must return the brute-force n-best exactly,
    ranked by score. The stop rule is exact whenever the penalty never rewards length
    (alpha <= 0): a longer caption can only score lower than its prefix's bound."""
    dec, mem = make(cell, attention, vocab=6)
    mem = Memory(*(None if x is None else x[:3] for x in mem))
    with torch.no_grad():
        dec.output.bias[Vocabulary.end_id] = 0.5
        result = beam_search(dec, mem, beam_size=24, max_length=4, n_best=8, alpha=alpha)
        expected = brute_force_n_best(dec, mem, 4, alpha, 8)
    for i, best in enumerate(expected):
        assert len({len(tokens) for _, _, tokens in best}) >= 2  # captions of different lengths compete
        for j, (score, log_prob, tokens) in enumerate(best):
            assert result.tokens[i, j, :len(tokens)].tolist() == tokens
            assert int(result.lengths[i, j]) == len(tokens)
            assert float(result.log_probs[i, j]) == pytest.approx(log_prob, abs=1e-4)
            assert float(result.scores[i, j]) == pytest.approx(score, abs=1e-4)


def test_search_refuses_an_impossible_n_best():
    dec, mem = make("gru")
    for beam, n in ((2, 3), (0, 1), (3, 0)):
        with pytest.raises(ValueError, match="1 <= n_best <= beam_size"):
            beam_search(dec, mem, beam_size=beam, n_best=n)


def test_decode_runs_the_method_the_config_asks_for():
    """decode() is beam search with the config's beam, n-best, length and penalty, or
    sampling with its temperature, top-k and n-best draws; no_end_after reaches both."""
    dec, mem = make("gru", True)
    barred = [4, 5]
    beam = DecodingConfig(beam_size=4, n_best=2, max_length=9, length_penalty=0.6)
    got = decode(dec, mem, beam, return_attention=True, no_end_after=barred)
    want = beam_search(dec, mem, beam_size=4, max_length=9, alpha=0.6, n_best=2, return_attention=True,
                       no_end_after=barred)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.scores, want.scores)
    assert got.attention is not None and torch.equal(got.attention, want.attention)
    drawn = DecodingConfig(sample=True, n_best=5, beam_size=1, max_length=7, temperature=0.8, top_k=6)
    got = decode(dec, mem, drawn, generator=torch.Generator().manual_seed(2), no_end_after=barred)
    want = sample(dec, mem, 7, temperature=0.8, top_k=6, num_samples=5, generator=torch.Generator().manual_seed(2),
                  no_end_after=barred)
    assert got.tokens.shape[:2] == (5, 5) and torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.log_probs, want.log_probs)


def test_length_penalty_is_gnmt():
    lengths = torch.tensor([1, 4, 10])
    assert torch.equal(length_penalty(lengths, 0.0), torch.ones(3))
    torch.testing.assert_close(length_penalty(lengths, 0.7), ((5.0 + lengths.float()) / 6.0) ** 0.7)
    assert float(length_penalty(torch.tensor(1), 2.0)) == pytest.approx(1.0)  # ((5 + 1) / 6) ** alpha


def test_repeat_state_is_image_major():
    h = torch.arange(6.0).view(1, 3, 2)  # 1 layer, 3 images, H = 2
    (repeated,) = repeat_state((h,), 2)
    assert repeated[0, :, 0].tolist() == [0.0, 0.0, 2.0, 2.0, 4.0, 4.0]
    assert repeat_state((h,), 1)[0] is h


def test_end_barring_masks_end_after_the_barred_words_only():
    assert end_barring(None, 8, "cpu") is None and end_barring([], 8, "cpu") is None
    barred = end_barring([4, 6], 8, "cpu")
    assert barred.tolist() == [False] * 4 + [True, False, True, False]
    logp = torch.zeros(3, 8)
    bar_end(logp, torch.tensor([4, 5, 6]), barred)
    assert logp[:, Vocabulary.end_id].tolist() == [-math.inf, 0.0, -math.inf]
    assert torch.isfinite(logp[:, [0, 1, 3, 4, 5, 6, 7]]).all()  # only <end> is touched
    unchanged = torch.zeros(3, 8)
    bar_end(unchanged, torch.tensor([4, 5, 6]), None)
    assert torch.equal(unchanged, torch.zeros(3, 8))


def test_sampling_log_probs_are_over_the_writable_words():
    """The never-written ids are banned before the log-softmax and the top-k cut: a decoder
    that loves <unk> still draws from its two best real words (top_k=2), each with its
    probability among the writable words."""
    dec, mem = make("gru", vocab=12)
    with torch.no_grad():
        dec.output.weight.zero_()
        dec.output.bias.zero_()
        dec.output.bias[Vocabulary.unk_id] = 100.0
        dec.output.bias[[4, 5]] = 5.0
        drawn = draw(dec, mem, samples=40, max_length=1, top_k=2, generator=torch.Generator().manual_seed(0))
    first = drawn.tokens[:, 0]
    assert set(first.tolist()) == {4, 5}  # both, and nothing else
    writable = 12 - len(NEVER_WRITTEN)
    expected = 5.0 - math.log(2 * math.exp(5.0) + (writable - 2))
    torch.testing.assert_close(drawn.log_probs[:, 0], torch.full((200,), expected), atol=1e-5, rtol=0)
    sorted_result = sample(dec, mem, 1, top_k=2, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sorted_result.scores, sorted_result.log_probs)
    assert (sorted_result.lengths == 1).all()


def test_finished_log_prob_matches_rescoring():
    dec, mem = make("gru")
    r = beam_search(dec, mem, beam_size=3, max_length=10)
    state, tok, total = dec.init_state(mem), torch.full((5,), Vocabulary.start_id), torch.zeros(5)
    for t in range(int(r.lengths.max())):
        logits, state, _ = dec.step(tok, state, mem)
        tok = r.tokens[:, 0, t]
        lp = torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
        total += torch.where(t < r.lengths[:, 0], lp, torch.zeros_like(lp))
    assert torch.allclose(total, r.log_probs[:, 0], atol=1e-4)


def test_sampling_respects_top_k_seed_and_temperature():
    dec, mem = make("lstm")
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = sample(dec, mem, 10, temperature=0.7, top_k=3, num_samples=4, generator=g())
    b = sample(dec, mem, 10, temperature=0.7, top_k=3, num_samples=4, generator=g())
    assert torch.equal(a.tokens, b.tokens)
    assert (a.log_probs[:, :-1] >= a.log_probs[:, 1:]).all()
    # top_k=1 sampling is greedy
    one = sample(dec, mem, 10, top_k=1, generator=g())
    gr = greedy(dec, mem, 10)
    n = one.tokens.shape[2]
    assert torch.equal(one.tokens[:, 0], gr.tokens[:, 0, :n])
    with pytest.raises(ValueError):
        sample(dec, mem, 10, temperature=0)


def test_unknown_word_is_never_written():
    """Even a decoder that loves <unk> (huge output bias) writes real words instead."""
    dec, mem = make("gru", False)
    with torch.no_grad():
        dec.output.bias[Vocabulary.unk_id] = 100.0
        for result in (greedy(dec, mem, 8), beam_search(dec, mem, beam_size=3, n_best=3, max_length=8),
                       sample(dec, mem, 8, num_samples=3, generator=torch.Generator().manual_seed(0))):
            assert not (result.tokens == Vocabulary.unk_id).any()


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_no_caption_ends_on_a_barred_word(search):
    """<end> is barred right after the words of `no_end_after` (an article, say), in every
    search: a decoder that always prefers <end>, then word 4, writes "4" and stops without
    the bar on 4, and never stops right after a 4 with it."""
    dec, mem = make("gru", vocab=12)
    with torch.no_grad():
        dec.output.weight.zero_()
        dec.output.bias.zero_()
        dec.output.bias[Vocabulary.end_id] = 5.0
        dec.output.bias[4] = 4.0

    def run(barred):
        with torch.no_grad():
            if search == "greedy":
                return greedy(dec, mem, max_length=6, no_end_after=barred).tokens[:, 0]
            if search == "beam":
                return beam_search(dec, mem, beam_size=3, max_length=6, no_end_after=barred).tokens[:, 0]
            torch.manual_seed(0)  # sampling: <end> (or 4) has nearly all the mass, so the draw is fixed
            return sample(dec, mem, max_length=6, temperature=0.05, no_end_after=barred).tokens[:, 0]

    assert run(None)[:, 0].tolist() == [Vocabulary.end_id] * 5          # an empty caption
    assert run([Vocabulary.start_id])[:, :2].tolist() == [[4, Vocabulary.end_id]] * 5
    barred = run([Vocabulary.start_id, 4])
    previous = torch.cat([torch.full_like(barred[:, :1], Vocabulary.start_id), barred[:, :-1]], dim=1)
    ends = barred == Vocabulary.end_id
    assert not (ends & ((previous == 4) | (previous == Vocabulary.start_id))).any(), barred
