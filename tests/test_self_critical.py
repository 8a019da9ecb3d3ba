"""Self-critical sequence training: sampling with gradients (`search.draw`), the BLEU and
CIDEr-D rewards (CIDEr-D equal to the COCO toolkit's), the mean-of-others baseline, and that
the loss actually teaches a decoder the references."""
from __future__ import annotations

import pytest
import torch

from captioner.errors import TrainingError
from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.model.module import CaptioningModule, DecoderSettings, OptimizationConfig, SelfCriticalConfig
from captioner.model.search import draw
from captioner.model.self_critical import (CiderD, build_reward, mean_of_others_advantage, parse_reward,
                                           self_critical_loss, sentence_bleu_rewards)
from captioner.text import BAD_ENDINGS, Vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["a", "dog", "runs", "on", "grass", "cat", "sleeps", "the", "red", "ball"]
VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *WORDS])


def decoder(attention: bool = False, seed: int = 0) -> CaptionDecoder:
    torch.manual_seed(seed)
    return CaptionDecoder(DecoderConfig(vocab_size=len(VOCAB), feature_dim=6, cell="gru", attention=attention,
                                        embed_dim=8, hidden_dim=16, attention_dim=8, dropout=0.0))


def memory(model: CaptionDecoder, images: int = 3):
    torch.manual_seed(1)
    return model.memory(torch.randn(images, 4, 6), torch.randn(images, 6))


@pytest.mark.parametrize("attention", [False, True])
def test_samples_carry_log_probs_with_gradients(attention):
    model = decoder(attention)
    drawn = draw(model, memory(model), samples=4, max_length=7)
    tokens, log_probs, mask = drawn.tokens, drawn.log_probs, drawn.mask
    assert tokens.shape == log_probs.shape == mask.shape and tokens.shape[0] == 12 and tokens.shape[1] <= 7
    assert not torch.isin(tokens[mask], torch.tensor([0, 1, 3])).any()  # no <pad>/<start>/<unk> written
    assert (tokens[~mask] == Vocabulary.pad_id).all()
    assert torch.isfinite(log_probs).all() and (log_probs[mask] <= 0).all()
    for row, keep in zip(tokens, mask):
        ends = (row == Vocabulary.end_id).nonzero()
        if len(ends):  # the mask covers the words and the first <end>, nothing after
            assert keep.sum() == ends[0, 0] + 1 and keep[: ends[0, 0] + 1].all()
        else:  # ran out of steps: every token is real
            assert keep.all() and tokens.shape[1] == 7
    if attention:  # one distribution over the 4 grid cells per step
        assert drawn.attention.shape == (12, tokens.shape[1], 4)
        torch.testing.assert_close(drawn.attention.sum(-1), torch.ones(12, tokens.shape[1]))
    else:
        assert drawn.attention is None
    (log_probs * mask).sum().backward()
    assert model.output.weight.grad is not None and model.output.weight.grad.abs().sum() > 0
    if attention:
        assert model.attention.encoder_proj.weight.grad.abs().sum() > 0


def test_drawn_log_probs_are_the_models_own_at_any_temperature():
    """The temperature and the top-k cut shape the draw, not the log-probabilities the loss
    pushes on: rescoring the drawn captions with step() gives the same numbers."""
    model = decoder().eval()
    mem = memory(model)
    with torch.no_grad():
        drawn = draw(model, mem, samples=2, max_length=6, temperature=0.5, top_k=3,
                     generator=torch.Generator().manual_seed(0))
        state = tuple(s.repeat_interleave(2, dim=1) for s in model.init_state(mem))
        previous = torch.full((6,), Vocabulary.start_id)
        for t in range(drawn.tokens.shape[1]):
            logits, state, _ = model.step(previous, state, mem)
            logits[:, [0, 1, 3]] = float("-inf")
            logp = torch.log_softmax(logits, -1)
            word = drawn.tokens[:, t]
            real = drawn.mask[:, t]
            torch.testing.assert_close(drawn.log_probs[real, t], logp[real].gather(1, word[real, None]).squeeze(1))
            previous = word


def test_samples_are_drawn_reproducibly_with_a_generator():
    model = decoder()
    mem = memory(model)
    with torch.no_grad():
        a = draw(model, mem, 3, 8, generator=torch.Generator().manual_seed(7))
        b = draw(model, mem, 3, 8, generator=torch.Generator().manual_seed(7))
        c = draw(model, mem, 3, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    with pytest.raises(ValueError, match="temperature must be positive"):
        draw(model, mem, 3, 8, temperature=0.0)


def test_sentence_bleu_rewards_rank_captions_by_their_match():
    refs = [["a", "dog", "runs", "on", "the", "grass"], ["a", "dog", "runs", "fast"]]
    hyps = [refs[0], ["a", "dog", "runs", "on", "red", "grass"], ["a", "cat", "sleeps"], ["cat", "sleeps"], [],
            ["a", "dog", "runs"]]
    rewards = sentence_bleu_rewards(hyps, [refs] * 6, orders=(1, 4))
    assert rewards.shape == (6, 2)
    bleu1, bleu4 = rewards.T
    assert bleu4[0] == pytest.approx(1.0) and bleu1[0] == pytest.approx(1.0)
    assert 0.0 < bleu4[2] < bleu4[1] < bleu4[0]
    assert bleu4[3] == bleu4[4] == 0.0  # no word in common; an empty caption (a sample that ended at once)
    # Three words of a four-word reference: every n-gram matches, only the brevity penalty
    # (exp(1 - 4/3)) holds it back, in BLEU-1 exactly so.
    assert bleu1[5] == pytest.approx(0.7165, abs=1e-4)


def test_reward_specs_sum_their_terms():
    refs = [[["a", "dog", "runs", "on", "the", "grass"]], [["the", "cat", "sleeps"]]]
    hyps, images = [["a", "dog", "runs"], ["the", "cat", "sleeps", "on", "grass"]], [0, 1]
    bleu = sentence_bleu_rewards(hyps, [refs[i] for i in images], orders=(1, 4))
    assert build_reward("bleu1+bleu4", refs)(hyps, images).tolist() == pytest.approx(bleu.sum(1).tolist())
    assert build_reward("bleu4", refs)(hyps, images).tolist() == pytest.approx(bleu[:, 1].tolist())
    cider = CiderD(refs)
    assert build_reward("cider+bleu1", refs)(hyps, images).tolist() == pytest.approx(
        [cider.score(h, i) + b for h, i, b in zip(hyps, images, bleu[:, 0].tolist())])
    assert parse_reward("bleu1+bleu4") == ["bleu1", "bleu4"]
    for bad in ("meteor", "bleu5", "bleu4+bleu4", ""):
        with pytest.raises(ValueError, match="self_critical_reward must be one of cider, bleu1"):
            parse_reward(bad)


def test_mean_of_others_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.2])
    advantage = mean_of_others_advantage(rewards, 3)
    assert advantage.tolist() == pytest.approx([0.75, -0.75, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_of_others_advantage(rewards, 1)


def test_cider_d_rewards_matching_and_length():
    refs = [[["a", "dog", "runs", "on", "the", "grass"], ["a", "dog", "on", "grass"]],
            [["the", "cat", "sleeps"], ["a", "cat", "sleeps", "on", "a", "red", "ball"]]]
    cider = CiderD(refs)
    exact, near, wrong = (cider.score(["a", "dog", "runs", "on", "the", "grass"], 0),
                          cider.score(["a", "dog", "runs", "on", "grass"], 0), cider.score(["the", "cat", "sleeps"], 0))
    assert exact > near > wrong >= 0.0
    assert cider.score([], 1) == 0.0
    padded = ["a", "dog", "runs", "on", "the", "grass"] + ["a", "dog"] * 8  # the same words, far too long
    assert cider.score(padded, 0) < 0.5 * exact
    reward = build_reward("cider", refs)
    assert reward([["a", "dog", "runs", "on", "the", "grass"], ["the", "cat", "sleeps"]], [0, 1]).tolist() == \
        pytest.approx([exact, cider.score(["the", "cat", "sleeps"], 1)])


def test_cider_d_equals_the_coco_toolkit():
    """With the scored corpus as its references, every image's score is pycocoevalcap's."""
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider", reason="pycocoevalcap not installed "
                                       "(pip install 'captioner[coco]')")
    refs = [[["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "on", "grass"]],
            [["the", "cat", "sleeps", "on", "a", "bed"], ["a", "cat", "sleeps"]],
            [["two", "men", "ride", "red", "bikes"], ["men", "on", "bikes", "in", "the", "street"]],
            [["a", "girl", "in", "a", "red", "dress"], ["a", "little", "girl", "runs", "on", "the", "grass"]]]
    hyps = [["a", "dog", "runs", "on", "grass"], ["a", "cat", "on", "a", "bed"], ["a", "man", "rides", "a", "bike"],
            ["a", "girl", "runs", "on", "the", "grass", "in", "a", "red", "dress"]]
    mean, per_image = cider_module.Cider().compute_score(
        {i: [" ".join(r) for r in rr] for i, rr in enumerate(refs)}, {i: [" ".join(h)] for i, h in enumerate(hyps)})
    ours = CiderD(refs)
    assert [ours.score(h, i) for i, h in enumerate(hyps)] == pytest.approx(list(per_image), abs=1e-9)


@pytest.mark.parametrize("reward", ["cider", pytest.param("bleu4", marks=pytest.mark.slow),
                                    pytest.param("bleu1+bleu4", marks=pytest.mark.slow)])
def test_self_critical_loss_teaches_the_references(reward):
    """200 steps of the loss alone move a random decoder's samples towards the references:
    the mean sampled reward rises from chance to most of the way, and greedy output follows."""
    model = decoder(attention=True)
    torch.manual_seed(1)
    grid, pooled = torch.randn(2, 4, 6), torch.randn(2, 6)
    refs = [[["a", "dog", "runs", "on", "the", "grass"]], [["the", "cat", "sleeps", "on", "a", "red", "ball"]]]
    score = build_reward(reward, refs)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    rewards = []
    torch.manual_seed(2)
    for _ in range(200):
        loss, parts = self_critical_loss(model, model.memory(grid, pooled), score, [0, 1], VOCAB, samples=10,
                                         max_length=10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(float(parts["reward"]))
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    best = float(score([refs[0][0], refs[1][0]], [0, 1]).mean())  # the references themselves
    assert last > 0.5 * best and last > 2.5 * first, (first, last, best)
    from captioner.model.search import greedy
    with torch.no_grad():
        tokens = greedy(model.eval(), model.memory(grid, pooled), max_length=10).tokens[:, 0]
    assert score([VOCAB.decode(t.tolist()).split() for t in tokens], [0, 1]).min() > 0.3 * best


def test_self_critical_settings_are_checked():
    with pytest.raises(ValueError, match="self_critical.samples must be >= 2"):
        SelfCriticalConfig(samples=1)
    with pytest.raises(ValueError, match="self_critical_reward must be one of cider"):
        SelfCriticalConfig(reward="meteor")
    with pytest.raises(ValueError, match="self_critical.xe_weight must be >= 0"):
        SelfCriticalConfig(xe_weight=-0.1)
    assert SelfCriticalConfig(reward="bleu1+bleu4", samples=2).reward == "bleu1+bleu4"


def test_samples_never_end_on_a_bad_ending():
    """The loss draws as search writes: never <end> right after "a", "on", "the"... (a policy
    trained on BLEU learns to stop on them). A decoder keen to end shows the bar matters."""
    model = decoder()
    with torch.no_grad():
        model.output.bias[Vocabulary.end_id] = 2.0
    seen: list[list[str]] = []

    def reward(hypotheses, images):
        seen.extend(hypotheses)
        return torch.zeros(len(hypotheses))

    mem = model.memory(None, torch.randn(3, 6))
    torch.manual_seed(0)
    self_critical_loss(model, mem, reward, [0, 1, 2], VOCAB, samples=30, max_length=25)
    assert len(seen) == 90 and sum(1 for h in seen if h) > 45
    assert not [h for h in seen if h and h[-1] in BAD_ENDINGS]
    torch.manual_seed(0)
    unbarred = draw(model, mem, 30, 25)  # the same decoder without the bar
    ended_on = [VOCAB.decode(row.tolist()).split()[-1:] for row in unbarred.tokens]
    assert any(words and words[0] in BAD_ENDINGS for words in ended_on)


def test_loss_parts_are_the_mean_reward_and_length():
    model = decoder()
    mem = memory(model, images=2)
    torch.manual_seed(0)
    loss, parts = self_critical_loss(model, mem, lambda h, i: torch.tensor([float(len(x)) for x in h]), [0, 1],
                                     VOCAB, samples=4, max_length=9)
    torch.manual_seed(0)
    drawn = draw(model, mem, 4, 9, no_end_after=VOCAB.bad_ending_ids())
    words = torch.tensor([float(len(VOCAB.decode(r.tolist()).split())) for r in drawn.tokens])
    assert float(parts["reward"]) == pytest.approx(float(words.mean()))
    assert float(parts["sample_length"]) == pytest.approx(float(drawn.mask.sum(1).float().mean()))
    assert loss.requires_grad and torch.isfinite(loss)


def test_module_trains_on_rewards_and_validates_as_usual():
    module = CaptioningModule(vocab_size=len(VOCAB), feature_dim=6,
                              decoder=DecoderSettings(cell="gru", embed_dim=8, hidden_dim=16, dropout=0.0),
                              self_critical=SelfCriticalConfig(samples=3, max_length=6))
    module.vocabulary = VOCAB
    module._reward = build_reward("cider", [[["a", "dog"]], [["a", "cat"]], [["the", "ball"]]])
    batch = {"pooled": torch.randn(2, 6), "index": torch.tensor([2, 0]),
             "captions": torch.tensor([[1, 4, 5, 2]] * 2), "lengths": torch.tensor([4, 4])}
    module.train()
    loss, parts = module.loss(batch)
    assert set(parts) == {"reward", "sample_length"} and loss.requires_grad
    module.eval()  # validation-time loss stays cross-entropy on the reference captions
    _, parts = module.loss(batch)
    assert set(parts) == {"ce"}


def test_a_non_finite_self_critical_loss_stops_training():
    module = CaptioningModule(vocab_size=len(VOCAB), feature_dim=6,
                              decoder=DecoderSettings(cell="gru", embed_dim=8, hidden_dim=16, dropout=0.0),
                              self_critical=SelfCriticalConfig(samples=3, max_length=6))
    module.vocabulary = VOCAB
    module._reward = lambda hypotheses, images: torch.full((len(hypotheses),), float("nan"))
    batch = {"pooled": torch.randn(2, 6), "index": torch.tensor([1, 0]),
             "captions": torch.tensor([[1, 4, 5, 2]] * 2), "lengths": torch.tensor([4, 4])}
    module.train()
    with pytest.raises(TrainingError, match="non-finite training loss") as info:
        module.training_step(batch, 0)
    assert "\n" not in str(info.value)


def _toy_module(xe_weight: float, reward_refs) -> CaptioningModule:
    torch.manual_seed(0)
    module = CaptioningModule(
        vocab_size=len(VOCAB), feature_dim=6,
        decoder=DecoderSettings(cell="gru", attention=True, embed_dim=8, hidden_dim=16, attention_dim=8, dropout=0.0),
        optimization=OptimizationConfig(alpha_c=0.0),
        self_critical=SelfCriticalConfig(reward="bleu1+bleu4", samples=6, max_length=8, xe_weight=xe_weight))
    module.vocabulary = VOCAB
    module._reward = build_reward("bleu1+bleu4", reward_refs)
    return module


def _batch(captions: list[str]) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    rows = [VOCAB.encode(c) for c in captions]  # <start> ... <end>
    width = max(map(len, rows))
    return {"grid": torch.randn(len(rows), 4, 6), "pooled": torch.randn(len(rows), 6),
            "index": torch.arange(len(rows)),
            "captions": torch.tensor([r + [Vocabulary.pad_id] * (width - len(r)) for r in rows]),
            "lengths": torch.tensor([len(r) for r in rows])}


def test_mixed_loss_adds_the_weighted_cross_entropy_of_the_reference():
    refs = [[["a", "dog", "runs"]], [["the", "cat", "sleeps"]]]
    batch = _batch(["a dog runs", "the cat sleeps"])
    pure, mixed = _toy_module(0.0, refs).train(), _toy_module(0.5, refs).train()
    torch.manual_seed(5)
    pure_loss, pure_parts = pure.loss(batch)
    torch.manual_seed(5)  # the same samples
    mixed_loss, mixed_parts = mixed.loss(batch)
    assert set(pure_parts) == {"reward", "sample_length"}
    assert set(mixed_parts) == {"reward", "sample_length", "ce"}
    assert mixed_parts["reward"] == pure_parts["reward"]
    assert float(mixed_loss) == pytest.approx(float(pure_loss) + 0.5 * float(mixed_parts["ce"]), rel=1e-6)
    assert float(mixed_parts["ce"]) == pytest.approx(float(pure.cross_entropy_loss(batch)[0]), rel=1e-6)


@pytest.mark.parametrize("xe_weight, distinct", [(0.0, 1), (1.0, 2)])
def test_cross_entropy_keeps_captions_apart_where_the_reward_would_merge_them(xe_weight, distinct):
    """A reward that pays both images for one caption collapses them onto it; the reference
    captions' cross-entropy, mixed in, keeps each image's own caption (the collapse that kept
    self-critical models from shipping, in miniature)."""
    module = _toy_module(xe_weight, reward_refs=[[["a", "dog", "runs"]], [["a", "dog", "runs"]]]).train()
    batch = _batch(["a dog runs", "the cat sleeps"])
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-2)
    torch.manual_seed(2)
    for _ in range(150):
        loss, _ = module.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    from captioner.model.search import greedy
    module.eval()
    with torch.no_grad():
        tokens = greedy(module.decoder, module.memory(batch), max_length=8).tokens[:, 0]
    captions = [VOCAB.decode(t.tolist()) for t in tokens]
    assert len(set(captions)) == distinct, captions
    if distinct == 2:
        assert captions == ["a dog runs", "the cat sleeps"]
