"""Decoder and search behaviour on small random models (fast, no data needed)."""
import pytest
import torch

from captioner.model.decoder import CaptionDecoder, DecoderConfig, Memory, SoftAttention
from captioner.model.search import beam_search, greedy, length_penalty, repeat_state, sample
from captioner.text import Vocabulary

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


@pytest.mark.parametrize("cell,attention", CONFIGS)
def test_scheduled_sampling_feeds_back_the_decoders_own_words(cell, attention):
    """sample_prob 0 through the step loop equals the fused teacher-forced path; sample_prob
    ~1 feeds every word after <start> from the decoder's own previous argmax (free running),
    and the loss still lines up with the reference targets."""
    dec, mem = make(cell, attention)
    caps, lengths = padded_batch()
    forced, targets, _ = dec(mem, caps, lengths)
    steps = lengths - 1
    stepwise, _ = dec._forward_stepwise(caps[:, :-1], steps, dec.init_state(mem), mem)
    mask = torch.arange(caps.shape[1] - 1)[None] < steps[:, None]
    torch.testing.assert_close(dec.output(stepwise[mask]), forced, atol=1e-5, rtol=0)

    free, free_targets, _ = dec(mem, caps, lengths, sample_prob=0.999999)
    assert torch.equal(free_targets, targets)
    state, tok, outs = dec.init_state(mem), caps[:, 0], []
    for _ in range(caps.shape[1] - 1):
        logits, state, _ = dec.step(tok, state, mem)
        outs.append(logits)
        tok = logits.argmax(1)
    torch.testing.assert_close(free, torch.stack(outs, 1)[mask], atol=1e-5, rtol=0)
    assert not torch.allclose(free, forced, atol=1e-3)


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


@pytest.mark.parametrize("cell,attention", CONFIGS)
def test_folded_embedding_steps_like_the_plain_decoder(cell, attention):
    """fold_embedding (what Captioner does) changes no step's result beyond float rounding,
    so beam search finds the same captions; .train() drops the tables."""
    dec, mem = make(cell, attention)
    plain = beam_search(dec, mem, beam_size=3, max_length=12, n_best=3, return_attention=attention)
    state, tokens = dec.init_state(mem), torch.tensor([1, 5, 9, 2, 7])
    expected = dec.step(tokens, state, mem)
    assert dec.fold_embedding() is dec and dec._token_gates.shape[0] == 40
    got = dec.step(tokens, state, mem)
    for a, b in zip((expected[0], *expected[1]), (got[0], *got[1])):
        assert torch.allclose(a, b, atol=1e-5)
    folded = beam_search(dec, mem, beam_size=3, max_length=12, n_best=3, return_attention=attention)
    assert torch.equal(plain.tokens, folded.tokens)
    assert torch.allclose(plain.log_probs, folded.log_probs, atol=1e-5)
    dec.train()
    assert dec._token_gates is None and "_token_gates" not in dec.state_dict()


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
    """The sigmoid form computed for speed is the textbook tanh attention: same context,
    weights and gradients (Xu et al. 2015: alpha = softmax(w . tanh(W_v v + W_h h) + b),
    context = sigmoid(W_b h) * sum(alpha v))."""
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


def test_n_best_search_stops_no_earlier_than_its_answer_allows():
    """Stopping once the n best finished hypotheses are settled (exhaustive bound) returns
    exactly the top n of a search that settles all K."""
    dec, mem = make("lstm", True)
    with torch.no_grad():
        dec.output.bias[Vocabulary.end_id] = 1.5
    full = beam_search(dec, mem, beam_size=4, max_length=15, alpha=1.0, n_best=4, exhaustive=True)
    for n in (1, 2):
        early = beam_search(dec, mem, beam_size=4, max_length=15, alpha=1.0, n_best=n, exhaustive=True)
        width = early.tokens.shape[2]
        assert torch.equal(early.tokens, full.tokens[:, :n, :width])
        assert (full.tokens[:, :n, width:] == Vocabulary.pad_id).all()
        assert torch.allclose(early.scores, full.scores[:, :n])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_default_stop_rule_is_the_exhaustive_one_cut_short(alpha):
    """The default stop (no open beam could enter the answer by ending at the next step)
    costs fewer rows than the exhaustive bound; the exhaustive search continues the very same
    beams, so its answer scores at least as well; without a length penalty both rules are
    one and the same."""
    dec, mem = make("gru", True, seed=1)
    with torch.no_grad():
        dec.output.bias[Vocabulary.end_id] = 1.0
    rows = count_rows(dec)
    quick = beam_search(dec, mem, beam_size=3, max_length=25, alpha=alpha)
    quick_rows, rows[:] = sum(rows), []
    full = beam_search(dec, mem, beam_size=3, max_length=25, alpha=alpha, exhaustive=True)
    assert (full.scores[:, 0] >= quick.scores[:, 0] - 1e-6).all()
    if alpha == 0:
        assert quick_rows == sum(rows) and torch.equal(quick.tokens, full.tokens)
    else:
        assert quick_rows < sum(rows)


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
