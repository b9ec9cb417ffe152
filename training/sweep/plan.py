"""What a sweep trains: a prompt list x losses x seeds on one base config, and where each run lives.

Every (prompt, loss, seed) is an ordinary run folder, at a name a person can find:

    <sweep>/<loss>/<prompt-slug>_s<seed>          e.g. outputs/table1/sctd/a_ripe_strawberry_s0

The plan is pure (no model, no file written): it loads and validates every run's config up front, so
that a typo in an override or an empty prompt fails before any worker loads a model.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from utils.config import Config, ConfigError, config_to_dict, load_config, validate_config
from utils.prompts import Prompt, load_prompts, slugify, unique_slugs  # noqa: F401 (the sweep's prompt lists)


def loss_names() -> tuple[str, ...]:
    """The losses a sweep can train: every name in the loss registry (guidance/losses/registry.py)."""
    from guidance.losses import LOSSES

    return tuple(LOSSES)


@dataclass(frozen=True)
class SweepRun:
    loss: str
    prompt: Prompt
    seed: int
    slug: str

    @property
    def name(self) -> str:
        """<loss>/<slug>_s<seed>: the run folder relative to the sweep folder (and the claim's name)."""
        return f"{self.loss}/{self.slug}_s{self.seed}"


@dataclass
class SweepPlan:
    root: Path
    base: Config  # base config with the sweep's overlays and overrides applied
    runs: list[SweepRun]
    source: dict  # what the plan was made from (written to sweep.json)

    @classmethod
    def build(cls, root: str | Path, prompts_path: str | Path, losses: Sequence[str], seeds: Sequence[int],
              opt: str | None = None, overrides: Sequence[str] = (), overlays: Sequence[str] = ()) -> "SweepPlan":
        known = loss_names()
        unknown = [loss for loss in losses if loss not in known]
        if unknown or not losses:
            raise ConfigError(f"--losses must name some of {list(known)}, got {list(losses)}")
        if not seeds or any(s < 0 for s in seeds):
            raise ConfigError(f"--seeds must be non-negative integers, got {list(seeds)}")
        base = load_config(opt, list(overrides), overlays=list(overlays))
        prompts = load_prompts(prompts_path)
        runs = [SweepRun(loss, p, int(seed), slug)
                for loss in dict.fromkeys(losses) for p, slug in zip(prompts, unique_slugs(prompts))
                for seed in dict.fromkeys(seeds)]
        source = {"opt": opt, "overlays": list(overlays), "overrides": list(overrides),
                  "prompts": str(prompts_path), "losses": list(dict.fromkeys(losses)),
                  "seeds": [int(s) for s in dict.fromkeys(seeds)]}
        plan = cls(Path(root), base, runs, source)
        for run in runs:  # every run's config is valid before any work starts
            plan.config(run)
        return plan

    def folder(self, run: SweepRun) -> Path:
        return self.root / run.name

    def config(self, run: SweepRun) -> Config:
        """The base config with this run's prompt, loss and seed; output_dir/workspace point at its folder.
        A text-conditioned initialisation (Point-E) gets the run's prompt too: the base config's
        init_prompt names the base config's object."""
        cfg = copy.deepcopy(self.base)
        cfg.guidance.text = run.prompt.text
        if cfg.camera.init_shape in ("pointe", "shapee"):
            cfg.camera.init_prompt = run.prompt.text
        if run.prompt.negative is not None:
            cfg.guidance.negative = run.prompt.negative
        cfg.guidance.guidance_type = run.loss
        cfg.seed = run.seed
        cfg.output_dir = str(self.root)
        cfg.model.workspace = run.loss
        return validate_config(cfg)

    def manifest(self) -> dict:
        """sweep.json: the sources, the resolved base config and every run (name, prompt, loss, seed)."""
        return {"source": self.source, "base_config": config_to_dict(self.base),
                "runs": [{"name": r.name, "loss": r.loss, "prompt": r.prompt.text, "negative": r.prompt.negative,
                          "seed": r.seed} for r in self.runs]}

    def write_manifest(self) -> Path:
        """Write (or check) <sweep>/sweep.json: a second launch of the same sweep must plan the same runs."""
        from utils.files import atomic_write_text

        path = self.root / "sweep.json"
        text = json.dumps(self.manifest(), indent=2) + "\n"
        if path.is_file() and read_manifest(self.root) != json.loads(text):
            raise ConfigError(f"{path} describes another sweep (other prompts, losses, seeds or config); "
                              "use another sweep folder, or delete sweep.json to redefine this one")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        return path


def read_manifest(root: str | Path) -> dict:
    """<sweep>/sweep.json; InputError naming the folder or file when it is not a sweep folder's."""
    from utils.cli_errors import InputError, require_folder

    root = require_folder("sweep folder", Path(root), "pass the --out folder of python -m training.sweep")
    path = root / "sweep.json"
    if not path.is_file():
        raise InputError(f"{path} not found: {root} is not a sweep folder written by python -m training.sweep")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{path} is damaged ({type(exc).__name__}: {exc}); relaunch the sweep with its arguments "
                         "to write it again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        raise InputError(f"{path} is not a sweep manifest (no list of runs); relaunch the sweep with its arguments "
                         "to write it again")
    return manifest
