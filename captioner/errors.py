"""The exceptions users meet. The library raises them; only the CLI prints them.

Every `CaptionerError` reads as one line that names the thing at fault (a file, an option, a
dataset line) and the problem, so the CLI can print `captioner: error: <message>` with no
traceback. `UsageError` and its subclasses are mistakes in how the tool was asked (exit
status 2); the rest are problems with the user's files or data (exit status 1).

The subclasses also derive from the built-in exception a caller would expect (`ValueError`
for bad content, `RuntimeError` for a state that cannot be used), so code written against
those keeps working.
"""
from __future__ import annotations

import os

__all__ = [
    "CaptionerError",
    "CheckpointError",
    "DatasetError",
    "DecodingConfigError",
    "DeviceError",
    "EncoderWeightsError",
    "FeatureCacheError",
    "ImageFeaturesError",
    "ImageLoadError",
    "ModelFileError",
    "OutputError",
    "TrainingError",
    "UnknownEncoderError",
    "UsageError",
    "one_line",
    "shown_path",
]


def one_line(text: object) -> str:
    """Collapse whitespace runs so a message can never break one-line-per-item output."""
    return " ".join(str(text).split())


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path as it appears inside a message: line breaks escaped, the rest as it is."""
    return os.fspath(path).replace("\r", "\\r").replace("\n", "\\n")


class CaptionerError(Exception):
    """Base of every error the package raises on purpose; str() is one line."""


class UsageError(CaptionerError, ValueError):
    """An option or argument outside its contract (the CLI exits 2, as argparse does)."""


class DecodingConfigError(UsageError):
    """A `DecodingConfig` field out of range, or fields that contradict each other."""


class DeviceError(UsageError):
    """A device or precision this machine cannot provide (e.g. `cuda` without a GPU)."""


class UnknownEncoderError(UsageError):
    """An encoder name that is not in the registry (`captioner.model.encoders.ENCODERS`)."""


class ImageLoadError(CaptionerError, ValueError):
    """An image that cannot be used. `reason` is the problem alone (for an upload whose
    file name means nothing); str() is the one-line "PATH: reason"."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = one_line(reason)
        super().__init__(f"{shown_path(self.path)}: {self.reason}")


class ModelFileError(CaptionerError, ValueError):
    """A model file that cannot be used; the message names the file and the problem."""


class CheckpointError(CaptionerError, ValueError):
    """A training checkpoint that cannot be read safely (never unpickled beyond tensors)."""


class DatasetError(CaptionerError, ValueError):
    """A dataset that cannot be read as asked; names the file (and line) at fault."""


class FeatureCacheError(CaptionerError, RuntimeError):
    """A feature cache that must not be used: stale, incomplete, truncated or damaged."""


class ImageFeaturesError(FeatureCacheError):
    """Some images of a feature extraction could not be read; their rows are listed in the
    cache's index as failed and the finished rows are kept."""

    def __init__(self, failed: list[dict], total: int, index_path: str | os.PathLike[str]) -> None:
        self.failed = failed
        shown = "; ".join(f["error"] for f in failed[:5])
        more = f"; and {len(failed) - 5} more (all listed in {index_path})" if len(failed) > 5 else ""
        super().__init__(
            f"{len(failed)} of {total} images could not be read: {shown}{more}. Fix or remove "
            f"them and run again: the {total - len(failed)} finished rows are kept")


class EncoderBackendWarning(RuntimeWarning):
    """The faster encoder backend could not be used; the eager encoder runs instead."""


class EncoderWeightsError(CaptionerError, RuntimeError):
    """Pretrained encoder weights are not on this machine (nothing is downloaded at run time)."""


class OutputError(CaptionerError, OSError):
    """An output target that is refused (not a regular file, the input itself) or cannot be
    written; checked before the work, so no result is lost to it."""


class TrainingError(CaptionerError, RuntimeError):
    """Settings that cannot train together, or a run that diverged (non-finite loss or weights)."""
