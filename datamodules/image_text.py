"""Image-text pairs in the img2dataset layout: ``.jpg``/``.png``/``.webp`` + ``.txt`` (+ ``.json``)."""

from __future__ import annotations

import torch

from mmalign.specs import coerce

from .base import Preprocess, StreamingDataModule
from .specs import BASE_MOVED, CaptionSpec, EvalSpec, GenerateSpec, ImageSpec, ShardsSpec, StreamSpec
from .samples import IMAGE_EXTS, decode_image_bytes, find_image, read_json
from .transforms import default_image_transform

class ImageTextDataModule(StreamingDataModule):
    """Image-caption pairs. Batches: ``image`` (B,3,H,W), ``text`` (list[str]), ``tokens`` (B,L) when
    a tokenizer is linked, ``key``, ``meta`` (parsed json or {}).

    Args:
        shards, stream, eval, generate, preprocess: See ``StreamingDataModule``.
        caption: Where the caption is: ``txt`` or ``json:<field>`` (``CaptionSpec``).
        image: Default transform size when the model supplies none (``ImageSpec``).
    """

    required = (IMAGE_EXTS, ("txt",))
    moved_options = {**BASE_MOVED, "caption_key": "caption.key", "image_size": "image.size"}

    def __init__(self, shards: ShardsSpec = ShardsSpec(), stream: StreamSpec = StreamSpec(),
                 eval: EvalSpec = EvalSpec(), generate: GenerateSpec | str | None = None,
                 preprocess: Preprocess | None = None,
                 caption: CaptionSpec = CaptionSpec(), image: ImageSpec = ImageSpec()) -> None:
        super().__init__(shards, stream, eval, generate, preprocess)
        self.cfg.caption, self.cfg.image = coerce(caption, CaptionSpec, "caption"), coerce(image, ImageSpec, "image")
        self.caption_key, self.image_size = self.cfg.caption.key, self.cfg.image.size
        if self.caption_key != "txt":
            self.required = (IMAGE_EXTS, ("json",))

    def _transform(self, train: bool):
        chosen = self.preprocess.train_transform if train else self.preprocess.eval_transform
        if chosen is None:
            chosen = default_image_transform(self.image_size, train)
        return chosen

    def decode(self, sample: dict, train: bool) -> dict:
        image = self._transform(train)(decode_image_bytes(find_image(sample)))
        meta = read_json(sample)
        if self.caption_key == "txt":
            try:
                text = sample["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as exc:  # skipped and counted: guessing an encoding would garble it
                raise ValueError(f"caption is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        else:
            value = meta[self.caption_key[5:]]
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"json caption field '{self.caption_key[5:]}' holds {value!r}, not text")
            text = str(value).strip()
        if not text:
            raise ValueError("empty caption")  # empty or whitespace only: skipped and counted
        # a caption longer than the text tower's context is cut by the tokenizer (open_clip and HF truncate)
        return {"image": image, "text": text, "key": sample["__key__"], "meta": meta}

    def collate(self, samples: list[dict]) -> dict:
        texts = [s["text"] for s in samples]
        batch = {"image": torch.stack([s["image"] for s in samples]), "text": texts,
                 "key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
        if self.preprocess.tokenizer is not None:
            batch["tokens"] = self.preprocess.tokenizer(texts)
        return batch
