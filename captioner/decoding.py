"""`DecodingConfig`: every setting of caption search, validated in one place.

Like transformers' `GenerationConfig`: a model file stores its own default decoding (chosen
on the dev split when the model was made), callers override single fields
(`config.replace(beam_size=5)`), and search, the Python API, `captioner evaluate` and the
demo all take the one object. Every field has a bound that keeps time and memory finite
(a beam of 10^5 or 10^8 steps would exhaust memory, a temperature of 1e-300 overflows to
NaN), so a bad value fails here, with one line naming the field, before any work starts.
The CLI derives its option ranges from `LIMITS`, so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from captioner.errors import DecodingConfigError

__all__ = ["DecodingConfig", "LIMITS", "PRECISIONS"]

PRECISIONS = ("auto", "float32", "int8")

# field -> (lowest, highest) allowed value, both inclusive.
LIMITS: dict[str, tuple[float, float]] = {
    "beam_size": (1, 32),
    "n_best": (1, 32),
    "max_length": (1, 200),
    "length_penalty": (-5.0, 5.0),
    "temperature": (0.01, 100.0),
    "top_k": (0, 100_000),
    "seed": (0, 2**63 - 1),
}


@dataclass(frozen=True)
class DecodingConfig:
    """How to search for captions.

    beam_size       beams per image (1 = greedy); ignored when sampling
    n_best          captions returned per image, best first (<= beam_size for beam search)
    max_length      words per caption at most, <end> included
    length_penalty  GNMT alpha: scores are log P / ((5 + length) / 6) ** alpha; 0 = none
    sample          draw captions from the model instead of searching
    temperature     sampling: softmax(logits / temperature)
    top_k           sampling: draw from the k most probable words only; 0 = all
    seed            sampling: a fixed random seed for reproducible draws; None = fresh
    precision       decoder arithmetic: auto (int8 on a CPU with x86 int8 kernels, else
                    float32), float32 or int8 (CPU only)
    """

    beam_size: int = 3
    n_best: int = 1
    max_length: int = 30
    length_penalty: float = 0.0
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("beam_size", "n_best", "max_length", "top_k"):
            _check_int(name, getattr(self, name))
        if self.seed is not None:
            _check_int("seed", self.seed)
        for name in ("length_penalty", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DecodingConfigError(f"decoding {name} must be a number, got {value!r}")
            try:
                number = float(value)
            except OverflowError:  # an integer too large for a float
                number = float("inf")
            _check_range(name, number)
            object.__setattr__(self, name, number)
        if not isinstance(self.sample, bool):
            raise DecodingConfigError(f"decoding sample must be true or false, got {self.sample!r}")
        if self.precision not in PRECISIONS:
            raise DecodingConfigError(f"decoding precision must be one of {', '.join(PRECISIONS)}, "
                                      f"got {self.precision!r}")
        if not self.sample and self.n_best > self.beam_size:
            raise DecodingConfigError(f"n_best {self.n_best} needs beam_size >= {self.n_best} "
                                      f"(beam_size is {self.beam_size})")

    def replace(self, **changes: Any) -> DecodingConfig:
        """A copy with `changes` applied (None values are ignored), validated again."""
        given = {k: v for k, v in changes.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise DecodingConfigError(f"unknown decoding settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecodingConfig:
        """Inverse of `to_dict`; missing fields take their defaults (older model files
        store only `beam_size` and `length_penalty`), unknown ones are an error."""
        if not isinstance(data, Mapping):
            raise DecodingConfigError(f"decoding must be a JSON object, got {type(data).__name__}")
        return cls().replace(**dict(data)) if data else cls()


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodingConfigError(f"decoding {name} must be an integer, got {value!r}")
    _check_range(name, value)


def _check_range(name: str, value: float) -> None:
    low, high = LIMITS[name]
    if not (math.isfinite(value) and low <= value <= high):
        raise DecodingConfigError(f"decoding {name} must be between {low:g} and {high:g}, got {value!r}")
