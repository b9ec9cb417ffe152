"""The sweep in one process: prompt lists, the plan and its run names, claims, prompt swapping with one
prior (same results as runs started alone), failures that do not stop the sweep, and the report."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from tests.sweep_helpers import PROMPTS, TINY_ANALYTIC, assert_same_result, tiny_sd, write_prompts
from training.sweep.claims import ClaimStore, Heartbeat
from training.sweep.markers import DONE, FAILED
from training.sweep.plan import Prompt, SweepPlan, load_prompts, slugify, unique_slugs
from training.sweep.report import ReportOptions, write_report
from training.sweep.report import main as report_main
from training.sweep.worker import SweepWorker, WorkerEnv, prior_fingerprint, worker_env
from training.sweep.worker import main as sweep_main
from utils.config import ConfigError, save_config

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- prompt lists and the plan


def test_text_and_yaml_prompt_lists(tmp_path):
    assert [p.text for p in load_prompts(write_prompts(tmp_path))] == PROMPTS
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text("prompts:\n  - a cat\n  - {text: 'a dog: brown', negative: blurry}\n")
    assert load_prompts(yaml_path) == [Prompt("a cat"), Prompt("a dog: brown", "blurry")]
    yaml_path.write_text("- a cat\n- a cat\n")
    with pytest.raises(ConfigError, match="listed twice"):
        load_prompts(yaml_path)
    yaml_path.write_text("- {text: ''}\n")
    with pytest.raises(ConfigError, match="non-empty"):
        load_prompts(yaml_path)


def test_the_papers_forty_prompts_are_shipped():
    prompts = load_prompts(REPO / "config" / "paper_prompts.yaml")
    assert len(prompts) == 40 and len({p.text for p in prompts}) == 40
    assert prompts[0].text == "A cat with a mullet" and prompts[39].text == "A DSLR photo of a shiny beetle"
    assert prompts[13].text == "A photo of a skiing penguin wearing a puffy jacket, highly realistic DSLR photo"
    assert len(set(unique_slugs(prompts))) == 40


def test_slugs_are_readable_and_unique():
    assert slugify("A red-eyed tree frog, low poly!") == "a_red_eyed_tree_frog_low_poly"
    assert unique_slugs([Prompt("A cat"), Prompt("a cat!"), Prompt("A CAT")]) == ["a_cat", "a_cat_2", "a_cat_3"]
    assert len(slugify("x" * 200)) == 60


def test_plan_names_every_run_and_sets_its_prompt_loss_and_seed(tmp_path):
    plan = SweepPlan.build(tmp_path / "sw", write_prompts(tmp_path), ["sctd", "sds"], [0, 3],
                           overrides=[*TINY_ANALYTIC, "GuidanceParams.negative=ugly"])
    names = [r.name for r in plan.runs]
    assert len(names) == 8 and len(set(names)) == 8
    assert "sds/a_blue_car_on_a_road_s3" in names
    run = next(r for r in plan.runs if r.name == "sds/a_blue_car_on_a_road_s3")
    cfg = plan.config(run)
    assert (cfg.guidance.text, cfg.guidance.guidance_type, cfg.seed) == ("a blue car on a road", "sds", 3)
    assert cfg.guidance.negative == "ugly" and cfg.camera.image_w == 32 and cfg.camera.init_prompt == ""
    pointe = SweepPlan.build(tmp_path / "sw2", write_prompts(tmp_path), ["sctd"], [0],
                             overrides=["GenerateCamParams.init_shape=pointe", "GenerateCamParams.init_prompt=a bagel"])
    assert pointe.config(pointe.runs[1]).camera.init_prompt == "a blue car on a road"
    assert plan.folder(run) == tmp_path / "sw" / "sds" / "a_blue_car_on_a_road_s3"


def test_plan_errors_name_the_key_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="GuidanceParams.guidance_scale"):
        SweepPlan.build(tmp_path / "sw", write_prompts(tmp_path), ["sctd"], [0],
                        overrides=["GuidanceParams.guidance_scale=-1"])
    with pytest.raises(ConfigError, match="--losses"):
        SweepPlan.build(tmp_path / "sw", write_prompts(tmp_path), ["sdx"], [0])
    assert not (tmp_path / "sw").exists()


def test_a_second_launch_must_plan_the_same_sweep(tmp_path):
    prompts = write_prompts(tmp_path)
    SweepPlan.build(tmp_path / "sw", prompts, ["sctd"], [0], overrides=TINY_ANALYTIC).write_manifest()
    SweepPlan.build(tmp_path / "sw", prompts, ["sctd"], [0], overrides=TINY_ANALYTIC).write_manifest()
    with pytest.raises(ConfigError, match="another sweep"):
        SweepPlan.build(tmp_path / "sw", prompts, ["sctd", "ism"], [0], overrides=TINY_ANALYTIC).write_manifest()


def test_worker_env_from_torchrun_variables():
    env = worker_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "job7",
                      "TORCHELASTIC_RESTART_COUNT": "2"})
    assert env == WorkerEnv(3, 4, 1, "job7-r2")
    alone = worker_env({})
    assert (alone.rank, alone.world_size, alone.local_rank) == (0, 1, 0) and alone.launch != worker_env({}).launch
    with pytest.raises(ValueError, match="RANK=4"):
        worker_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_prior_fingerprint_ignores_prompts_and_losses_only(tmp_path):
    plan = SweepPlan.build(tmp_path / "sw", write_prompts(tmp_path), ["sctd", "sds"], [0, 1], overrides=TINY_ANALYTIC)
    assert len({prior_fingerprint(plan.config(r)) for r in plan.runs}) == 1
    other = plan.config(plan.runs[0])
    other.guidance.analytic_scene = "snowman"
    assert prior_fingerprint(other) != prior_fingerprint(plan.config(plan.runs[0]))


# ---------------------------------------------------------------------- claims


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_claim_is_exclusive_until_released(tmp_path):
    a, b = ClaimStore(tmp_path, 60, 1, {"rank": 0}), ClaimStore(tmp_path, 60, 1, {"rank": 1})
    claim = a.try_claim("sctd/x_s0")
    assert claim is not None and b.try_claim("sctd/x_s0") is None and b.held_by_other("sctd/x_s0")
    assert json.loads(claim.path.read_text())["rank"] == 0
    a.release(claim)
    assert not claim.path.exists() and b.try_claim("sctd/x_s0") is not None


def test_a_dead_owners_claim_is_taken_over_by_exactly_one_worker(tmp_path):
    dead = ClaimStore(tmp_path, 60, 1)
    dead.owner["pid"] = _dead_pid()
    stale = dead.try_claim("run")
    stores = [ClaimStore(tmp_path, 60, 1, {"rank": k}) for k in range(3)]
    won = [s.try_claim("run") for s in stores]
    assert sum(c is not None for c in won) == 1
    winner = next(c for c in won if c is not None)
    assert not dead.owns(stale) and json.loads(winner.path.read_text())["token"] == winner.token


def test_a_claim_without_heartbeat_goes_stale_and_its_owner_notices(tmp_path):
    owner, other = ClaimStore(tmp_path, 60, 1), ClaimStore(tmp_path, 60, 1)
    claim = owner.try_claim("run")
    record = json.loads(claim.path.read_text())
    claim.path.write_text(json.dumps({**record, "host": "elsewhere", "heartbeat": record["heartbeat"] - 61}))
    assert other.try_claim("run") is not None
    assert owner.heartbeat(claim) is False  # lost: the heartbeat writes nothing
    with pytest.raises(ValueError, match="heartbeat_s"):
        ClaimStore(tmp_path, 1, 1)


def test_the_heartbeat_refreshes_the_claim_and_notices_a_takeover(tmp_path):
    store = ClaimStore(tmp_path, 10, 0.05)
    claim = store.try_claim("run")
    first = json.loads(claim.path.read_text())["heartbeat"]
    with Heartbeat(store, claim) as beat:
        time.sleep(0.3)
        assert json.loads(claim.path.read_text())["heartbeat"] > first
        claim.path.write_text(json.dumps({"token": "other", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
        time.sleep(0.3)
    assert beat.lost and json.loads(claim.path.read_text())["token"] == "other"


# ---------------------------------------------------------------------- runs: same as alone, failures


def _plan(tmp_path, overrides, losses=("sctd",)):
    return SweepPlan.build(tmp_path / "sw", write_prompts(tmp_path), list(losses), [0], overrides=overrides)


def _worker(plan, poll=0.05):
    store = ClaimStore(plan.root / ".claims", 60, 1)
    return SweepWorker(plan, store, WorkerEnv(0, 1, 0, "launch-a"), [], poll_s=poll)


def _alone(tmp_path, run_dir: Path) -> Path:
    """The same run started alone with train.py, from the run folder's config."""
    out = tmp_path / "alone" / run_dir.parent.name / run_dir.name
    assert train.main(["--quiet", "--opt", str(run_dir / "config.yaml"), f"output_dir={out}"]) == 0
    (alone,) = [p for p in out.glob("*/*") if p.is_dir()]
    return alone


@pytest.mark.slow
@pytest.mark.parametrize("prior,losses", [("analytic", ("sctd", "ism")), ("stable_diffusion", ("sctd",))])
def test_runs_with_one_prior_equal_runs_started_alone(tmp_path, tiny_sd_dir, prior, losses):
    overrides = TINY_ANALYTIC if prior == "analytic" else tiny_sd(tiny_sd_dir)
    plan = _plan(tmp_path, overrides, losses=losses)
    worker = _worker(plan)
    built = []
    worker.make_prior = lambda cfg, device, make=worker.make_prior: built.append(cfg.guidance.text) or make(cfg, device)
    results = worker.run_all()
    assert [r.ok for r in results] == [True] * len(plan.runs) and len(built) == 1  # one model for every run
    for run in plan.runs:
        folder = plan.folder(run)
        done = json.loads((folder / DONE).read_text())
        assert done["prompt"] == run.prompt.text and done["resumed_from_step"] == 0
        assert_same_result(folder, _alone(tmp_path, folder))


def test_set_prompts_gives_the_embeddings_of_a_prior_built_with_them(tiny_sd_dir, make_guidance_cfg):
    from guidance.stable_diffusion import StableDiffusionPrior

    cfg = make_guidance_cfg(model_key=str(tiny_sd_dir), perpneg=True)
    swapped = StableDiffusionPrior.from_config(cfg, "cpu")
    swapped.set_prompts("a blue car", "ugly")
    fresh = StableDiffusionPrior.from_config(make_guidance_cfg(model_key=str(tiny_sd_dir), perpneg=True,
                                                               text="a blue car", negative="ugly"), "cpu")
    for name in fresh.embeddings:
        torch.testing.assert_close(swapped.embeddings[name], fresh.embeddings[name], rtol=0, atol=0)
    assert not torch.equal(swapped.embeddings["front"],
                           StableDiffusionPrior.from_config(cfg, "cpu").embeddings["front"])


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    plan = _plan(tmp_path, TINY_ANALYTIC)
    plan.write_manifest()
    broken = plan.folder(plan.runs[0])
    save_config(plan.config(plan.runs[0]), broken / "config.yaml")
    (broken / "checkpoints").mkdir(parents=True)
    torch.save({"version": -1, "step": 2}, broken / "checkpoints" / "last.pt")  # fails inside train()
    results = _worker(plan).run_all()
    assert [r.ok for r in results] == [False, True]
    failed = json.loads((broken / FAILED).read_text())
    # refused before its own train.log exists: the log named is the worker's (none in this in-process test)
    assert failed["launch"] == "launch-a" and failed["log"] is None and "version -1" in failed["error"]
    assert (plan.folder(plan.runs[1]) / DONE).is_file()
    assert _worker(plan).run_all() == []  # failed in this launch: not retried
    md, per_loss, per_run = write_report(plan.root, ReportOptions(clip_model=None))
    text = md.read_text()
    assert "1 of 2 runs finished, 1 failed" in text and "| sctd/a_red_apple_s0 | failed |" in text
    rows = per_run.read_text().splitlines()
    assert len(rows) == 3 and "failed" in rows[1] and "done" in rows[2]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_from_the_checkpoint_and_skips_finished_runs(tmp_path, monkeypatch):
    from training.trainer import Trainer

    argv = ["--prompts", str(write_prompts(tmp_path)), "--out", str(tmp_path / "sw"), "--poll", "0.05", *TINY_ANALYTIC]
    first, second = (tmp_path / "sw" / "sctd" / f"{slugify(p)}_s0" for p in PROMPTS)
    train_step = Trainer.train_step

    def killed_at_step_3(self, step, **kwargs):
        if self.cfg.guidance.text == PROMPTS[1] and step == 3:
            raise SystemExit(143)  # what SIGTERM becomes in a worker
        return train_step(self, step, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_3)
    with pytest.raises(SystemExit):
        sweep_main(argv)
    assert (first / DONE).is_file() and not (second / DONE).exists()
    assert torch.load(second / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    assert not list((tmp_path / "sw" / ".claims").rglob("*.json"))  # released on the way out
    monkeypatch.undo()
    done_before = (first / DONE).read_text()
    assert sweep_main(argv) == 0
    assert (first / DONE).read_text() == done_before  # skipped
    assert json.loads((second / DONE).read_text())["resumed_from_step"] == 2
    assert_same_result(second, _alone(tmp_path, second))
    assert "resumed from step 2" in (second / "train.log").read_text()
    assert (tmp_path / "sw" / "report.md").is_file() and (tmp_path / "sw" / "report.csv").is_file()
    (tmp_path / "sw" / "report.md").unlink()
    assert report_main([str(tmp_path / "sw"), "--clip-model", ""]) == 0
    assert "2 of 2 runs finished, 0 failed" in (tmp_path / "sw" / "report.md").read_text()
