"""Frozen helper networks (teacher, FD feature network, VAE) as registered submodules.

Registered, so Lightning and ``.to()`` move them with the model and DDP sees one module tree; but
they are rebuilt from their own source files at construction, so:

* no gradients (``requires_grad`` off) and never in the optimizer or the EMA;
* always in eval mode: Lightning calls ``model.train()`` on the whole tree at every fit start and
  after every validation, which would switch on dropout and BatchNorm statistic updates;
* not in ``state_dict`` (checkpoints stay the size of what is trained, and a checkpoint never
  pins a teacher's weights), and ``load_state_dict(strict=True)`` does not miss them.

The state-dict rules are module hooks rather than method overrides, so they hold wherever the
model sits in a larger tree (keys are matched under the hook's prefix).
"""

from __future__ import annotations

import os

from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad`` off and eval mode; returns ``module``."""
    module.requires_grad_(False)
    return module.eval()


class FrozenChildren(nn.Module):
    """Mixin: the children named in ``frozen_children`` are frozen, kept in eval and not saved."""

    frozen_children: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_pre_hook(_drop_incoming_frozen_keys)
        self.register_load_state_dict_post_hook(_forgive_missing_frozen_keys)

    def frozen_modules(self) -> list[nn.Module]:
        return [m for n in self.frozen_children if isinstance(m := getattr(self, n, None), nn.Module)]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():
            m.train(False)
        return self


def _prefixes(module: FrozenChildren, prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{n}." for n in module.frozen_children)


def _drop_frozen_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(_prefixes(module, prefix))]:
        del state_dict[key]


def _drop_incoming_frozen_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                               error_msgs) -> None:
    # a checkpoint written by hand with teacher weights: the teacher is rebuilt from its own file
    for key in [k for k in state_dict if k.startswith(_prefixes(module, prefix))]:
        del state_dict[key]
    module._load_prefix = prefix


def _forgive_missing_frozen_keys(module, incompatible_keys) -> None:
    frozen = _prefixes(module, getattr(module, "_load_prefix", ""))
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(frozen)]


def load_vae(path: str) -> nn.Module:
    """A local diffusers ``AutoencoderKL`` folder, frozen."""
    from diffusers import AutoencoderKL

    if not os.path.isdir(path):
        raise FileNotFoundError(f"diffusion.vae_path '{path}' is not a directory; give a local diffusers AutoencoderKL "
                                "folder (config.json + weights), saved with save_pretrained.")
    return freeze(AutoencoderKL.from_pretrained(path, local_files_only=True))
