"""`captioner train`: LightningCLI over CaptioningModule + CaptionDataModule.

Configs compose: `captioner train --config configs/base.yaml --config configs/gru-attention.yaml`
applies each file's values over the previous ones (LightningCLI's repeated --config). The CLI
links the data's vocabulary size, feature width, mode and encoder into the model, and the
model's attention flag into the data (only attention models read the feature grid). At the
end of fit the best checkpoint (by dev BLEU-4) is exported as a model file (`ExportModelFile`).
Config files with a repeated key are refused (PyYAML would keep the last one silently).
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import set_loader
from pytorch_lightning.cli import LightningCLI

from captioner.data.datamodule import CaptionDataModule
from captioner.errors import CaptionerError
from captioner.export import load_module, read_checkpoint
from captioner.model.module import CaptioningModule
from captioner.modelfile import save_model


class ExportModelFile(pl.Callback):
    """On fit end, write the best checkpoint's weights as a model file (rank 0 only; never
    under `fast_dev_run`, whose few untrained steps would replace the run's real model).

    The best of the whole run, also when it was resumed with --ckpt_path: a resumed run's
    loggers open a new version directory, the checkpoints' directory moves with them, and
    Lightning then forgets the checkpoint callback's best score, so by itself it would offer
    the best of the resumed epochs only. The resumed checkpoint still records the earlier
    best; `on_load_checkpoint` keeps it for the comparison."""

    def __init__(self, output: str | None = None, name: str = "") -> None:
        """`output`: the model file; default `<trainer.default_root_dir>/model.safetensors`."""
        self.output = output
        self.name = name
        self._started = time.time()
        self._earlier_best: tuple[str, float] | None = None  # (path, score) before a resume

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.time()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        ckpt = trainer.checkpoint_callback
        state = checkpoint.get("callbacks", {}).get(ckpt.state_key) if ckpt is not None else None
        if state and state.get("best_model_path") and state.get("best_model_score") is not None:
            self._earlier_best = (state["best_model_path"], float(state["best_model_score"]))

    def best_checkpoint(self, trainer: pl.Trainer) -> tuple[str, float | None]:
        """(path, score) of the run's best checkpoint; ("", None) when there is none."""
        ckpt = trainer.checkpoint_callback
        path = getattr(ckpt, "best_model_path", "") if ckpt else ""
        score = float(ckpt.best_model_score) if path and ckpt.best_model_score is not None else None
        if self._earlier_best and Path(self._earlier_best[0]).is_file():
            earlier_path, earlier = self._earlier_best
            sign = -1.0 if getattr(ckpt, "mode", "max") == "min" else 1.0
            if score is None or sign * earlier > sign * score:
                return earlier_path, earlier
        return path, score

    def output_path(self, trainer: pl.Trainer) -> Path:
        return Path(self.output) if self.output else Path(trainer.default_root_dir) / "model.safetensors"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: CaptioningModule) -> None:
        if not trainer.is_global_zero:
            return
        output = self.output_path(trainer)
        if trainer.fast_dev_run:  # a smoke test of a real config must not replace its trained model
            print(f"captioner: fast_dev_run: {output} not written")
            return
        best, score = self.best_checkpoint(trainer)
        module = load_module(best) if best else pl_module
        scores = {"dev_bleu4_best": score} if score is not None else {}
        training = {"checkpoint": best, "epochs": trainer.current_epoch,
                    "wall_seconds": round(time.time() - self._started, 1),
                    "datamodule": _jsonable(trainer.datamodule.hparams) if trainer.datamodule else {},
                    "model": _jsonable(pl_module.hparams)}
        model = module.to_model_file(training, scores)
        model.name = self.name
        save_model(output, model)
        print(f"captioner: exported {best or 'final weights'} -> {output}")


def _jsonable(hparams: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(hparams), default=lambda o: getattr(o, "__dict__", str(o))))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"repeated key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _load_unique(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


set_loader("yaml_unique_keys", _load_unique, exceptions=(yaml.YAMLError,))


class CaptionerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.feature_dim", "model.feature_dim", apply_on="instantiate")
        parser.link_arguments("data.mode", "model.mode")
        parser.link_arguments("data.encoder", "model.encoder")
        parser.link_arguments("model.decoder.attention", "data.load_grid")


def _ckpt_paths(args: Sequence[str]) -> list[str]:
    """The values of --ckpt_path in a LightningCLI argument list ("last"/"best" are Lightning's)."""
    found = []
    for i, arg in enumerate(args):
        if arg == "--ckpt_path" and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--ckpt_path="):
            found.append(arg.split("=", 1)[1])
    return [f for f in found if f not in ("last", "best", "null", "None", "")]


def run_training(argv: Sequence[str]) -> int:
    """Entry point of `captioner train ...`; argv is everything after `train`. Problems with
    the user's data or files raise CaptionerError (the CLI prints one line)."""
    args = list(argv)
    if not args or args[0].startswith("-"):
        args = ["fit", *args]  # `captioner train --config x.yaml` means fit
    for checkpoint in _ckpt_paths(args):
        read_checkpoint(checkpoint)  # a malicious or broken --ckpt_path: one line, nothing run
    torch.set_float32_matmul_precision("high")
    # sys.argv stays as it is (DDP re-launches it in each process); `args` is what we parse.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        CaptionerCLI(CaptioningModule, CaptionDataModule, args=args, save_config_kwargs={"overwrite": True},
                     seed_everything_default=0,
                     parser_kwargs={"prog": "captioner train", "parser_mode": "yaml_unique_keys"})
    except CaptionerError:
        raise
    except ValueError as exc:  # a model or data setting out of range (dataclass checks)
        raise CaptionerError(f"training settings: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    return 0
