"""The paper's experiment as one command: prompts x losses x seeds, one model load per worker, many workers.

    python -m training.sweep --opt config/bagel.yaml --prompts config/paper_prompts.txt \\
        --losses sctd,ism,sds,cds,gcs --seeds 0 --out outputs/table1 GuidanceParams.model_key=/models/sd21base
    torchrun --standalone --nproc_per_node=8 -m training.sweep ...same arguments...     # one worker per GPU
    python -m training.sweep --report-only --out outputs/table1 ...same arguments...    # report of a partial sweep

Each (prompt, loss, seed) is an ordinary run folder, <out>/<loss>/<prompt-slug>_s<seed>, exactly as
train.py writes it (plus done.json, written last, or failed.json). A worker builds the prior once and
trains its runs back to back, only re-targeting the prompt embeddings between runs
(DiffusionPrior.set_prompts); a run gives the same result as the same run started alone.

Workers are started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK; one GPU per local rank) or by hand, on
one host or many sharing the folder. They need no process group and no coordinator: each takes the
next run it can claim (training/sweep/claims.py), skips finished runs, resumes half-finished ones from
checkpoints/last.pt, and waits for runs that live workers hold (taking them over if their owner dies).
A failed run is recorded (failed.json, with its log) and never stops the sweep; a later launch retries
it. Workers exit 0 even when runs failed, because torchrun stops every worker as soon as one exits
non-zero: the failures are in the log and the report. Rank 0 shows the overall bar and writes the
report (training/sweep/report.py) when every run has finished or failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from training.stop import TrainingInterrupted
from training.sweep.claims import Claim, ClaimStore, Heartbeat
from training.sweep.markers import failed_in, is_done, mark_done, mark_failed
from training.sweep.plan import SweepPlan, SweepRun, loss_names
from utils.config import Config, ConfigError, config_value, load_config, prior_keys

log = logging.getLogger("training.sweep")

CHECKPOINT = "checkpoints/last.pt"


@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    launch: str  # the same for every worker of one launch; a later launch retries failed runs


def worker_env(environ: dict | None = None) -> WorkerEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (one worker when absent). The launch id is
    torchrun's rendezvous id (a fresh uuid with --standalone; pass --rdzv-id=$SLURM_JOB_ID across nodes),
    else the SLURM job, else the torchrun agent's pid on this host, else a fresh id for a lone worker."""
    env = os.environ if environ is None else environ
    rank, world, local = (int(env.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        launch = f"{run_id}-r{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    elif env.get("SLURM_JOB_ID"):
        launch = f"slurm{env['SLURM_JOB_ID']}"
    elif "TORCHELASTIC_RUN_ID" in env:
        launch = f"{socket.gethostname()}-agent{os.getppid()}"
    else:
        launch = uuid.uuid4().hex
    return WorkerEnv(rank, world, local, launch)


def prior_fingerprint(cfg: Config) -> str:
    """Two configs with equal fingerprints can share one built prior (after set_prompts): the values of
    every key not declared prior-free in the schema (utils/config/schema.py prior_keys)."""
    return json.dumps({key: config_value(cfg, key) for key in prior_keys()}, sort_keys=True)


def select_device(cfg: Config, local_rank: int) -> torch.device:
    """One GPU per local rank (CUDA), else the CPU."""
    from utils.devices import resolve_device

    device = resolve_device(cfg.pipeline.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return device


class TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


@contextmanager
def sweep_logging(root: Path, env: WorkerEnv) -> Iterator[Path]:
    """The sweep's own logger (console + <sweep>/logs/<host>-rank<k>.log), independent of the root
    logger that each run re-points at its train.log; yields the log file. On exit the logger is as it was
    (handlers, level, propagation) and the file is closed, so a sweep called in-process leaves no trace."""
    log_file = root / "logs" / f"{socket.gethostname()}-rank{env.rank}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    claims_log = logging.getLogger("training.sweep.claims")
    saved = (list(log.handlers), log.level, log.propagate)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    console = TqdmHandler()
    console.setFormatter(logging.Formatter(f"[sweep rank {env.rank}] %(message)s"))
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for handler in (console, file_handler):
        log.addHandler(handler)
    claims_log.addHandler(file_handler)
    try:
        yield log_file
    finally:
        claims_log.removeHandler(file_handler)
        file_handler.close()
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]


class SweepProgress:
    """Rank 0's overall bar: counts done markers in the shared folder (every worker's runs), refreshed
    from a thread so that the ETA moves while this worker is inside a long run."""

    def __init__(self, plan: SweepPlan, enabled: bool, refresh_s: float = 10.0):
        self.plan, self.refresh_s = plan, refresh_s
        self.bar = tqdm(total=len(plan.runs), initial=self.count(), desc="sweep", unit="run", disable=not enabled,
                        dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweep progress", daemon=True)
        if enabled:
            self._thread.start()

    def count(self) -> int:
        return sum(is_done(self.plan.folder(r)) for r in self.plan.runs)

    def refresh(self) -> None:
        done = self.count()
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        self.refresh()
        self.bar.close()


@dataclass
class RunResult:
    run: SweepRun
    ok: bool
    seconds: float


class SweepWorker:
    """Trains the plan's runs that it can claim, back to back, with one prior."""

    def __init__(self, plan: SweepPlan, store: ClaimStore, env: WorkerEnv, argv: list[str],
                 make_prior: Callable | None = None, poll_s: float = 5.0, log_file: Path | None = None):
        from training.trainer import build_prior

        self.plan, self.store, self.env, self.argv, self.poll_s = plan, store, env, argv, poll_s
        self.log_file = log_file  # this worker's log: where a failure before the run's train.log is told
        self.make_prior = make_prior or build_prior
        self.prior, self.prior_key = None, None
        self.model_load_seconds = 0.0
        self.results: list[RunResult] = []

    # ------------------------------------------------------------------ which run next

    def terminal(self, run: SweepRun) -> bool:
        folder = self.plan.folder(run)
        return is_done(folder) or failed_in(folder, self.env.launch)

    def order(self, pending: list[SweepRun]) -> list[SweepRun]:
        """Each rank starts at its own share of the list, so that workers rarely race for one claim."""
        start = len(pending) * self.env.rank // self.env.world_size
        return pending[start:] + pending[:start]

    def pending(self) -> list[SweepRun]:
        return [r for r in self.plan.runs if not self.terminal(r)]

    def claim_next(self, pending: list[SweepRun]) -> tuple[SweepRun, Claim] | None:
        """The first pending run this worker can claim (None: live workers hold them all)."""
        for run in self.order(pending):
            claim = self.store.try_claim(run.name)
            if claim is None:
                continue
            if self.terminal(run):  # finished between the scan and the claim
                self.store.release(claim)
                continue
            return run, claim
        return None

    def run_all(self, progress: SweepProgress | None = None) -> list[RunResult]:
        """Until every run is done (or failed in this launch): claim, train, release; wait while live
        workers hold the remaining runs, to take them over should their owners die."""
        while pending := self.pending():
            claimed = self.claim_next(pending)
            if claimed is None:
                time.sleep(self.poll_s)
                continue
            run, claim = claimed
            try:
                with Heartbeat(self.store, claim):
                    self.results.append(self.execute(run))
            finally:
                self.store.release(claim)
            if progress is not None:
                progress.refresh()
        return self.results

    # ------------------------------------------------------------------ one run

    def prior_for(self, cfg: Config):
        """The loaded prior re-targeted to cfg's prompts; built (once) on first use or when a key it
        depends on changes."""
        key = prior_fingerprint(cfg)
        if key != self.prior_key:
            self.prior = None  # free the old model first
            t0 = time.perf_counter()
            self.prior = self.make_prior(cfg, select_device(cfg, self.env.local_rank))
            self.prior_key = key
            self.model_load_seconds += time.perf_counter() - t0
            log.info("prior built in %.1f s", time.perf_counter() - t0)
        else:
            self.prior.set_prompts(cfg.guidance.text, cfg.guidance.negative)
        return self.prior

    def execute(self, run: SweepRun) -> RunResult:
        """Train one claimed run (fresh, or resumed from its checkpoint); a failure is recorded, not raised."""
        folder = self.plan.folder(run)
        t0 = time.perf_counter()
        try:
            record = self._train(run, folder)
        except TrainingInterrupted as exc:
            # SIGTERM or Ctrl-C during the run (torchrun stopping the group, a time limit): the run saved its
            # checkpoint; the worker stops too instead of taking the next claim (a relaunch resumes it)
            log.warning("%s: %s; the worker stops", run.name, exc)
            raise SystemExit(143 if exc.signal_name == "SIGTERM" else 130) from None
        except Exception as exc:  # noqa: BLE001 - one failed run never stops the sweep
            seconds = time.perf_counter() - t0
            log_path = folder / "train.log"
            # a user error (a damaged checkpoint or config in the run folder) is its message; a bug its traceback
            from utils.cli_errors import user_errors

            detail = str(exc) if isinstance(exc, user_errors()) else traceback.format_exc()
            if log_path.is_file():  # into the run's own log (the root logger points at it)
                logging.getLogger("training.run").error("run failed:\n%s", detail)
            else:
                log_path = self.log_file
                log.error("%s failed:\n%s", run.name, detail)
            mark_failed(folder, {"name": run.name, "error": f"{type(exc).__name__}: {exc}",
                                 "log": None if log_path is None else str(log_path),
                                 "launch": self.env.launch, "host": socket.gethostname(), "rank": self.env.rank,
                                 "seconds": seconds})
            log.error("FAILED %s after %.1f s: %s: %s (log: %s)", run.name, seconds, type(exc).__name__, exc, log_path)
            return RunResult(run, False, seconds)
        finally:
            from utils.monitor import setup_logging

            setup_logging(None, quiet=True)  # detach the run's train.log
        log.info("done %s in %.1f min (%s)", run.name, record["wall_seconds"] / 60,
                 f"resumed from step {record['resumed_from_step']}" if record["resumed_from_step"] else "fresh")
        return RunResult(run, True, record["wall_seconds"])

    def _train(self, run: SweepRun, folder: Path) -> dict:
        from training.run import train
        from utils.checkpoint_file import load_checkpoint

        resume = (folder / CHECKPOINT).is_file()
        if resume:
            cfg = load_config(folder / "config.yaml", warn_no_effect=False)
            start_step = int(load_checkpoint(folder / CHECKPOINT)["step"])  # weights only: a shared folder runs no code
        else:
            if folder.exists():  # started but killed before its first checkpoint: start again
                shutil.rmtree(folder)
            cfg, start_step = self.plan.config(run), 0
        prior = self.prior_for(cfg)
        cuda = torch.cuda.is_available() and getattr(prior, "device", torch.device("cpu")).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        outputs = train(cfg, None, ["-m", "training.sweep", *self.argv], resume=str(folder) if resume else None,
                        quiet=True, prior=prior, run_dir=None if resume else folder)
        wall = time.perf_counter() - t0
        record = {
            "name": run.name, "loss": run.loss, "prompt": cfg.guidance.text, "seed": cfg.seed,
            "iterations": cfg.optim.iterations, "resumed_from_step": start_step,
            "wall_seconds": wall, "train_seconds": outputs.metrics.get("train_seconds"),
            "minutes_per_asset": wall / 60 * cfg.optim.iterations / max(cfg.optim.iterations - start_step, 1),
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "final": outputs.metrics.get("final", {}), "launch": self.env.launch,
            "host": socket.gethostname(), "rank": self.env.rank, "finished": time.time(),
        }
        mark_done(folder, record)
        return record


# ---------------------------------------------------------------------- command line


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="prompt list: text (one per line) or YAML")
    p.add_argument("--out", required=True, type=Path, help="the sweep folder (shared by every worker)")
    p.add_argument("--opt", help="base YAML config (e.g. config/bagel.yaml)")
    p.add_argument("--overlay", action="append", default=[], help="partial YAML applied after --opt (repeatable)")
    p.add_argument("--losses", type=comma_list, default=["sctd"],
                   help=f"comma-separated losses among {','.join(loss_names())} (default sctd)")
    p.add_argument("--seeds", type=lambda text: [int(s) for s in comma_list(text)], default=[0],
                   help="comma-separated seeds (default 0)")
    p.add_argument("overrides", nargs="*", metavar="Section.key=value", help="overrides of the base config")
    p.add_argument("--stale-after", type=float, default=600.0,
                   help="seconds without a heartbeat after which another host may take a run over (default 600)")
    p.add_argument("--heartbeat", type=float, default=30.0, help="seconds between claim heartbeats (default 30)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks while others hold the rest")
    p.add_argument("--report-only", action="store_true", help="write the report of what is there now, train nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    from training.sweep.report import add_report_arguments

    add_report_arguments(p)
    return p.parse_intermixed_args(argv)


def preflight(cfg: Config) -> None:
    """The model must be there before any worker creates a folder (the check train.py makes)."""
    if cfg.guidance.prior == "stable_diffusion":
        from guidance.stable_diffusion import check_model_available

        g = cfg.guidance
        check_model_available(g.model_key, g.is_safe_tensor, g.base_model_key)


def raise_system_exit(signum, frame) -> None:
    """SIGTERM (torchrun stopping the group, SLURM's time limit) unwinds the stack, so claims are released
    and the interrupted run resumes from its last checkpoint in the next launch."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from utils.cli_errors import run_command

    return run_command(lambda: run_sweep(args, argv), logging.getLogger("training.sweep"))


def run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    """The sweep of main(): every user error (config, prompts, --out, model) is found before any folder."""
    from training.sweep.report import report_options, write_report
    from utils.cli_errors import require_writable_folder

    try:
        env = worker_env()
    except ValueError as exc:  # the launcher's environment: RANK / WORLD_SIZE / LOCAL_RANK
        raise ConfigError(str(exc)) from None
    require_writable_folder("--out", args.out)
    plan = SweepPlan.build(args.out, args.prompts, args.losses, args.seeds, args.opt, args.overrides, args.overlay)
    if not args.report_only:
        preflight(plan.base)
    if args.report_only:
        paths = write_report(plan.root, report_options(args))
        print(f"report: {paths[0].resolve()}")
        return 0
    plan.write_manifest()
    with sweep_logging(plan.root, env) as log_file:
        signal.signal(signal.SIGTERM, raise_system_exit)
        store = ClaimStore(plan.root / ".claims", args.stale_after, args.heartbeat,
                           owner={"rank": env.rank, "launch": env.launch})
        log.info("%d runs (%d prompts x %d losses x %d seeds) in %s; worker %d of %d, launch %s", len(plan.runs),
                 len(plan.runs) // len(plan.source["losses"]) // len(plan.source["seeds"]), len(plan.source["losses"]),
                 len(plan.source["seeds"]), plan.root, env.rank, env.world_size, env.launch)
        progress = SweepProgress(plan, enabled=env.rank == 0)
        worker = SweepWorker(plan, store, env, argv, poll_s=args.poll, log_file=log_file)
        try:
            results = worker.run_all(progress)
        finally:
            progress.close()
        failed = [r for r in results if not r.ok]
        log.info("this worker: %d runs finished, %d failed, prior built in %.1f s", len(results) - len(failed),
                 len(failed), worker.model_load_seconds)
        if env.rank == 0 and not args.no_report:
            worker.prior = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            paths = write_report(plan.root, report_options(args))
            log.info("report: %s", paths[0].resolve())
        return 0


if __name__ == "__main__":
    sys.exit(main())
