"""One asset on several processes: camera shards, noise of the whole batch, and a 2-process gloo run
(torchrun) that ends with the Gaussians of the 1-process run, densification included."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guidance.losses import BatchShard, NoiseSource
from training.distributed import ProcessGroup, shard_bounds

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("total,world,expected", [
    (4, 2, [(0, 2), (2, 4)]),
    (5, 2, [(0, 3), (3, 5)]),
    (3, 3, [(0, 1), (1, 2), (2, 3)]),
    (8, 3, [(0, 3), (3, 6), (6, 8)]),
])
def test_shard_bounds_cover_the_batch_once_in_order(total, world, expected):
    assert [shard_bounds(total, r, world) for r in range(world)] == expected


def test_shard_rules_are_checked():
    with pytest.raises(ValueError, match="start <= stop"):
        BatchShard(3, 2, 4)
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(4, 2, 2)
    with pytest.raises(ValueError, match="C_batch_size must be >= the number of processes"):
        ProcessGroup(rank=0, world_size=4).shard(2)
    assert ProcessGroup().shard(4) is None  # one process: the whole batch


@pytest.mark.parametrize("fixed,shared", [(False, False), (True, False), (True, True)])
def test_noise_of_a_shard_is_its_rows_of_the_whole_batch(fixed, shared):
    like = torch.zeros(5, 4, 3, 3)
    whole = NoiseSource(fixed, 0.1, seed=7, shared=shared)(like)
    for start, stop in ((0, 3), (3, 5)):
        part = NoiseSource(fixed, 0.1, seed=7, shared=shared)(like[start:stop], BatchShard(start, stop, 5))
        torch.testing.assert_close(part, whole[start:stop], rtol=0, atol=0)
    with pytest.raises(ValueError, match="a shard of 2 rows got a batch of 3"):
        NoiseSource(fixed, 0.1, seed=7)(like[:3], BatchShard(0, 2, 5))


SMALL = [
    "GuidanceParams.prior=analytic", "GuidanceParams.C_batch_size=4", "GuidanceParams.lambda_guidance=0.1",
    "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=400",
    "OptimizationParams.iterations=12", "OptimizationParams.densify_from_iter=2",
    "OptimizationParams.densification_interval=5", "OptimizationParams.opacity_reset_interval=10",
    "OptimizationParams.densify_grad_threshold=0.0002", "OptimizationParams.warmup_iter=4",
    "OptimizationParams.lambda_tv=1.0", "OptimizationParams.lambda_scale=1.0",
    "ModelParams.workspace=dist", "save_video=false", "test_ratio=2", "save_ratio=1", "checkpoint_interval=6",
    "log_interval=1", "preview_interval=0", "PipelineParams.device=cpu", "export_mesh=false",
]


def _train(tmp_path: Path, name: str, nproc: int, extra: list[str]) -> Path:
    out = tmp_path / name
    argv = ["train.py", "--quiet", f"output_dir={out}", *SMALL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [p for p in (out / "dist").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # only rank 0 writes a run folder
    return runs[0]


def _gaussians(run: Path) -> dict:
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return state["gaussians"]["params"] if "params" in state["gaussians"] else state["gaussians"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sctd", "gcs"])
def test_two_processes_take_the_one_process_step(tmp_path, loss):
    """Same Gaussians after 12 steps with two densify-and-prune rounds and an opacity reset: every
    parameter within 1e-4 relative L2 (float32 partial sums in another order), same count."""
    extra = [f"GuidanceParams.guidance_type={loss}"] + (["GuidanceParams.w_cp=0.5"] if loss == "gcs" else [])
    one = _gaussians(_train(tmp_path, "one", 1, extra))
    two = _gaussians(_train(tmp_path, "two", 2, extra))
    tensors = {k: v for k, v in one.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert tensors, sorted(one)
    for name, ref in tensors.items():
        got = two[name]
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert err < 1e-4, (name, err)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_processes(tmp_path, monkeypatch):
    """Checkpoints hold no process count: a run stopped at step 7 by one process and resumed by two
    (torchrun) ends where the uninterrupted one-process run ends."""
    from training import run as run_module
    from training.trainer import Trainer
    from utils.config import load_config

    reference = _gaussians(_train(tmp_path, "one", 1, []))
    cfg = load_config(None, [f"output_dir={tmp_path / 'resumed'}", *SMALL])
    original = Trainer.train_step

    def crash_at_7(self, step, **kwargs):
        if step == 7:
            raise KeyboardInterrupt
        return original(self, step, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crash_at_7)
    with pytest.raises(KeyboardInterrupt):
        run_module.train(cfg, None, ["train.py"], quiet=True)
    monkeypatch.setattr(Trainer, "train_step", original)
    (run_dir,) = [p for p in (tmp_path / "resumed" / "dist").iterdir() if p.is_dir()]
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "train.py", "--quiet", "--resume", str(run_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = _gaussians(run_dir)
    for name, ref in reference.items():
        if isinstance(ref, torch.Tensor) and ref.is_floating_point():
            err = ((resumed[name] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            assert resumed[name].shape == ref.shape and err < 1e-4, (name, err)


_JOIN_AND_LEAVE = """
import gc, sys, weakref
import torch
import torch.distributed as dist
from training.distributed import ProcessGroup
group = ProcessGroup.from_environment()
group.start(torch.device("cpu"), timeout_s=60)
param = torch.nn.Parameter(torch.ones(4))
torch.optim.Adam([param], lr=0.1)  # the first optimizer imports torch._dynamo (and torch.distributed._shard)
flat = torch.ones(3) * (group.rank + 1)
dist.all_reduce(flat)
default = weakref.ref(dist.distributed_c10d._get_default_group())
group.stop()
gc.collect()
print(f"rank {group.rank} sum {flat.tolist()} group freed {default() is None}")
"""


def test_leaving_the_group_frees_it_before_exit(tmp_path):
    """The cause of a rare SIGABRT at exit ("terminate called without an active exception"): a process
    group still referenced after destroy_process_group() has its gloo threads torn down during interpreter
    exit. After ProcessGroup.stop() nothing may refer to it, even once an optimizer imported torch._dynamo."""
    from bench.headless_chromium import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-c", _JOIN_AND_LEAVE], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert f"rank {rank} sum [3.0, 3.0, 3.0] group freed True" in out, out + err[-3000:]
        assert "outlived destroy_process_group" not in err, err[-3000:]
