"""Caption search over `step()`: greedy, sampling and batched beam search.

Each method is one batched tensor program over B images x K rows (beams or samples), on CPU
or GPU, so captioning 32 images costs about as many steps as captioning one. Any decoder with
`memory` / `init_state` / `step` works: the textbook `CaptionDecoder`, its `FastDecoder`, or an
`EnsembleDecoder`. `decode(decoder, memory, DecodingConfig)` picks the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from captioner.decoding import DecodingConfig
from captioner.model.decoder import Memory, State
from captioner.text import Vocabulary

NEG_INF = float("-inf")
# Ids no search writes into a caption: not words ("<unk>" included: not a word a caption may say).
NEVER_WRITTEN = (Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id)


@dataclass
class SearchResult:
    """n-best hypotheses per image, best first.

    tokens [B,N,T] (word ids, <end> and then <pad> after the end), log_probs [B,N] (sum of
    token log-probabilities, <end> included), scores [B,N] (log_probs after the length
    penalty: what the ranking used), lengths [B,N] (tokens incl. <end> when emitted),
    attention [B,N,T,L] or None.
    """

    tokens: Tensor
    log_probs: Tensor
    scores: Tensor
    lengths: Tensor
    attention: Tensor | None = None


def decode(decoder, memory: Memory, config: DecodingConfig, *, generator: torch.Generator | None = None,
           return_attention: bool = False, no_end_after: Sequence[int] | None = None) -> SearchResult:
    """The one entry point of the API, evaluation and the demo: the method `config` asks for."""
    if config.sample:
        return sample(decoder, memory, config.max_length, config.temperature, config.top_k, config.n_best,
                      generator, no_end_after)
    return beam_search(decoder, memory, config.beam_size, config.max_length, config.length_penalty,
                       config.n_best, return_attention, no_end_after=no_end_after)


# ---- shared pieces -----------------------------------------------------------------------

def length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha (Wu et al. 2016); 1 when alpha == 0."""
    if alpha == 0:
        return torch.ones_like(lengths, dtype=torch.float)
    return ((5.0 + lengths.float()) / 6.0) ** alpha


def repeat_state(state: State, k: int) -> State:
    """Each image's state rows repeated k times (image-major); the memory is not repeated
    (a step's K rows per image share its row)."""
    return state if k == 1 else tuple(s.repeat_interleave(k, dim=1) for s in state)


def end_barring(no_end_after: Sequence[int] | None, vocab_size: int, device) -> Tensor | None:
    """A [V] bool mask of the words after which <end> may not follow (`no_end_after`: ids,
    e.g. `Vocabulary.bad_ending_ids()`), or None for none."""
    if no_end_after is None or len(no_end_after) == 0:
        return None
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[torch.as_tensor(no_end_after, dtype=torch.long, device=device)] = True
    return mask


def bar_end(step_logp: Tensor, previous: Tensor, barred: Tensor | None) -> None:
    """In place: -inf for <end> in the rows whose previous word is barred from ending.
    step_logp [N,V] (or [n,width,V] with previous [n*width])."""
    if barred is not None:
        step_logp.view(-1, step_logp.shape[-1])[:, Vocabulary.end_id].masked_fill_(barred[previous], NEG_INF)


def greedy(decoder, memory: Memory, max_length: int = 30, no_end_after: Sequence[int] | None = None) -> SearchResult:
    """The most probable word at every step: beam search with one beam."""
    return beam_search(decoder, memory, beam_size=1, max_length=max_length, no_end_after=no_end_after)


# ---- sampling ----------------------------------------------------------------------------

class Samples(NamedTuple):
    """K drawn captions per image, image-major rows [B*K, T]."""

    tokens: Tensor             # word ids, <pad> after <end>
    log_probs: Tensor          # each drawn token's log-probability under the model (differentiable)
    mask: Tensor               # real tokens (<end> included)
    attention: Tensor | None   # [B*K, T, L]


def draw(decoder, memory: Memory, samples: int, max_length: int, temperature: float = 1.0, top_k: int = 0,
         generator: torch.Generator | None = None, no_end_after: Sequence[int] | None = None) -> Samples:
    """Ancestral sampling, the one loop behind `sample` and self-critical training.

    Words come from softmax(logits / temperature), optionally from the top-k words only, and
    are drawn as search writes them: never NEVER_WRITTEN, no <end> right after
    `no_end_after`. Log-probabilities are the model's own (untempered) over the words it may
    write, and keep their graph when autograd is on. Rows that have ended keep stepping until
    every row has: the batch stays one tensor program.
    """
    if not temperature > 0:
        raise ValueError("temperature must be positive")
    b = memory.pooled.shape[0]
    n, device, vocab = b * samples, memory.pooled.device, decoder.config.vocab_size
    state = repeat_state(decoder.init_state(memory), samples)
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)
    banned[list(NEVER_WRITTEN)] = True
    barred = end_barring(no_end_after, vocab, device)
    tokens = torch.full((n,), Vocabulary.start_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    words, log_probs, masks, alphas = [], [], [], []
    for _ in range(max_length):
        logits, state, alpha = decoder.step(tokens, state, memory)
        logits = logits.float().masked_fill(banned, NEG_INF)
        bar_end(logits, tokens, barred)
        logp = torch.log_softmax(logits, dim=-1)                               # [N,V]
        with torch.no_grad():
            scaled = logits / temperature
            if top_k > 0:
                kth = torch.topk(scaled, min(top_k, vocab), dim=-1).values[:, -1:]
                scaled = scaled.masked_fill(scaled < kth, NEG_INF)
            choice = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(1)
            choice = torch.where(done, torch.full_like(choice, Vocabulary.pad_id), choice)
        # An ended row's log-prob is masked out; gather a finite one (<pad> is banned: -inf).
        scored = torch.where(done, torch.full_like(choice, Vocabulary.end_id), choice)
        log_probs.append(logp.gather(1, scored[:, None]).squeeze(1))
        words.append(choice)
        masks.append(~done)
        if alpha is not None:
            alphas.append(alpha)
        done = done | (choice == Vocabulary.end_id)
        tokens = choice
        if bool(done.all()):
            break
    attention = torch.stack(alphas, dim=1) if alphas else None
    return Samples(torch.stack(words, 1), torch.stack(log_probs, 1), torch.stack(masks, 1), attention)


def sample(decoder, memory: Memory, max_length: int = 30, temperature: float = 1.0, top_k: int = 0,
           num_samples: int = 1, generator: torch.Generator | None = None,
           no_end_after: Sequence[int] | None = None) -> SearchResult:
    """`num_samples` drawn captions per image, sorted by their log-probability under the model."""
    b = memory.pooled.shape[0]
    drawn = draw(decoder, memory, num_samples, max_length, temperature, top_k, generator, no_end_after)
    total = (drawn.log_probs * drawn.mask).sum(1).view(b, num_samples)
    order = torch.argsort(total, dim=1, descending=True)                       # [B,N]
    tokens = drawn.tokens.view(b, num_samples, -1)
    lengths = drawn.mask.sum(1).view(b, num_samples).gather(1, order)
    attention = None
    if drawn.attention is not None:
        attention = drawn.attention.view(b, num_samples, *drawn.attention.shape[1:])
        attention = attention.gather(1, order[:, :, None, None].expand_as(attention))
    total = total.gather(1, order)
    return SearchResult(tokens.gather(1, order[:, :, None].expand_as(tokens)), total, total, lengths, attention)


# ---- beam search -------------------------------------------------------------------------

@dataclass
class _Pool:
    """Per image of the whole batch, K hypotheses: the finished pool, or the open beams kept
    when the steps ran out. tokens [B,K,T], log_probs/scores/lengths [B,K], attention [B,K,T,L]."""

    tokens: Tensor
    log_probs: Tensor
    scores: Tensor
    lengths: Tensor
    attention: Tensor | None = None

    @classmethod
    def empty(cls, b: int, k: int, max_length: int, device) -> _Pool:
        return cls(torch.full((b, k, max_length), Vocabulary.pad_id, dtype=torch.long, device=device),
                   torch.full((b, k), NEG_INF, device=device), torch.full((b, k), NEG_INF, device=device),
                   torch.zeros(b, k, dtype=torch.long, device=device))


@dataclass
class _Beams:
    """The open beams of the images still searching (`alive`: their indices in the batch)."""

    alive: Tensor               # [n]
    log_probs: Tensor           # [n,K]
    history: Tensor             # [n,K,t] words so far
    attention: Tensor | None    # [n,K,t,L]
    tokens: Tensor              # [n*width] the words the next step reads
    rows: Tensor | None         # [n*K] the decoder row each beam continues (None at the start)


@dataclass
class _Candidates:
    """The 2K best one-word extensions of each image's beams."""

    log_probs: Tensor           # [n,2K]
    parent: Tensor              # [n,2K] the beam each extends
    word: Tensor                # [n,2K]
    tokens: Tensor              # [n,2K,t+1]
    attention: Tensor | None    # [n,2K,t+1,L]


def beam_search(decoder, memory: Memory, beam_size: int = 3, max_length: int = 30, alpha: float = 0.0,
                n_best: int = 1, return_attention: bool = False,
                no_end_after: Sequence[int] | None = None) -> SearchResult:
    """Batched beam search with the GNMT length penalty and a pool of finished hypotheses.

    Per image, K open beams are extended each step; of the 2K best candidates, those ending in
    <end> (and ranking in the first K) enter a K-sized pool of finished hypotheses, ranked by
    log_prob / length_penalty, and the K best others stay open, so a finished hypothesis is
    never pushed out by open beams that later end worse. An image is done when no open beam
    could enter the n_best best of its pool by ending at the next step (Hugging Face's default
    rule); its rows then leave the batch. At max_length the open beams of the images still
    searching are kept: for an image whose pool never filled they are the answer.
    """
    if beam_size < 1 or n_best < 1 or n_best > beam_size:
        raise ValueError("need 1 <= n_best <= beam_size")
    b, k, device = memory.pooled.shape[0], beam_size, memory.pooled.device
    vocab = decoder.config.vocab_size
    barred = end_barring(no_end_after, vocab, device)
    penalties = length_penalty(torch.arange(1, max_length + 1), alpha).tolist()  # [length - 1]
    # All K beams of an image start identical: the first step runs one row per image and only
    # the first beam is expanded (the others start at -inf).
    state = decoder.init_state(memory)
    start_logp = torch.zeros(b, k, device=device)
    start_logp[:, 1:] = NEG_INF
    beams = _Beams(torch.arange(b, device=device), start_logp, torch.zeros(b, k, 0, dtype=torch.long, device=device),
                   None, torch.full((b,), Vocabulary.start_id, dtype=torch.long, device=device), None)
    pool, kept = _Pool.empty(b, k, max_length, device), _Pool.empty(b, k, max_length, device)
    owns_memory = False  # whether `memory` is our own copy (then images leave it in place)
    for t in range(max_length):
        width = 1 if t == 0 else k  # this step's rows per image
        logits, state, alpha_t = decoder.step(beams.tokens, state, memory)
        step_logp = _step_log_probs(decoder, logits, beams, width, vocab, barred)
        cand = _candidates(step_logp, beams, alpha_t if return_attention else None, width, k, vocab, t)
        ends = cand.word == Vocabulary.end_id
        pool_best = _pool_finished(pool, beams.alive, cand, ends, k, penalties[t], max_length, t)
        _keep_open(beams, cand, ends, width, k)
        # An image is done when no open beam can still enter the n-best of its pool.
        bound = beams.log_probs.max(dim=1).values / penalties[min(t + 2, max_length) - 1]
        searching = bound >= pool_best[:, n_best - 1]
        if t == max_length - 1:  # out of steps: the open beams of the images still searching are kept
            _keep_last(kept, beams, searching, t)
            break
        if not bool(searching.any()):
            break
        if not bool(searching.all()):
            memory, owns_memory = _compact(beams, memory, owns_memory, searching, k)
        state = tuple(s.index_select(1, beams.rows) for s in state)
    return _n_best(pool, kept, alpha, n_best)


def _step_log_probs(decoder, logits: Tensor, beams: _Beams, width: int, vocab: int,
                    barred: Tensor | None) -> Tensor:
    """The step's word log-probabilities [n,width,V], never-written words and barred endings at -inf."""
    n = beams.alive.shape[0]
    step_logp = (logits.float() if decoder.step_returns_log_probs
                 else torch.log_softmax(logits.float(), dim=-1)).view(n, width, vocab)
    for word in NEVER_WRITTEN:  # three strided fills: cheaper than an index_put per step
        step_logp[..., word] = NEG_INF
    bar_end(step_logp, beams.tokens, barred)
    return step_logp


def _candidates(step_logp: Tensor, beams: _Beams, alpha_t: Tensor | None, width: int, k: int,
                vocab: int, t: int) -> _Candidates:
    """The 2K best extensions per image, with their words so far (and attention)."""
    n = step_logp.shape[0]
    total = (beams.log_probs[..., None] + step_logp).view(n, k * vocab)   # a width of 1 broadcasts
    top_logp, top_index = total.topk(min(2 * k, k * vocab), dim=1)       # [n,2K]
    parent, word = top_index // vocab, top_index % vocab
    n_cand = parent.shape[1]
    tokens = torch.cat([beams.history.gather(1, parent[..., None].expand(n, n_cand, t)), word[..., None]], dim=2)
    attention = None
    if alpha_t is not None:
        cells = alpha_t.shape[-1]
        a = alpha_t.view(n, width, 1, cells).expand(n, k, 1, cells).gather(
            1, parent[:, :, None, None].expand(n, n_cand, 1, cells))
        attention = a if beams.attention is None else torch.cat(
            [beams.attention.gather(1, parent[:, :, None, None].expand(n, n_cand, t, cells)), a], dim=2)
    return _Candidates(top_logp, parent, word, tokens, attention)


def _pool_finished(pool: _Pool, alive: Tensor, cand: _Candidates, ends: Tensor, k: int, penalty: float,
                   max_length: int, t: int) -> Tensor:
    """Finished candidates among the K best join their image's pool, which keeps its K best
    (as in fairseq: with K=1 this is exactly greedy). Returns the pool's scores [n,K]."""
    n, n_cand = ends.shape
    in_top_k = torch.arange(n_cand, device=ends.device)[None, :] < k
    new_score = torch.where(ends & in_top_k, cand.log_probs / penalty, torch.full_like(cand.log_probs, NEG_INF))
    merged_score, keep = torch.cat([pool.scores[alive], new_score], dim=1).topk(k, dim=1)
    padded = torch.nn.functional.pad(cand.tokens, (0, max_length - t - 1), value=Vocabulary.pad_id)
    pool.tokens[alive] = torch.cat([pool.tokens[alive], padded], dim=1).gather(1, keep[..., None].expand(n, k, max_length))
    pool.log_probs[alive] = torch.cat([pool.log_probs[alive], cand.log_probs], dim=1).gather(1, keep)
    pool.lengths[alive] = torch.cat([pool.lengths[alive], torch.full_like(cand.word, t + 1)], dim=1).gather(1, keep)
    pool.scores[alive] = merged_score
    if cand.attention is not None:
        cells = cand.attention.shape[-1]
        padded_att = torch.nn.functional.pad(cand.attention, (0, 0, 0, max_length - t - 1))
        if pool.attention is None:
            pool.attention = torch.zeros(pool.tokens.shape[0], k, max_length, cells, device=ends.device)
        pool.attention[alive] = torch.cat([pool.attention[alive], padded_att], dim=1).gather(
            1, keep[:, :, None, None].expand(n, k, max_length, cells))
    return merged_score


def _keep_open(beams: _Beams, cand: _Candidates, ends: Tensor, width: int, k: int) -> None:
    """The K best unfinished candidates become the open beams; `rows` and `tokens` say which
    decoder row each continues and with which word."""
    n = ends.shape[0]
    beams.log_probs, pick = torch.where(ends, torch.full_like(cand.log_probs, NEG_INF), cand.log_probs).topk(k, dim=1)
    beams.history = cand.tokens.gather(1, pick[..., None].expand(n, k, cand.tokens.shape[2]))
    if cand.attention is not None:
        cells = cand.attention.shape[-1]
        beams.attention = cand.attention.gather(1, pick[:, :, None, None].expand(n, k, cand.attention.shape[2], cells))
    source = cand.parent.gather(1, pick) if width > 1 else torch.zeros_like(pick)
    beams.rows = (torch.arange(n, device=ends.device)[:, None] * width + source).view(-1)
    beams.tokens = cand.word.gather(1, pick).view(-1)


def _keep_last(kept: _Pool, beams: _Beams, searching: Tensor, t: int) -> None:
    """Out of steps: the open beams of the images still searching become their fallback answers."""
    last = beams.alive[searching]
    kept.tokens[last, :, :t + 1] = beams.history[searching]
    kept.log_probs[last] = beams.log_probs[searching]
    kept.lengths[last] = t + 1
    if beams.attention is not None:
        if kept.attention is None:
            b, k, max_length = kept.tokens.shape
            kept.attention = torch.zeros(b, k, max_length, beams.attention.shape[-1], device=kept.tokens.device)
        kept.attention[last, :, :t + 1] = beams.attention[searching]


def _compact(beams: _Beams, memory: Memory, owns_memory: bool, searching: Tensor, k: int) -> tuple[Memory, bool]:
    """Images that are done leave the batch: the m still searching take positions 0..m-1,
    moving as few as possible (those already there stay; those past m fill the holes).
    Compacting the [n,49,1280] grid by a full copy each time an image left was 2.5% of beam
    search on CPU. Every tensor indexed by the images is reordered alike."""
    keep = searching.nonzero().squeeze(1)
    m = keep.numel()
    holes = (~searching[:m]).nonzero().squeeze(1)
    movers = keep[keep >= m]
    order = torch.arange(m, device=searching.device)
    order[holes] = movers                       # new position j holds old position order[j]
    n = searching.shape[0]
    beams.alive, beams.log_probs = beams.alive[order], beams.log_probs.index_select(0, order)
    beams.history = beams.history.index_select(0, order)
    if beams.attention is not None:
        beams.attention = beams.attention.index_select(0, order)
    beams.rows = beams.rows.view(n, k).index_select(0, order).view(-1)
    beams.tokens = beams.tokens.view(n, k).index_select(0, order).view(-1)
    if owns_memory:  # move the few images that fill the holes; the rest stays put
        return Memory(*(None if x is None else x.index_copy_(0, holes, x.index_select(0, movers))[:m]
                        for x in memory)), True
    return Memory(*(None if x is None else x.index_select(0, order) for x in memory)), True  # the caller's: copy once


def _n_best(pool: _Pool, kept: _Pool, alpha: float, n_best: int) -> SearchResult:
    """Each image's n best: its finished pool first, then (where the pool never filled) the
    open beams kept at max_length, which rank after every finished hypothesis."""
    b = pool.tokens.shape[0]
    kept_score = kept.log_probs / length_penalty(kept.lengths, alpha)
    rank_key = torch.cat([pool.scores, kept_score - 1e9], dim=1)
    order = rank_key.argsort(dim=1, descending=True)[:, :n_best]
    lengths = torch.cat([pool.lengths, kept.lengths], dim=1).gather(1, order)
    width = int(lengths.max())

    def pick(x: Tensor) -> Tensor:  # the n-best rows of a [B,2K,...] tensor
        return x.gather(1, order.view(b, n_best, *([1] * (x.dim() - 2))).expand(b, n_best, *x.shape[2:]))

    attention = None
    if pool.attention is not None or kept.attention is not None:
        pool_att = pool.attention if pool.attention is not None else torch.zeros_like(kept.attention)
        kept_att = kept.attention if kept.attention is not None else torch.zeros_like(pool.attention)
        attention = pick(torch.cat([pool_att, kept_att], dim=1))[:, :, :width]
    return SearchResult(pick(torch.cat([pool.tokens, kept.tokens], dim=1))[:, :, :width],
                        torch.cat([pool.log_probs, kept.log_probs], dim=1).gather(1, order),
                        torch.cat([pool.scores, kept_score], dim=1).gather(1, order), lengths, attention)
