"""Building any timm model by name, offline-safe: pretrained weights come from a local file."""

from __future__ import annotations

import difflib
import logging
from typing import Any

from torch import nn

from .weights import load_weights

log = logging.getLogger(__name__)


class UnknownModelError(ValueError):
    """A model name the library does not know; the message lists close matches."""


def close_matches(name: str, names: list[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)


def check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        hint = close_matches(name, timm.list_models())
        raise UnknownModelError(f"unknown timm model '{name}'." + (f" Close matches: {hint}." if hint else "")
                                + " See timm.list_models() for all names.")


def create_timm_model(name: str, num_classes: int | None = None, pretrained: bool = False,
                      checkpoint_path: str | None = None, **kwargs: Any) -> nn.Module:
    """timm model ``name``; weights from ``checkpoint_path`` (local) or timm's ``pretrained`` tag.

    A local checkpoint whose classifier has another class count loads everything but the head
    (re-initialised), which is what fine-tuning wants; any other mismatch is an error.
    """
    import timm

    check_timm_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint_path is None, **kwargs)
    except TypeError as exc:
        raise ValueError(f"timm model '{name}' rejected model_kwargs {sorted(kwargs)}: {exc}") from exc
    except (OSError, RuntimeError) as exc:
        if pretrained and checkpoint_path is None:
            raise RuntimeError(f"could not fetch pretrained weights for '{name}' ({exc}). mmalign runs offline: "
                               "set checkpoint_path to a local weights file instead.") from exc
        raise
    if checkpoint_path:
        head = []
        if hasattr(model, "get_classifier"):
            classifier = model.get_classifier()
            names = {m: n for n, m in model.named_modules()}
            if isinstance(classifier, nn.Module) and classifier in names:
                head = [names[classifier] + "."]
        try:
            load_weights(model, checkpoint_path)
        except ValueError:
            if not head:
                raise
            load_weights(model, checkpoint_path, drop=head)  # retry without the head; still strict elsewhere
            log.warning("loaded %s into %s except the classifier %s (class count differs): it starts fresh",
                        checkpoint_path, name, head[0].rstrip("."))
    return model
