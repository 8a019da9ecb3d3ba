"""Self-critical sequence training (Rennie et al. 2017): train on the metric itself.

Cross-entropy teaches the decoder the next reference word; the captions it is judged on are
its own. Here the decoder samples K captions per image, each is scored by sentence-level
BLEU-4 against the image's references, and the log-probability of each sampled word is
pushed up or down by how much better its caption scored than the other K-1 samples of the
same image (the mean-of-others baseline of Luo 2020, "A better variant of self-critical
sequence training": no greedy decode for the baseline, and an unbiased one).

`sample_with_log_probs` runs on `CaptionDecoder.step()` with autograd on, so one pass both
samples and keeps the graph; `self_critical_loss` is what `CaptioningModule.loss` returns
in this mode.
"""
from __future__ import annotations

from typing import Sequence

import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from torch import Tensor

from captioner.model.decoder import CaptionDecoder, Memory
from captioner.model.search import repeat_state
from captioner.text import Vocabulary

Tokens = list[str]
# Without smoothing a caption with no matching 4-gram scores exactly 0, however close it is,
# so most short samples would get the same reward; method1 adds 0.1 to empty match counts.
_SMOOTHING = SmoothingFunction().method1
# Never sampled: they are not words (search never writes <unk> either).
_BANNED = (Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id)


def sample_with_log_probs(decoder: CaptionDecoder, memory: Memory, samples: int,
                          max_length: int) -> tuple[Tensor, Tensor, Tensor]:
    """K = `samples` captions per image drawn from the decoder, with gradients.

    Returns tokens [B*K, T] (image-major rows, <pad> after <end>), the log-probability of
    each sampled token [B*K, T] (differentiable) and the mask of real tokens [B*K, T]
    (<end> included). Rows that have ended keep stepping until every row has: the batch
    stays one tensor program.
    """
    b = memory.pooled.shape[0]
    state = repeat_state(decoder.init_state(memory), samples)
    n = b * samples
    device = memory.pooled.device
    tokens = torch.full((n,), Vocabulary.start_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    banned = torch.zeros(decoder.config.vocab_size, dtype=torch.bool, device=device)
    banned[list(_BANNED)] = True
    words, log_probs, masks = [], [], []
    for _ in range(max_length):
        logits, state, _ = decoder.step(tokens, state, memory)
        logp = torch.log_softmax(logits.float().masked_fill(banned, float("-inf")), dim=-1)
        with torch.no_grad():
            choice = torch.multinomial(logp.exp(), 1).squeeze(1)
            choice = torch.where(done, torch.full_like(choice, Vocabulary.pad_id), choice)
        words.append(choice)
        # An ended row's log-prob is masked out; gather a finite one (<pad> is banned: -inf).
        scored = torch.where(done, torch.full_like(choice, Vocabulary.end_id), choice)
        log_probs.append(logp.gather(1, scored[:, None]).squeeze(1))
        masks.append(~done)
        done = done | (choice == Vocabulary.end_id)
        tokens = choice
        if bool(done.all()):
            break
    return torch.stack(words, 1), torch.stack(log_probs, 1), torch.stack(masks, 1)


def bleu4_rewards(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> Tensor:
    """Sentence-level BLEU-4 of each hypothesis against its references (nltk, with
    method1 smoothing and the sentence's own brevity penalty)."""
    return torch.tensor([sentence_bleu(refs, hyp, smoothing_function=_SMOOTHING) if hyp else 0.0
                         for hyp, refs in zip(hypotheses, references)], dtype=torch.float)


def mean_of_others_advantage(rewards: Tensor, samples: int) -> Tensor:
    """Each sample's reward minus the mean reward of the other samples of its image."""
    if samples < 2:
        raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
    grouped = rewards.view(-1, samples)
    others = (grouped.sum(1, keepdim=True) - grouped) / (samples - 1)
    return (grouped - others).view(-1)


def self_critical_loss(decoder: CaptionDecoder, memory: Memory, references: Sequence[Sequence[Tokens]],
                       vocabulary: Vocabulary, samples: int = 5,
                       max_length: int = 20) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE with the mean-of-others baseline over `samples` captions per image;
    `references[i]` are image i's tokenized reference captions.

    The loss is the advantage-weighted negative log-probability averaged over sampled
    tokens; the returned parts log the mean reward (sentence BLEU-4 of the samples) and
    their mean length, the two numbers that show whether the policy is improving or
    gaming the metric."""
    tokens, log_probs, mask = sample_with_log_probs(decoder, memory, samples, max_length)
    hypotheses = [vocabulary.decode(row).split() for row in tokens.tolist()]
    per_sample_refs = [refs for refs in references for _ in range(samples)]
    rewards = bleu4_rewards(hypotheses, per_sample_refs).to(log_probs.device)
    advantage = mean_of_others_advantage(rewards, samples)
    weights = mask.float()
    loss = -(advantage[:, None] * log_probs * weights).sum() / weights.sum()
    return loss, {"reward": rewards.mean(), "sample_length": weights.sum(1).mean()}
