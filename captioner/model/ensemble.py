"""Several trained decoders that caption as one: at every step their word distributions are
averaged, so every search method in `search.py` works on an ensemble unchanged.

Why it pays on a CPU: the encoder dominates captioning time (the decoders are a few percent
of it) and runs once for all members, so a 3-decoder ensemble costs little more than one
decoder while its averaged distribution makes fewer confident mistakes.

Members must share the vocabulary and the encoder features (same `vocab_size` and
`feature_dim`); they may differ in cell, width, depth and attention. The ensemble's state
and memory are plain tuples/`Memory`s of the members' tensors, batch dimension intact, so
beam search reorders and repeats them exactly as it does a single decoder's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from captioner.model.decoder import DecoderConfig, Memory, State


@dataclass(frozen=True)
class EnsembleConfig:
    """The members' configs, and the few facts callers ask of any decoder's config."""

    members: tuple[DecoderConfig, ...]

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError("an ensemble needs at least two decoders")
        first = self.members[0]
        for other in self.members[1:]:
            if (other.vocab_size, other.feature_dim) != (first.vocab_size, first.feature_dim):
                raise ValueError("ensemble members must share vocabulary size and feature dimension, got "
                                 f"{(first.vocab_size, first.feature_dim)} and {(other.vocab_size, other.feature_dim)}")

    def to_dict(self) -> dict:
        return {"ensemble": [m.to_dict() for m in self.members]}

    @property
    def vocab_size(self) -> int:
        return self.members[0].vocab_size

    @property
    def feature_dim(self) -> int:
        return self.members[0].feature_dim

    @property
    def attention(self) -> bool:
        """True when any member attends (then the feature grid is needed)."""
        return any(m.attention for m in self.members)


class EnsembleDecoder(nn.Module):
    """The `CaptionDecoder` inference interface (memory / init_state / step) over N decoders
    (`CaptionDecoder`s, or their `FastDecoder`s: `inference.fast_decoder` wraps each member).

    `step` returns the log of the members' mean word probabilities (a normalized
    distribution: `step_returns_log_probs` tells search to skip its log_softmax), and the
    mean attention of the attending members (None if none attends).
    """

    step_returns_log_probs = True

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.config = EnsembleConfig(tuple(m.config for m in members))
        # Memory.grid_proj holds every attending member's projection side by side on the last
        # axis ([B, L, sum A]); member i reads its own slice.
        self._proj_slices: list[slice | None] = []
        start = 0
        for m in members:
            if m.config.attention:
                self._proj_slices.append(slice(start, start + m.config.attention_dim))
                start += m.config.attention_dim
            else:
                self._proj_slices.append(None)
        self._state_sizes = [2 if m.config.cell == "lstm" else 1 for m in members]

    def memory(self, grid: Tensor | None, pooled: Tensor) -> Memory:
        memories = [m.memory(grid, pooled) for m in self.members]
        projections = [mem.grid_proj for mem in memories if mem.grid_proj is not None]
        grid_proj = torch.cat(projections, dim=-1) if projections else None
        return Memory(grid if grid_proj is not None else None, grid_proj, pooled)

    def _member_memory(self, i: int, memory: Memory) -> Memory:
        part = self._proj_slices[i]
        if part is None:
            return Memory(None, None, memory.pooled)
        return Memory(memory.grid, memory.grid_proj[..., part], memory.pooled)

    def _split_state(self, state: State) -> list[State]:
        parts, start = [], 0
        for size in self._state_sizes:
            parts.append(tuple(state[start:start + size]))
            start += size
        return parts

    def init_state(self, memory: Memory) -> State:
        return tuple(t for i, m in enumerate(self.members) for t in m.init_state(self._member_memory(i, memory)))

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        """tokens [B] -> log mean probability [B,V], new state, mean attention [B,L] or None."""
        # One softmax per member and one log, instead of a log_softmax per member, a stack and
        # a logsumexp with its infinity guards (those were 8% of the shipped pair's search);
        # a word whose mean probability underflows float32 (< 1e-45) gets -inf, which no
        # search would pick anyway.
        total, new_state, alphas = None, [], []
        for i, (member, member_state) in enumerate(zip(self.members, self._split_state(state))):
            logits, member_state, alpha = member.step(tokens, member_state, self._member_memory(i, memory))
            probs = torch.softmax(logits.float(), dim=-1)
            total = probs if total is None else total.add_(probs)
            new_state.extend(member_state)
            if alpha is not None:
                alphas.append(alpha)
        mixed = total.log_().sub_(math.log(len(self.members)))
        attention = torch.stack(alphas).mean(dim=0) if alphas else None
        return mixed, tuple(new_state), attention
