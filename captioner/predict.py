"""Captioning on many devices and machines through Lightning: `Trainer.predict` with DDP.

Why Lightning: it already knows how to start one process per GPU (or CPU process, over gloo),
across nodes (`--num-nodes`, with MASTER_ADDR / NODE_RANK or a Slurm / torchrun environment),
and how to place each on its device. Only this module imports it, so `captioner caption`
without `--devices` never pays for the import.

How the work is split and kept: every rank walks the same inputs and takes the images whose
stable path hash lands on its rank (`bulk.Selector`), so no list of paths is ever sent
between processes. Each rank appends its records, a batch at a time with fsync, to its own
part file `OUTPUT.rank<R>.part` (a `BasePredictionWriter`); after a barrier rank 0 folds
the parts into OUTPUT. A killed run leaves part files behind: the next run's rank 0 folds
them (and drops stale records) into OUTPUT before any rank reads what is done, so a rerun
with any number of devices resumes. OUTPUT must be on a file system all nodes share.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from captioner.api import Captioner
from captioner.bulk import (
    BulkSummary,
    ErrorsFile,
    Events,
    Item,
    Selector,
    Shard,
    pending,
    record_of,
)
from captioner.bulk_output import (
    OutputFormat,
    RecordFile,
    merge_into,
    open_records,
    part_files,
    rank_file,
    read_done,
)
from captioner.decoding import DecodingConfig
from captioner.discovery import iter_images
from captioner.errors import DeviceError, ImageLoadError
from captioner.outputs import atomic_write

__all__ = ["DistributedJob", "run_distributed"]

for _name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)  # "GPU available: ..." is noise here


@dataclass
class DistributedJob:
    """Everything a rank needs; built in the launching process and rebuilt by each relaunch."""

    captioner: Captioner
    config: DecodingConfig
    paths: Sequence[str]
    output: Path
    format: OutputFormat
    batch_size: int
    workers: int | None = None
    shard: Shard | None = None
    errors: Path | None = None
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    summary: BulkSummary = field(default_factory=BulkSummary)


class _Batches(IterableDataset):
    """The rank's images as ready batches: discovery streamed, decoded one batch ahead on a
    thread pool (as `Captioner.iter_captions` does), so the device never waits on JPEGs."""

    def __init__(self, items: Iterator[Item], captioner: Captioner, batch_size: int, workers: int | None) -> None:
        self.items, self.captioner, self.batch_size, self.workers = items, captioner, batch_size, workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        chunks = iter(lambda: list(islice(self.items, self.batch_size)), [])
        with ThreadPoolExecutor(max_workers=self.workers or min(4, os.cpu_count() or 1)) as pool:
            chunk = next(chunks, None)
            pending_loads = [pool.submit(self._load, item.path) for item in chunk or []]
            while chunk:
                upcoming = next(chunks, None)
                ahead = [pool.submit(self._load, item.path) for item in upcoming or []]
                loaded = [f.result() for f in pending_loads]
                good = [i for i, (tensor, _) in enumerate(loaded) if tensor is not None]
                yield {"paths": [item.path for item in chunk], "sizes": [item.size for item in chunk],
                       "mtimes": [item.mtime_ns for item in chunk], "good": good,
                       "pixels": torch.stack([loaded[i][0] for i in good]) if good else torch.empty(0),
                       "errors": [(i, reason) for i, (_, reason) in enumerate(loaded) if reason is not None]}
                chunk, pending_loads = upcoming, ahead

    def _load(self, path: str) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.captioner.preprocess(path), None
        except ImageLoadError as exc:
            return None, exc.reason


class _Module(pl.LightningModule):
    """Holds the job; the Captioner is rebuilt on this rank's device (no DDP wrapping: predict)."""

    def __init__(self, job: DistributedJob, events: Events) -> None:
        super().__init__()
        self.job, self.events = job, events
        self.records: RecordFile | None = None  # rank 0 holds the output (and its lock)
        self.part: RecordFile | None = None     # this rank's part file
        self._on_device: Captioner | None = None
        self.generator: torch.Generator | None = None

    def captioner(self) -> Captioner:
        if self._on_device is None:
            device = self.trainer.strategy.root_device
            base = self.job.captioner
            self._on_device = base if base.device == device else Captioner(
                base.model, device, base.source, encoder_backend=base.encoder_backend)
            if self.job.config.seed is not None:
                self.generator = torch.Generator(device=device).manual_seed(self.job.config.seed + self.global_rank)
        return self._on_device

    def predict_dataloader(self) -> DataLoader:
        job, strategy = self.job, self.trainer.strategy
        rank, world = self.global_rank, self.trainer.world_size
        if rank == 0:  # fold a killed run's parts and drop stale records before anyone reads
            self.records = open_records(job.output, job.format, parts=part_files(job.output))
            if job.errors is not None:
                for leftover in part_files(job.errors):
                    leftover.unlink(missing_ok=True)
        strategy.barrier("captioner-output-ready")
        shard = [(job.shard.index, job.shard.count)] if job.shard else []
        select = Selector([*shard, (rank, world)])
        done = read_done(job.output, job.format, select) if rank != 0 else {
            k: v for k, v in self.records.done.items() if select(k)}
        if rank == 0:
            self.records.done.clear()  # rank 0's share was copied; the rest is the other ranks'
        part = rank_file(job.output, rank)  # created only now: rank 0 has folded the old ones
        part.unlink(missing_ok=True)
        self.part = open_records(part, job.format, check_stale=False)
        if job.errors is not None:
            self.events = ErrorsFile(rank_file(job.errors, rank), self.events)
        self.events.started(rank, world, select if select else None)
        items = pending(iter_images(job.paths), done, select if select else None, self.events, job.summary)
        return DataLoader(_Batches(items, self.captioner(), job.batch_size, job.workers), batch_size=None)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[int, Any]:
        captioner = self.captioner()
        good = batch["good"]
        if not good:
            return {}
        features = captioner.encode(batch["pixels"])
        answers = captioner.decode_features(features, self.job.config, names=[batch["paths"][i] for i in good],
                                            generator=self.generator)
        return dict(zip(good, answers))


class _PartWriter(BasePredictionWriter):
    """Appends each batch's records to this rank's part file (durable per batch); at the end
    sums the counts over ranks and lets rank 0 fold the parts into the output."""

    def __init__(self, job: DistributedJob) -> None:
        super().__init__(write_interval="batch")
        self.job = job

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        paths, sizes, mtimes = batch["paths"], batch["sizes"], batch["mtimes"]
        records = [record_of(result, Item(paths[i], sizes[i], mtimes[i]), self.job.config.n_best)
                   for i, result in sorted(prediction.items())]
        pl_module.part.append(records)
        events = pl_module.events
        for i, reason in batch["errors"]:
            events.problem(paths[i], reason)
        summary = self.job.summary
        summary.captioned += len(records)
        summary.failed += len(batch["errors"])
        events.written(len(records), len(batch["errors"]))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.part.close()
        if isinstance(pl_module.events, ErrorsFile):
            pl_module.events.close()
        summary = self.job.summary
        counts = torch.tensor([summary.captioned, summary.failed, summary.skipped], device=pl_module.device)
        totals = trainer.strategy.reduce(counts, reduce_op="sum")
        trainer.strategy.barrier("captioner-parts-written")
        summary.captioned, summary.failed, summary.skipped = (int(v) for v in totals.tolist())
        if trainer.global_rank == 0:
            output = self.job.output
            records = merge_into(pl_module.records, [rank_file(output, r) for r in range(trainer.world_size)])
            records.close()
            if self.job.errors is not None:
                _concatenate(self.job.errors, [rank_file(self.job.errors, r) for r in range(trainer.world_size)])


def _concatenate(path: Path, parts: list[Path]) -> None:
    """The errors file: every rank's errors, in rank order, replacing the last run's."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            for part in parts:
                if part.exists():
                    out.write(part.read_bytes())
    atomic_write(path, write)
    for part in parts:
        part.unlink(missing_ok=True)


def run_distributed(job: DistributedJob, events: Events) -> tuple[int, int]:
    """Run `job` on `devices` x `num_nodes` processes; returns (global rank, local rank) of this
    process, whose `job.summary` then holds the totals over all ranks. Lightning relaunches
    the command line (`sys.argv`) for the other local ranks."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.strategies import DDPStrategy

    quiet = ("does not have many workers", "predict_dataloader", "LeafSpec", "batch indices", "num_workers",
             "GPU available but not used")  # Lightning's advice for training loops, not this one
    warnings.filterwarnings("ignore", message=".*(" + "|".join(quiet) + ")")
    world = job.devices * job.num_nodes
    module = _Module(job, events)
    writer = _PartWriter(job)
    try:
        trainer = pl.Trainer(accelerator=job.accelerator, devices=job.devices, num_nodes=job.num_nodes,
                             strategy=DDPStrategy() if world > 1 else "auto", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             use_distributed_sampler=False, callbacks=[writer])
    except MisconfigurationException as exc:
        raise DeviceError(f"--accelerator {job.accelerator} --devices {job.devices}: {exc}") from None
    try:
        trainer.predict(module, return_predictions=False)
    finally:
        for held in (module.records, module.part):
            if held is not None:
                held.close()
        if isinstance(module.events, ErrorsFile):
            module.events.close()
    return trainer.global_rank, trainer.local_rank

