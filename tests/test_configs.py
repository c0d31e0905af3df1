"""Every shipped YAML parses and trains for two steps (STYLE: configs are tested, not just stored)."""

import glob
import os

import pytest

from mmalign import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
# configs that need hardware CI lacks are parsed but not run
GPU_ONLY = {"vitb32_laion_ddp.yaml", "vitb32_laion_fsdp.yaml"}


MARK = "# mmalign-test:"
QUICK = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
         "--trainer.enable_progress_bar=false", "--data.init_args.num_workers=0", "--trainer.enable_model_summary=false"]


def quick_command(config: str) -> list[str]:
    """A config may say how to run it quickly in a first-lines comment, e.g.
    ``# mmalign-test: adapt --max_batches=2`` (subcommand, then its own overrides); default ``fit``."""
    with open(config) as f:
        for line in f.readlines()[:10]:
            if line.startswith(MARK):
                sub, *extra = line[len(MARK):].split()
                return [sub, "-c", config, *extra, *([] if sub != "fit" else QUICK)]
    return ["fit", "-c", config, *QUICK]


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.relpath(c, ROOT) for c in CONFIGS])
def test_config_runs_two_steps(config, in_tmp, capsys):
    args = quick_command(config)
    if os.path.basename(config) in GPU_ONLY:  # parse and validate every key, without a GPU to run on
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["fit", "-c", config, "--print_config"])
        assert exit_info.value.code in (0, None) and "class_path: mmalign.contrastive.CLIP" in capsys.readouterr().out
        return
    c = cli.main(args)
    if args[0] == "fit":
        assert c.trainer.global_step == 2
