"""A new loss is one file that registers it (README, "Adding a loss"): from then on it is selectable from
YAML, from the command line (and listed in its help), in a sweep's --losses and on resume, with nothing
else edited. The file here is written to a temporary folder and imported, as guidance/losses/__init__.py
imports every file of its folder."""
import importlib
import json
import sys
from pathlib import Path

import pytest

from guidance.losses import LOSSES
from tests.sweep_helpers import TINY_ANALYTIC, write_prompts
from tests.test_resume import _crash_at, _ply, _resume, _run
from training.sweep.worker import main as sweep_main
from training.trainer import Trainer
from utils.config import ConfigError, build_arg_parser, load_config, parse_cli
from utils.config.help import format_config_help

TINY_LOSS_FILE = '''"""A tiny loss: the SDS direction at timesteps from its own rule."""
import torch

from guidance.losses import DistillationLoss, LossOutput, register

CALLS = []  # the steps it was called at


def tiny_timestep(step: int) -> int:
    """Its timestep rule, beside the loss: 200, 300, ..., 600, 200, ..."""
    return 200 + 100 * (step % 5)


@register
class TinyLoss(DistillationLoss):
    name = "tiny"

    def __call__(self, z0, cond, info):
        CALLS.append(info.step)
        t_val = tiny_timestep(info.step)
        t = self.timesteps(t_val, z0.shape[0])
        with torch.no_grad():
            z0 = z0.float()
            noise = self.noise(z0, info.shard)
            eps, _, _ = self.guided_noise(self.schedule.add_noise(z0, noise, t), t, cond)
            grad = self.lambda_guidance * self.schedule.snr_weight(t).view(-1, 1, 1, 1) * (eps - noise)
        return LossOutput(latent_grad=grad, scalars={"t": float(t_val)})
'''


@pytest.fixture
def tiny_loss(tmp_path, monkeypatch):
    """Write the loss's file, import it (it registers itself); unregister afterwards."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "tiny_loss.py").write_text(TINY_LOSS_FILE)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("tiny_loss")
    yield module
    LOSSES.pop("tiny", None)
    sys.modules.pop("tiny_loss", None)


def test_an_unregistered_loss_is_refused_with_the_registered_names():
    with pytest.raises(ConfigError, match=r"GuidanceParams.guidance_type must be one of \['cds', 'gcs', 'ism', "
                                          r"'sctd', 'sds'\], got 'tiny'"):
        load_config(None, ["GuidanceParams.guidance_type=tiny"])


def test_every_file_in_guidance_losses_is_imported():
    folder = Path(__file__).resolve().parents[1] / "guidance" / "losses"
    for path in folder.glob("*.py"):
        assert f"guidance.losses.{path.stem}" in sys.modules or path.stem == "__init__", path.name
    assert {cls.__module__ for cls in LOSSES.values()} >= {"guidance.losses.sctd", "guidance.losses.gcs"}


def test_a_new_loss_is_selectable_from_yaml_the_cli_and_on_resume(tiny_loss, tmp_path, monkeypatch):
    assert "tiny" in build_arg_parser().format_help() and "sctd, sds, tiny" in format_config_help("GuidanceParams")
    assert parse_cli(["--guidance_type", "tiny"])[0].guidance.guidance_type == "tiny"
    # YAML: an uninterrupted run
    opt = tmp_path / "tiny.yaml"
    opt.write_text("GuidanceParams:\n  guidance_type: tiny\n  fix_noise: false\n")
    assert _run(tmp_path / "straight", "--opt", str(opt), "export_mesh=false") == 0
    assert tiny_loss.CALLS == [1, 2, 3, 4]
    straight = next((tmp_path / "straight").glob("*/*"))
    assert "guidance_type: tiny" in (straight / "config.yaml").read_text()
    # the command line, interrupted after the step-2 checkpoint, then resumed: the same Gaussians
    original = _crash_at(monkeypatch, 3)
    assert _run(tmp_path / "crashed", "--guidance_type", "tiny", "GuidanceParams.fix_noise=false",
                "export_mesh=false") == 130
    monkeypatch.setattr(Trainer, "train_step", original)
    crashed = next((tmp_path / "crashed").glob("*/*"))
    tiny_loss.CALLS.clear()
    assert _resume(crashed) == 0
    assert tiny_loss.CALLS == [3, 4]
    reference, resumed = _ply(straight / "point_cloud.ply"), _ply(crashed / "point_cloud.ply")
    assert all((resumed[k] == reference[k]).all() for k in reference)


def test_a_new_loss_is_selectable_in_a_sweep(tiny_loss, tmp_path):
    out = tmp_path / "sw"
    argv = ["--prompts", str(write_prompts(tmp_path, ["a red apple"])), "--out", str(out), "--losses", "tiny",
            "--poll", "0.1", "--no-report", *TINY_ANALYTIC, "OptimizationParams.iterations=2"]
    assert sweep_main(argv) == 0
    done = json.loads((out / "tiny" / "a_red_apple_s0" / "done.json").read_text())
    assert done["loss"] == "tiny" and tiny_loss.CALLS == [1, 2]
