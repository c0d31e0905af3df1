"""Scoring text-to-image models: the fixed prompt set, the CLIP judge and the evaluation loop.

* ``PromptSet``: class names (``"red circle"``), which are held out from training, the zero-shot
  templates of the judge, the generation prompt (``"a {}"``) and per-class attributes (colour,
  shape). Read from a dataset folder (the shapes data's ``classes.json`` + ``info.json``) or a json.
* ``ClipJudge``: any CLIP checkpoint (the quick start's by default) behind ``encode_images`` /
  ``encode_texts``, through ``clip_from_checkpoint`` (the one reader of mmalign CLIP checkpoints).
* ``score_images``: images + the classes they were generated for (or show) -> CLIP score and prompt
  accuracy per group (``mmalign.evaluation.text_image.TextImageAlignment``).

Plain torch; the judge only needs ``encode_images(images in [-1, 1]) -> (N, D)`` and
``encode_texts(list[str]) -> (N, D)``, so any image-text model can judge.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PromptSet:
    classnames: tuple[str, ...]
    heldout: frozenset[str]
    templates: tuple[str, ...]
    prompt: str = "a {}"
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def prompts(self) -> list[str]:
        """The generation prompt of every class, in class order."""
        return [self.prompt.format(c) for c in self.classnames]

    def groups(self) -> Tensor:
        """Per class: 0 = seen in training, 1 = held out."""
        return torch.tensor([int(c in self.heldout) for c in self.classnames])

    @property
    def attribute_table(self) -> dict[str, tuple[str, ...]]:
        return dict(self.attributes)


def load_prompt_set(path: str, prompt: str = "a {}") -> PromptSet:
    """A dataset folder (``classes.json`` with ``classnames`` + ``templates``; ``info.json`` with
    ``heldout_combos``; two-word class names give the attributes colour and shape) or a json file with
    ``classnames``, ``templates`` and optionally ``heldout``, ``prompt``, ``attributes``."""
    if os.path.isdir(path):
        spec_path, info_path = os.path.join(path, "classes.json"), os.path.join(path, "info.json")
        if not os.path.isfile(spec_path):
            raise FileNotFoundError(f"prompt set '{path}' has no classes.json; point judge.prompts at a generated "
                                    "shapes dataset folder (e.g. data/shapes) or a prompt-set json.")
        with open(spec_path) as f:
            spec = json.load(f)
        info = {}
        if os.path.isfile(info_path):
            with open(info_path) as f:
                info = json.load(f)
        spec = {**spec, "heldout": info.get("heldout_combos", [])}
        names = spec["classnames"]
        if all(len(n.split()) == 2 for n in names):  # "<colour> <shape>": the shapes data's class names
            spec["attributes"] = {"colour": [n.split()[0] for n in names], "shape": [n.split()[1] for n in names]}
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt set '{path}' does not exist (a dataset folder or a json file).")
        with open(path) as f:
            spec = json.load(f)
    names = tuple(spec["classnames"])
    unknown = sorted(set(spec.get("heldout", [])) - set(names))
    if unknown:
        raise ValueError(f"prompt set '{path}': held-out classes {unknown} are not among its class names.")
    attrs = tuple((k, tuple(v)) for k, v in (spec.get("attributes") or {}).items())
    return PromptSet(names, frozenset(spec.get("heldout", [])), tuple(spec.get("templates") or ["{}"]),
                     spec.get("prompt", prompt), attrs)


class ClipJudge(nn.Module):
    """A frozen CLIP as the judge of generated images.

    Args:
        checkpoint: An mmalign CLIP checkpoint (architecture read from it) or open_clip weights.
        name: open_clip model name for plain weights.
    """

    def __init__(self, checkpoint: str, name: str | None = None) -> None:
        super().__init__()
        import open_clip

        from mmalign.encoders.open_clip_teacher import clip_from_checkpoint

        self.model, self.name = clip_from_checkpoint(checkpoint, name)
        self._tokenize = open_clip.get_tokenizer(self.name)
        pp = getattr(self.model.visual, "preprocess_cfg", None) or {}
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.register_buffer("mean", torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             persistent=False)
        self.checkpoint = checkpoint
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ClipJudge":
        return super().train(False)

    def describe(self) -> str:
        return f"CLIP judge {self.name} ({self.checkpoint})"

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        x = ((images.float() + 1) / 2).clamp(0, 1)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > self.image_size).clamp(0, 1)
        return self.model.encode_image((x - self.mean) / self.std, normalize=True).float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self._tokenize(texts).to(self.mean.device), normalize=True).float()


def class_weights(judge, prompts: PromptSet) -> Tensor:
    """The judge's zero-shot classifier over the prompt set's classes (template ensemble)."""
    from mmalign.evaluation.zeroshot import build_zeroshot_weights

    return build_zeroshot_weights(judge.encode_texts, list, list(prompts.classnames), list(prompts.templates))


def alignment_metric(judge, prompts: PromptSet):
    from mmalign.evaluation.text_image import TextImageAlignment

    return TextImageAlignment(class_weights(judge, prompts), prompts.attribute_table, groups=("seen", "heldout"))


@torch.no_grad()
def score_images(judge, prompts: PromptSet, images: Tensor, classes: Tensor, metric=None,
                 texts: list[str] | None = None) -> None | dict[str, Tensor]:
    """Update ``metric`` (or a fresh one, computed and returned) with ``images`` ([-1, 1]) that were
    generated for (or show) ``classes``; the CLIP score is taken against their generation prompts
    (``texts`` overrides them, e.g. shuffled prompts)."""
    own = metric is None
    metric = alignment_metric(judge, prompts) if own else metric
    classes = classes.long().cpu()
    texts = texts if texts is not None else [prompts.prompts()[i] for i in classes.tolist()]
    metric.update(judge.encode_images(images), judge.encode_texts(texts), classes.to(images.device),
                  prompts.groups()[classes].to(images.device))
    return {k: v for k, v in metric.compute().items()} if own else None
