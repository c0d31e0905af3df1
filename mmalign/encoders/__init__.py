"""Teacher registry: frozen vision encoders that output patch tokens, behind one interface.

``build_teacher(kind, name, checkpoint_path, ...)`` returns a ``TeacherEncoder`` with
``forward_tokens(images) -> (B, N, D)``, ``grid_size``, ``input_size``, ``mean``/``std``,
``encode(images_in_[-1,1], grid=None)`` and a pooled ``forward`` usable as an FD feature network.

Kinds: ``classifier`` (an ``ImageClassifier`` checkpoint: the timm architecture is read from its
saved hyper-parameters, only the path is given), ``timm`` (any timm model) and ``open_clip`` (the
image tower of an open_clip model or of an mmalign CLIP checkpoint: a ViT's patch tokens, or a timm
tower's final feature map, e.g. the quick start's MobileNetV2). Other packages add
kinds with ``@register_teacher("kind")`` on a builder ``fn(name, checkpoint_path, **kwargs)``
(e.g. mmalign's own CLIP checkpoints). Heavy libraries are imported inside the builders only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import GridMismatchError, TeacherEncoder, tokens_from_features

_TEACHERS: dict[str, Callable[..., TeacherEncoder]] = {}


def register_teacher(kind: str):
    """Decorator registering ``fn(name, checkpoint_path=None, **kwargs) -> TeacherEncoder``."""

    def wrap(fn):
        _TEACHERS[kind] = fn
        return fn

    return wrap


def teacher_kinds() -> list[str]:
    return sorted(_TEACHERS)


@register_teacher("timm")
def _timm(name: str, checkpoint_path: str | None = None, **kwargs: Any) -> TeacherEncoder:
    from .timm_teacher import TimmTeacher

    return TimmTeacher(name, checkpoint_path, **kwargs)


@register_teacher("classifier")
def _classifier(name: str | None, checkpoint_path: str | None = None, **kwargs: Any) -> TeacherEncoder:
    if checkpoint_path is None:
        raise ValueError("teacher kind 'classifier' needs a checkpoint_path: the ImageClassifier checkpoint whose "
                         "hyper-parameters name the architecture.")
    from .timm_teacher import teacher_from_classifier

    return teacher_from_classifier(checkpoint_path, name, **kwargs)


@register_teacher("open_clip")
def _open_clip(name: str | None, checkpoint_path: str | None = None, **kwargs: Any) -> TeacherEncoder:
    # an open_clip ViT tower, or a timm tower's trunk (the quick start's MobileNetV2); the name may be
    # omitted for an mmalign CLIP checkpoint, which records it
    from .open_clip_teacher import clip_image_teacher

    return clip_image_teacher(name, checkpoint_path, **kwargs)


def build_teacher(kind: str, name: str | None, checkpoint_path: str | None = None, grid: int | None = None,
                  **kwargs: Any) -> TeacherEncoder:
    """Build a frozen teacher; with ``grid``, resize its input so the token grid is ``grid x grid``
    (``GridMismatchError`` when that is impossible)."""
    if kind not in _TEACHERS:
        raise ValueError(f"unknown teacher kind '{kind}'; registered kinds: {teacher_kinds()}.")
    teacher = _TEACHERS[kind](name, checkpoint_path, **kwargs)
    if grid is not None:
        teacher.set_grid(grid)
    return teacher.freeze()


__all__ = ["GridMismatchError", "TeacherEncoder", "build_teacher", "register_teacher", "teacher_kinds",
           "tokens_from_features"]
