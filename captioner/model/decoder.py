"""The recurrent caption decoder, in its textbook form.

Read top to bottom: the config, soft attention, then the decoder itself, whose three methods
are the whole model: `init_state` (the image sets the first hidden state), `step` (one word
in, the next word's logits out) and the teacher-forced `forward` used in training. Every
search method (`search.py`) is built on `step()` alone. The inference fast path (a folded
embedding, fused cell steps, int8 products) wraps this module from `inference.py` and
computes the same function.

Shapes: B images, K rows per image (beams or samples), T caption steps, L grid cells,
C feature channels, H hidden, E embedding, A attention, V vocabulary.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# One time step of a one-layer cell on the nn.RNN module's own weights. Running the sequence
# module on a length-1 sequence costs 2x more for an LSTM forward+backward on CPU (oneDNN's
# sequence kernel set-up), and attention training steps one word at a time.
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
        for name in ("vocab_size", "feature_dim", "embed_dim", "hidden_dim", "attention_dim", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.attention, bool):
            raise ValueError(f"attention must be true or false, got {self.attention!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Memory(NamedTuple):
    """What every step reads from the image, computed once per image (one row per image).

    A step may carry K rows per image (beams or samples, image-major: rows i*K .. i*K+K-1
    belong to image i); they all read the image's one row, so search never copies the grid
    K times, and attention reads each image's grid once for its K rows.
    """

    grid: Tensor | None        # [B, L, C] (attention models only)
    grid_proj: Tensor | None   # [B, L, A] the encoder half of the attention energies
    pooled: Tensor             # [B, C]


State = tuple[Tensor, ...]  # (h,) or (h, c) for an LSTM; each [num_layers, B*K, H]


def rows_per_image(rows: int, images: int) -> int:
    """K for a step over `rows` decoder rows against a memory of `images` images."""
    if images < 1 or rows % images:
        raise ValueError(f"{rows} decoder rows cannot share the memory of {images} images")
    return rows // images


class SoftAttention(nn.Module):
    """Additive (Bahdanau) attention with the Show, Attend and Tell gating scalar beta."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, feature_dim)  # beta: how much of the image to let in

    def project_grid(self, grid: Tensor) -> Tensor:
        """The encoder half of the energies, once per image: [B,L,C] -> [B,L,A]."""
        return self.encoder_proj(grid)

    def forward(self, grid: Tensor, grid_proj: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """grid [B,L,C], grid_proj [B,L,A], hidden [B*K,H] -> gated context [B*K,C], alpha [B*K,L]."""
        b, cells = grid.shape[0], grid.shape[1]
        k = rows_per_image(hidden.shape[0], b)
        query = self.hidden_proj(hidden).view(b, k, 1, -1)                    # [B,K,1,A]
        energy = torch.tanh(grid_proj.unsqueeze(1) + query)                    # [B,K,L,A]
        alpha = torch.softmax(self.score(energy).squeeze(-1), dim=2)           # [B,K,L]
        context = torch.bmm(alpha, grid).view(b * k, -1)                       # [B*K,C]
        return torch.sigmoid(self.gate(hidden)) * context, alpha.view(b * k, cells)


class CaptionDecoder(nn.Module):
    """Image features -> initial state; then one word at a time through an LSTM/GRU/RNN."""

    step_returns_log_probs = False  # step() gives logits; search normalizes them

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        # Image features -> initial hidden (and cell) state of every layer.
        self.init_h = nn.Linear(c.feature_dim, c.num_layers * c.hidden_dim)
        self.init_c = nn.Linear(c.feature_dim, c.num_layers * c.hidden_dim) if c.cell == "lstm" else None
        self.attention = SoftAttention(c.feature_dim, c.hidden_dim, c.attention_dim) if c.attention else None
        rnn_kwargs = {"nonlinearity": "tanh"} if c.cell == "rnn" else {}
        self.rnn = CELLS[c.cell](
            input_size=c.embed_dim + (c.feature_dim if c.attention else 0),
            hidden_size=c.hidden_dim, num_layers=c.num_layers, batch_first=True,
            dropout=c.dropout if c.num_layers > 1 else 0.0, **rnn_kwargs)
        self.dropout = nn.Dropout(c.dropout)
        self.output = nn.Linear(c.hidden_dim, c.vocab_size)

    def memory(self, grid: Tensor | None, pooled: Tensor) -> Memory:
        """The per-image tensors every step reads. grid [B,L,C], pooled [B,C]."""
        if self.attention is None:
            return Memory(None, None, pooled)
        if grid is None:
            raise ValueError("an attention decoder needs the feature grid")
        return Memory(grid, self.attention.project_grid(grid), pooled)

    def init_state(self, memory: Memory) -> State:
        """tanh(W pooled + b) as every layer's first hidden (and cell) state: one row per image."""
        c, b = self.config, memory.pooled.shape[0]

        def project(layer: nn.Linear) -> Tensor:  # [B,C] -> [layers,B,H]
            return torch.tanh(layer(memory.pooled)).view(b, c.num_layers, c.hidden_dim).transpose(0, 1).contiguous()

        return (project(self.init_h),) if self.init_c is None else (project(self.init_h), project(self.init_c))

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        """One word: tokens [B*K] -> logits [B*K,V], new state, attention [B*K,L] or None."""
        hidden, state, alpha = self.advance(self.embedding(tokens), state, memory)
        return self.output(self.dropout(hidden)), state, alpha

    def advance(self, embedded: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        """The recurrence without the output layer: embedded [B*K,E] -> top hidden [B*K,H]."""
        alpha = None
        if self.attention is not None:
            context, alpha = self.attention(memory.grid, memory.grid_proj, state[0][-1])
            embedded = torch.cat([embedded, context], dim=1)                    # [B*K,E+C]
        if self.config.num_layers == 1:
            hidden, state = self.cell_step(embedded, state)
            return hidden, state, alpha
        out, rnn_state = self.rnn(embedded.unsqueeze(1), state[0] if len(state) == 1 else state)
        state = (rnn_state,) if isinstance(rnn_state, Tensor) else tuple(rnn_state)
        return out.squeeze(1), state, alpha

    def cell_step(self, x: Tensor, state: State, weight_ih: Tensor | None = None,
                  bias_ih: Tensor | None = None) -> tuple[Tensor, State]:
        """One step of a one-layer cell: x [N,in], state [1,N,H] each -> h [N,H], new state.

        `weight_ih` / `bias_ih` replace the cell's input weight and bias: the inference path
        passes its own (a per-row [N, gates] bias holding the looked-up word half)."""
        rnn = self.rnn
        weights = (rnn.weight_ih_l0 if weight_ih is None else weight_ih, rnn.weight_hh_l0,
                   rnn.bias_ih_l0 if bias_ih is None else bias_ih, rnn.bias_hh_l0)
        hx = tuple(t[0] for t in state) if len(state) > 1 else state[0][0]  # an LSTM takes (h, c)
        out = CELL_STEPS[self.config.cell](x, hx, *weights)
        new = out if isinstance(out, tuple) else (out,)
        return new[0], tuple(t.unsqueeze(0) for t in new)

    # ---- training --------------------------------------------------------------------------
    def forward(self, memory: Memory, captions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Teacher forcing. captions [B,T] = <start> w1 .. <end> <pad>..., lengths [B] count
        <start>..<end>. Returns logits [N,V] and targets [N] for the N real (non-pad) target
        positions only, and attention [B,T-1,L] (zeros past each caption) or None.

        Padding costs little: the output layer (the largest product) sees real positions only;
        with attention the batch is sorted by length and shrinks as captions end; without it
        the fused RNN kernel runs over the padded batch, which the DataModule's length-bucketed
        batches keep nearly free of padding (the RNN is causal: real positions are unchanged).
        """
        inputs, targets = captions[:, :-1], captions[:, 1:]                    # [B,T-1] each
        steps = (lengths - 1).clamp(min=1)
        state = self.init_state(memory)
        if self.attention is None:
            hidden, _ = self.rnn(self.embedding(inputs), state[0] if len(state) == 1 else state)
            alphas = None                                                       # hidden [B,T-1,H]
        else:
            hidden, alphas = self._forward_stepwise(inputs, steps, state, memory)
        mask = torch.arange(inputs.shape[1], device=captions.device)[None, :] < steps[:, None]
        logits = self.output(self.dropout(hidden[mask]))                        # [N,V]
        return logits, targets[mask], alphas

    def _forward_stepwise(self, inputs: Tensor, steps: Tensor, state: State,
                          memory: Memory) -> tuple[Tensor, Tensor]:
        """Attention reads the state, so it runs a word at a time; captions sorted by length
        so the batch shrinks as they end. -> hidden [B,T-1,H], alphas [B,T-1,L]."""
        b, t = inputs.shape
        order = torch.argsort(steps, descending=True)
        inverse = torch.argsort(order)
        memory = Memory(*(None if x is None else x[order] for x in memory))
        state = tuple(s[:, order] for s in state)
        inputs = inputs[order]
        hidden = memory.pooled.new_zeros(b, t, self.config.hidden_dim)
        alphas = memory.pooled.new_zeros(b, t, memory.grid.shape[1])
        active = (steps[order][None, :] > torch.arange(t, device=inputs.device)[:, None]).sum(1).tolist()
        for i, n in enumerate(active):
            if n == 0:
                break
            mem = Memory(*(None if x is None else x[:n] for x in memory))
            out, new_state, alpha = self.advance(self.embedding(inputs[:n, i]), tuple(s[:, :n] for s in state), mem)
            state = tuple(torch.cat([ns, s[:, n:]], dim=1) for ns, s in zip(new_state, state))
            hidden[:n, i] = out
            alphas[:n, i] = alpha
        return hidden[inverse], alphas[inverse]
