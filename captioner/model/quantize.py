"""int8 inference for the decoder's large matrix products on CPU.

Why: on a 2-core CPU beam search is matrix products over few rows (batch x beam), where
PyTorch's x86 int8 kernels (FBGEMM, through `torch.ao.nn.quantized.dynamic.Linear`: weights
int8 per output channel, activations quantized on the fly) run about 2x faster than float32.
Quantized: each decoder's output projection (hidden -> vocabulary, the largest), the attention
gate (hidden -> channels) and, when the encoder's features are bounded and the decoder has one
layer (whose input products are folded), the context's share of the cell's input (channels ->
gates). The recurrent products, the attention energies and the softmax stay float32. The
shipped model's dev BLEU-4 moves by at most 0.0005 (README).

A caption must not depend on the other images in its batch. Dynamic quantization takes the
activations' scale from the range of the whole input, so every row would shift with its
neighbours; `PinnedRangeInt8Linear` pins that range to the input's known bounds (a recurrent
cell's hidden state lies in [-1, 1]; lite0's features in [0, 6]), which makes each row's
result exactly what it is alone.

Only for inference copies of a decoder (`Captioner` builds its own): the swapped modules cannot
be trained or saved, and `train()` on a quantized decoder raises.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from captioner.model.decoder import CaptionDecoder
from captioner.model.ensemble import EnsembleDecoder

PRECISIONS = ("auto", "float32", "int8")
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
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "int8" if device.type == "cpu" and int8_supported() else "float32"
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"--precision int8 runs on the CPU only, not on {device.type}")
    if precision == "int8" and not int8_supported():
        raise ValueError("--precision int8: this torch build has no x86 int8 kernels "
                         f"(quantized engines: {', '.join(torch.backends.quantized.supported_engines)}); "
                         "use --precision float32")
    return precision


class PinnedRangeInt8Linear(nn.Module):
    """y = x @ weight.T + bias, weight int8 (one scale per output row), x quantized with the
    scale of a fixed range [low, high] instead of its own batch's range.

    The pin is one extra input row holding `low` and `high`: the kernel's range is then the
    pinned one whenever the real rows stay inside it, so each row's result is independent of
    the others (and equal to its result alone). A value outside only widens the range.
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


def quantize_decoder(decoder: CaptionDecoder | EnsembleDecoder,
                     feature_range: tuple[float, float] | None = None) -> CaptionDecoder | EnsembleDecoder:
    """Swap the large products of a folded (`fold_embedding`) CPU decoder, or of every member
    of an ensemble, for int8 ones, in place. `feature_range`: the encoder's
    (`Encoder.feature_range`); without one the context's product stays float32."""
    for member in getattr(decoder, "members", [decoder]):
        _quantize_member(member, feature_range)
    return decoder


def _quantize_member(member: CaptionDecoder, feature_range: tuple[float, float] | None) -> None:
    if member.quantized:
        return
    if not member.folded:
        raise ValueError("quantize a decoder after fold_embedding(): int8 is for inference")
    member.output = PinnedRangeInt8Linear(member.output.weight, member.output.bias, HIDDEN_RANGE)
    if member.attention is not None:
        gate = member.attention.gate
        member.attention.gate = PinnedRangeInt8Linear(gate.weight, gate.bias, HIDDEN_RANGE)
        # The gated context (a gate in (0, 1) times a mean of features) enters a one-layer
        # cell's gates as its own product; a multi-layer cell (nn.GRU / nn.LSTM) takes it whole.
        if feature_range is not None and member._context_weight is not None:
            low, high = min(feature_range[0], 0.0), max(feature_range[1], 0.0)
            member.context_gates = PinnedRangeInt8Linear(member._context_weight, None, (low, high))
    member.quantized = True
