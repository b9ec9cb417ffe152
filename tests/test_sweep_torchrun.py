"""The issue's done-when test: torchrun starts two CPU workers on a small sweep, one is killed mid-run,
the same command is started again, and every run exists exactly once, equal to the run started alone;
the report has every row. Once with the analytic prior, once with a tiny random Stable Diffusion
(scored by a tiny CLIP and FID against reference images the same model generates)."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluation import fid
from tests.sweep_helpers import TINY_ANALYTIC, assert_same_result, tiny_sd, write_prompts
from tests.test_sweep import _alone
from tests.tiny_models import save_tiny_clip, save_tiny_inception
from training.sweep.markers import DONE

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("sctd", "ism")


def _launch(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.sweep", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_a_worker_mid_run(root: Path, proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """SIGKILL the owner of a run that has a checkpoint but is not finished; returns that run's name."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for claim in (root / ".claims").rglob("*.json"):
            name = str(claim.relative_to(root / ".claims").with_suffix(""))
            run = root / name
            if (run / "checkpoints" / "last.pt").is_file() and not (run / DONE).exists():
                try:
                    owner = json.loads(claim.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                os.kill(owner["pid"], signal.SIGKILL)
                return name
        time.sleep(0.01)
    raise AssertionError(f"no run was caught mid-run:\n{proc.communicate()[0] if proc.poll() is not None else ''}")


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["analytic", "stable_diffusion"])
def test_torchrun_sweep_survives_a_killed_worker(tmp_path, tiny_sd_dir, prior):
    root, prompts = tmp_path / "sweep", write_prompts(tmp_path)
    iters = ["OptimizationParams.iterations=20", "OptimizationParams.densify_until_iter=5", "checkpoint_interval=2"]
    argv = ["--prompts", str(prompts), "--out", str(root), "--losses", ",".join(LOSSES), "--poll", "0.1",
            "--views", "4", "--eval-resolution", "32"]
    if prior == "analytic":
        argv += [*TINY_ANALYTIC, *iters]
    else:
        clip, inception, reference = tmp_path / "clip", tmp_path / "inception.pt", tmp_path / "reference"
        save_tiny_clip(clip)
        save_tiny_inception(inception)
        assert fid.main(["reference", "--model-key", str(tiny_sd_dir), "--prompts", str(prompts), "--out",
                         str(reference), "--per-prompt", "2", "--steps", "2", "--resolution", "64",
                         "--device", "cpu"]) == 0
        argv += ["--clip-model", str(clip), "--fid-inception", str(inception), "--fid-reference", str(reference),
                 *tiny_sd(tiny_sd_dir), *iters]

    first = _launch(argv)
    killed = _kill_a_worker_mid_run(root, first)
    out1 = first.communicate(timeout=300)[0]
    assert first.returncode != 0, out1  # torchrun stops the group when a worker dies
    assert not (root / killed / DONE).exists()

    second = _launch(argv)
    out2 = second.communicate(timeout=300)[0]
    assert second.returncode == 0, out2

    names = [f"{loss}/{slug}_s0" for loss in LOSSES for slug in ("a_red_apple", "a_blue_car_on_a_road")]
    logs = "".join(p.read_text() for p in (root / "logs").glob("*.log"))
    for name in names:
        assert (root / name / DONE).is_file(), name
        assert len(re.findall(rf"done {re.escape(name)} in", logs)) == 1, name  # finished exactly once
    assert sorted(str(p.relative_to(root)) for p in root.glob("*/*") if (p / "config.yaml").is_file()) == sorted(names)
    assert json.loads((root / killed / DONE).read_text())["resumed_from_step"] > 0
    for name in names:
        assert_same_result(root / name, _alone(tmp_path, root / name))

    runs = list(csv.DictReader((root / "runs.csv").open()))
    assert sorted(r["name"] for r in runs) == sorted(names) and {r["status"] for r in runs} == {"done"}
    per_loss = {r["loss"]: r for r in csv.DictReader((root / "report.csv").open())}
    assert set(per_loss) == set(LOSSES) and all(r["finished"] == "2" for r in per_loss.values())
    if prior == "analytic":
        assert all(float(r["psnr_heldout"]) > 5 for r in runs)
    else:
        assert all(0.0 <= float(r["clip_l"]) <= 100.0 for r in runs)
        assert all(float(r["fid"]) >= 0.0 for r in per_loss.values())
        assert "ImageReward: not computed" in (root / "report.md").read_text()
