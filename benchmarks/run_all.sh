#!/usr/bin/env bash
# Every benchmark at the README sizes (each script's defaults), one after another, then
# benchmarks/results.json: {"<name>": <that script's JSON>, ...}.
#
#   bash benchmarks/run_all.sh                      # the shipped model
#   MODEL=runs/x/model.safetensors bash benchmarks/run_all.sh
#   ONLY="batched_beam cold_start" bash benchmarks/run_all.sh   # a subset (merged into results.json)
#
# Run on a quiet machine: the ratios cancel a uniformly slower machine, not other
# processes competing for the cores mid-run (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
ALL="caption_throughput batched_beam single_image training cold_start image_decoding memory"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
failed=""
for name in ${ONLY:-$ALL}; do
  args=()
  if [ -n "${MODEL:-}" ] && [ "$name" != training ]; then args=(--model "$MODEL"); fi
  echo "benchmarks: $name ..." >&2
  start=$(date +%s)
  if "$PY" "benchmarks/bench_$name.py" "${args[@]}" > "$out/$name.json.tmp"; then
    mv "$out/$name.json.tmp" "$out/$name.json"
  else
    failed="$failed $name"  # keep going; a failed check (e.g. captions differ) still printed its JSON
    if "$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$out/$name.json.tmp" 2>/dev/null; then
      mv "$out/$name.json.tmp" "$out/$name.json"
    fi
  fi
  echo "benchmarks: $name done in $(( $(date +%s) - start )) s" >&2
done
"$PY" - "$out" benchmarks/results.json <<'PYEOF'
import json, sys
from pathlib import Path
out, target = Path(sys.argv[1]), Path(sys.argv[2])
results = json.loads(target.read_text()) if target.is_file() else {}
for f in sorted(out.glob("*.json")):
    results[f.stem] = json.loads(f.read_text())
target.write_text(json.dumps(results, indent=2) + "\n")
print(f"benchmarks: wrote {target} ({', '.join(results)})", file=sys.stderr)
PYEOF
if [ -n "$failed" ]; then
  echo "benchmarks: FAILED:$failed" >&2
  exit 1
fi
