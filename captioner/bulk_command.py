"""`captioner caption PATH... --output FILE`: the bulk, resumable form of the caption command.

The CLI layer (it prints): checks the options and the output before any work, opens the
output (`bulk_output`), runs the pipeline (`bulk`, or `predict` with `--devices`), draws a
progress bar on stderr (tqdm) and prints each problem as `captioner: error: PATH: reason`.
The exit status is 1 when any image could not be captioned, else 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from captioner.bulk import (
    BulkSummary,
    ErrorsFile,
    Events,
    Selector,
    Shard,
    count_images,
    run_bulk,
)
from captioner.bulk_output import (
    ScanReport,
    format_for,
    merge_into,
    open_records,
    part_files,
)
from captioner.errors import UsageError, shown_path
from captioner.formats import escape_name
from captioner.outputs import check_output

PROG = "captioner"
REFRESH_S = 0.5


def _say(kind: str, message: str, bar: Any = None) -> None:
    """One `captioner: KIND: ...` line on stderr, above the progress bar when one is drawn."""
    line = f"{PROG}: {kind + ': ' if kind else ''}{message}"
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Progress(Events):
    """Problems as error lines; with `show`, a tqdm bar whose rate and ETA count captioned
    images only (skipped ones move the count, not the rate) and whose total comes from a
    background counting walk once it finishes."""

    def __init__(self, show: bool, paths: Sequence[str], label: str = "") -> None:
        self.show, self.paths, self.label = show, paths, label
        self.bar: Any = None
        self.counted: int | None = None
        self.stop = threading.Event()
        self.last_refresh = 0.0

    def started(self, rank: int, world_size: int, select: Callable[[str], bool] | None) -> None:
        if not self.show or rank != 0:
            return
        from tqdm import tqdm
        desc = self.label + (f" (rank 0 of {world_size})" if world_size > 1 else "")
        self.bar = tqdm(total=None, unit="img", desc=desc or None, file=sys.stderr, dynamic_ncols=True,
                        smoothing=0.05, mininterval=REFRESH_S)
        threading.Thread(target=self._count, args=(select,), daemon=True, name="captioner-count").start()

    def _count(self, select: Callable[[str], bool] | None) -> None:
        self.counted = count_images(self.paths, self.stop, select)

    def problem(self, path: str, reason: str) -> None:
        _say("error", f"{escape_name(path)}: {reason}", self.bar)

    def skipped(self, count: int) -> None:
        if self.bar is not None:
            self.bar.n += count
            self.bar.last_print_n += count  # not work done now: kept out of the rate
            now = time.monotonic()
            if not self._set_total() and now - self.last_refresh >= REFRESH_S:
                self.bar.refresh()
                self.last_refresh = now

    def written(self, captioned: int, failed: int) -> None:
        if self.bar is not None:
            self.bar.update(captioned + failed)  # tqdm redraws at most every REFRESH_S
            self._set_total()

    def _set_total(self) -> bool:
        """Give the bar its total once the count is known (never below what is done)."""
        if self.counted is None or self.bar.total == max(self.counted, self.bar.n):
            return False
        self.bar.total = max(self.counted, self.bar.n)
        self.bar.refresh()
        return True

    def close(self, finished: bool = False) -> None:
        self.stop.set()
        if self.bar is not None:
            if finished:
                self.bar.total = self.bar.n  # the count is an estimate; the end is exact
                self.bar.refresh()
            self.bar.close()
            self.bar = None


def check_options(args: argparse.Namespace) -> None:
    """Options that need --output, and the ones it cannot take (usage errors, exit 2)."""
    if args.output is None:
        given = [name for name, value in (("--devices", args.devices), ("--shard", args.shard),
                                          ("--errors", args.errors), ("--num-nodes", args.num_nodes),
                                          ("--accelerator", args.accelerator))
                 if value is not None]
        given += ["--progress"] if args.progress else []
        raise UsageError(f"{', '.join(given) or 'this option'} needs --output FILE (.jsonl or .csv)")
    if args.attention_maps is not None:
        raise UsageError("--attention-maps cannot be combined with --output")
    if args.devices is None and (args.num_nodes is not None or args.accelerator is not None):
        raise UsageError("--num-nodes and --accelerator go with --devices N")


def caption_to_file(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """The handler: every image under args.paths into args.output, resumably."""
    check_options(args)
    fmt = format_for(args.output)
    shard = Shard(*args.shard) if args.shard is not None else None
    output = check_output(args.output, "output", inputs=args.paths)
    errors = None
    if args.errors is not None:
        errors = check_output(args.errors, "errors file", inputs=[*args.paths, args.output])
        if errors.resolve() == output.resolve():
            raise UsageError(f"{shown_path(errors)}: the errors file must not be the output")
    captioner, config = _load(args, overrides)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    events = Progress(show, args.paths, label=output.name)
    if args.devices is not None:
        return _distributed(args, captioner, config, output, fmt, shard, errors, events)
    records = open_records(output, fmt, parts=part_files(output))
    _report_repairs(output, records.report)
    sink: Events = ErrorsFile(errors, events) if errors is not None else events
    try:
        events.started(0, 1, Selector([(shard.index, shard.count)]) if shard else None)
        summary = run_bulk(captioner, config, args.paths, records, batch_size=args.batch_size,
                           workers=args.workers, select=Selector([(shard.index, shard.count)]) if shard else None,
                           events=sink)
        if summary.superseded:  # files changed mid-run: their older records go now
            records = merge_into(records, [])
        events.close(finished=True)
    finally:
        events.close()
        records.close()
        if isinstance(sink, ErrorsFile):
            sink.close()
    _report_summary(output, summary)
    return 1 if summary.failed else 0


def _load(args: argparse.Namespace, overrides: dict[str, Any]):
    """The model and the decoding, checked before any work (as the plain command does)."""
    from captioner.api import Captioner
    device = "cpu" if args.devices is not None else args.device  # Lightning places each rank
    captioner = Captioner.load(args.model, device=device, encoder_backend=args.encoder_backend)
    config = captioner.settings(**overrides)
    captioner.decoder_for(config.precision)
    captioner.encoder_runner()  # an encoder backend that cannot run fails before any work
    return captioner, config


def _distributed(args: argparse.Namespace, captioner: Any, config: Any, output: Path, fmt: Any,
                 shard: Shard | None, errors: Path | None, events: Progress) -> int:
    """--devices N [--num-nodes M]: Lightning relaunches this very command line for the other
    local ranks, so it must be the command line this process was started with."""
    if os.environ.get("LOCAL_RANK") is None and not any(
            a == "--devices" or a.startswith("--devices=") for a in sys.argv[1:]):
        raise UsageError("--devices runs the command line again for each device: use it from the "
                         "`captioner` command or `python -m captioner`, not from inside Python")
    from captioner.predict import DistributedJob, run_distributed
    accelerator = args.accelerator or {"cuda": "gpu", "cpu": "cpu"}.get(args.device, "auto")
    job = DistributedJob(captioner, config, args.paths, output, fmt, args.batch_size, args.workers, shard,
                         errors, accelerator, args.devices, args.num_nodes or 1)
    start = time.perf_counter()
    try:
        global_rank, local_rank = run_distributed(job, events)
        events.close(finished=True)
    finally:
        events.close()
    job.summary.seconds = time.perf_counter() - start
    if local_rank != 0:
        return 0  # Lightning stops every rank when a relaunched one exits non-zero
    if global_rank == 0:
        _report_summary(output, job.summary)
    return 1 if job.summary.failed else 0


def _report_repairs(output: Path, report: ScanReport) -> None:
    shown = shown_path(output)
    if report.cut_bytes:
        _say("warning", f"{shown}: cut off a partial last line ({report.cut_bytes} bytes) left by an "
                        "interrupted run")
    if report.stale:
        _say("warning", f"{shown}: {report.stale} images changed since they were captioned; their "
                        "records were removed and they are captioned again")
    if report.bad_lines:
        _say("warning", f"{shown}: removed {report.bad_lines} damaged lines")


def _report_summary(output: Path, summary: BulkSummary) -> None:
    _say("", f"{shown_path(output)}: {summary.captioned} captioned, {summary.skipped} already done, "
                 f"{summary.failed} failed ({summary.rate:.1f} images/s)")
