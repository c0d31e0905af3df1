"""Typed option groups shared by every module: validation helpers, mapping -> spec coercion, the one
``OptimSpec``, and the table that sends an old flat option to its new grouped place.

A LightningModule or datamodule takes a handful of frozen dataclasses ("specs"), each validated in its
``__post_init__`` with an error that names the field, the bad value and what is allowed. In YAML every
spec is a nested mapping under ``init_args`` (jsonargparse builds the dataclass), e.g.
``--model.init_args.optim.lr=1e-3``. Specs are frozen so one default instance can be shared by every
signature that names it.

Plain torch / stdlib only: importable without Lightning (the core layer test checks it).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Literal

SCHEDULES = ("cosine", "constant")


def need(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``: the one-line check every spec uses."""
    if not ok:
        raise ValueError(message)


def positive(name: str, value: float | int | None, allow_none: bool = False, zero: bool = False) -> None:
    """``value > 0`` (``>= 0`` with ``zero``), or None when allowed; the error names the option."""
    if value is None:
        need(allow_none, f"{name} must be set, got null.")
        return
    ok = value >= 0 if zero else value > 0
    need(ok and not (isinstance(value, float) and math.isnan(value)),
         f"{name} must be {'>= 0' if zero else '> 0'}{' (or null)' if allow_none else ''}, got {value}.")


def unit_interval(name: str, value: float, closed_top: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed_top else 0.0 <= value < 1.0
    need(ok, f"{name} must be in [0, 1{']' if closed_top else ')'}, got {value}.")


def one_of(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = tuple(allowed)
    need(value in allowed, f"{name} must be one of {list(allowed)}, got {value!r}.")


def _spec_type(hint: Any) -> type | None:
    """The dataclass inside ``Spec`` / ``Spec | None`` / ``Optional[Spec]``, else None."""
    if is_dataclass(hint) and isinstance(hint, type):
        return hint
    for arg in typing.get_args(hint):
        if is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def coerce(value: Any, cls: type, where: str, base: Any = None) -> Any:
    """A ``cls`` spec from a spec, a mapping (a checkpoint's saved hyper-parameters, Python callers, a
    jsonargparse Namespace) or None (the default). Nested spec fields are coerced too; unknown keys are
    named with the allowed ones. ``base``: the default instance of the signature (a module's own
    ``OptimSpec``); the fields a mapping leaves out come from it, as they do in a YAML config."""
    if value is None or isinstance(value, cls):
        return (cls() if base is None else base) if value is None else value
    if is_dataclass(value):
        value = asdict(value)
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}.")
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; allowed: {sorted(allowed)}.")
    hints = typing.get_type_hints(cls)
    if base is not None:
        value = {**{f.name: getattr(base, f.name) for f in fields(cls)}, **value}
    out = dict(value)
    for key, item in value.items():
        sub = _spec_type(hints.get(key))
        if sub is not None and item is not None and not isinstance(item, sub):
            out[key] = coerce(item, sub, f"{where}.{key}")
        elif isinstance(item, list) and typing.get_origin(hints.get(key)) is tuple:
            out[key] = tuple(item)
    return cls(**out)


def as_hparams(spec: Any) -> Any:
    """A spec as plain containers (what checkpoints store: they load with ``weights_only=True``)."""
    return asdict(spec) if is_dataclass(spec) else spec


def store_specs(module: Any, specs: dict[str, Any]) -> None:
    """Replace the spec objects ``save_hyperparameters`` recorded by plain mappings, so checkpoints load
    with ``weights_only=True`` and ``load_from_checkpoint`` passes them back to the constructor."""
    for store in (module._hparams, module._hparams_initial):
        for key, spec in specs.items():
            store[key] = as_hparams(spec)


def migrate_flat(cls: type | dict[str, str], hparams: dict[str, Any]) -> dict[str, Any]:
    """Move the flat options an older checkpoint recorded (``lr``) into their groups (``optim.lr``), by
    ``cls.moved_options`` (or ``cls``, the table itself); keys already grouped are kept. Used wherever
    saved hyper-parameters are read back into a constructor."""
    moved: dict[str, str] = (cls if isinstance(cls, dict) else getattr(cls, "moved_options", {})) or {}
    if not moved or not any(k in moved for k in hparams):
        return dict(hparams)
    out: dict[str, Any] = {k: v for k, v in hparams.items() if k not in moved}
    for old, value in hparams.items():
        if old not in moved:
            continue
        *path, leaf = moved[old].split(".")
        node = out
        for part in path:
            child = node.get(part)
            child = as_hparams(child) if child is not None else {}
            node[part] = dict(child)
            node = node[part]
        node.setdefault(leaf, value)
    return out


def moved_option_hint(cls: type, name: str) -> str | None:
    """``"'lr' moved to 'optim.lr'"`` for an option an older config used, else None."""
    import difflib

    moved: dict[str, str] = {}
    for klass in reversed(getattr(cls, "__mro__", ())):
        moved.update(klass.__dict__.get("moved_options") or {})
    group = getattr(cls, "config_group", "model")  # datamodules are configured under ``data``
    if name in moved:
        return f"option '{name}' moved to '{moved[name]}' (--{group}.init_args.{moved[name]}=... or the nested " \
               "mapping in YAML)"
    close = difflib.get_close_matches(name, list(moved), n=1)  # a typo of an old flat option
    if close:
        return f"option '{name}' looks like '{close[0]}', which moved to '{moved[close[0]]}' " \
               f"(--{group}.init_args.{moved[close[0]]}=...)"
    return None


@dataclass(frozen=True)
class OptimSpec:
    """AdamW with a per-step linear warm-up, then cosine decay or a constant rate; the one optimiser
    spec of every module (each gives its own default instance).

    Args:
        lr: Peak learning rate.
        weight_decay: AdamW weight decay, applied to weight matrices and kernels only
            (``mmalign.optim.decays``: not to norms, biases, embeddings, logit scale/bias).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warm-up steps.
        schedule: ``cosine`` (decay to ``min_lr_ratio * lr`` at the last step) or ``constant`` after warm-up.
        min_lr_ratio: Floor of the cosine schedule as a fraction of ``lr``.
        grad_clip: Gradient-norm clip used when the trainer sets no ``gradient_clip_val``; 0 = off.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        positive("optim.lr", self.lr)
        positive("optim.weight_decay", self.weight_decay, zero=True)
        need(len(tuple(self.betas)) == 2, f"optim.betas must be two numbers, got {self.betas}.")
        for i, b in enumerate(self.betas):
            unit_interval(f"optim.betas[{i}]", b)
        positive("optim.eps", self.eps)
        positive("optim.warmup_steps", self.warmup_steps, zero=True)
        one_of("optim.schedule", self.schedule, SCHEDULES)
        unit_interval("optim.min_lr_ratio", self.min_lr_ratio, closed_top=True)
        positive("optim.grad_clip", self.grad_clip, zero=True)

    def build(self, named_parameters: typing.Iterable[tuple[str, Any]], total_steps: int) -> dict:
        """``configure_optimizers``' return value for these parameters (frozen ones are left out)."""
        from mmalign.optim import adamw_warmup_cosine

        floor = 1.0 if self.schedule == "constant" else self.min_lr_ratio
        return adamw_warmup_cosine(named_parameters, total_steps, self.lr, self.weight_decay, tuple(self.betas),
                                   self.eps, self.warmup_steps, min_ratio=floor)


#: the flat optimiser options of the older modules and where they live now
OPTIM_MOVED = {k: f"optim.{k}" for k in ("lr", "weight_decay", "betas", "eps", "warmup_steps")}


def replace(spec: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that re-runs validation (frozen specs are otherwise immutable)."""
    return dataclasses.replace(spec, **changes)
