"""``python -m mmalign``: LightningCLI with subclass mode for model and data, plus custom subcommands.

Defaults every run gets: a seed, CSV + TensorBoard loggers under ``runs/``, the rich progress bar,
step checkpoints plus ``last.ckpt`` written atomically, the NaN guard and data-health reports.
Configs are parsed in OmegaConf mode, so ``${...}`` interpolation works.

Adding a subcommand
-------------------
Write a function taking ``trainer``, ``model`` and ``datamodule`` plus typed keyword arguments (they
become the subcommand's options and config keys) and register it::

    from mmalign.cli import register_subcommand

    @register_subcommand("adapt")
    def adapt(trainer, model, datamodule, rounds: int = 1, out_dir: str = "runs/adapt"):
        '''Adapt a model at test time.'''  # first line = help text
        ...

The module must be imported before the parser is built: list it in ``BUILTIN_SUBCOMMANDS`` below,
or expose it from another package through the entry-point group ``mmalign.subcommands``. Keep its
top-level imports light (``--help`` must stay fast).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Modules that register LightningModules/DataModules (for short class_path names) and subcommands.
# They must import nothing heavy at top level (no open_clip, diffusers, timm).
BUILTIN_MODULES = ["mmalign.classify", "mmalign.contrastive", "mmalign.tta", "mmalign.repa", "mmalign.speech"]
BUILTIN_SUBCOMMANDS = ["mmalign.contrastive.zeroshot_command", "mmalign.tta.adapt_command"]
ENTRY_POINT_GROUP = "mmalign.subcommands"


@dataclass
class Subcommand:
    name: str
    fn: Callable[..., Any]
    help: str


_SUBCOMMANDS: dict[str, Subcommand] = {}
_PASSED = ("trainer", "model", "datamodule")


def register_subcommand(name: str, help: str | None = None):
    """Decorator registering ``fn(trainer, model, datamodule, **options)`` as ``mmalign <name>``."""

    def wrap(fn):
        if name in LightningCLI.subcommands():
            raise ValueError(f"subcommand '{name}' is one of Lightning's own; pick another name.")
        params = inspect.signature(fn).parameters
        missing = [p for p in _PASSED if p not in params]
        if missing:
            raise TypeError(f"subcommand function {fn.__name__} must accept {missing}.")
        doc = (fn.__doc__ or "").strip().splitlines()
        _SUBCOMMANDS[name] = Subcommand(name, fn, help or (doc[0] if doc else name))
        return fn

    return wrap


def _load_plugins() -> None:
    from importlib.util import find_spec

    for mod in BUILTIN_MODULES + BUILTIN_SUBCOMMANDS:
        try:
            present = find_spec(mod) is not None
        except ModuleNotFoundError:  # its parent package is absent (a method deleted from the tree)
            present = False
        if present:
            importlib.import_module(mod)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def _trainer_defaults() -> dict[str, Any]:
    return {
        "default_root_dir": "runs",
        "logger": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "mmalign"}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "mmalign"}},
        ],
        "plugins": [{"class_path": "mmalign.callbacks.AtomicCheckpointIO"}],
        "log_every_n_steps": 10,
    }


class MMAlignCLI(LightningCLI):
    """LightningCLI with mmalign's defaults and registered custom subcommands."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands.update({name: set(_PASSED) for name in _SUBCOMMANDS})
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        # Checkpoints are a top-level config group so users tune them without replacing callbacks.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": 500, "checkpoint.save_last": True,
                             "checkpoint.save_top_k": -1, "checkpoint.filename": "step{step:07d}",
                             "checkpoint.auto_insert_metric_name": False})
        # Models hand their transforms/tokenizer to the datamodule.
        parser.link_arguments("model.preprocess", "data.init_args.preprocess", apply_on="instantiate")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        parser_subcommands = parser.add_subcommands()
        trainer_class = self.trainer_class
        for subcommand in self.subcommands():
            custom = _SUBCOMMANDS.get(subcommand)
            if custom is None:
                description = (getattr(trainer_class, subcommand).__doc__ or "").strip().splitlines()[0]
            else:
                description = custom.help
            subparser_kwargs = dict(kwargs.get(subcommand, {}))
            subparser_kwargs.setdefault("description", description)
            sub = self._prepare_subcommand_parser(trainer_class, subcommand, **subparser_kwargs)
            self._subcommand_parsers[subcommand] = sub
            parser_subcommands.add_subcommand(subcommand, sub, help=description)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        custom = _SUBCOMMANDS.get(subcommand)
        if custom is None:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser = self.init_parser(**kwargs)
        self._add_arguments(parser)
        added = parser.add_function_arguments(custom.fn, skip=set(_PASSED))
        self._subcommand_method_arguments[subcommand] = added
        return parser

    def before_instantiate_classes(self) -> None:
        _share_logger_version(self._get(self.config, "trainer"))

    def instantiate_trainer(self, **kwargs: Any):
        from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

        from mmalign.callbacks import DataHealthMonitor, NaNGuard

        config = self._get(self.config_init, "trainer", default={})
        extra = [NaNGuard(), DataHealthMonitor()]
        given = config.get("callbacks") or []
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(RichProgressBar(leave=True))
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        custom = _SUBCOMMANDS.get(subcommand)
        if custom is None:
            return super()._run_subcommand(subcommand)
        options = {k: v for k, v in self.config_init[subcommand].items()
                   if k in self._subcommand_method_arguments[subcommand]}
        custom.fn(trainer=self.trainer, model=self.model, datamodule=self.datamodule, **options)


def _share_logger_version(trainer_cfg: Any) -> None:
    """Give CSV and TensorBoard loggers with the same save_dir/name one shared ``version_N`` folder,
    so metrics.csv, event files and checkpoints of a run sit together (each would pick its own
    next free number otherwise)."""
    import os
    import re

    loggers = trainer_cfg.get("logger") if trainer_cfg is not None else None
    if not isinstance(loggers, list):
        return
    groups: dict[tuple, list] = {}
    for lg in loggers:
        init = getattr(lg, "init_args", None)
        if init is None or init.get("version") is not None or "save_dir" not in init:
            continue
        groups.setdefault((str(init.save_dir), str(init.get("name") or "")), []).append(init)
    for (save_dir, name), inits in groups.items():
        if len(inits) < 2:
            continue
        root = os.path.join(save_dir, name)
        taken = [int(m.group(1)) for d in (os.listdir(root) if os.path.isdir(root) else [])
                 if (m := re.fullmatch(r"version_(\d+)", d))]
        for init in inits:
            init.version = max(taken, default=-1) + 1


def _parser_kwargs() -> dict[str, Any]:
    mode = {"parser_mode": "omegaconf"}
    return {**mode, **{name: dict(mode) for name in MMAlignCLI.subcommands()}}


def main(args: list[str] | None = None, run: bool = True) -> MMAlignCLI:
    """Entry point of ``python -m mmalign`` and the ``mmalign`` console script."""
    import lightning.pytorch as pl

    from datamodules import StreamingDataModule

    _load_plugins()
    return MMAlignCLI(
        pl.LightningModule,
        StreamingDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults=_trainer_defaults(),
        parser_kwargs=_parser_kwargs(),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
