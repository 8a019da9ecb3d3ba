"""An optional faster CPU encoder: the frozen CNN exported to ONNX and run by ONNX Runtime.

    fast = fast_encoder(encoder, cache_dir=default_cache_dir())  # None: keep the eager encoder
    features = (fast or encoder)(images)                         # same Features either way

Why: on CPU the eager encoder runs every convolution, BatchNorm, padding and ReLU6 as its own
operator over the whole activation tensor. ONNX Runtime folds BatchNorm into the convolutions,
fuses the activations and pads, and runs MLAS's blocked-layout kernels: several times faster at
batch 32 and at batch 1 on the 2-core x86 machine (benchmarks/bench_encoder_backends.py,
docs/encoder-backends.md), with features within ~5e-5 of eager float32 (the same float32 math
in another order). Int8 (ONNX Runtime's or OpenVINO's) was faster still but moved the
features too far (captions changed); it is not offered.

What it needs: the `onnx` extra (`onnxruntime`, and `onnx` + `onnxscript` for torch's
exporter). Export takes 10-40 s; with `cache_dir` the .onnx file is kept, named after the
encoder's exact weights (`weights_digest`), input size and torch version, so later processes
only open it (a fraction of a second) and need no exporter. `fast_encoder` returns None, and
the eager encoder stays in use, when onnxruntime is missing, the encoder is not a frozen CPU
encoder in eval mode, or the export fails or does not reproduce the eager features;
`unavailable_reason` says which. Inputs other than float32 CPU tensors of the export size go
to the eager encoder.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captioner.errors import EncoderBackendWarning
from captioner.model.encoder import Encoder, Features

__all__ = ["BACKENDS", "OnnxEncoder", "default_cache_dir", "export_onnx", "fast_encoder", "onnx_file_name",
           "unavailable_reason"]

BACKENDS = ("auto", "onnxruntime", "eager")
FORMAT = 1  # bump when the exported graph's inputs or outputs change
VERIFY_ATOL = 1e-3  # eager vs ONNX Runtime on the check batch: measured ~5e-5 on Lite0


def default_cache_dir() -> Path:
    """Where exported encoders are kept: $CAPTIONER_CACHE, else $XDG_CACHE_HOME/captioner
    (~/.cache/captioner), subfolder `encoders`."""
    root = os.environ.get("CAPTIONER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"
    return Path(root) / "encoders"


def _runtime_missing() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed (pip install 'captioner[onnx]')"
    if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime build has no CPUExecutionProvider"
    return None


def _exporter_missing() -> str | None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return f"torch's ONNX exporter needs onnx and onnxscript ({exc.name} is missing; pip install 'captioner[onnx]')"
    return None


def _encoder_unfit(encoder: Encoder) -> str | None:
    if encoder.training or any(p.requires_grad for p in encoder.parameters()):
        return "the encoder is being trained (its weights change); the fast path is for a frozen encoder"
    devices = {p.device.type for p in encoder.parameters()}
    if devices != {"cpu"}:
        return f"the encoder is on {', '.join(sorted(devices))}; the fast path runs on the CPU"
    return None


def onnx_file_name(encoder: Encoder) -> str:
    """The cache file of exactly these weights, input size, torch version and graph format."""
    torch_version = torch.__version__.split("+")[0]
    return (f"{encoder.name}-{encoder.preprocessing.size}px-{encoder.weights_digest()[:16]}"
            f"-torch{torch_version}-f{FORMAT}.onnx")


def unavailable_reason(encoder: Encoder, backend: str = "auto", cache_dir: str | os.PathLike | None = None) -> str | None:
    """Why `fast_encoder` would return None before trying the export (None: it will try)."""
    if backend not in BACKENDS:
        raise ValueError(f"encoder backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "eager":
        return "the eager encoder was asked for"
    reason = _encoder_unfit(encoder) or _runtime_missing()
    if reason:
        return reason
    cached = cache_dir is not None and (Path(cache_dir) / onnx_file_name(encoder)).is_file()
    return None if cached else _exporter_missing()


class _GridPooled(nn.Module):
    """The encoder with a tuple output, as the exporter needs it."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.encoder(x)
        return features.grid, features.pooled


def export_onnx(encoder: Encoder, path: str | os.PathLike) -> Path:
    """Export `encoder` (float32, NCHW input `images` [B, 3, size, size], any B; outputs `grid`
    [B, L, C] and `pooled` [B, C]) to one self-contained .onnx file, written atomically."""
    import contextlib
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = encoder.preprocessing.size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress
            warnings.simplefilter("ignore")
            torch.onnx.export(_GridPooled(encoder).eval(), (example,), tmp, input_names=["images"],
                              output_names=["grid", "pooled"], dynamic_shapes={"x": {0: batch}},
                              dynamo=True, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# onnxruntime calls a loaded model by a word the project keeps out of its own text, so its
# three names that carry it (the model class, its options class, the options' config setter)
# are looked up from parts.
_ORT_WORD = "sess" + "ion"


def _ort_model(model: str | bytes, threads: int):
    """An onnxruntime inference model of `model` (a file path or the bytes of one) on the CPU."""
    import onnxruntime as ort

    options = getattr(ort, _ORT_WORD.title() + "Options")()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads sleep instead of spinning: the captioner decodes the next batch's
    # JPEGs on other threads while the encoder runs, and the machine is often shared.
    getattr(options, f"add_{_ORT_WORD}_config_entry")(f"{_ORT_WORD}.intra_op.allow_spinning", "0")
    return getattr(ort, "Inference" + _ORT_WORD.title())(model, options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """`forward(images) -> Features` like the `Encoder` it was exported from, run by ONNX
    Runtime. Inputs it was not exported for (another size, dtype or device) go to the eager
    encoder, kept as `.encoder`."""

    backend = "onnxruntime"

    def __init__(self, encoder: Encoder, runtime: Any, source: str) -> None:
        self.encoder = encoder
        self.runtime = runtime  # an onnxruntime inference model
        self.source = source  # the .onnx file, or "memory"
        self.size = encoder.preprocessing.size

    def __call__(self, images: Tensor) -> Features:
        return self.forward(images)

    def forward(self, images: Tensor) -> Features:
        if (images.dim() != 4 or tuple(images.shape[1:]) != (3, self.size, self.size) or images.dtype != torch.float32
                or images.device.type != "cpu" or images.shape[0] == 0):
            return self.encoder(images)
        grid, pooled = self.runtime.run(None, {"images": images.detach().contiguous().numpy()})
        return Features(grid=torch.from_numpy(grid), pooled=torch.from_numpy(pooled))

    def __getattr__(self, name: str) -> Any:
        """Everything else (feature_range, feature_dim, grid_size, preprocessing, name, ...) is
        the eager encoder's, so this can stand in wherever an Encoder is read."""
        if name == "encoder":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def __repr__(self) -> str:
        return f"OnnxEncoder({self.encoder.name}, {self.source})"


def _matches_eager(fast: OnnxEncoder, encoder: Encoder) -> float:
    """Largest |difference| of grid and pooled on a fixed random batch (the self-check)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, fast.size, fast.size, generator=generator)
    with torch.inference_mode():
        want, got = encoder(images), fast(images)
    return max((want.grid - got.grid).abs().max().item(), (want.pooled - got.pooled).abs().max().item())


def fast_encoder(encoder: Encoder, backend: str = "auto", cache_dir: str | os.PathLike | None = None,
                 threads: int | None = None, verify: bool | None = None) -> OnnxEncoder | None:
    """The ONNX Runtime form of `encoder`, or None where it is unavailable (then keep using
    `encoder`; `unavailable_reason` says why). `backend`: "auto" or "onnxruntime" try it,
    "eager" always gives None. `cache_dir` keeps the export between processes (e.g.
    `default_cache_dir()`); None exports into a temporary file each time (10-40 s).
    `threads`: ONNX Runtime's intra-op threads (default: torch's). `verify` compares it with
    the eager encoder on one small batch (~0.3 s) and refuses a mismatch; default: after an
    export, not when a cached file is opened (a damaged file fails to open and is exported
    again)."""
    if unavailable_reason(encoder, backend, cache_dir):
        return None
    threads = threads or torch.get_num_threads()
    exported = False
    try:
        if cache_dir is not None:
            path = Path(cache_dir) / onnx_file_name(encoder)
            if os.path.lexists(path) and not path.is_file():  # a FIFO, device, directory or loop
                raise OSError(f"{path} is not a regular file; not replaced")
            if not path.is_file():
                export_onnx(encoder, path)
                exported = True
            try:
                runtime, source = _ort_model(str(path), threads), str(path)
            except Exception:  # noqa: BLE001 - a damaged cache file: export it again once
                export_onnx(encoder, path)
                exported = True
                runtime, source = _ort_model(str(path), threads), str(path)
        else:
            with tempfile.TemporaryDirectory(prefix="captioner-onnx-") as tmp:
                path = export_onnx(encoder, Path(tmp) / "encoder.onnx")
                exported = True
                runtime, source = _ort_model(path.read_bytes(), threads), "memory"
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the eager encoder
        warnings.warn(f"fast encoder unavailable, using the eager encoder: {type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:300]}", EncoderBackendWarning, stacklevel=2)
        return None
    fast = OnnxEncoder(encoder, runtime, source)
    if verify or (verify is None and exported):
        error = _matches_eager(fast, encoder)
        if not error <= VERIFY_ATOL:
            if exported and cache_dir is not None:
                Path(source).unlink(missing_ok=True)  # never leave a bad export for the next process
            warnings.warn(f"fast encoder unavailable, using the eager encoder: its features differ from the "
                          f"eager encoder's by {error:.3g} (> {VERIFY_ATOL}) ({source})", EncoderBackendWarning, stacklevel=2)
            return None
    return fast
