"""The sweep's Table 1: report.md, report.csv (one row per loss) and runs.csv (one row per run).

    python -m training.sweep.report outputs/table1 --clip-model /models/clip-vit-large-patch14 \\
        --fid-reference outputs/fid_reference --fid-inception inception-2015-12-05.pt

Per loss, as in SegmentDreamer's Table 1: CLIP-L score (mean over 120 views around each asset, then
mean and standard deviation over the assets), ImageReward (the same views; when its package is
installed), FID of all the loss's views against the reference folder (evaluation/fid.py), minutes per
asset, peak GPU memory, and how many runs finished / failed. Runs with the analytic prior carry the
held-out PSNR against the hidden scene instead (their prompts mean nothing to CLIP). Works on a partial
sweep: unfinished runs are counted, not scored. Each asset's scores are cached in its run folder
(evaluation.json, fid_features.pt) for the settings they were computed with.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.sweep.markers import DONE, FAILED, read_marker
from utils.checkpoint_file import load_tensor_file
from utils.cli_errors import require_writable_folder, run_command
from utils.config import ConfigError
from utils.files import atomic_write_text

log = logging.getLogger(__name__)

RUN_COLUMNS = ("name", "loss", "prompt", "seed", "status", "minutes", "peak_gpu_gib", "psnr_heldout", "clip_l",
               "image_reward", "error", "log")
LOSS_COLUMNS = ("loss", "finished", "failed", "unfinished", "clip_l_mean", "clip_l_std", "image_reward_mean",
                "image_reward_std", "fid", "psnr_mean", "psnr_std", "minutes_per_asset", "peak_gpu_gib")


@dataclass
class ReportOptions:
    clip_model: str | None = "openai/clip-vit-large-patch14"
    views: int = 120
    resolution: int = 512
    image_reward: str | None = "ImageReward-v1.0"
    fid_reference: Path | None = None
    fid_inception: Path | None = None
    device: str = "auto"


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report")
    g.add_argument("--clip-model", default=ReportOptions.clip_model,
                   help="CLIPModel folder or cached hub id for CLIP-L (empty: skip)")
    g.add_argument("--views", type=int, default=120, help="views per asset (paper: 120)")
    g.add_argument("--eval-resolution", type=int, default=512, help="render size of the scored views")
    g.add_argument("--image-reward", default=ReportOptions.image_reward,
                   help="ImageReward model name or .pt path (empty: skip)")
    g.add_argument("--fid-reference", type=Path, help="folder of reference images (python -m evaluation.fid reference)")
    g.add_argument("--fid-inception", type=Path, help="inception-2015-12-05.pt (see evaluation/fid.py)")
    g.add_argument("--eval-device", default="auto", choices=("auto", "cpu", "cuda"))


def report_options(args: argparse.Namespace) -> ReportOptions:
    if args.views <= 0 or args.eval_resolution <= 0:
        raise ConfigError(f"--views and --eval-resolution must be positive, got {args.views}, {args.eval_resolution}")
    return ReportOptions(args.clip_model or None, args.views, args.eval_resolution, args.image_reward or None,
                         args.fid_reference, args.fid_inception, args.eval_device)


# ---------------------------------------------------------------------- scorers, loaded on first use


def _unavailable(reason: str):
    """A loader that fails with `reason` (recorded like a model that failed to load)."""
    def load():
        raise RuntimeError(reason)
    return load


@dataclass
class Scorers:
    """The evaluation models; one that cannot load is recorded in `notes` and its column stays empty."""

    options: ReportOptions
    device: torch.device
    notes: list[str] = field(default_factory=list)
    _loaded: dict = field(default_factory=dict)

    def _get(self, name: str, load):
        if name not in self._loaded:
            try:
                self._loaded[name] = load()
            except Exception as exc:  # noqa: BLE001 - a missing metric model must not stop the report
                self._loaded[name] = None
                self.notes.append(f"{name}: not computed: {exc}")
                log.warning("%s: not computed: %s", name, exc)
        return self._loaded[name]

    def clip(self):
        from evaluation.clip_score import CLIPScorer

        if not self.options.clip_model:
            return self._get("CLIP-L", _unavailable("no --clip-model given"))
        return self._get("CLIP-L", lambda: CLIPScorer.from_pretrained(self.options.clip_model, self.device))

    def image_reward(self):
        from evaluation.image_reward import ImageRewardScorer

        if not self.options.image_reward:
            return self._get("ImageReward", _unavailable("no --image-reward given"))
        return self._get("ImageReward", lambda: ImageRewardScorer.from_pretrained(self.options.image_reward,
                                                                                  self.device))

    def inception(self):
        from evaluation.fid import InceptionFeatures

        if self.options.fid_reference is None or self.options.fid_inception is None:
            return self._get("FID", _unavailable("pass --fid-reference and --fid-inception (see evaluation/fid.py)"))
        return self._get("FID", lambda: InceptionFeatures(self.options.fid_inception, self.device))


def _settings(options: ReportOptions) -> dict:
    return {"clip_model": options.clip_model, "views": options.views, "resolution": options.resolution,
            "image_reward": options.image_reward, "fid_inception": str(options.fid_inception)}


def score_asset(run_dir: Path, cfg, done: dict, scorers: Scorers) -> dict:
    """CLIP-L and ImageReward means over the views of one finished asset, and its FID features (cached)."""
    from evaluation.clip_score import asset_ply, render_ring
    from evaluation.fid import resize_for_inception

    options = scorers.options
    cache_path, features_path = run_dir / "evaluation.json", run_dir / "fid_features.pt"
    clip, reward, inception = scorers.clip(), scorers.image_reward(), scorers.inception()
    wanted = {name for name, scorer in (("clip_l", clip), ("image_reward", reward)) if scorer is not None}
    cached = read_marker(run_dir, "evaluation.json")
    key = {**_settings(options), "finished": done.get("finished")}
    if (cached and cached.get("settings") == key and wanted <= set(cached["scores"])
            and (inception is None or features_path.is_file())):
        return cached["scores"]
    images = render_ring(asset_ply(run_dir), cfg.camera, options.views, options.resolution, scorers.device)
    scores = {}
    if clip is not None:
        scores["clip_l"] = clip.score(images, cfg.guidance.text).mean().item()
    if reward is not None:
        scores["image_reward"] = reward.score(images, cfg.guidance.text).mean().item()
    if inception is not None:
        torch.save(inception(resize_for_inception(images)), features_path)
    atomic_write_text(cache_path, json.dumps({"settings": key, "scores": scores}, indent=2) + "\n")
    return scores


# ---------------------------------------------------------------------- rows


def run_status(run_dir: Path, claims: Path, name: str) -> str:
    if (run_dir / DONE).is_file():
        return "done"
    if (run_dir / FAILED).is_file():
        return "failed"
    if (claims / f"{name}.json").is_file():
        return "running"
    return "partial" if (run_dir / "checkpoints" / "last.pt").is_file() else "pending"


def run_rows(root: Path, scorers: Scorers) -> list[dict]:
    from training.sweep.plan import read_manifest
    from utils.config import load_config

    rows = []
    for entry in read_manifest(root)["runs"]:
        run_dir = root / entry["name"]
        row = {c: None for c in RUN_COLUMNS}
        row.update(name=entry["name"], loss=entry["loss"], prompt=entry["prompt"], seed=entry["seed"],
                   status=run_status(run_dir, root / ".claims", entry["name"]))
        if row["status"] == "failed":
            failed = read_marker(run_dir, FAILED) or {}
            row["log"] = failed.get("log")
            row["error"] = failed.get("error")
        if row["status"] == "done":
            done = read_marker(run_dir, DONE)
            cfg = load_config(run_dir / "config.yaml", warn_no_effect=False)
            row.update(minutes=done["minutes_per_asset"], peak_gpu_gib=done.get("peak_gpu_memory_gib"))
            if cfg.guidance.prior == "analytic":
                row["psnr_heldout"] = done["final"].get("psnr_heldout")
            else:
                row.update(score_asset(run_dir, cfg, done, scorers))
        rows.append(row)
    return rows


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def loss_fid(root: Path, rows: list[dict], scorers: Scorers) -> float | None:
    """FID of every view of the loss's finished assets against the reference folder."""
    from evaluation.fid import feature_statistics, frechet_distance, reference_features

    files = [root / r["name"] / "fid_features.pt" for r in rows if r["status"] == "done"]
    files = [f for f in files if f.is_file()]
    if not files or scorers.inception() is None:
        return None
    reference = reference_features(scorers.options.fid_reference, scorers.inception(), root / "fid_reference.pt")
    features = torch.cat([load_tensor_file(f, "FID features") for f in files])  # weights only: shared folders
    return frechet_distance(*feature_statistics(features), *feature_statistics(reference))


def loss_rows(root: Path, rows: list[dict], scorers: Scorers) -> list[dict]:
    out = []
    for loss in dict.fromkeys(r["loss"] for r in rows):
        mine = [r for r in rows if r["loss"] == loss]
        done = [r for r in mine if r["status"] == "done"]
        clip, reward, psnr = (_mean_std([r[k] for r in done]) for k in ("clip_l", "image_reward", "psnr_heldout"))
        minutes, _ = _mean_std([r["minutes"] for r in done])
        memory = [r["peak_gpu_gib"] for r in done if r["peak_gpu_gib"] is not None]
        sd_done = [r for r in done if r["psnr_heldout"] is None]
        out.append({
            "loss": loss, "finished": len(done), "failed": sum(r["status"] == "failed" for r in mine),
            "unfinished": sum(r["status"] not in ("done", "failed") for r in mine),
            "clip_l_mean": clip[0], "clip_l_std": clip[1], "image_reward_mean": reward[0],
            "image_reward_std": reward[1], "fid": loss_fid(root, sd_done, scorers) if sd_done else None,
            "psnr_mean": psnr[0], "psnr_std": psnr[1], "minutes_per_asset": minutes,
            "peak_gpu_gib": max(memory) if memory else None,
        })
    return out


# ---------------------------------------------------------------------- writing


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pm(mean, std) -> str:
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


def markdown(root: Path, losses: list[dict], rows: list[dict], notes: list[str]) -> str:
    lines = [f"# Sweep report: {root}", "",
             f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} runs finished, "
             f"{sum(r['status'] == 'failed' for r in rows)} failed.", "",
             "| loss | CLIP-L ↑ | ImageReward ↑ | FID ↓ | held-out PSNR ↑ | min / asset | peak GPU GiB "
             "| finished | failed | unfinished |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in losses:
        lines.append(f"| {r['loss']} | {_pm(r['clip_l_mean'], r['clip_l_std'])} | "
                     f"{_pm(r['image_reward_mean'], r['image_reward_std'])} | {_fmt(r['fid'])} | "
                     f"{_pm(r['psnr_mean'], r['psnr_std'])} | {_fmt(r['minutes_per_asset'])} | "
                     f"{_fmt(r['peak_gpu_gib'])} | {r['finished']} | {r['failed']} | {r['unfinished']} |")
    lines += ["", "CLIP-L and ImageReward: mean over the views of each asset, then mean ± standard deviation over "
              "the assets. FID: all views of the loss's assets against the reference images. Held-out PSNR: "
              "analytic-prior runs, against the hidden scene (dB). Minutes per asset: wall time of the run in "
              "its worker (a resumed run: its last part, scaled to all iterations)."]
    if notes:
        lines += ["", "## Not computed", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {r['name']}: {r.get('error')} (log: {r['log']})" for r in failed]
    lines += ["", "## Runs", "", "| run | status | min | CLIP-L | ImageReward | PSNR |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {_fmt(r['minutes'])} | {_fmt(r['clip_l'])} | "
              f"{_fmt(r['image_reward'])} | {_fmt(r['psnr_heldout'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, columns: tuple, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())  # never a half-written table (full disk)


def write_report(root: str | Path, options: ReportOptions | None = None) -> tuple[Path, Path, Path]:
    """Evaluate what is finished and write root/report.md, root/report.csv (per loss), root/runs.csv."""
    from utils.devices import resolve_device

    root, options = Path(root), options or ReportOptions()
    scorers = Scorers(options, resolve_device(options.device))
    rows = run_rows(root, scorers)
    losses = loss_rows(root, rows, scorers)
    md, per_loss, per_run = root / "report.md", root / "report.csv", root / "runs.csv"
    atomic_write_text(md, markdown(root, losses, rows, scorers.notes))
    _write_csv(per_loss, LOSS_COLUMNS, losses)
    _write_csv(per_run, RUN_COLUMNS, rows)
    return md, per_loss, per_run


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.sweep.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="a sweep folder (python -m training.sweep --out)")
    add_report_arguments(p)
    args = p.parse_args(argv)

    def report() -> int:
        from training.sweep.plan import read_manifest

        read_manifest(args.sweep)  # a sweep folder, before any model loads
        require_writable_folder("sweep folder", args.sweep)
        paths = write_report(args.sweep, report_options(args))
        print(f"report: {paths[0].resolve()}")
        return 0

    return run_command(report, log)


if __name__ == "__main__":
    sys.exit(main())
