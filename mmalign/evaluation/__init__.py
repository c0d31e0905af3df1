"""Evaluators: torchmetrics Metrics that take features (or a text encoder for zero-shot weights).

Every metric keeps sum or concatenation states, so torchmetrics gathers them across ranks by
itself inside ``compute()``; none of them needs a model class or Lightning.
"""

from mmalign.evaluation.geometry import EmbeddingGeometry, uniformity
from mmalign.evaluation.prompts import (
    ClassSpec,
    default_templates,
    format_prompts,
    load_class_spec,
    load_templates,
    packaged_spec_path,
    validate_template,
)
from mmalign.evaluation.retrieval import RetrievalRecall
from mmalign.evaluation.zeroshot import ZeroShotAccuracy, build_zeroshot_weights

__all__ = [
    "ClassSpec",
    "EmbeddingGeometry",
    "RetrievalRecall",
    "ZeroShotAccuracy",
    "build_zeroshot_weights",
    "default_templates",
    "format_prompts",
    "load_class_spec",
    "load_templates",
    "packaged_spec_path",
    "uniformity",
    "validate_template",
]
