"""Self-critical sequence training (Rennie et al. 2017): train on a caption metric itself.

Cross-entropy teaches the decoder the next reference word; the captions it is judged on are
its own. Here the decoder samples K captions per image, each is scored against the image's
references, and the log-probability of each sampled word is pushed up or down by how much
better its caption scored than the other K-1 samples of the same image (the mean-of-others
baseline of Luo 2020, "A better variant of self-critical sequence training": no greedy
decode for the baseline, and an unbiased one).

Rewards (`build_reward`): `cider` is CIDEr-D with document frequencies from the training
references, the reward of Rennie et al. and of most captioning work since. `bleu1`..`bleu4`
are sentence-level BLEU-n, the evaluation metric itself, and a sum such as `bleu1+bleu4`
rewards both. BLEU-4 alone is gamed by shortening: precision rises faster than the brevity
penalty falls (on Flickr8k the GRU-512's greedy captions shrank to 5.7 words in two epochs,
"a man in a black"); BLEU-1 is mostly the brevity penalty and unigram precision, so adding
it holds the length.

Samples come from `search.draw`, the same loop that sampling search uses, run with autograd
on, so one pass both samples and keeps the graph; `self_critical_loss` is what
`CaptioningModule` trains on in this mode.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from torch import Tensor

from captioner.model.decoder import CaptionDecoder, Memory
from captioner.model.search import draw
from captioner.text import Vocabulary

Tokens = list[str]
# Without smoothing a caption with no matching 4-gram scores exactly 0, however close it is,
# so most short samples would get the same reward; method1 adds 0.1 to empty match counts.
_SMOOTHING = SmoothingFunction().method1


def sentence_bleu_rewards(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
                          orders: Sequence[int] = (4,)) -> Tensor:
    """Sentence-level BLEU-n for each n in `orders` of each hypothesis against its
    references (nltk, method1 smoothing, the sentence's own brevity penalty): [N, len(orders)]."""
    weights = [(1.0 / n,) * n for n in orders]
    rows = []
    for hyp, refs in zip(hypotheses, references):
        # nltk returns one 0 (not a list) when no word matches, also for several weights.
        scores = sentence_bleu(refs, hyp, weights=weights, smoothing_function=_SMOOTHING) if hyp else 0.0
        rows.append(scores if isinstance(scores, list) else [float(scores)] * len(orders))
    return torch.tensor(rows, dtype=torch.float).view(-1, len(orders))


NGram = tuple[str, ...]


def _ngram_counts(tokens: Tokens, n: int) -> Counter[NGram]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D (Vedantam et al. 2015) of captions against a fixed corpus's references, as
    the COCO caption toolkit computes it (n = 1..4, tf-idf vectors, clipped hypothesis
    weights, Gaussian length penalty sigma 6, x10), except that document frequencies come
    from the whole `references` corpus given here, once, instead of from the captions being
    scored: a training reward must not change with the batch it is computed in. With the
    scored corpus as `references` it equals the toolkit's Cider scorer (tests)."""

    sigma, max_n = 6.0, 4

    def __init__(self, references: Sequence[Sequence[Tokens]]) -> None:
        document_frequency: Counter[NGram] = Counter()
        for refs in references:
            document_frequency.update({g for ref in refs for n in range(1, self.max_n + 1)
                                       for g in _ngram_counts(ref, n)})
        self._df = document_frequency
        self._log_images = math.log(float(len(references)))
        self._references = references
        self._ref_vectors: dict[int, list[tuple[list[dict[NGram, float]], list[float], int]]] = {}

    def _vector(self, tokens: Tokens) -> tuple[list[dict[NGram, float]], list[float], int]:
        vectors, norms = [], []
        for n in range(1, self.max_n + 1):
            vec = {g: tf * (self._log_images - math.log(max(1.0, self._df[g])))
                   for g, tf in _ngram_counts(tokens, n).items()}
            vectors.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vectors, norms, len(tokens)

    def _refs_of(self, image: int):
        if image not in self._ref_vectors:  # each training image's references, once
            self._ref_vectors[image] = [self._vector(ref) for ref in self._references[image]]
        return self._ref_vectors[image]

    def score(self, hypothesis: Tokens, image: int) -> float:
        """CIDEr-D of one caption against references[image]."""
        hyp_vecs, hyp_norms, hyp_len = self._vector(hypothesis)
        refs = self._refs_of(image)
        total = 0.0
        for ref_vecs, ref_norms, ref_len in refs:
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * self.sigma ** 2))
            for hv, hn, rv, rn in zip(hyp_vecs, hyp_norms, ref_vecs, ref_norms):
                if hn == 0 or rn == 0:
                    continue
                dot = sum(min(w, rv[g]) * rv[g] for g, w in hv.items() if g in rv)
                total += penalty * dot / (hn * rn)
        return 10.0 * total / self.max_n / len(refs)


Reward = Callable[[Sequence[Tokens], Sequence[int]], Tensor]  # (captions, image of each) -> [N]
BLEU_TERMS = {"bleu1": 1, "bleu2": 2, "bleu3": 3, "bleu4": 4}
REWARD_TERMS = ("cider", *BLEU_TERMS)


def build_reward(spec: str, references: Sequence[Sequence[Tokens]]) -> Reward:
    """The reward named by `spec`: one of REWARD_TERMS or a sum of them ("bleu1+bleu4"),
    scored against references[image] (CIDEr-D's document frequencies: all of them)."""
    terms = parse_reward(spec)
    orders = [BLEU_TERMS[t] for t in terms if t in BLEU_TERMS]
    cider = CiderD(references) if "cider" in terms else None

    def reward(hypotheses: Sequence[Tokens], images: Sequence[int]) -> Tensor:
        total = torch.zeros(len(hypotheses))
        if orders:
            total += sentence_bleu_rewards(hypotheses, [references[i] for i in images], orders).sum(1)
        if cider is not None:
            total += torch.tensor([cider.score(h, i) for h, i in zip(hypotheses, images)], dtype=torch.float)
        return total

    return reward


def parse_reward(spec: str) -> list[str]:
    """"bleu1+bleu4" -> ["bleu1", "bleu4"]; ValueError naming the known terms otherwise."""
    terms = [t.strip() for t in str(spec).split("+")]
    unknown = [t for t in terms if t not in REWARD_TERMS]
    if unknown or len(set(terms)) != len(terms):
        raise ValueError(f"self_critical_reward must be one of {', '.join(REWARD_TERMS)} or a sum of "
                         f"different ones (e.g. bleu1+bleu4), got {spec!r}")
    return terms


def mean_of_others_advantage(rewards: Tensor, samples: int) -> Tensor:
    """Each sample's reward minus the mean reward of the other samples of its image."""
    if samples < 2:
        raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
    grouped = rewards.view(-1, samples)
    others = (grouped.sum(1, keepdim=True) - grouped) / (samples - 1)
    return (grouped - others).view(-1)


def self_critical_loss(decoder: CaptionDecoder, memory: Memory, reward: Reward, images: Sequence[int],
                       vocabulary: Vocabulary, samples: int = 5,
                       max_length: int = 20) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE with the mean-of-others baseline over `samples` captions per image;
    `images[i]` is memory row i's image, as `reward` knows it.

    The loss is the advantage-weighted negative log-probability averaged over sampled
    tokens; the returned parts log the samples' mean reward and mean length (tokens incl.
    <end>), the two numbers that show whether the policy is improving or gaming the metric."""
    drawn = draw(decoder, memory, samples, max_length, no_end_after=vocabulary.bad_ending_ids())
    hypotheses = [vocabulary.decode(row).split() for row in drawn.tokens.tolist()]
    rewards = reward(hypotheses, [i for i in images for _ in range(samples)]).to(drawn.log_probs.device)
    advantage = mean_of_others_advantage(rewards, samples)
    weights = drawn.mask.float()
    loss = -(advantage[:, None] * drawn.log_probs * weights).sum() / weights.sum()
    return loss, {"reward": rewards.mean(), "sample_length": weights.sum(1).mean()}
