"""DecodingConfig: every bound of LIMITS (inclusive, and refused one step outside), n_best
against the beam, replace / from_dict / to_dict, unknown keys, and values of the wrong kind
(a bool is not an integer); every refusal is one DecodingConfigError line naming the field.
The CLI's option ranges are LIMITS too."""
from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from captioner.decoding import LIMITS, PRECISIONS, DecodingConfig
from captioner.errors import DecodingConfigError, UsageError

INTEGER_FIELDS = ("beam_size", "n_best", "max_length", "top_k", "seed")
FLOAT_FIELDS = ("length_penalty", "temperature")


def valid(**values) -> DecodingConfig:
    """A config with `values`, made consistent otherwise (a wide beam for any n_best)."""
    base = {"beam_size": 32} if "beam_size" not in values else {}
    return DecodingConfig(**{**base, **values})


def refused(pattern: str, **values) -> DecodingConfigError:
    with pytest.raises(DecodingConfigError) as info:
        valid(**values)
    message = str(info.value)
    assert "\n" not in message and (pattern in message), message
    return info.value


def test_limits_cover_every_bounded_field():
    assert set(LIMITS) == set(INTEGER_FIELDS) | set(FLOAT_FIELDS)
    names = {f.name for f in dataclasses.fields(DecodingConfig)}
    assert set(LIMITS) <= names and names - set(LIMITS) == {"sample", "precision"}


@pytest.mark.parametrize("field", INTEGER_FIELDS)
def test_integer_bounds_are_inclusive_and_one_step_outside_is_refused(field):
    low, high = LIMITS[field]
    assert getattr(valid(**{field: low}), field) == low
    assert getattr(valid(**{field: high}), field) == high
    for outside in (low - 1, high + 1):
        error = refused(f"decoding {field} must be between {low:g} and {high:g}, got {outside}", **{field: outside})
        assert isinstance(error, UsageError) and isinstance(error, ValueError)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_float_bounds_are_inclusive_and_just_outside_is_refused(field):
    low, high = LIMITS[field]
    assert getattr(valid(**{field: low}), field) == low
    assert getattr(valid(**{field: high}), field) == high
    for outside in (math.nextafter(low, -math.inf), math.nextafter(high, math.inf), high * 1e300,
                    math.nan, math.inf, -math.inf):
        refused(f"decoding {field} must be between {low:g} and {high:g}", **{field: outside})


def test_the_seed_spans_a_signed_64_bit_integer():
    assert valid(seed=None).seed is None
    assert valid(seed=2 ** 63 - 1).seed == 2 ** 63 - 1
    refused("decoding seed must be between 0 and", seed=2 ** 63)
    refused("decoding seed must be between 0 and", seed=-1)


@pytest.mark.parametrize("field", INTEGER_FIELDS)
@pytest.mark.parametrize("value", [True, False, 3.0, "3", [3], {"n": 3}])
def test_integers_must_be_integers_not_bools_floats_or_strings(field, value):
    refused(f"decoding {field} must be an integer, got {value!r}", **{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [True, False, "0.5", None, [0.5]])
def test_numbers_must_be_numbers_not_bools_or_strings(field, value):
    if value is None:  # None is "not given" for replace(), but a real value here
        with pytest.raises(DecodingConfigError, match=f"decoding {field} must be a number"):
            DecodingConfig(**{field: None})
        return
    refused(f"decoding {field} must be a number, got {value!r}", **{field: value})


def test_integral_numbers_become_floats():
    config = DecodingConfig(length_penalty=1, temperature=2)
    assert config.length_penalty == 1.0 and isinstance(config.length_penalty, float)
    assert isinstance(config.temperature, float)


@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_sample_must_be_a_bool(value):
    refused("decoding sample must be true or false", sample=value)


@pytest.mark.parametrize("value", ["int4", "float16", "INT8", "", None])
def test_precision_must_be_a_known_one(value):
    refused("decoding precision must be one of auto, float32, int8", precision=value)
    assert {valid(precision=p).precision for p in PRECISIONS} == set(PRECISIONS)


def test_n_best_needs_a_beam_at_least_as_wide_except_when_sampling():
    refused("n_best 4 needs beam_size >= 4 (beam_size is 3)", beam_size=3, n_best=4)
    assert DecodingConfig(beam_size=4, n_best=4).n_best == 4
    drawn = DecodingConfig(sample=True, beam_size=1, n_best=32)  # n_best draws; the beam is ignored
    assert drawn.n_best == 32
    with pytest.raises(DecodingConfigError, match="n_best 32 needs beam_size >= 32"):
        drawn.replace(sample=False)


def test_defaults():
    assert DecodingConfig() == DecodingConfig(beam_size=3, n_best=1, max_length=30, length_penalty=0.0,
                                              sample=False, temperature=1.0, top_k=0, seed=None, precision="auto")


def test_the_config_is_frozen_and_replace_validates_the_copy():
    config = DecodingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.beam_size = 5
    wider = config.replace(beam_size=5, n_best=None, length_penalty=0.5)  # None: not given
    assert (wider.beam_size, wider.n_best, wider.length_penalty) == (5, 1, 0.5)
    assert config == DecodingConfig()  # the original is untouched
    with pytest.raises(DecodingConfigError, match="decoding beam_size must be between 1 and 32, got 33"):
        config.replace(beam_size=33)
    with pytest.raises(DecodingConfigError, match="unknown decoding settings: exhaustive, mirror"):
        config.replace(mirror=True, exhaustive=True, beam_size=4)
    assert config.replace() == config


def test_dict_round_trip_and_partial_dicts():
    config = DecodingConfig(beam_size=5, n_best=2, max_length=40, length_penalty=0.7, sample=False,
                            temperature=0.9, top_k=10, seed=123, precision="float32")
    data = config.to_dict()
    assert data == {"beam_size": 5, "n_best": 2, "max_length": 40, "length_penalty": 0.7, "sample": False,
                    "temperature": 0.9, "top_k": 10, "seed": 123, "precision": "float32"}
    assert DecodingConfig.from_dict(data) == config
    assert DecodingConfig.from_dict({}) == DecodingConfig()
    older = DecodingConfig.from_dict({"beam_size": 3, "length_penalty": 0.0})  # what older model files store
    assert older == DecodingConfig(beam_size=3, length_penalty=0.0)
    assert DecodingConfig.from_dict({"seed": None}).seed is None


@pytest.mark.parametrize("data", [[], [("beam_size", 3)], "beam_size=3", 3, None])
def test_from_dict_needs_an_object(data):
    with pytest.raises(DecodingConfigError, match="decoding must be a JSON object, got"):
        DecodingConfig.from_dict(data)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(DecodingConfigError, match="unknown decoding settings: sample_prob"):
        DecodingConfig.from_dict({"beam_size": 3, "sample_prob": 0.1})
    with pytest.raises(DecodingConfigError, match="decoding beam_size must be an integer, got True"):
        DecodingConfig.from_dict({"beam_size": True})


@pytest.mark.parametrize("field", sorted(LIMITS))
def test_the_cli_option_ranges_are_the_limits(field):
    from captioner.cli import _decoding_type

    parse = _decoding_type(field)
    low, high = LIMITS[field]
    assert parse(str(low)) == low and parse(str(high)) == high
    outside = (low - 1, high + 1) if field in INTEGER_FIELDS else (low - 0.001, high + 0.001)
    for value in (*outside, "nan", "ten", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(str(value))
    if field in INTEGER_FIELDS:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(f"{low}.0")


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_an_integer_too_large_for_a_float_is_refused_as_out_of_range(field):
    refused(f"decoding {field} must be between", **{field: 10 ** 400})
