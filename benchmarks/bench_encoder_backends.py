"""Encoder backends: EfficientNet-Lite0 throughput (batch 32) and latency (batch 1) under
PyTorch's compilation and quantization paths and under ONNX Runtime and OpenVINO, as a ratio
against today's eager float32 channels-last encoder measured in the same run, with the
quality checks that decide whether a backend may replace it.

Backends (each skipped, with the reason in its JSON entry, when its package is missing):

  eager_fp32          the baseline: `Encoder.forward`, float32, channels_last
  compile_default     torch.compile (inductor, CPU), mode default
  compile_freezing    the same with inductor's `freezing` (weights folded as constants,
                      BatchNorm folded into the convolutions, oneDNN weight prepacking)
  compile_max_autotune  mode max-autotune-no-cudagraphs, with freezing
  pt2e_int8           torch.export -> prepare_pt2e(X86InductorQuantizer) -> calibrate ->
                      convert_pt2e -> torch.compile with freezing (torchao's PT2E APIs)
  onnxruntime_fp32    torch.onnx.export (dynamo exporter, dynamic batch) -> ONNX Runtime CPU
  onnxruntime_int8    the same file, ONNX Runtime static int8 (QDQ, per-channel weights)
  openvino_fp32       the same file, OpenVINO CPU (latency hint)
  openvino_int8       the same file quantized by NNCF (int8), OpenVINO CPU

Timing: `--images` Flickr8k test images (first N), preprocessed once as `Captioner.preprocess`
does, run at `--batch-size` (throughput) and one image per call (latency, `--latency-images`
per round). The backends run round-robin, `--repeats` rounds after `--warmup`; each round's
ratio compares runs seconds apart and the reported ratio is the median over rounds of those
paired ratios (a ratio of medians is reported too). The 1-minute load average is recorded
before and after every round: on a shared machine read it next to the figures.

Quality, per backend: Features shapes; max/mean |grid - eager grid| on the timing images;
ImageNet top-1 of the original classifier head (`load_efficientnet_lite()._fc`) on the pooled
features must match eager float32 on the four demo photos and on `--top1-images` Flickr8k
test images (>= 98% agreement); and, for backends at least `--bleu-min-ratio` faster,
Flickr8k test BLEU-4 of the shipped model (default decoding) on `--bleu-images` test images
with the backend's features must be within 0.003 of eager float32's.

Set-up cost (export, quantization, compilation: the first calls) is reported apart. The
compile backends start from an empty inductor cache in the run's work directory (a cold
compile); `--inductor-cache DIR` reuses one (a warm start).

    python benchmarks/bench_encoder_backends.py [--images 256] [--batch-size 32] [--repeats 5]
        [--backends eager_fp32,onnxruntime_fp32,...] [--threads N] [--bleu-images 1000]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEMO_IMAGES, add_threads_option, apply_threads, emit, flickr8k_records, machine,  # noqa: E402
                     model_path, summary)

BACKENDS = ("eager_fp32", "compile_default", "compile_freezing", "compile_max_autotune", "pt2e_int8",
            "onnxruntime_fp32", "onnxruntime_int8", "openvino_fp32", "openvino_int8")
BASELINE = "eager_fp32"
TARGET_RATIO = 1.5
TARGET_TOP1 = 0.98
TARGET_BLEU_DELTA = 0.003
PACKAGES = ("onnxruntime", "onnx", "onnxscript", "openvino", "nncf", "torchao")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file (encoder and BLEU decoder); default: the shipped model")
    p.add_argument("--images", type=int, default=256, help="Flickr8k test images timed (first N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latency-images", type=int, default=16, help="single-image calls per backend per round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (interleaved); median reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list; the baseline always runs")
    p.add_argument("--calibration-images", type=int, default=64, help="Flickr8k train images for int8 calibration")
    p.add_argument("--top1-images", type=int, default=500, help="Flickr8k test images for top-1 agreement")
    p.add_argument("--bleu-images", type=int, default=1000, help="Flickr8k test images for BLEU-4 (0: skip BLEU)")
    p.add_argument("--bleu-min-ratio", type=float, default=1.3,
                   help="BLEU only for backends at least this much faster than eager at the batch size")
    p.add_argument("--caption-images", type=int, default=256,
                   help="end to end: Captioner.caption (default decoding) on N test images with the eager "
                        "encoder and with the library's fast encoder, interleaved (0: skip)")
    p.add_argument("--workdir", default=None, help="keep exported files here (default: a temporary directory)")
    p.add_argument("--inductor-cache", default=None,
                   help="inductor cache directory (default: a fresh one in the work directory: cold compile)")
    add_threads_option(p)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ backends


class Backend:
    """A built backend: `run(images) -> Features`, plus what building it cost."""

    def __init__(self, name: str, run: Callable, setup: dict[str, Any]) -> None:
        self.name, self.run, self.setup = name, run, setup


def _outputs_module(encoder):
    """The encoder as a module returning (grid, pooled): what export and PT2E capture."""
    import torch

    class GridPooled(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            f = self.enc(x)
            return f.grid, f.pooled

    return GridPooled(encoder).eval()


def _features(grid, pooled):
    import torch

    from captioner.model.encoder import Features
    if not isinstance(grid, torch.Tensor):
        grid, pooled = torch.from_numpy(grid), torch.from_numpy(pooled)
    return Features(grid=grid, pooled=pooled)


def _first_calls(run: Callable, batch, single) -> dict[str, float]:
    """Seconds of the first call at the batch size and at batch 1 (compilation happens here)."""
    t0 = time.perf_counter()
    run(batch)
    t1 = time.perf_counter()
    run(single)
    return {"first_call_batch_s": round(t1 - t0, 2), "first_call_single_s": round(time.perf_counter() - t1, 2)}


def build_eager_fp32(encoder, ctx):
    return encoder, {}


def _build_compiled(encoder, ctx, options: dict[str, Any] | None):
    """torch.compile(dynamic=False, options=options), with the same `options` also set in
    inductor's global config around every call (compilation happens inside the call).

    Both are needed in torch 2.14. Passed only to torch.compile, `freezing` did not take
    effect (features bit-identical to the unfrozen compile, no speed-up) and broke the int8
    weight prepacking (UnsupportedOperatorException: onednn.qconv_prepack). Set only
    globally, two compiles of the same module class with equal torch.compile arguments share
    Dynamo's cache: the second reused the first's graph instead of compiling its own."""
    import torch
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    options = dict(options or {})
    module = copy.deepcopy(encoder)
    compiled = torch.compile(module, dynamic=False, options=options or None)

    def run(images):
        with torch._inductor.config.patch(options):
            return compiled(images)

    return run, {"inductor_config": options, "dynamic": False}


def build_compile_default(encoder, ctx):
    return _build_compiled(encoder, ctx, None)


def build_compile_freezing(encoder, ctx):
    return _build_compiled(encoder, ctx, {"freezing": True})


def build_compile_max_autotune(encoder, ctx):
    import torch._inductor
    return _build_compiled(encoder, ctx, {**torch._inductor.list_mode_options("max-autotune-no-cudagraphs"),
                                          "freezing": True})


def _tag_source_partitions(graph_module) -> int:
    """X86InductorQuantizer finds convolutions, ReLU6s and adds through `source_fn_stack`
    node metadata, which torch.export (2.14) no longer records; its nn_module_stack fallback
    misses Conv2d subclasses (efficientnet_lite_pytorch's Conv2dDynamicSamePadding) and
    merges the two uses of one ReLU6 module into a partition with two outputs. Tag each node
    as its own source so every convolution is annotated."""
    import operator

    import torch
    sources = {torch.ops.aten.conv2d.default: torch.nn.Conv2d, torch.ops.aten.hardtanh.default: torch.nn.ReLU6,
               torch.ops.aten.add.Tensor: operator.add}
    tagged = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in sources:
            node.meta["source_fn_stack"] = [(node.name, sources[node.target])]
            tagged += 1
    return tagged


def build_pt2e_int8(encoder, ctx):
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    t0 = time.perf_counter()
    example = ctx["calibration"][:2]
    batch = torch.export.Dim("batch", min=1, max=4096)
    captured = torch.export.export(_outputs_module(copy.deepcopy(encoder)), (example,),
                                   dynamic_shapes={"x": {0: batch}}).module()
    tagged = _tag_source_partitions(captured)
    quantizer = xiq.X86InductorQuantizer()
    # torchao's advice: reduce_range on CPUs without VNNI (their u8 x s8 pair sums saturate)
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=not has_vnni()))
    prepared = prepare_pt2e(captured, quantizer)
    calibration = ctx["calibration"]
    with torch.no_grad():
        for i in range(0, len(calibration), 8):
            prepared(calibration[i:i + 8])
    converted = convert_pt2e(prepared)
    quantized_convs = sum(1 for n in converted.graph.nodes if n.op == "call_function"
                          and "quantize_per_channel" in str(n.target))
    quantize_s = time.perf_counter() - t0
    compile_run, _ = _build_compiled(converted, ctx, {"freezing": True})  # freezing lowers int8 convs to oneDNN

    def run(images):
        grid, pooled = compile_run(images.contiguous())
        return _features(grid, pooled)

    return run, {"quantize_s": round(quantize_s, 2), "tagged_nodes": tagged,
                 "per_channel_quantized_weights": quantized_convs, "calibration_images": len(calibration),
                 "reduce_range": not has_vnni(),
                 "config": "x86 inductor default: static, u8 activations per tensor, s8 weights per channel"}


def onnx_file(encoder, ctx) -> Path:
    """The float32 ONNX export (dynamic batch) of captioner/model/fast_encoder.py, made once
    per run and shared by the ONNX Runtime and OpenVINO backends."""
    if "onnx_path" not in ctx:
        from captioner.model.fast_encoder import export_onnx, onnx_file_name
        t0 = time.perf_counter()
        ctx["onnx_path"] = export_onnx(encoder, Path(ctx["workdir"]) / onnx_file_name(encoder))
        ctx["onnx_export_s"] = round(time.perf_counter() - t0, 2)
    return ctx["onnx_path"]


def _ort_model(path: Path, threads: int):
    from captioner.model.fast_encoder import _ort_model as load
    return load(str(path), threads)  # the library's runtime options


def _ort_run(runtime):
    def run(images):
        grid, pooled = runtime.run(None, {"images": images.contiguous().numpy()})
        return _features(grid, pooled)
    return run


def build_onnxruntime_fp32(encoder, ctx):
    """Exactly the library's fast path: `fast_encoder` on the run's exported file."""
    import onnxruntime

    from captioner.model.fast_encoder import fast_encoder
    path = onnx_file(encoder, ctx)
    t0 = time.perf_counter()
    fast = fast_encoder(encoder, "onnxruntime", cache_dir=path.parent, threads=ctx["threads"], verify=True)
    if fast is None:
        raise RuntimeError("fast_encoder returned None (see its warning)")
    return fast, {"onnx_export_s": ctx["onnx_export_s"], "load_and_check_s": round(time.perf_counter() - t0, 2),
                  "file_bytes": path.stat().st_size, "onnxruntime": onnxruntime.__version__,
                  "library": "captioner.model.fast_encoder.fast_encoder"}


def _calibration_batches(ctx, size: int = 8):
    calibration = ctx["calibration"]
    return [calibration[i:i + size].numpy() for i in range(0, len(calibration), size)]


def build_onnxruntime_int8(encoder, ctx):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    path = onnx_file(encoder, ctx)
    workdir = Path(ctx["workdir"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": b} for b in _calibration_batches(ctx)])

        def get_next(self):
            return next(self.batches, None)

    t0 = time.perf_counter()
    pre, out = workdir / "lite0.pre.onnx", workdir / "lite0.int8.onnx"
    quant_pre_process(str(path), str(pre))
    # reduce_range (7-bit weights): ONNX Runtime's advice for per-channel int8 without VNNI
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=not has_vnni())
    quantize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runtime = _ort_model(out, ctx["threads"])
    return _ort_run(runtime), {"onnx_export_s": ctx["onnx_export_s"], "quantize_s": round(quantize_s, 2),
                               "load_s": round(time.perf_counter() - t0, 2), "file_bytes": out.stat().st_size,
                               "reduce_range": not has_vnni(),
                               "config": "QDQ, u8 activations (MinMax calibration), s8 weights per channel"}


def _openvino_run(compiled):
    request = compiled.create_infer_request()

    def run(images):
        out = request.infer({0: images.contiguous().numpy()})  # outputs copied (share_outputs=False)
        return _features(out[0], out[1])
    return run


def _openvino_compile(model, ctx):
    import openvino as ov
    core = ov.Core()
    return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                             "INFERENCE_NUM_THREADS": ctx["threads"]})


def build_openvino_fp32(encoder, ctx):
    import openvino as ov
    path = onnx_file(encoder, ctx)
    t0 = time.perf_counter()
    compiled = _openvino_compile(ov.Core().read_model(str(path)), ctx)
    return _openvino_run(compiled), {
        "onnx_export_s": ctx["onnx_export_s"], "compile_s": round(time.perf_counter() - t0, 2),
        "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")), "openvino": ov.__version__}


def build_openvino_int8(encoder, ctx):
    import nncf
    import openvino as ov
    path = onnx_file(encoder, ctx)
    t0 = time.perf_counter()
    batches = _calibration_batches(ctx)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    # NNCF's fix for CPUs without VNNI (saturating u8 x s8 pair sums): for every layer
    overflow_fix = OverflowFix.FIRST_LAYER if has_vnni() else OverflowFix.ENABLE
    quantized = nncf.quantize(ov.Core().read_model(str(path)), nncf.Dataset(batches),
                              subset_size=len(ctx["calibration"]),
                              advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow_fix))
    quantize_s = time.perf_counter() - t0
    out = Path(ctx["workdir"]) / "lite0.int8.xml"
    ov.save_model(quantized, str(out))
    t0 = time.perf_counter()
    compiled = _openvino_compile(quantized, ctx)
    return _openvino_run(compiled), {
        "onnx_export_s": ctx["onnx_export_s"], "quantize_s": round(quantize_s, 2),
        "compile_s": round(time.perf_counter() - t0, 2),
        "file_bytes": out.stat().st_size + out.with_suffix(".bin").stat().st_size,
        "overflow_fix": str(overflow_fix),
        "config": "NNCF post-training quantization, preset performance (symmetric), nncf " + nncf.__version__}


BUILDERS = {name: globals()[f"build_{name}"] for name in BACKENDS}


def build(name: str, encoder, ctx, batch, single) -> tuple[Backend | None, dict[str, Any]]:
    """Build one backend and make its first calls; (None, {"error": ...}) when it cannot."""
    import torch
    exported_before = "onnx_export_s" in ctx
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            run, setup = BUILDERS[name](encoder, ctx)
            build_s = time.perf_counter() - t0
            first = _first_calls(run, batch, single)
    except ImportError as exc:
        return None, {"available": False, "error": f"not installed: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a backend that cannot take this model is a finding, not a crash
        traceback.print_exc(file=sys.stderr)
        return None, {"available": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    elapsed = time.perf_counter() - t0
    if not exported_before and "onnx_export_s" in ctx:  # this build made the shared export
        elapsed -= ctx["onnx_export_s"]
        build_s -= ctx["onnx_export_s"]
    setup.update(first, build_s=round(build_s, 2))
    # everything this backend needs from scratch: its share of the ONNX export included
    setup["setup_s"] = round(elapsed + setup.get("onnx_export_s", 0.0), 2)
    return Backend(name, run, setup), {"available": True}


# ------------------------------------------------------------------------------ timing


def load_avg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def time_rounds(backends: dict[str, Backend], batches: list, singles: list, repeats: int, warmup: int):
    """Round-robin: per round, every backend encodes all `batches`, then every backend encodes
    each of `singles` one per call. Returns seconds per round (throughput), median seconds
    per single image per round (latency), and the load average around each round."""
    import torch
    throughput = {name: [] for name in backends}
    latency = {name: [] for name in backends}
    loads = []
    with torch.inference_mode():
        for r in range(warmup + repeats):
            timed = r >= warmup
            before = load_avg()
            for name, backend in backends.items():
                t0 = time.perf_counter()
                for batch in batches:
                    backend.run(batch)
                if timed:
                    throughput[name].append(time.perf_counter() - t0)
            for name, backend in backends.items():
                each = []
                for single in singles:
                    t0 = time.perf_counter()
                    backend.run(single)
                    each.append(time.perf_counter() - t0)
                if timed:
                    latency[name].append(statistics.median(each))
            if timed:
                loads.append({"round": r - warmup, "before": before, "after": load_avg()})
            print(f"bench: round {r - warmup} {'(warm-up) ' if not timed else ''}done, load {load_avg()}",
                  file=sys.stderr, flush=True)
    return throughput, latency, loads


# ------------------------------------------------------------------------------ quality


def imagenet_head():
    from torchvision.models import ResNet50_Weights

    from captioner.model.backbones import load_efficientnet_lite
    return load_efficientnet_lite()._fc.eval(), ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def encode_all(backend: Backend, images, batch_size: int):
    """Features of every image, always at exactly `batch_size` (the last batch padded with
    copies of its last image, the padding dropped), so a compiled backend never meets a new
    shape and recompiles: (grid per batch, pooled [N, C])."""
    import torch
    grids, pooled = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            n = len(chunk)
            if n < batch_size:
                chunk = torch.cat([chunk, chunk[-1:].expand(batch_size - n, *chunk.shape[1:])])
            f = backend.run(chunk)
            grids.append(f.grid[:n].float())
            pooled.append(f.pooled[:n].float())
    return grids, torch.cat(pooled)


def main(argv=None) -> dict:
    args = parse(argv)
    apply_threads(args)
    with contextlib.ExitStack() as stack:
        # Exporters, NNCF and the runtimes print progress; stdout is only for the JSON.
        saved_stdout = os.dup(1)
        os.dup2(2, 1)
        stack.callback(lambda: (sys.stdout.flush(), os.dup2(saved_stdout, 1), os.close(saved_stdout)))
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        result = _run(args, stack)
    return emit(result)


def _run(args, stack) -> dict:
    from captioner.allocator import keep_freed_memory
    malloc_tuned = keep_freed_memory()  # as every entry point does (the eager encoder is 2.6x faster)

    workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(
        prefix="encoder-backends-")))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.inductor_cache) if args.inductor_cache
                                                else workdir / "inductor-cache")
    import warnings

    import torch

    from captioner.api import Captioner
    from captioner.metrics import bleu_scores
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    start_load = os.getloadavg() if hasattr(os, "getloadavg") else None
    captioner = Captioner.load(model_path(args.model), device="cpu", encoder_backend="eager")  # the baseline
    encoder = captioner.encoder
    names = [BASELINE] + [n for n in args.backends.split(",") if n.strip() and n.strip() != BASELINE]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise SystemExit(f"bench: unknown backends {unknown}; choose from {', '.join(BACKENDS)}")

    def pixels(records):
        return torch.stack([captioner.preprocess(r.path) for r in records])

    quality_n = max(args.top1_images, args.bleu_images)
    test_records = flickr8k_records("test", max(args.images, quality_n))
    test_images = pixels(test_records)
    calibration = pixels(flickr8k_records("train", args.calibration_images))
    timed_images = test_images[:args.images]
    batches = [timed_images[i:i + args.batch_size] for i in range(0, len(timed_images), args.batch_size)]
    singles = [timed_images[i:i + 1] for i in range(min(args.latency_images, len(timed_images)))]
    ctx = {"workdir": workdir, "calibration": calibration, "threads": torch.get_num_threads()}

    backends: dict[str, Backend] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"bench: building {name} ...", file=sys.stderr, flush=True)
        backend, entry = build(name, encoder, ctx, batches[0], singles[0])
        entries[name] = entry
        if backend is not None:
            backends[name] = backend
            entry["setup"] = backend.setup
            print(f"bench: {name} ready ({backend.setup['setup_s']} s)", file=sys.stderr, flush=True)
        else:
            print(f"bench: {name} unavailable: {entry['error']}", file=sys.stderr, flush=True)
    if BASELINE not in backends:
        raise SystemExit(f"bench: the baseline failed: {entries[BASELINE]['error']}")

    throughput, latency, loads = time_rounds(backends, batches, singles, args.repeats, args.warmup)
    n = len(timed_images)
    base_t, base_l = throughput[BASELINE], latency[BASELINE]
    for name in backends:
        e = entries[name]
        e["images_per_s"] = round(n / statistics.median(throughput[name]), 2)
        e["throughput_ratio"] = round(statistics.median(b / c for b, c in zip(base_t, throughput[name])), 3)
        e["throughput_ratio_of_medians"] = round(statistics.median(base_t) / statistics.median(throughput[name]), 3)
        e["batch1_latency_ms"] = round(1000 * statistics.median(latency[name]), 2)
        e["latency_speedup"] = round(statistics.median(b / c for b, c in zip(base_l, latency[name])), 3)
        e["seconds"] = summary(throughput[name])

    # ---- quality ---------------------------------------------------------------------
    head, categories = imagenet_head()
    demo_paths = sorted(DEMO_IMAGES.glob("*.jpg"))
    demo = torch.stack([captioner.preprocess(p) for p in demo_paths])
    references = [list(r.captions) for r in test_records[:args.bleu_images]]
    eager: dict[str, Any] = {}

    def top1(pooled):
        with torch.inference_mode():
            return head(pooled).argmax(dim=1)

    def captions(grids, pooled):
        from captioner.model.encoder import Features
        out, start = [], 0
        for g in grids:
            out += [r.caption for r in captioner.decode_features(Features(g, pooled[start:start + len(g)]))]
            start += len(g)
        return out

    for name, backend in backends.items():  # the baseline first
        print(f"bench: quality of {name} ...", file=sys.stderr, flush=True)
        e = entries[name]
        want_bleu = args.bleu_images > 0 and (name == BASELINE or e["throughput_ratio"] >= args.bleu_min_ratio)
        count = max(args.images, args.top1_images, args.bleu_images if want_bleu else 0)
        grids, pooled = encode_all(backend, test_images[:count], args.batch_size)
        shapes = {"grid": [count, *grids[0].shape[1:]], "pooled": list(pooled.shape)}
        timed_grid = torch.cat(grids)[:args.images] if len(grids) > 1 else grids[0][:args.images]
        if name == BASELINE:
            eager.update(shapes=shapes, grid=timed_grid, pooled=pooled[:args.images])
        e["shapes"] = {**shapes, "same_as_eager": shapes == eager["shapes"]}
        diff = (timed_grid - eager["grid"]).abs()
        e["grid_max_abs_diff"] = float(f"{diff.max().item():.3g}")
        e["grid_mean_abs_diff"] = float(f"{diff.mean().item():.3g}")
        e["pooled_max_abs_diff"] = float(f"{(pooled[:args.images] - eager['pooled']).abs().max().item():.3g}")
        del timed_grid, diff

        demo_top1 = top1(encode_all(backend, demo, args.batch_size)[1]).tolist()
        labels = {p.stem: categories[i] for p, i in zip(demo_paths, demo_top1)}
        t1 = top1(pooled[:args.top1_images])
        if name == BASELINE:
            eager.update(top1=t1, demo=labels)
        agreement = (t1 == eager["top1"]).float().mean().item() if len(t1) else None
        e["top1"] = {"demo": labels, "demo_same_as_eager": labels == eager["demo"],
                     "flickr8k_agreement": None if agreement is None else round(agreement, 4),
                     "flickr8k_images": len(t1),
                     "ok": labels == eager["demo"] and (agreement is None or agreement >= TARGET_TOP1)}
        if want_bleu:
            n_bleu = args.bleu_images
            hyps = captions(grids, pooled)[:n_bleu]
            bleu4 = bleu_scores(hyps, references)["bleu4"]
            if name == BASELINE:
                eager.update(bleu4=bleu4, captions=hyps)
            e["bleu"] = {"bleu4": round(bleu4, 5), "delta_vs_eager": round(bleu4 - eager["bleu4"], 5),
                         "captions_changed": sum(a != b for a, b in zip(hyps, eager["captions"])),
                         "images": len(hyps), "ok": abs(bleu4 - eager["bleu4"]) <= TARGET_BLEU_DELTA}
        elif args.bleu_images > 0:
            e["bleu"] = f"skipped: throughput ratio below {args.bleu_min_ratio}"
        else:
            e["bleu"] = "skipped (--bleu-images 0)"
        del grids, pooled
        e["adoptable"] = bool(name != BASELINE and e["throughput_ratio"] >= TARGET_RATIO and e["top1"]["ok"]
                              and isinstance(e["bleu"], dict) and e["bleu"]["ok"] and e["shapes"]["same_as_eager"])

    end_to_end = None
    if args.caption_images > 0 and "onnxruntime_fp32" in backends:
        print("bench: end to end ...", file=sys.stderr, flush=True)
        previous = os.environ.get("CAPTIONER_CACHE")
        os.environ["CAPTIONER_CACHE"] = str(workdir / "captioner-cache")  # the product's own export, here
        stack.callback(lambda: os.environ.pop("CAPTIONER_CACHE") if previous is None
                       else os.environ.__setitem__("CAPTIONER_CACHE", previous))
        fast_captioner = Captioner.load(model_path(args.model), device="cpu", encoder_backend="onnxruntime")
        end_to_end = caption_end_to_end(captioner, fast_captioner,
                                        [r.path for r in test_records[:args.caption_images]], args)

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.import_module(package).__version__
        except Exception:  # noqa: BLE001 - not installed or no version: say so
            versions[package] = None
    return {
        "benchmark": "encoder_backends",
        "machine": {**machine("cpu"), "malloc_tuned": malloc_tuned, "cpu_flags": cpu_flags()},
        "packages": versions,
        "sizes": {"images": n, "batch_size": args.batch_size, "latency_images_per_round": len(singles),
                  "repeats": args.repeats, "warmup": args.warmup, "calibration_images": len(calibration),
                  "top1_images": args.top1_images, "bleu_images": args.bleu_images,
                  "dataset": "flickr8k test (first N); calibration: flickr8k train (first N)",
                  "encoder": encoder.name, "model": str(model_path(args.model)),
                  "inductor_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"] if args.inductor_cache else "fresh (cold)"},
        "load_average": {"start_1_5_15": [round(x, 2) for x in start_load] if start_load else None,
                         "rounds": loads,
                         "end_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None},
        "targets": {"throughput_ratio_at_least": TARGET_RATIO, "top1_agreement_at_least": TARGET_TOP1,
                    "bleu4_delta_at_most": TARGET_BLEU_DELTA},
        "backends": entries,
        "adoptable": [name for name, e in entries.items() if e.get("adoptable")],
        "caption_end_to_end": end_to_end,
    }


def caption_end_to_end(captioner, fast_captioner, paths, args) -> dict[str, Any]:
    """`Captioner.caption` (files in, captions out: the decode thread pool, the encoder, the
    search at the model's default decoding) with the eager encoder and through the product's
    ONNX Runtime encoder (`encoder_backend="onnxruntime"`), round-robin; the paired per-round
    ratio's median, as for the encoder alone."""
    from _common import interleaved
    assert captioner.encoder_backend_in_use == "eager"
    assert fast_captioner.encoder_backend_in_use == "onnxruntime"
    out: dict[str, list] = {}

    def case(c, key):
        def go():
            out[key] = [r.caption for r in c.caption(paths, batch_size=args.batch_size)]
        return go

    before = load_avg()
    seconds = interleaved({"eager": case(captioner, "eager"), "fast": case(fast_captioner, "fast")},
                          args.repeats, args.warmup)
    n = len(paths)
    return {"images": n, "batch_size": args.batch_size, "decoding": captioner.decoding.to_dict(),
            "fast": "Captioner(encoder_backend='onnxruntime') (captioner.model.fast_encoder)",
            "eager_images_per_s": round(n / statistics.median(seconds["eager"]), 2),
            "fast_images_per_s": round(n / statistics.median(seconds["fast"]), 2),
            "ratio": round(statistics.median(e / f for e, f in zip(seconds["eager"], seconds["fast"])), 3),
            "ratio_of_medians": round(statistics.median(seconds["eager"]) / statistics.median(seconds["fast"]), 3),
            "captions_identical": sum(a == b for a, b in zip(out["eager"], out["fast"])),
            "load_average_1min": {"before": before, "after": load_avg()}}


def has_vnni() -> bool:
    """VNNI (AVX512-VNNI or AVX-VNNI) or AMX: int8 dot products without int16 saturation."""
    return any(f in cpu_flags() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def cpu_flags() -> list[str]:
    """The x86 vector extensions int8 and float32 kernels care about."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "fma")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [w for w in wanted if w in flags]


if __name__ == "__main__":
    main()
