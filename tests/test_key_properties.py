"""Each key's properties, declared once in utils/config/schema.py param(), hold: a sweep changing any one key
either rebuilds its prior or gets the same numbers from the prior it keeps; the lists of resumable keys,
prior keys and flags are the declarations; train.py --help-config prints them."""
import copy
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import train
import training.sweep.worker as sweep
from scene.camera_sampler import orbit_cameras
from tests.sweep_helpers import write_prompts
from training.sweep.claims import ClaimStore
from training.sweep.plan import SweepPlan
from training.sweep.worker import SweepWorker, WorkerEnv, prior_fingerprint
from training.trainer import build_prior
from utils.config import (
    RESUMABLE_KEYS,
    Config,
    ConfigError,
    build_arg_parser,
    cli_overrides,
    config_value,
    flag_keys,
    load_config,
    prior_keys,
    resumable_keys,
)
from utils.config.help import format_config_help, help_sections
from utils.config.schema import all_keys, field_choices, key_spec

REPO = Path(__file__).resolve().parents[1]
BASE = ["GuidanceParams.prior=analytic", "PipelineParams.device=cpu", "GenerateCamParams.image_w=16",
        "GenerateCamParams.image_h=16"]


def _numbers(low, high, default, is_int):
    """Candidate values near the default, inside [low, high] where given."""
    base = 1 if default is None else default
    out = [base + 1, base - 1, base * 2, base / 2, base + 0.5, base - 0.5, 16, 3]
    if low is not None and high is not None:
        out += [(low + high) / 2, low, high]
    if is_int:
        out = [int(v) for v in out if float(v).is_integer()]
    return [v for v in out if v != default]


def _candidates(key: str, default):
    """Values other than the default that the key's type and rules may accept, most likely first."""
    spec = key_spec(key)
    meta, tp = spec.meta, spec.type
    choices = field_choices(meta)
    if choices and isinstance(default, list):  # a list of choices (export_formats): add one more
        return [[*default, c] for c in choices if c not in default]
    if choices:
        return [c for c in choices if c != default]
    optional = typing.get_origin(tp) is typing.Union
    inner = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    if inner is bool:
        return [not default]
    if inner is str:
        return [f"{default or 'x'}_changed", "changed.ply"]
    low = meta["min"] if meta["min"] is not None else meta["gt"]
    if typing.get_origin(inner) is list:
        elem_int = typing.get_args(inner)[0] is int
        values = default if default is not None else [1.0] * (meta["length"] or 2)
        out = []
        for i in reversed(range(len(values))):
            for v in _numbers(low, meta["max"], values[i], elem_int):
                out.append([*values[:i], v, *values[i + 1:]])
        return out
    return _numbers(low, meta["max"], default, inner is int)


def _changed(base: Config, key: str) -> Config:
    """base with `key` set to a valid value other than its own (loading's rules decide what is valid)."""
    default = config_value(base, key)
    for value in _candidates(key, default):
        try:
            cfg = load_config(None, [*BASE, f"{key}={_yaml(value)}"], warn_no_effect=False)
        except ConfigError:
            continue
        if config_value(cfg, key) != default:
            return cfg
    raise AssertionError(f"no valid value other than {default!r} found for {key}: add a candidate in this test")


def _yaml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return SweepPlan.build(root / "sw", write_prompts(root), ["sctd"], [0], overrides=BASE)


@pytest.fixture(scope="module")
def base_prior():
    return build_prior(load_config(None, BASE, warn_no_effect=False), torch.device("cpu"))


def _prior_numbers(prior) -> list[torch.Tensor]:
    """What a loss reads from a prior (one small view, to stay fast): conditioning, noise predictions for
    every branch the losses use, encoder and decoder, noise schedule and timestep grid."""
    cams = orbit_cameras(torch.full((1,), 3.5), torch.full((1,), 80.0), torch.tensor([30.0]),
                         torch.full((1,), 0.55), 6, 6)
    cond = prior.condition(cams, torch.zeros(1, 3))
    images = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    z = prior.encode(images)
    eps = prior.predict_noise(z, torch.tensor([300]), cond, ("neg", "pos", "null"))
    grid = torch.tensor([prior.timestep_grid(i) for i in (0, 500, 999)])
    return [prior.alphas_cumprod, grid, z, prior.decode(z), eps]


def _build_inputs(cfg: Config) -> dict:
    """Every key, with its value, that building a prior from cfg reads."""
    reads: dict = {}
    build_prior(_Recorder(cfg, reads), torch.device("cpu"))
    return reads


def test_every_key_rebuilds_the_prior_or_keeps_its_numbers(plan, base_prior, monkeypatch):
    """Change each key alone, as a sweep's runs differ: the worker builds a new prior, or the prior it keeps
    (re-targeted with set_prompts) is the one a build with the changed config gives: the build reads the
    same values (a prior is a function of what it reads; test_a_built_prior_reads_only_prior_keys covers
    the reads after the build), and for the keys a sweep varies, the numbers are compared too."""
    monkeypatch.setattr(sweep, "select_device", lambda cfg, local_rank: torch.device("cpu"))
    base = load_config(None, BASE, warn_no_effect=False)
    base_inputs = _build_inputs(base)
    assert "GuidanceParams.analytic_scene" in base_inputs
    expected = _prior_numbers(base_prior)
    rebuilt, kept = [], []
    for key in all_keys():
        cfg = _changed(base, key)
        builds = []

        def make_prior(c, device, builds=builds):
            builds.append(c)
            return base_prior if len(builds) == 1 else object()  # a rebuild needs no real model here

        worker = SweepWorker(plan, ClaimStore(plan.root / ".claims", 60, 1), WorkerEnv(0, 1, 0, "a"), [],
                             make_prior=make_prior)
        worker.prior_for(base)
        worker.prior_for(cfg)
        if len(builds) == 2:
            rebuilt.append(key)
            continue
        kept.append(key)
        assert worker.prior is base_prior  # kept, re-targeted to cfg's prompts (a no-op for the analytic prior)
        assert _build_inputs(cfg) == base_inputs, f"{key} is declared prior-free, but the prior reads it"
        if key in SWEEP_VARIES:
            fresh = _prior_numbers(build_prior(cfg, torch.device("cpu")))
            for a, b in zip(expected, fresh):
                assert torch.equal(a, b), f"{key}: a prior built with it gives other numbers"
    assert set(rebuilt) == set(prior_keys())  # the fingerprint is exactly the keys not declared prior-free
    for key in ("GuidanceParams.analytic_scene", "GuidanceParams.model_key", "GuidanceParams.clip_skip",
                "PipelineParams.device", "GuidanceParams.precision"):
        assert key in rebuilt
    assert set(SWEEP_VARIES) <= set(kept)  # what a sweep varies between runs keeps the prior


SWEEP_VARIES = ("GuidanceParams.text", "GuidanceParams.negative", "GuidanceParams.guidance_type", "seed",
                "output_dir", "ModelParams.workspace", "GenerateCamParams.init_prompt")


class _Recorder:
    """A config (or section) that records every key read through it, with its value, in `reads`."""

    def __init__(self, target, reads: dict, section=None):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_section", section)

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if dataclasses.is_dataclass(value):
            section = next(f.metadata["section"] for f in dataclasses.fields(Config) if f.name == name)
            return _Recorder(value, self._reads, section)
        self._reads[f"{self._section}.{name}" if self._section else name] = copy.deepcopy(value)
        return value


@pytest.mark.parametrize("prior", ["analytic", "stable_diffusion"])
def test_a_built_prior_reads_only_prior_keys(prior, tiny_sd_dir):
    """Building a prior, re-targeting it and using it reads no key declared prior-free except the prompts,
    which set_prompts re-targets (a prior-free key read by a prior would let a sweep reuse a stale one)."""
    overrides = ([*BASE] if prior == "analytic" else
                 ["PipelineParams.device=cpu", "PipelineParams.compile=false",
                  f"GuidanceParams.model_key={tiny_sd_dir}", "GuidanceParams.precision=fp32"])
    reads: dict = {}
    cfg = _Recorder(load_config(None, overrides, warn_no_effect=False), reads)
    built = build_prior(cfg, torch.device("cpu"))
    built.set_prompts("a red apple", "blurry")
    cams = orbit_cameras(torch.full((2,), 3.5), torch.full((2,), 80.0), torch.tensor([0.0, 180.0]),
                         torch.full((2,), 0.55), 64, 64)
    cond = built.condition(cams, torch.zeros(2, 3))
    z = built.encode(torch.rand(2, 3, 64, 64))
    built.predict_noise(z, torch.tensor([300, 700]), cond, ("neg", "pos"))
    assert reads, "the recorder saw no read"
    stray = set(reads) - set(prior_keys()) - {"GuidanceParams.text", "GuidanceParams.negative"}
    assert not stray, f"{sorted(stray)} are read by the {prior} prior but declared prior-free"


def test_fingerprint_changes_with_a_prior_key_and_not_with_a_prompt():
    base = load_config(None, BASE, warn_no_effect=False)
    other = copy.deepcopy(base)
    other.guidance.text = "a different prompt"
    assert prior_fingerprint(other) == prior_fingerprint(base)
    other.guidance.analytic_std = 0.07
    assert prior_fingerprint(other) != prior_fingerprint(base)


def test_resume_and_flags_are_the_declarations():
    assert RESUMABLE_KEYS == resumable_keys()
    assert RESUMABLE_KEYS["OptimizationParams.iterations"].startswith("train further")
    assert "PipelineParams.compile" in RESUMABLE_KEYS and "GuidanceParams.guidance_scale" not in RESUMABLE_KEYS
    assert all(key_spec(key).meta["resumable"] for key in RESUMABLE_KEYS)
    flags = flag_keys()
    assert flags["guid_scale"] == "GuidanceParams.guidance_scale" and flags["output"] == "output_dir"
    args = build_arg_parser().parse_intermixed_args(["--guid_scale", "3", "--output", "runs", "--phase_num", "5"])
    assert sorted(cli_overrides(args)) == ["GuidanceParams.guidance_scale=3", "GuidanceParams.phase_num=5",
                                           "output_dir=runs"]


def test_help_config_prints_every_key_with_its_properties():
    text = format_config_help()
    for key in all_keys():
        section, _, name = key.rpartition(".")
        assert f"\n  {name} = " in text, key
    guidance = format_config_help("GuidanceParams")
    assert "ModelParams" not in guidance and "\n  guidance_type = \"sctd\"   (--guidance_type)" in guidance
    assert "one of cds, gcs, ism, sctd, sds" in guidance  # the names of the loss registry
    assert "two empty-prompt DDIM steps" in guidance  # t_threshold's meaning
    lines = guidance.splitlines()
    model_key = lines.index('  model_key = null')
    assert "a sweep rebuilds the prior" in lines[model_key + 2]
    optim = format_config_help("optimizationparams")
    assert "may change on resume: train further" in optim and "per-tensor clipping of the Gaussians' gradients" in optim
    assert "NO EFFECT: " in format_config_help("top-level").split("\n  port = ")[1].split("\n  ")[2]
    with pytest.raises(ConfigError, match="no section 'Guidance'; the sections are ModelParams"):
        format_config_help("Guidance")
    assert help_sections()[-1] == "top-level"


def test_train_help_config_exit_codes(capsys):
    with pytest.raises(SystemExit) as done:
        train.main(["--help-config", "PipelineParams"])
    out = capsys.readouterr()
    assert done.value.code == 0 and out.out.startswith("Configuration keys")
    assert "\n  renderer = \"auto\"" in out.out and "GuidanceParams:" not in out.out
    with pytest.raises(SystemExit) as bad:
        train.main(["--opt", "config/demo.yaml", "--help-config", "Nope"])
    out = capsys.readouterr()
    assert bad.value.code == 2 and not out.out
    assert "train.py: error: --help-config: no section 'Nope'; the sections are ModelParams, PipelineParams" in out.err


def test_help_config_from_the_shell():
    done = subprocess.run([sys.executable, "train.py", "--help-config", "nope"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "no section 'nope'" in done.stderr


def test_cuda_only_keys_set_away_from_their_defaults_are_listed():
    from utils.config import cuda_only_changes

    assert cuda_only_changes(load_config(None, [], warn_no_effect=False).pipeline) == []
    cfg = load_config(None, ["PipelineParams.compile_regions=true", "PipelineParams.cuda_graphs=false",
                             "PipelineParams.encode_chunk=2"], warn_no_effect=False)
    assert cuda_only_changes(cfg.pipeline) == ["PipelineParams.cuda_graphs=False",
                                               "PipelineParams.compile_regions=True"]  # encode_chunk acts on a CPU


def test_a_cpu_run_warns_about_each_cuda_only_key_it_was_given(tmp_path):
    from tests.test_train import TINY

    def cuda_only_warnings(name, *extra):  # from the run's train.log (train.py replaces the log handlers)
        out = tmp_path / name
        assert train.main(["--quiet", f"output_dir={out}", *TINY, "OptimizationParams.iterations=1",
                           "PipelineParams.device=cpu", "save_video=false", "export_mesh=false", *extra]) == 0
        log_text = next(out.glob("*/*/train.log")).read_text()
        return [line.split("training.run: ", 1)[1] for line in log_text.splitlines() if "CUDA only" in line]

    assert cuda_only_warnings("defaults") == []
    assert cuda_only_warnings("regions", "PipelineParams.compile_regions=true") == [
        "PipelineParams.compile_regions=True has no effect on a CPU run: the key acts on CUDA only"]
