"""Cold start of `captioner caption one.jpg` (a fresh process: imports, model load, one
image through encoder and beam search) against `python -c "import torch, torchvision"`,
the floor any PyTorch tool pays. Runs alternate between the two commands; medians reported.

The caption command is the console script's own two lines (`from captioner.cli import
main; sys.exit(main())`) plus an exit hook that reports whether any Lightning module was
imported, so every timed run also checks DESIGN.md's "`captioner caption` never imports
Lightning". One more run under `python -X importtime` (not timed) lists the slowest imports.

    python benchmarks/bench_cold_start.py [--model FILE] [--image demo/images/chelsea.jpg] [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEMO_IMAGES, captioner_env, emit, machine, model_path, summary  # noqa: E402

TARGET_RATIO = 1.5
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file; default: the shipped model")
    p.add_argument("--image", default=str(DEMO_IMAGES / "chelsea.jpg"))
    p.add_argument("--runs", type=int, default=5, help="runs of each command (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (file cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-import-profile", action="store_true", help="skip the -X importtime run")
    return p.parse_args(argv)


# `captioner` console script + a report of Lightning modules on stderr at exit.
CONSOLE_SCRIPT = (
    "import atexit, sys\n"
    "def _report():\n"
    "    found = sorted(m for m in sys.modules if m.split('.')[0] in {names!r})\n"
    "    sys.stderr.write('BENCH-LIGHTNING-MODULES ' + ','.join(found) + '\\n')\n"
    "atexit.register(_report)\n"
    "sys.argv[0] = 'captioner'\n"
    "from captioner.cli import main\n"
    "sys.exit(main())\n"
)


def lightning_modules(stderr: str) -> list[str]:
    for line in stderr.splitlines():
        if line.startswith("BENCH-LIGHTNING-MODULES "):
            return [m for m in line.split(" ", 1)[1].split(",") if m]
    raise SystemExit("bench: the caption run did not report its modules")


def run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return seconds, proc


def import_report(stderr: str) -> tuple[list[str], list[dict]]:
    """From `-X importtime` output: every module imported, and the slowest top-level ones."""
    modules, top = [], []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:"):].split("|")
        try:
            cumulative = int(parts[1])
        except ValueError:  # the header line
            continue
        name = parts[2].rstrip()
        modules.append(name.strip())
        if not name.startswith("  ") and name.strip():  # depth 0: imported by the program itself
            top.append({"module": name.strip(), "cumulative_ms": round(cumulative / 1000, 1)})
    top.sort(key=lambda m: -m["cumulative_ms"])
    return modules, top[:8]


def main(argv=None) -> dict:
    args = parse(argv)
    model = model_path(args.model)
    env = captioner_env()
    py = sys.executable
    caption_args = ["caption", args.image, "--model", str(model), "--device", args.device]
    caption_cmd = [py, "-c", CONSOLE_SCRIPT.format(names=set(LIGHTNING)), *caption_args]
    baseline_cmd = [py, "-c", "import torch, torchvision"]
    for _ in range(args.warmup):
        run(baseline_cmd, env)
        run(caption_cmd, env)
    times: dict[str, list[float]] = {"import_torch_torchvision": [], "captioner_caption": []}
    output, lightning = "", set()
    for _ in range(args.runs):
        times["import_torch_torchvision"].append(run(baseline_cmd, env)[0])
        seconds, proc = run(caption_cmd, env)
        times["captioner_caption"].append(seconds)
        output = proc.stdout.strip()
        lightning.update(lightning_modules(proc.stderr))

    modules, slowest = [], []
    if not args.no_import_profile:  # once more under -X importtime (untimed: tracing slows it)
        _, traced = run([py, "-X", "importtime", "-m", "captioner", *caption_args], env)
        modules, slowest = import_report(traced.stderr)
        lightning.update(m for m in modules if m.split(".")[0] in LIGHTNING)
    lightning = sorted(lightning)

    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = round(medians["captioner_caption"] / medians["import_torch_torchvision"], 3)
    return emit({
        "benchmark": "cold_start",
        "machine": machine(args.device),
        "model": str(model),
        "sizes": {"runs": args.runs, "warmup": args.warmup, "image": args.image},
        "commands": {"captioner_caption": "captioner " + " ".join(caption_args), "import_torch_torchvision": " ".join(baseline_cmd[1:])},
        "seconds": {name: summary(t) for name, t in times.items()},
        "ratio": ratio,
        "caption_output": output,
        "lightning_imported": bool(lightning),
        "lightning_modules": lightning[:10],
        "modules_imported": len(modules) or None,
        "slowest_top_level_imports": slowest,
        "target": {"ratio_at_most": TARGET_RATIO, "met": ratio <= TARGET_RATIO and not lightning},
    })


if __name__ == "__main__":
    main()
