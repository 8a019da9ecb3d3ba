"""Recurrent caption decoder: image features set the initial state, words come out one step
at a time.

Read top to bottom: config, attention, the decoder (init_state / step / teacher-forced
forward). Every search method in `search.py` is built on `step()` alone.

Shapes: B batch, T caption steps, L grid cells, C feature channels, H hidden, E embedding,
A attention, V vocabulary.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# One time step of a one-layer cell, on the nn.RNN module's own weights. Calling the sequence
# module on a length-1 sequence costs 2x more for an LSTM forward+backward on CPU (oneDNN's
# sequence kernel set-up); attention training and every search step take this path.
CELL_STEPS = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell}


@dataclass
class DecoderConfig:
    vocab_size: int
    feature_dim: int                 # C of the encoder's Features
    cell: str = "lstm"               # lstm | gru | rnn (plain tanh RNN)
    attention: bool = False          # Show, Attend and Tell soft attention over the grid
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        for name in ("vocab_size", "feature_dim", "embed_dim", "hidden_dim", "attention_dim",
                     "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


class Memory(NamedTuple):
    """What every step reads from the image; computed once per image, one row per image.

    A step may carry K rows per image (beams or samples, image-major: rows i*K .. i*K+K-1
    belong to image i); they all read the image's one row, so search never copies the grid
    K times (at beam 3 on a batch of 32 that copy alone was 24 MB per batch) and attention
    reads each image's grid once for its K rows (one [K,L] x [L,C] product per image).
    """

    grid: Tensor | None        # [B, L, C] (attention models only)
    grid_proj: Tensor | None   # [B, L, A] encoder half of the additive attention (SoftAttention.project_grid)
    pooled: Tensor             # [B, C]


def rows_per_image(rows: int, images: int) -> int:
    """K for a step over `rows` rows against a memory of `images` images."""
    if images < 1 or rows % images:
        raise ValueError(f"{rows} decoder rows cannot share the memory of {images} images")
    return rows // images


State = tuple[Tensor, ...]  # (h,) or (h, c); each [num_layers, B, H]


class SoftAttention(nn.Module):
    """Additive (Bahdanau) attention with the Show, Attend and Tell gating scalar."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, feature_dim)  # beta: how much image to let in

    def project_grid(self, grid: Tensor) -> Tensor:
        """The encoder half of the energy, once per image: 2 x encoder_proj(grid) [B,L,A]
        (doubled for forward's sigmoid form of tanh)."""
        return self.encoder_proj(grid).mul_(2)

    def forward(self, grid: Tensor, grid_proj: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        # grid [B,L,C], grid_proj [B,L,A] from project_grid, hidden [B*K,H] (K rows per image,
        # see Memory) -> context [B*K,C], alpha [B*K,L]
        #
        # score = w . tanh(e) + b with e = encoder_proj(grid) + hidden_proj(h), computed as
        # 2 w . sigmoid(2e) + (b - sum(w)) (tanh(x) = 2 sigmoid(2x) - 1): PyTorch's CPU tanh
        # costs 3.7x its sigmoid, and this [B,K,L,A] tensor is the step's largest (tanh was
        # 9% of the shipped ensemble's beam search).
        b, cells = grid.shape[0], grid.shape[1]
        k = rows_per_image(hidden.shape[0], b)
        query = self.hidden_proj(hidden).mul_(2).view(b, k, 1, -1)              # [B,K,1,A]
        sig = (grid_proj.unsqueeze(1) + query).sigmoid_()  # in place: the step's largest tensor
        weight = self.score.weight[0]
        scores = torch.mv(sig.view(-1, sig.shape[-1]), 2 * weight).view(b, k, cells)
        alpha = torch.softmax(scores + (self.score.bias - weight.sum()), dim=2)
        context = torch.bmm(alpha, grid).view(b * k, -1)                        # [B*K,C]
        return torch.sigmoid(self.gate(hidden)) * context, alpha.view(b * k, cells)


class CaptionDecoder(nn.Module):
    step_returns_log_probs = False  # step() gives logits; search normalizes them

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        # Image features -> initial hidden (and cell) state of every layer.
        self.init_h = nn.Linear(c.feature_dim, c.num_layers * c.hidden_dim)
        self.init_c = nn.Linear(c.feature_dim, c.num_layers * c.hidden_dim) if c.cell == "lstm" else None
        self.attention = (SoftAttention(c.feature_dim, c.hidden_dim, c.attention_dim)
                          if c.attention else None)
        rnn_kwargs = {"nonlinearity": "tanh"} if c.cell == "rnn" else {}
        self.rnn = CELLS[c.cell](
            input_size=c.embed_dim + (c.feature_dim if c.attention else 0),
            hidden_size=c.hidden_dim, num_layers=c.num_layers, batch_first=True,
            dropout=c.dropout if c.num_layers > 1 else 0.0, **rnn_kwargs)
        self.dropout = nn.Dropout(c.dropout)
        self.output = nn.Linear(c.hidden_dim, c.vocab_size)
        # Set by fold_embedding() (inference); never saved, dropped by .train().
        self.register_buffer("_token_gates", None, persistent=False)    # [V, gates]
        self.register_buffer("_context_weight", None, persistent=False)  # [gates, C] (attention)
        # Set by captioner.model.quantize (int8 inference on CPU): the context's share of the
        # input gates as an int8 product, in place of _context_weight.
        self.context_gates: nn.Module | None = None
        self.quantized = False
        self.folded = False  # fold_embedding() ran: frozen for inference (also when nothing folds)

    # ---- inference interface ---------------------------------------------------------------
    def fold_embedding(self) -> CaptionDecoder:
        """For inference with frozen weights: precompute every word's input-side gate
        pre-activations (embedding @ W_ih[:, :E].T + b_ih, a [V, gates] table), so a
        one-layer step looks its words' rows up instead of multiplying by W_ih's word half
        (the whole W_ih without attention: a third of a 512-wide GRU step's multiply-adds).
        Same maths, float rounding aside; `.train()` drops the tables. A multi-layer decoder
        steps through nn.GRU / nn.LSTM, so it has nothing to fold; it is marked frozen alike."""
        self.folded = True
        if self.config.num_layers != 1:
            return self
        e = self.config.embed_dim
        with torch.no_grad():
            weight = self.rnn.weight_ih_l0
            self._token_gates = torch.nn.functional.linear(self.embedding.weight, weight[:, :e], self.rnn.bias_ih_l0)
            self._context_weight = weight[:, e:].contiguous() if self.attention is not None else None
        return self

    def train(self, mode: bool = True) -> CaptionDecoder:
        if mode and self.quantized:
            raise RuntimeError("an int8 decoder is for inference only: load the model file again to train it")
        if mode:
            self._token_gates = self._context_weight = None  # the weights are about to change
            self.folded = False
        return super().train(mode)

    def memory(self, grid: Tensor | None, pooled: Tensor) -> Memory:
        """Precompute the per-image tensors every step needs. grid [B,L,C], pooled [B,C]."""
        if self.attention is None:
            return Memory(None, None, pooled)
        if grid is None:
            raise ValueError("an attention decoder needs the feature grid")
        return Memory(grid, self.attention.project_grid(grid), pooled)

    def init_state(self, memory: Memory) -> State:
        """The state of one row per image (search's first step runs on it; later steps carry
        K rows per image, see Memory)."""
        c, b = self.config, memory.pooled.shape[0]

        def project(layer: nn.Linear) -> Tensor:  # [B,C] -> [layers,B,H]
            return torch.tanh(layer(memory.pooled)).view(b, c.num_layers, c.hidden_dim).transpose(0, 1).contiguous()

        return (project(self.init_h),) if self.init_c is None else (project(self.init_h), project(self.init_c))

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        """One word: tokens [B*K] -> logits [B*K,V], new state, attention [B*K,L] or None,
        for K rows per image of the memory's B (see Memory)."""
        if self._token_gates is not None:
            out, state, alpha = self._advance_folded(tokens, state, memory)
        else:
            out, state, alpha = self._advance(self.embedding(tokens), state, memory)
        return self.output(self.dropout(out)), state, alpha

    def _advance_folded(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        # _advance with the word half of the input projection looked up (fold_embedding): the
        # cell's input is the attention context alone (or nothing), its input bias the rows.
        gates = self._token_gates.index_select(0, tokens)
        x = weight = alpha = None  # x None: the cell gets a zero-width input (all in `gates`)
        if self.attention is not None:
            x, alpha = self.attention(memory.grid, memory.grid_proj, state[0][-1])
            if self.context_gates is None:
                weight = self._context_weight
            else:  # int8: the context's product outside the cell
                gates, x = gates + self.context_gates(x), None
        if x is None:
            x, weight = gates.new_zeros(gates.shape[0], 0), gates.new_zeros(gates.shape[1], 0)
        return (*self._one_layer_step(x, state, weight, gates), alpha)

    def _advance(self, embedded: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        # embedded [B,E] -> top hidden [B,H]
        alpha = None
        if self.attention is not None:
            context, alpha = self.attention(memory.grid, memory.grid_proj, state[0][-1])
            embedded = torch.cat([embedded, context], dim=1)
        if self.config.num_layers == 1:
            return (*self._one_layer_step(embedded, state), alpha)
        rnn_state = state[0] if len(state) == 1 else state
        out, rnn_state = self.rnn(embedded.unsqueeze(1), rnn_state)
        state = (rnn_state,) if isinstance(rnn_state, Tensor) else tuple(rnn_state)
        return out.squeeze(1), state, alpha

    def _one_layer_step(self, x: Tensor, state: State, weight_ih: Tensor | None = None,
                        bias_ih: Tensor | None = None) -> tuple[Tensor, State]:
        # x [B,in], state tensors [1,B,H] -> h [B,H], new state; same maths as self.rnn. The
        # folded path passes its own input weight and a per-row [B, gates] input bias.
        rnn = self.rnn
        weights = (rnn.weight_ih_l0 if weight_ih is None else weight_ih, rnn.weight_hh_l0,
                   rnn.bias_ih_l0 if bias_ih is None else bias_ih, rnn.bias_hh_l0)
        hx = tuple(t[0] for t in state) if len(state) > 1 else state[0][0]  # lstm takes (h, c)
        out = CELL_STEPS[self.config.cell](x, hx, *weights)
        new = out if isinstance(out, tuple) else (out,)
        return new[0], tuple(t.unsqueeze(0) for t in new)

    # ---- training --------------------------------------------------------------------------
    def forward(self, memory: Memory, captions: Tensor, lengths: Tensor,
                sample_prob: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
        """Teacher forcing. captions [B,T] = <start> w1 .. <end> <pad>..., lengths [B] count
        <start>..<end>. Returns logits [N,V] and targets [N] for the N real (non-pad) target
        positions only, and attention [B,T-1,L] (zeros past each caption) or None.

        `sample_prob` > 0 is scheduled sampling (Bengio et al. 2015): after the first word,
        each input word is, with that probability, the decoder's own most probable word at the
        previous step instead of the reference's, so training sees the decoder's own
        mistakes as at inference. It runs step by step (the fused RNN kernel cannot feed back).

        Padding costs little: the output layer (the biggest matmul) only sees real
        positions; with attention the batch is sorted by length and shrinks as captions end;
        without attention the fused RNN kernel runs over the padded batch, which the
        DataModule's length-bucketed batches keep nearly free of padding. (On CPU a packed
        sequence of ragged lengths measured 3x slower than the padded fused kernel, and the
        hidden states at real positions are identical either way: the RNN is causal.)
        """
        inputs, targets = captions[:, :-1], captions[:, 1:]
        steps = (lengths - 1).clamp(min=1)
        state = self.init_state(memory)
        if self.attention is None and sample_prob == 0:
            hidden, alphas = self._forward_padded(inputs, state), None
        else:
            hidden, alphas = self._forward_stepwise(inputs, steps, state, memory, sample_prob)
        mask = torch.arange(inputs.shape[1], device=captions.device)[None, :] < steps[:, None]
        logits = self.output(self.dropout(hidden[mask]))
        return logits, targets[mask], alphas

    def _forward_padded(self, inputs: Tensor, state: State) -> Tensor:
        rnn_state = state[0] if len(state) == 1 else state
        hidden, _ = self.rnn(self.embedding(inputs), rnn_state)
        return hidden  # [B,T-1,H]

    def _forward_stepwise(self, inputs: Tensor, steps: Tensor, state: State, memory: Memory,
                          sample_prob: float = 0.0) -> tuple[Tensor, Tensor | None]:
        # One step at a time (attention, scheduled sampling): captions sorted by length so the
        # batch shrinks as they end.
        b, t = inputs.shape
        order = torch.argsort(steps, descending=True)
        inverse = torch.argsort(order)
        steps_sorted = steps[order]
        memory = Memory(*(None if x is None else x[order] for x in memory))
        state = tuple(s[:, order] for s in state)
        inputs = inputs[order]
        hidden = memory.pooled.new_zeros(b, t, self.config.hidden_dim)
        alphas = None if memory.grid is None else memory.pooled.new_zeros(b, t, memory.grid.shape[1])
        active_counts = (steps_sorted[None, :] > torch.arange(t, device=inputs.device)[:, None]).sum(1).tolist()
        previous = None  # the decoder's own best words at the last step
        for i, n in enumerate(active_counts):
            if n == 0:
                break
            words = inputs[:n, i]
            if previous is not None and sample_prob > 0:
                own = torch.rand(n, device=words.device) < sample_prob
                words = torch.where(own, previous[:n], words)
            mem = Memory(*(None if x is None else x[:n] for x in memory))
            out, new_state, alpha = self._advance(self.embedding(words), tuple(s[:, :n] for s in state), mem)
            state = tuple(torch.cat([ns, s[:, n:]], dim=1) for ns, s in zip(new_state, state))
            hidden[:n, i] = out
            if alphas is not None:
                alphas[:n, i] = alpha
            if sample_prob > 0:
                with torch.no_grad():
                    previous = self.output(out).argmax(dim=1)
        return hidden[inverse], None if alphas is None else alphas[inverse]
