"""Model load of `train.py`, part by part: where the seconds before the first render go (issue 20).

What a run does from its parsed command line to train.py's "model_loaded" milestone (its imports, then
training/run.py's pre-flight, run metadata and `_build`'s Trainer), on the full-size SD 2.1-base
architecture with random weights saved as an fp16 diffusers folder (the real model's bytes; built once,
like bench/time_to_asset.py), each repeat in a fresh process so that imports count as in a run; on a GPU
gsplat's background build starts first, as train() starts it. Stages:

    train imports   the training code train.py imports (training.run, ...; torch is in already)
    import          guidance.stable_diffusion (diffusers, transformers)
    check           the pre-flight checks (the model folder's configs and safetensors headers, ...)
    run metadata    environment.json (git; on a GPU its name, which creates the CUDA context)
    unet, vae, text encoder, tokenizer, scheduler
                    each component's from_pretrained
    to device       the frozen networks moved to the device in the model dtype (host -> device on a GPU)
    prompts         the text embeddings (5 prompts through the text encoder)
    fast path       PipelineParams' options (torch.compile wrappers, the text encoder leaving the GPU)
    Gaussians       the initial point cloud's kNN scales and the optimizer
    Trainer, other parts   the rest of Trainer(): loss, camera sampler, initial points, densification
    total           the whole window, as a run pays it
    gsplat build    on a GPU: from its start to its end in the background thread (beside the stages above,
                    which it slows where it competes for the CPU); not part of the total

Two paths side by side: "before", as train.py ran until this change (`load_components` reading the text
encoder in its file's dtype and casting it after; nothing read ahead), and "after", the repository's code
(train.py starts guidance/model_folder.py's read-ahead of the weight files right after parsing its command
line, so the disk reads overlap the imports). Both give the same bits (tests/test_model_loading.py).
--cold drops the weight files from the page cache before each process (a model's first read: a new machine,
a fresh download, a cache evicted since); without it they stay cached, as for a run right after another.

    python bench/model_load.py --out bench/results/model_load_cpu.md        # CPU (fp32, as a CPU run)
    python bench/model_load.py --cold                                         # weights read from disk
    python bench/model_load.py --device cuda --repeats 3                      # on a GPU (fp16)
    python bench/model_load.py --tiny --repeats 1                             # smoke test of the script

Medians over --repeats processes per path (interleaved); seconds. A CPU run casts the fp16 file to fp32,
and has no host -> device copies: the GPU's split differs (to device, prompts and fast path move weights).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("before", "after")
STAGES = ("train imports", "import", "check", "run metadata", "unet", "vae", "text encoder", "tokenizer", "scheduler",
          "to device", "prompts", "fast path", "Gaussians", "Trainer, other parts")
GSPLAT = "gsplat build, in the background (not in the total)"
LOADERS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text encoder": "CLIPTextModel",
           "tokenizer": "CLIPTokenizer", "scheduler": "DDIMScheduler"}


class StageClock:
    """Seconds per stage; a stage entered again (several calls) adds up. Nested stages count in both."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Time every call of owner.attribute (a function or a classmethod, maybe inherited) as stage `name`."""
        original = inspect.getattr_static(owner, attribute)
        is_classmethod = isinstance(original, classmethod)
        func = original.__func__ if is_classmethod else original

        def timed(*args, **kwargs):
            with self.stage(name):
                return func(*args, **kwargs)

        setattr(owner, attribute, classmethod(timed) if is_classmethod else timed)


class BuildTime(logging.Handler):
    """The seconds gsplat's background build reports when it is ready (gaussian_renderer/gsplat_backend.py)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("gsplat's CUDA extension ready") and record.args:
            self.seconds = float(record.args[0])


def legacy_components(model_key: str, is_safe_tensor: bool = False, base_model_key: str | None = None,
                      dtype=None):
    """`load_components` as train.py ran it before this change, for a local folder: the folder checked a
    second time, every component read onto the CPU, the text encoder in its file's dtype and then cast."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from guidance.stable_diffusion import SDComponents, _locate

    _locate("model_key", model_key)
    unet = UNet2DConditionModel.from_pretrained(model_key, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(model_key, subfolder="vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(model_key, subfolder="text_encoder").to(dtype)
    tokenizer = CLIPTokenizer.from_pretrained(model_key, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(model_key, subfolder="scheduler")
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler)


def measure(path: str, model_key: str, device: str, overrides: list[str], tiny: bool) -> dict[str, float]:
    """One process's stage seconds for `path` ("before" or "after"): train.py's steps from its parsed config
    to the "model_loaded" milestone (its other imports, training/run.py's pre-flight, run metadata and
    _build's Trainer), with gsplat's background build started first on a GPU, as train() starts it."""
    from utils.config import load_config  # parsing the config imports torch (the losses' names)

    base = [f"GuidanceParams.model_key={model_key}", "GenerateCamParams.init_shape=sphere",
            f"PipelineParams.device={device.split(':')[0]}"]
    if tiny:
        base += ["GenerateCamParams.init_num_pts=1000"]
    cfg = load_config(str(REPO / "config" / "bagel.yaml"), base + overrides, warn_no_effect=False)
    clock = StageClock(device)
    t0 = time.perf_counter()
    if path == "after":  # as train.py, right after parsing its command line
        from guidance.model_folder import read_ahead, weight_files

        read_ahead(weight_files(cfg.guidance.model_key, cfg.guidance.is_safe_tensor))
    with clock.stage("train imports"):
        import torch

        from scene.gaussian_model import GaussianModel
        from training import run_dir as run_files
        from training.preflight import preflight
        from training.run import uses_gsplat
        from training.trainer import Trainer
        from utils.seeding import seed_everything
    with clock.stage("import"):
        from guidance import stable_diffusion as sd
    import diffusers
    import transformers

    if uses_gsplat(cfg):
        from gaussian_renderer.gsplat_backend import build_gsplat_in_background

        gsplat_seconds = BuildTime()
        gsplat_log = logging.getLogger("gaussian_renderer.gsplat_backend")
        gsplat_log.setLevel(logging.INFO)
        gsplat_log.addHandler(gsplat_seconds)
        gsplat = build_gsplat_in_background()
    for name, cls in LOADERS.items():
        owner = getattr(diffusers if name in ("unet", "vae", "scheduler") else transformers, cls)
        clock.wrap(owner, "from_pretrained", name)
    clock.wrap(sd, "_freeze", "to device")
    clock.wrap(sd.StableDiffusionPrior, "set_prompts", "prompts")
    clock.wrap(sd.StableDiffusionPrior, "enable_fast_path", "fast path")
    clock.wrap(GaussianModel, "from_points", "Gaussians")
    clock.wrap(GaussianModel, "setup_optimizer", "Gaussians")
    if path == "before":
        sd.load_components = legacy_components  # what from_config calls
    with clock.stage("check"):
        preflight(cfg)
    with tempfile.TemporaryDirectory() as tmp, clock.stage("run metadata"):
        run_files.write_run_metadata(Path(tmp), ["train.py"])  # on a GPU: the CUDA context (its name)
    with clock.stage("Trainer"):
        seed_everything(cfg.seed)
        trainer = Trainer(cfg, device=torch.device(device))
    clock.sync()
    seconds = {**clock.seconds, "total": time.perf_counter() - t0}
    if uses_gsplat(cfg):  # how long the background build ran beside the load (it may still be running)
        gsplat.join()
        if gsplat_seconds.seconds is not None:
            seconds[GSPLAT] = gsplat_seconds.seconds
    seconds["Trainer, other parts"] = seconds.pop("Trainer") - sum(
        seconds.get(s, 0.0) for s in ("unet", "vae", "text encoder", "tokenizer", "scheduler", "to device",
                                      "prompts", "fast path", "Gaussians"))
    return {**seconds, "dtype": str(trainer.prior.dtype).removeprefix("torch.")}


def make_model_folder(folder: Path, tiny: bool) -> Path:
    sys.path.insert(0, str(REPO))
    from bench.time_to_asset import make_model_folder as make

    return make(folder, tiny)


def evict_from_page_cache(model: Path) -> None:
    """Drop the model's weight files from the operating system's page cache (Linux; only these files), so
    that the next process reads them from the disk, as on a new machine or after a fresh download."""
    from guidance.model_folder import weight_files

    for name in weight_files(str(model)):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a model just saved) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_one(path: str, args, model: Path) -> dict:
    """measure() in a fresh process (imports and allocator state as a new run has them)."""
    if args.cold:
        evict_from_page_cache(model)
    command = [sys.executable, str(Path(__file__).resolve()), "--one", path, "--model", str(model),
               "--device", args.device, *[f"--set={item}" for item in args.set]] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {path} measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results: dict[str, list[dict]], device_name: str, args) -> str:
    dtype = results[PATHS[0]][0]["dtype"]
    lines = [f"# Model load of train.py: {device_name}, {dtype}", "",
             f"`python bench/model_load.py {' '.join(args.argv)}`: "
             f"{'tiny random SD' if args.tiny else 'random-weight SD 2.1-base saved as an fp16 diffusers folder'}, "
             f"{'weights evicted from the page cache before each process (read from disk), ' if args.cold else ''}"
             f"median of {args.repeats} fresh processes per path, seconds.", "",
             "| stage | before | after | after - before |", "|---|---|---|---|"]
    for stage in (*STAGES, "total", GSPLAT):
        values = {p: [r.get(stage) for r in results[p] if r.get(stage) is not None] for p in PATHS}
        if not any(values.values()):
            continue
        med = {p: statistics.median(v) if v else 0.0 for p, v in values.items()}
        name = f"**{stage}**" if stage == "total" else stage
        lines.append(f"| {name} | {med['before']:.3f} | {med['after']:.3f} | {med['after'] - med['before']:+.3f} |")
    totals = {p: sorted(r["total"] for r in results[p]) for p in PATHS}
    lines += ["", "Total over the processes, min / max: " + "; ".join(
        f"{p} {totals[p][0]:.2f} / {totals[p][-1]:.2f} s" for p in PATHS) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--set", action="append", default=[], metavar="Section.key=value",
                   help="extra config override (repeatable), e.g. GuidanceParams.precision=bf16")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per path (the median is reported)")
    p.add_argument("--model", type=Path, help="a Stable Diffusion folder (default: random SD 2.1-base, saved once)")
    p.add_argument("--work", type=Path, help="where the random model folder is saved (default: temporary)")
    p.add_argument("--cold", action="store_true",
                   help="before each process, drop the weight files from the page cache (a first read from disk)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny random SD (smoke test of the script)")
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    p.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.one:
        print(json.dumps(measure(args.one, str(args.model), args.device, args.set, args.tiny)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        model = args.model or work / "model"
        if args.model is None and not (model / "model_index.json").is_file():
            make_model_folder(model, args.tiny)
        results: dict[str, list[dict]] = {p: [] for p in PATHS}
        for k in range(args.repeats):
            for path in PATHS:  # interleaved: a machine's load drifts alike for both
                results[path].append(run_one(path, args, model))
                print(f"repeat {k + 1}/{args.repeats} {path}: total {results[path][-1]['total']:.2f} s", flush=True)
    import torch

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    table = format_table(results, device_name, args)
    from bench.report import publish_table

    publish_table(table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
