"""The decoder's inference fast path, beside the textbook model of `decoder.py`.

`fast_decoder(decoder, precision, feature_range)` wraps a trained `CaptionDecoder` (or every
member of an `EnsembleDecoder`) in a frozen `FastDecoder` with the same `memory` /
`init_state` / `step` interface, so every search method runs on either. It computes the same
function with three measured tricks:

* Folded embedding (one-layer decoders): every word's input-side gate pre-activations
  (embedding @ W_ih[:, :E].T + b_ih, a [V, gates] table) are computed once, so a step looks
  its words' rows up instead of multiplying by W_ih's word half (a third of a 512-wide GRU
  step's multiply-adds), and the fused cell function takes them as a per-row input bias.
* Sigmoid-form attention energies: w . tanh(e) + b computed as 2 w . sigmoid(2e) +
  (b - sum(w)) (tanh(x) = 2 sigmoid(2x) - 1): PyTorch's CPU tanh costs 3.7x its sigmoid, and
  this [B,K,L,A] tensor is the step's largest (tanh was 9% of beam search).
* int8 products on CPU (`precision="int8"`): the output projection, the attention gate, the
  context's share of the cell's input, the recurrent product W_hh h (the cell's gate
  non-linearities then run in `_gate_step`) and the grid's attention projection run through
  FBGEMM's int8 kernels (weights int8 per output channel), about 2x faster than float32 for
  the few rows of a beam search step. The attention energies and the softmaxes stay float32.
  Each activation range is pinned (`PinnedRangeInt8Linear`: hidden states to [-1, 1],
  features to the encoder's range) so a caption never depends on its batch.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from captioner.errors import DeviceError
from captioner.model.decoder import CaptionDecoder, DecoderConfig, Memory, State, rows_per_image
from captioner.model.ensemble import EnsembleDecoder

__all__ = ["FastDecoder", "PinnedRangeInt8Linear", "fast_decoder", "int8_supported", "resolve_precision"]

_INT8_ENGINES = ("x86", "fbgemm")  # the x86 kernels; ARM's qnnpack lacks per-channel weights
HIDDEN_RANGE = (-1.0, 1.0)         # every cell's output: tanh, or a mix of tanh and the last one


def int8_supported() -> bool:
    """Whether this torch build has the x86 int8 kernels dynamic quantization needs."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear  # noqa: F401
    except ImportError:  # a future torch without the eager quantization modules
        return False
    return any(engine in torch.backends.quantized.supported_engines for engine in _INT8_ENGINES)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> int8 on a CPU that supports it, float32 elsewhere; an impossible ask raises."""
    if precision == "auto":
        return "int8" if device.type == "cpu" and int8_supported() else "float32"
    if precision == "int8" and device.type != "cpu":
        raise DeviceError(f"precision int8 runs on the CPU only, not on {device.type}")
    if precision not in ("float32", "int8"):
        raise DeviceError(f"precision must be auto, float32 or int8, got {precision!r}")
    if precision == "int8" and not int8_supported():
        raise DeviceError("precision int8: this torch build has no x86 int8 kernels (quantized engines: "
                          f"{', '.join(torch.backends.quantized.supported_engines)}); use float32")
    return precision


class PinnedRangeInt8Linear(nn.Module):
    """y = x @ weight.T + bias, weight int8 (one scale per output row), x quantized with the
    scale of a fixed range [low, high] instead of its own batch's range.

    Dynamic quantization takes the activations' scale from the whole input, so every row
    would shift with its neighbours. The pin is one extra input row holding `low` and
    `high`: the kernel's range is then the pinned one whenever the real rows stay inside it,
    so each row's result equals its result alone. A value outside only widens the range.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, value_range: tuple[float, float]) -> None:
        super().__init__()
        low, high = value_range
        if not low < high or weight.shape[1] < 2:
            raise ValueError(f"need low < high and at least 2 inputs, got {value_range} and {weight.shape[1]}")
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if bias is not None:
                dense.bias.copy_(bias)
        with warnings.catch_warnings():  # torch's notice that these APIs move to torchao
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
            from torch.ao.quantization import per_channel_dynamic_qconfig
            dense.qconfig = per_channel_dynamic_qconfig
            self.int8 = DynamicInt8Linear.from_float(dense)
        pin = torch.full((1, weight.shape[1]), high)
        pin[0, 0] = low
        self.register_buffer("pin", pin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x [N, in] -> [N, out]
        return self.int8(torch.cat([x, self.pin])).narrow(0, 0, x.shape[0])


class FastDecoder(nn.Module):
    """A frozen `CaptionDecoder` for search: the same `memory` / `init_state` / `step`, faster.

    Its `memory().grid_proj` holds twice the textbook projection (the sigmoid form's 2e), so
    memories of the two kinds must not be mixed.
    """

    step_returns_log_probs = False

    def __init__(self, decoder: CaptionDecoder, precision: str = "float32",
                 feature_range: tuple[float, float] | None = None, int8_recurrent: bool = True) -> None:
        super().__init__()
        self.decoder = decoder.eval().requires_grad_(False)
        self.config: DecoderConfig = decoder.config
        c, attention = decoder.config, decoder.attention
        token_gates = context_weight = None
        if c.num_layers == 1:
            with torch.no_grad():
                weight = decoder.rnn.weight_ih_l0
                token_gates = nn.functional.linear(decoder.embedding.weight, weight[:, :c.embed_dim],
                                                   decoder.rnn.bias_ih_l0)
                if attention is not None:
                    context_weight = weight[:, c.embed_dim:].contiguous()
        # [V, gates]: the word half of the input products; [gates, C]: the context half.
        self.register_buffer("token_gates", token_gates, persistent=False)
        self.register_buffer("context_weight", context_weight, persistent=False)
        self.output: nn.Module = decoder.output
        self.gate: nn.Module | None = attention.gate if attention is not None else None
        self.context_gates: nn.Module | None = None  # int8: the context's product outside the cell
        self.recurrent: nn.Module | None = None      # int8: W_hh h + b_hh outside the fused cell
        self.grid_proj: nn.Module | None = attention.encoder_proj if attention is not None else None
        if attention is not None:
            score = attention.score
            self.register_buffer("score_weight", 2 * score.weight[0].detach(), persistent=False)
            self.register_buffer("score_bias", (score.bias - score.weight[0].sum()).detach(), persistent=False)
        if precision == "int8":
            self._to_int8(feature_range, int8_recurrent)

    def _to_int8(self, feature_range: tuple[float, float] | None, recurrent: bool) -> None:
        self.output = PinnedRangeInt8Linear(self.output.weight, self.output.bias, HIDDEN_RANGE)
        if self.gate is not None:
            self.gate = PinnedRangeInt8Linear(self.gate.weight, self.gate.bias, HIDDEN_RANGE)
        # The gated context (a gate in (0, 1) times a mean of features) enters a one-layer
        # cell's gates as its own product; a multi-layer nn.GRU / nn.LSTM takes it whole.
        if feature_range is not None and self.context_weight is not None:
            low, high = min(feature_range[0], 0.0), max(feature_range[1], 0.0)
            self.context_gates = PinnedRangeInt8Linear(self.context_weight, None, (low, high))
        # The encoder half of the attention energies, once per image (49 x 1280 -> 512: as
        # many multiply-adds as a sixth of EfficientNet-Lite0), over features in the same range.
        if feature_range is not None and self.grid_proj is not None:
            low, high = min(feature_range[0], 0.0), max(feature_range[1], 0.0)
            proj = self.decoder.attention.encoder_proj
            self.grid_proj = PinnedRangeInt8Linear(proj.weight, proj.bias, (low, high))
        # The recurrent product W_hh h (h in [-1, 1]) as int8 too: then the cell's gate
        # non-linearities run here (`_gate_step`) instead of inside torch's fused cell.
        if recurrent and self.token_gates is not None and (self.context_weight is None or self.context_gates is not None):
            rnn = self.decoder.rnn
            self.recurrent = PinnedRangeInt8Linear(rnn.weight_hh_l0, rnn.bias_hh_l0, HIDDEN_RANGE)

    def train(self, mode: bool = True) -> FastDecoder:
        if mode:
            raise RuntimeError("a FastDecoder is for inference only: train the CaptionDecoder it wraps")
        return super().train(False)

    def memory(self, grid: Tensor | None, pooled: Tensor) -> Memory:
        if self.decoder.attention is None:
            return Memory(None, None, pooled)
        if grid is None:
            raise ValueError("an attention decoder needs the feature grid")
        b, cells, channels = grid.shape
        projected = self.grid_proj(grid.reshape(b * cells, channels)).view(b, cells, -1)
        return Memory(grid, projected.mul_(2), pooled)  # 2e, see above

    def init_state(self, memory: Memory) -> State:
        return self.decoder.init_state(memory)

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        """tokens [B*K] -> logits [B*K,V], new state, attention [B*K,L] or None."""
        alpha = context = None
        if self.decoder.attention is not None:
            context, alpha = self._attend(memory, state[0][-1])
        if self.token_gates is None:  # several layers: nn.GRU / nn.LSTM over [word; context]
            embedded = self.decoder.embedding(tokens)
            x = embedded if context is None else torch.cat([embedded, context], dim=1)
            out, rnn_state = self.decoder.rnn(x.unsqueeze(1), state[0] if len(state) == 1 else state)
            hidden, state = out.squeeze(1), ((rnn_state,) if isinstance(rnn_state, Tensor) else tuple(rnn_state))
        else:
            gates = self.token_gates.index_select(0, tokens)                    # [B*K, gates]
            weight = self.context_weight
            if context is not None and self.context_gates is not None:
                gates, context = gates + self.context_gates(context), None
            if self.recurrent is not None:
                hidden, state = self._gate_step(gates, state)
            else:
                if context is None:  # the cell gets a zero-width input: everything is in `gates`
                    context, weight = gates.new_zeros(gates.shape[0], 0), gates.new_zeros(gates.shape[1], 0)
                hidden, state = self.decoder.cell_step(context, state, weight, gates)
        return self.output(hidden), state, alpha

    def _gate_step(self, gates: Tensor, state: State) -> tuple[Tensor, State]:
        """One cell step from the input gates [N, gates] and the int8 recurrent product, with
        torch's gate order (GRU r, z, n; LSTM i, f, g, o)."""
        h = state[0][0]                                                        # [N,H]
        recurrent = self.recurrent(h)                                          # [N, gates]
        cell = self.config.cell
        if cell == "gru":
            i_r, i_z, i_n = gates.chunk(3, 1)
            h_r, h_z, h_n = recurrent.chunk(3, 1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = n + z * (h - n)
            return h, (h.unsqueeze(0),)
        if cell == "lstm":
            i, f, g, o = (gates + recurrent).chunk(4, 1)
            c = torch.sigmoid(f) * state[1][0] + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            return h, (h.unsqueeze(0), c.unsqueeze(0))
        h = torch.tanh(gates + recurrent)
        return h, (h.unsqueeze(0),)

    def _attend(self, memory: Memory, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """`SoftAttention.forward` in the sigmoid form: -> gated context [B*K,C], alpha [B*K,L]."""
        attention, grid = self.decoder.attention, memory.grid
        b, cells = grid.shape[0], grid.shape[1]
        k = rows_per_image(hidden.shape[0], b)
        query = attention.hidden_proj(hidden).mul_(2).view(b, k, 1, -1)       # [B,K,1,A]
        sig = (memory.grid_proj.unsqueeze(1) + query).sigmoid_()               # [B,K,L,A], in place
        scores = torch.mv(sig.view(-1, sig.shape[-1]), self.score_weight).view(b, k, cells)
        alpha = torch.softmax(scores + self.score_bias, dim=2)                 # [B,K,L]
        context = torch.bmm(alpha, grid).view(b * k, -1)                       # [B*K,C]
        return torch.sigmoid(self.gate(hidden)) * context, alpha.view(b * k, cells)


def fast_decoder(decoder: CaptionDecoder | EnsembleDecoder, precision: str = "float32",
                 feature_range: tuple[float, float] | None = None,
                 int8_recurrent: bool = True) -> FastDecoder | EnsembleDecoder:
    """The inference form of a decoder or of every member of an ensemble. `precision`:
    'float32' or 'int8' (resolve 'auto' first); `feature_range`: the encoder's
    (`Encoder.feature_range`), without which the context's product stays float32."""
    if precision not in ("float32", "int8"):
        raise ValueError(f"precision must be float32 or int8 here, got {precision!r}")
    if isinstance(decoder, EnsembleDecoder):
        return EnsembleDecoder([FastDecoder(m, precision, feature_range, int8_recurrent)
                                for m in decoder.members]).eval()
    return FastDecoder(decoder, precision, feature_range, int8_recurrent).eval()
