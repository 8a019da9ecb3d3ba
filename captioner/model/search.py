"""Decoding over `CaptionDecoder.step()`: greedy, sampling and beam search.

Each method is one batched tensor program: beam search runs the whole batch x beam as a
single [B*K] batch per step on CPU or GPU, so captioning 32 images costs about as many
steps as captioning one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from captioner.model.decoder import CaptionDecoder, Memory
from captioner.text import Vocabulary


@dataclass
class SearchResult:
    """n-best hypotheses per image, best first.

    tokens [B, N, T] (word ids, <end> and then <pad> after the end), log_probs [B, N] (sum of
    token log-probabilities, <end> included), scores [B, N] (log_probs after the length
    penalty: what the ranking used), lengths [B, N] (tokens incl. <end> when emitted),
    attention [B, N, T, L] or None.
    """

    tokens: Tensor
    log_probs: Tensor
    scores: Tensor
    lengths: Tensor
    attention: Tensor | None = None


def length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha (Wu et al. 2016); 1 when alpha == 0."""
    if alpha == 0:
        return torch.ones_like(lengths, dtype=torch.float)
    return ((5.0 + lengths.float()) / 6.0) ** alpha


def greedy(decoder: CaptionDecoder, memory: Memory, max_length: int = 30) -> SearchResult:
    """Most probable word at every step: beam search with one beam."""
    return beam_search(decoder, memory, beam_size=1, max_length=max_length)


def sample(decoder: CaptionDecoder, memory: Memory, max_length: int = 30, temperature: float = 1.0,
           top_k: int = 0, num_samples: int = 1, generator: torch.Generator | None = None) -> SearchResult:
    """Ancestral sampling from softmax(logits / temperature), optionally from the top-k words.

    Returns num_samples captions per image sorted by log-probability (under the model, not
    the tempered distribution).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    b = memory.pooled.shape[0]
    memory = memory.repeat_interleave(num_samples)
    state = decoder.init_state(memory)
    n = b * num_samples
    tokens = torch.full((n,), Vocabulary.start_id, dtype=torch.long, device=memory.pooled.device)
    out, total, lengths = [], torch.zeros(n, device=tokens.device), torch.zeros(n, dtype=torch.long, device=tokens.device)
    done = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    alphas = []
    for _ in range(max_length):
        logits, state, alpha = decoder.step(tokens, state, memory)
        logp = torch.log_softmax(logits.float(), dim=-1)
        scaled = logits.float() / temperature
        if top_k > 0:
            kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        scaled[:, Vocabulary.pad_id] = float("-inf")
        scaled[:, Vocabulary.start_id] = float("-inf")
        choice = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(1)
        choice = torch.where(done, torch.full_like(choice, Vocabulary.pad_id), choice)
        total += torch.where(done, 0.0, logp.gather(1, choice[:, None]).squeeze(1))
        lengths += (~done).long()
        out.append(choice)
        if alpha is not None:
            alphas.append(alpha)
        done |= choice == Vocabulary.end_id
        tokens = choice
        if bool(done.all()):
            break
    tokens_t = torch.stack(out, dim=1).view(b, num_samples, -1)
    total = total.view(b, num_samples)
    order = torch.argsort(total, dim=1, descending=True)
    attention = None
    if alphas:
        attention = torch.stack(alphas, dim=1).view(b, num_samples, len(alphas), -1)
        attention = attention.gather(1, order[:, :, None, None].expand_as(attention))
    lengths = lengths.view(b, num_samples).gather(1, order)
    total = total.gather(1, order)
    return SearchResult(tokens_t.gather(1, order[:, :, None].expand_as(tokens_t)), total, total,
                        lengths, attention)


def beam_search(decoder: CaptionDecoder, memory: Memory, beam_size: int = 3, max_length: int = 30,
                alpha: float = 0.0, n_best: int = 1, return_attention: bool = False) -> SearchResult:
    """Batched beam search with the GNMT length penalty.

    A beam that emits <end> is frozen: it keeps its score and only extends with <pad> at no
    cost, so finished and open hypotheses compete in one top-k per image. Candidates are
    ranked by log_prob / length_penalty(length). When no beam ever ends, the open beams at
    max_length are the answer.
    """
    if beam_size < 1 or n_best < 1 or n_best > beam_size:
        raise ValueError("need 1 <= n_best <= beam_size")
    b, k = memory.pooled.shape[0], beam_size
    device = memory.pooled.device
    memory = memory.repeat_interleave(k)
    state = decoder.init_state(memory)
    vocab = decoder.config.vocab_size

    log_probs = torch.zeros(b, k, device=device)
    log_probs[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    lengths = torch.zeros(b, k, dtype=torch.long, device=device)
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    tokens = torch.full((b * k,), Vocabulary.start_id, dtype=torch.long, device=device)
    history = torch.zeros(b, k, 0, dtype=torch.long, device=device)
    attention = None
    base = (torch.arange(b, device=device) * k)[:, None]  # row offset of each image's beams

    # Frozen beams may only continue with <pad>, at log-prob 0.
    frozen_row = torch.full((vocab,), float("-inf"), device=device)
    frozen_row[Vocabulary.pad_id] = 0.0

    for _ in range(max_length):
        logits, state, alpha_t = decoder.step(tokens, state, memory)
        step_logp = torch.log_softmax(logits.float(), dim=-1).view(b, k, vocab)
        step_logp[..., Vocabulary.pad_id] = float("-inf")
        step_logp[..., Vocabulary.start_id] = float("-inf")
        step_logp = torch.where(finished[..., None], frozen_row, step_logp)

        cand_logp = (log_probs[..., None] + step_logp).view(b, k * vocab)
        cand_len = (lengths + (~finished).long())[..., None].expand(b, k, vocab).reshape(b, k * vocab)
        cand_score = cand_logp / length_penalty(cand_len, alpha)
        top_score, top_index = cand_score.topk(k, dim=1)           # [B,K]
        parent, word = top_index // vocab, top_index % vocab

        log_probs = cand_logp.gather(1, top_index)
        lengths = cand_len.gather(1, top_index)
        finished = finished.gather(1, parent) | (word == Vocabulary.end_id)
        history = torch.cat([history.gather(1, parent[..., None].expand_as(history)), word[..., None]], dim=2)
        rows = (base + parent).view(-1)
        state = tuple(s[:, rows] for s in state)
        if return_attention and alpha_t is not None:
            a = alpha_t.view(b, k, 1, -1)
            attention = a if attention is None else torch.cat(
                [attention.gather(1, parent[:, :, None, None].expand_as(attention)), a], dim=2)
            # frozen beams attend nowhere after their end
        tokens = word.view(-1)
        if bool(finished.all()):
            break

    scores = log_probs / length_penalty(lengths, alpha)
    order = scores.argsort(dim=1, descending=True)[:, :n_best]

    def pick(t: Tensor) -> Tensor:  # the n-best rows of a [B,K,...] tensor
        return t.gather(1, order.view(b, n_best, *([1] * (t.dim() - 2))).expand(b, n_best, *t.shape[2:]))

    return SearchResult(pick(history), log_probs.gather(1, order), scores.gather(1, order),
                        lengths.gather(1, order), pick(attention) if attention is not None else None)


def decode_batch(decoder: CaptionDecoder, memory: Memory, *, beam_size: int = 3, max_length: int = 30,
                 length_alpha: float = 0.0, n_best: int = 1, sample_captions: bool = False,
                 temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
                 return_attention: bool = False) -> SearchResult:
    """One entry point for the CLI, the API and evaluation."""
    if sample_captions:
        return sample(decoder, memory, max_length, temperature, top_k, n_best, generator)
    return beam_search(decoder, memory, beam_size, max_length, length_alpha, n_best, return_attention)
