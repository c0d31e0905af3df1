"""Any timm model as a teacher: ViT-style token models and CNN feature maps alike."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import GridMismatchError, TeacherEncoder


class TimmTeacher(TeacherEncoder):
    """timm model ``name`` with weights from a local file, headless, frozen.

    Args:
        name: timm model name (unknown names list close matches).
        checkpoint_path: Local weights (timm/torchvision state dict, Lightning checkpoint of
            ``ImageClassifier`` or safetensors); a classifier head in the file is ignored.
        pretrained: timm's pretrained tag (only if the weights are in the local HF cache).
        model_kwargs: Extra timm constructor arguments (e.g. ``img_size``, ``patch_size``, ``layers``).
        input_size: Native input side; default from the model (``img_size`` / pretrained config).
        mean, std: Input normalisation; default from the model's pretrained config.
    """

    def __init__(self, name: str, checkpoint_path: str | None = None, pretrained: bool = False,
                 model_kwargs: dict[str, Any] | None = None, input_size: int | None = None,
                 mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None) -> None:
        super().__init__()
        from timm.data import resolve_data_config

        from mmalign.models.timm_models import create_timm_model

        # num_classes=0 drops the head; a checkpoint's head keys are then dropped by create_timm_model
        self.model = create_timm_model(name, 0, pretrained, checkpoint_path, **(model_kwargs or {})).eval()
        cfg = resolve_data_config({}, model=self.model)
        self.name = f"timm:{name}" + (f" ({checkpoint_path})" if checkpoint_path else " (random init)"
                                       if not pretrained else " (pretrained)")
        self.mean = tuple(mean or cfg["mean"])
        self.std = tuple(std or cfg["std"])
        # a patch embedding's img_size reflects img_size overrides; the pretrained config does not
        native = next((m.img_size for m in self.model.modules()
                       if getattr(m, "img_size", None) is not None and hasattr(m, "patch_size")), None)
        self.input_size = int(input_size or (native[-1] if native is not None else cfg["input_size"][-1]))
        # NHWC models (Swin, some hybrids) return channels last from forward_features
        self._nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.num_prefix_tokens = 0 if self._nhwc else int(getattr(self.model, "num_prefix_tokens", 0))
        self._is_map = None
        side = self.check_grid()
        if self.input_size % side:
            raise GridMismatchError(f"teacher {name}: {self.input_size}px input gives a {side}x{side} grid, not a whole "
                                    "stride; set input_size to a multiple of the model's stride.")
        self.stride = self.input_size // side
        self.embed_dim = int(getattr(self.model, "num_features", 0)) or self._features_dim()
        self.resizable = self._is_map or hasattr(self.model, "set_input_size") or bool(
            getattr(self.model, "dynamic_img_size", False))
        self.freeze()

    def _features_dim(self) -> int:
        import torch

        with torch.no_grad():
            x = torch.zeros(1, 3, self.input_size, self.input_size)
            return int(self.forward_tokens(x).shape[-1])

    def _features(self, images: Tensor) -> Tensor:
        feats = self.model.forward_features(images)
        if isinstance(feats, (list, tuple)):
            feats = feats[-1]
        if self._nhwc and feats.ndim == 4:
            feats = feats.permute(0, 3, 1, 2)
        self._is_map = feats.ndim == 4
        # ViTs with average pooling put their final norm after pooling (fc_norm) and leave
        # ``norm`` as Identity: apply fc_norm per token so tokens are "after the final norm"
        if feats.ndim == 3 and isinstance(getattr(self.model, "norm", None), nn.Identity):
            fc_norm = getattr(self.model, "fc_norm", None)
            if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
                feats = fc_norm(feats)
        return feats

    def _resize(self, input_size: int) -> None:
        if self._is_map or getattr(self.model, "dynamic_img_size", False):
            return  # convolutions (and dynamic-size ViTs) take any input size
        self.model.set_input_size(img_size=(input_size, input_size))
        self.freeze()  # set_input_size creates a new pos_embed Parameter



def classifier_architecture(checkpoint_path: str) -> dict[str, Any]:
    """TimmTeacher arguments saved in an ``ImageClassifier`` checkpoint's hyper-parameters: model
    name, constructor kwargs, input size and normalisation (read with ``weights_only=True``), so a
    teacher or FD network is given by its checkpoint path alone."""
    from mmalign.checkpoint_layout import classifier_hparams
    from mmalign.models.weights import load_checkpoint_file

    raw = load_checkpoint_file(checkpoint_path, mmap=True)  # weights_only: a crafted file cannot run code
    hp = classifier_hparams(raw.get("hyper_parameters") if isinstance(raw, dict) else None)
    if hp is None:
        raise ValueError(f"checkpoint '{checkpoint_path}' holds no ImageClassifier hyper-parameters (network.name), so "
                         "the architecture cannot be read from it. Use kind: timm with the model name (and "
                         "kwargs.model_kwargs) for a plain weights file.")
    net, t = hp["network"], hp.get("transform") or {}
    arch: dict[str, Any] = {"name": net["name"], "model_kwargs": dict(net.get("kwargs") or {}),
                            "num_classes": hp.get("num_classes")}
    for key, field in (("image_size", "input_size"), ("mean", "mean"), ("std", "std")):
        if t.get(key) is not None:
            arch[field] = tuple(t[key]) if key != "image_size" else int(t[key])
    return arch


def teacher_from_classifier(checkpoint_path: str, name: str | None = None, **overrides: Any) -> TimmTeacher:
    """The backbone of an ``ImageClassifier`` checkpoint as a teacher (head dropped); ``overrides``
    replace what the checkpoint says (``input_size``, ``mean``, ``std``)."""
    arch = classifier_architecture(checkpoint_path)
    if name is not None and name != arch["name"]:
        raise ValueError(f"name '{name}' disagrees with the checkpoint's model_name '{arch['name']}'; leave name unset "
                         "for kind: classifier (it is read from the checkpoint).")
    model_name, num_classes = arch.pop("name"), arch.pop("num_classes")
    teacher = TimmTeacher(model_name, checkpoint_path, **{**arch, **overrides})
    teacher.name = f"classifier:{model_name} ({num_classes} classes, {checkpoint_path})"
    return teacher
