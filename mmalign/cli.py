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
            {"class_path": "mmalign.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "mmalign"}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "mmalign"}},
        ],
        "plugins": [{"class_path": "mmalign.checkpointing.AtomicCheckpointIO"}],
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
        from mmalign.checkpointing import RunCheckpoint

        # Checkpoints are a top-level config group so users tune them without replacing callbacks.
        # Default retention: the 3 newest step checkpoints ("monitor: step", the highest steps) plus
        # last.ckpt; save_top_k: -1 keeps every one.
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": 500, "checkpoint.save_last": True,
                             "checkpoint.save_top_k": 3, "checkpoint.monitor": "step", "checkpoint.mode": "max",
                             "checkpoint.filename": "step{step:07d}", "checkpoint.auto_insert_metric_name": False})
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

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` before anything is built (replaces Lightning's version, which
        silently overwrote the config's model options with the checkpoint's).

        ``last`` means the newest checkpoint of the newest run under the logger root (or under
        ``checkpoint.dirpath``). The model options of the config and command line win over the
        checkpoint's hyper-parameters; the ones that differ are printed, and ``ResumeOverrides``
        applies a changed ``lr``/``weight_decay`` to the restored optimizer. A ``fit`` resumed from a
        run's own checkpoint continues in that run's ``version_N`` folder."""
        from .resume import resolve_resume

        self._resume = resolve_resume(self.config)

    def before_instantiate_classes(self) -> None:
        from .resume import prepare_run_dirs

        prepare_run_dirs(self.config, getattr(self, "_resume", None))

    def instantiate_trainer(self, **kwargs: Any):
        from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

        from mmalign.callbacks import DataHealthMonitor, NaNGuard, PredictionWriter, ResumeOverrides

        config = self._get(self.config_init, "trainer", default={})
        extra = [NaNGuard(), DataHealthMonitor(), ResumeOverrides(), PredictionWriter()]
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


class ConciseArgumentParser(LightningArgumentParser):
    """Prints a config error once, last, as one readable message (no usage wall, no dump of the
    whole parsed value), with close matches for a mistyped option."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        from .resume import condense_parser_error

        sys.stderr.write(f"usage: python -m mmalign SUBCOMMAND -c CONFIG [--key=value ...]  (SUBCOMMAND --help lists "
                         f"every option)\nerror: {condense_parser_error(message)}\n")
        self.exit(2)


def _parser_kwargs() -> dict[str, Any]:
    mode = {"parser_mode": "omegaconf"}
    return {**mode, **{name: dict(mode) for name in MMAlignCLI.subcommands()}}


def main(args: list[str] | None = None, run: bool = True) -> MMAlignCLI:
    """Entry point of ``python -m mmalign`` and the ``mmalign`` console script."""
    from .resume import remove_failed_run_dirs

    _load_plugins()
    try:
        return _build(args, run)
    except BaseException:
        remove_failed_run_dirs()
        raise


def _build(args: list[str] | None, run: bool) -> MMAlignCLI:
    import lightning.pytorch as pl

    from datamodules import StreamingDataModule

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
        parser_class=ConciseArgumentParser,
        args=args,
        run=run,
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
