"""Image classification shards: an image plus its label in ``.cls`` or in a ``.json`` field."""

from __future__ import annotations

import json
import os

import torch

from mmalign.specs import coerce
from mmalign.specs import replace as spec_replace

from .errors import DataConfigError
from .folders import FOLDER_SCHEME, is_image_folder, scan
from .labels import class_map_for, parse_label
from .samples import IMAGE_EXTS, decode_image_bytes, find_image, read_json
from .shards import ShardIndex
from .base import Preprocess, StreamingDataModule
from .specs import BASE_MOVED, EvalSpec, GenerateSpec, ImageSpec, LabelSpec, ShardsSpec, StreamSpec
from .transforms import default_image_transform


class ImageLabelDataModule(StreamingDataModule):
    """Batches: ``image`` (B,3,H,W), ``label`` (B,) long, ``key``, ``meta``.

    Args:
        shards, stream, eval, generate, preprocess: See ``StreamingDataModule``.
        label: Where the label is (``.cls`` or a json field), the class count it must fit, and a
            class-index file for labels written as names (``LabelSpec``).
        image: Default transform size when the model supplies none (``ImageSpec``).
    """

    index_read = ("cls", "json")
    moved_options = {**BASE_MOVED, "label_key": "label.key", "num_classes": "label.num_classes",
                     "image_size": "image.size"}

    def __init__(self, shards: ShardsSpec = ShardsSpec(), stream: StreamSpec = StreamSpec(),
                 eval: EvalSpec = EvalSpec(), generate: GenerateSpec | str | None = None,
                 preprocess: Preprocess | None = None,
                 label: LabelSpec = LabelSpec(), image: ImageSpec = ImageSpec()) -> None:
        super().__init__(shards, stream, eval, generate, preprocess)
        self.cfg.label, self.cfg.image = coerce(label, LabelSpec, "label"), coerce(image, ImageSpec, "image")
        self.required = (IMAGE_EXTS, ("cls",) if self.label_key == "cls" else ("json",))

    @property
    def label_key(self) -> str:
        return self.cfg.label.key

    @property
    def image_size(self) -> int:
        return self.cfg.image.size

    @property
    def num_classes(self) -> int | None:
        return self.cfg.label.num_classes

    @num_classes.setter
    def num_classes(self, value: int | None) -> None:
        """The TTA pipeline hands the source model's class count over."""
        self.cfg.label = spec_replace(self.cfg.label, num_classes=value)

    def setup(self, stage: str) -> None:
        self.check_folder_classes({self._spec_name(k): v for k, v in self.shards.items()})
        super().setup(stage)

    def check_folder_classes(self, specs: dict) -> None:
        """Labelled image folders read by one datamodule must have the same class folders: a class index is
        a folder's position, so a split without the ``dog`` folder would call every later class by the
        wrong index. Not needed with ``label.classes`` (labels are then mapped by name)."""
        if self.cfg.label.classes is not None or self.label_key != "cls":
            return
        seen: dict[tuple[str, ...], str] = {}
        for what, spec in specs.items():
            items = [spec] if isinstance(spec, str) else list(spec or [])
            for item in items:
                if isinstance(item, str) and os.path.isdir(item) and is_image_folder(item):
                    names = tuple(scan(item).classes)
                    if names:
                        seen.setdefault(names, f"{what} ('{item}')")
        if len(seen) > 1:
            (a, where_a), (b, where_b) = list(seen.items())[:2]
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            raise DataConfigError(f"the class folders of {where_a} and {where_b} differ (only in the first: "
                                  f"{only_a[:5]}, only in the second: {only_b[:5]}), so one label index would name "
                                  "different classes. Give every split the same class folders (an empty folder is "
                                  "fine), or set label.classes to a class-index file.")

    def class_map(self) -> dict[str, int] | None:
        """``label.classes`` read (once): class names -> indices, or None."""
        return class_map_for(self.cfg.label.classes, self.data_root)

    def _label(self, cls_text: str | None, meta: dict, where: str, folder: bool = False) -> int:
        class_map = self.class_map()
        if folder and class_map is not None and self.label_key == "cls" and "class" in meta:
            value = meta["class"]  # a class folder: its name, indexed by label.classes (not the folder's position)
        elif self.label_key == "cls":
            if cls_text is None:
                raise KeyError("no .cls member")
            value = cls_text
        else:
            if self.label_key not in meta:
                raise KeyError(f"json has no field '{self.label_key}'")
            value = meta[self.label_key]
        label = parse_label(value, class_map, where)
        if self.num_classes is not None and label >= self.num_classes:
            raise DataConfigError(f"{where}: label {label} is outside [0, {self.num_classes}). Set label.num_classes "
                                  f"to cover the data (labels run 0..C-1) or fix label.key ('{self.label_key}').")
        return label

    def check_index(self, index: ShardIndex) -> None:
        missing, fields = [], set()
        folder = index.url.startswith(FOLDER_SCHEME)
        for key, members in index.texts.items():
            if self.label_key == "cls" and "cls" not in members:
                continue  # a sample without label is skipped (and counted) when streamed
            try:
                meta = json.loads(members.get("json") or "{}")
                self._label(members.get("cls"), meta if isinstance(meta, dict) else {}, f"{index.url}:{key}", folder)
            except DataConfigError:
                raise
            except (KeyError, ValueError):
                missing.append(key)
                try:
                    fields.update(json.loads(members.get("json") or "{}"))
                except (TypeError, ValueError):
                    pass
        if missing and len(missing) > self.max_skip_fraction * max(1, index.num_samples):
            where = "a readable .cls" if self.label_key == "cls" else f"json field '{self.label_key}'"
            raise DataConfigError(f"{index.url}: {len(missing)} of {index.num_samples} samples have no {where} "
                                  f"(e.g. {missing[:3]}; json fields seen: {sorted(fields)[:12]}). Set label.key to "
                                  "the member or json field that holds the class index.")

    def decode(self, sample: dict, train: bool) -> dict:
        chosen = self.preprocess.train_transform if train else self.preprocess.eval_transform
        transform = chosen or default_image_transform(self.image_size, train)
        image = transform(decode_image_bytes(find_image(sample)))
        cls_text = sample["cls"].decode("utf-8", "replace") if "cls" in sample else None
        meta = read_json(sample)
        label = self._label(cls_text, meta, f"{sample['__url__']}:{sample['__key__']}",
                            sample["__url__"].startswith(FOLDER_SCHEME))
        return {"image": image, "label": label, "key": sample["__key__"], "meta": meta}

    def collate(self, samples: list[dict]) -> dict:
        return {"image": torch.stack([s["image"] for s in samples]),
                "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
                "key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
