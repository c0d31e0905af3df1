"""Webdataset streaming datamodules shared by every mmalign workflow."""

from .audio_text import AudioTextDataModule
from .base import Preprocess, StreamingDataModule
from .image_label import ImageLabelDataModule
from .image_text import ImageTextDataModule
from .errors import DataConfigError, ShardError
from .shards import expand_shards

__all__ = ["AudioTextDataModule", "DataConfigError", "ImageLabelDataModule", "ImageTextDataModule", "Preprocess",
           "ShardError", "StreamingDataModule", "expand_shards"]
