#!/usr/bin/env bash
# The GPU figures, in one run of a few minutes on a CUDA machine (never needed by the tests):
#   1. one training epoch on cached features, float32 and bf16-mixed (bench_training.py);
#   2. batched beam search (beam 3) at batch 256 against one image at a time (bench_batched_beam.py);
#   3. captioning and the encoder alone at batch 256, images/s (bench_caption_throughput.py).
# Needs Flickr8k under $CAPTIONER_DATA and the feature cache cache/flickr8k-lite0 (built on
# first use for the images the scripts read). Writes $OUT (default benchmarks/results-gpu.json).
#
#   bash benchmarks/gpu.sh                # DEVICE=cuda
#   DEVICE=cpu SMALL=1 OUT=/tmp/dry.json bash benchmarks/gpu.sh   # the same steps, tiny, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
if [ -n "${SMALL:-}" ]; then TRAIN=64; IMAGES=64; BATCH=16; REPEATS=1; else TRAIN=6000; IMAGES=1000; BATCH=256; REPEATS=3; fi
ACCEL=gpu; PRECISION=bf16-mixed
# oneDNN has no bf16 recurrent kernels on most CPUs: the dry run times float32 twice.
if [ "$DEVICE" = cpu ]; then ACCEL=cpu; PRECISION=32-true; fi
CONFIG="configs/base.yaml,configs/flickr8k-att-gru512.yaml"   # the default model's decoder
OUT="${OUT:-benchmarks/results-gpu.json}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$PY" benchmarks/bench_training.py --accelerator "$ACCEL" --precision 32-true --modes features \
  --config "$CONFIG" --train-images "$TRAIN" --batch-size "$BATCH" > "$out/training_fp32.json"
"$PY" benchmarks/bench_training.py --accelerator "$ACCEL" --precision "$PRECISION" --modes features \
  --config "$CONFIG" --train-images "$TRAIN" --batch-size "$BATCH" > "$out/training_bf16.json"
"$PY" benchmarks/bench_batched_beam.py --device "$DEVICE" --batch-size "$BATCH" --images "$IMAGES" \
  --repeats "$REPEATS" > "$out/batched_beam.json" || true   # prints its JSON even when a check fails
"$PY" benchmarks/bench_caption_throughput.py --device "$DEVICE" --batch-size "$BATCH" --images "$IMAGES" \
  --beams 3 --float32-beams "" --repeats "$REPEATS" > "$out/caption_throughput.json" || true
"$PY" - "$out" "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out, target = Path(sys.argv[1]), Path(sys.argv[2])
results = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("*.json")) if f.stat().st_size}
target.write_text(json.dumps(results, indent=2) + "\n")
print(f"benchmarks: wrote {target} ({', '.join(results)})", file=sys.stderr)
PYEOF
