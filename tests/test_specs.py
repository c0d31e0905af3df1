"""The shared spec helpers (mmalign/specs.py) and the output-location check (mmalign/training/outputs.py)."""

import os
from dataclasses import dataclass

import pytest
import torch

from mmalign.specs import OptimSpec, coerce, migrate_flat, moved_option_hint
from mmalign.training.outputs import OutputLocationError, check_output_dir


@pytest.mark.parametrize("kw, pattern", [
    ({"lr": 0.0}, r"optim.lr must be > 0, got 0.0"),
    ({"lr": float("nan")}, r"optim.lr must be > 0"),
    ({"warmup_steps": -1}, r"optim.warmup_steps must be >= 0, got -1"),
    ({"betas": (0.9, 1.0)}, r"optim.betas\[1\] must be in \[0, 1\), got 1.0"),
    ({"schedule": "linear"}, r"optim.schedule must be one of \['cosine', 'constant'\], got 'linear'"),
])
def test_optim_spec_names_the_bad_value(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        OptimSpec(**kw)


def test_optim_spec_builds_the_schedule_it_names():
    net = torch.nn.Linear(4, 4)
    cosine = OptimSpec(lr=1.0, warmup_steps=2).build(net.named_parameters(), total_steps=10)
    const = OptimSpec(lr=1.0, warmup_steps=2, schedule="constant").build(net.named_parameters(), total_steps=10)
    lam_cos, lam_const = (o["lr_scheduler"]["scheduler"].lr_lambdas[0] for o in (cosine, const))
    assert lam_cos(0) == lam_const(0) == 0.5  # warm-up is shared
    assert lam_cos(10) == pytest.approx(0.0) and lam_const(10) == pytest.approx(1.0)
    # weight decay only on the matrix, not on the bias
    groups = cosine["optimizer"].param_groups
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[1]["weight_decay"] == 0.0


@dataclass(frozen=True)
class _Inner:
    x: int = 1


@dataclass(frozen=True)
class _Outer:
    inner: _Inner | None = None
    pair: tuple[int, int] = (0, 0)


def test_coerce_builds_nested_specs_and_names_unknown_keys():
    out = coerce({"inner": {"x": 3}, "pair": [1, 2]}, _Outer, "outer")
    assert out == _Outer(_Inner(3), (1, 2))
    with pytest.raises(ValueError, match=r"outer.inner: unknown option\(s\) \['y'\]; allowed: \['x'\]"):
        coerce({"inner": {"y": 3}}, _Outer, "outer")


class _Module:
    moved_options = {"lr": "optim.lr", "warmup_steps": "optim.warmup_steps"}


def test_old_flat_hparams_move_into_their_groups():
    hp = {"lr": 0.1, "warmup_steps": 5, "optim": {"betas": (0.9, 0.99)}, "other": 1}
    assert migrate_flat(_Module, hp) == {"optim": {"betas": (0.9, 0.99), "lr": 0.1, "warmup_steps": 5}, "other": 1}
    assert "moved to 'optim.lr'" in moved_option_hint(_Module, "lr")
    assert moved_option_hint(_Module, "other") is None


def test_output_dir_check_refuses_files_and_unwritable_places(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(OutputLocationError, match=r"checkpoints location .*afile is a file.*Set --checkpoint.dirpath"):
        check_output_dir(str(f), "checkpoints", "--checkpoint.dirpath")
    with pytest.raises(OutputLocationError, match=r"cannot be created: .*afile is a file"):
        check_output_dir(str(f / "sub"), "checkpoints")
    ok = check_output_dir(str(tmp_path / "new" / "dir"), "results")
    assert os.path.isdir(ok) and os.listdir(ok) == []  # the probe file is gone
    # a place even root cannot write (procfs): the probe file, not os.access, decides
    with pytest.raises(OutputLocationError, match="cannot be created|not writable"):
        check_output_dir("/proc/self/mmalign-out", "results")
