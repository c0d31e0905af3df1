"""Webdataset streaming datamodules shared by every mmalign workflow."""

from .audio_text import AudioTextDataModule
from .base import Preprocess, StreamingDataModule
from .image_label import ImageLabelDataModule
from .image_text import ImageTextDataModule
from .shards import ShardError, expand_shards
from .stream import DataConfigError

__all__ = ["AudioTextDataModule", "DataConfigError", "ImageLabelDataModule", "ImageTextDataModule", "Preprocess",
           "ShardError", "StreamingDataModule", "expand_shards"]
