"""The portable compile cache (guidance/compile_cache.py, PipelineParams.compile_cache; issue 20).

Two processes with separate Inductor caches stand for two machines sharing a home folder: the second finds
the first one's program through the file alone (Inductor on the CPU; the Stable Diffusion prior compiles on
CUDA only, where the same file also carries the Triton kernels). Then the file's rules (one per setup,
nothing rewritten without news, a broken file only costs a compilation) and the trainer's order: load
before compiling, save once compiled, by the writing process only.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import guidance.compile_cache as compile_cache
import train
import training.trainer
from guidance.compile_cache import PortableCompileCache, default_cache_folder, setup_key
from tests.prior_doubles import BackgroundCompilingPrior
from tests.test_train import TINY

REPO = Path(__file__).resolve().parents[1]

# one process: load the file, compile a small function with Inductor, save; prints what Inductor's cache did
_PROCESS = """
import json, sys, torch
from torch._dynamo.utils import counters
from guidance.compile_cache import PortableCompileCache
torch.set_num_threads(1)
cache = PortableCompileCache(sys.argv[1], {"test": 1})
loaded = cache.load()
f = torch.compile(lambda x, w: torch.nn.functional.gelu(x @ w).sum(-1))
y = f(torch.ones(4, 8), torch.ones(8, 8) / 8)
saved = cache.save()
print(json.dumps({"loaded": loaded, "saved": saved, "y": y.tolist(), **dict(counters["inductor"])}))
"""


def _compile_in_a_process(folder: Path, inductor_cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _PROCESS, str(folder)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="Inductor's CPU backend needs a C++ compiler")
def test_a_second_machine_finds_the_first_ones_program_through_the_file(tmp_path):
    folder = tmp_path / "home" / "compile"
    first = _compile_in_a_process(folder, tmp_path / "machine_a")
    assert first["loaded"] == 0 and first["saved"] >= 1  # compiled, then saved
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first.get("fxgraph_cache_hit", 0) == 0
    assert len(list(folder.glob("*.bin"))) == 1 and not list(folder.glob("*.tmp"))
    second = _compile_in_a_process(folder, tmp_path / "machine_b")  # an empty Inductor cache of its own
    assert second["loaded"] == first["saved"]
    assert second.get("fxgraph_cache_hit", 0) >= 1 and second.get("fxgraph_cache_miss", 0) == 0
    assert second["saved"] == 0  # nothing new: the file is not rewritten
    assert second["y"] == pytest.approx(first["y"])
    assert first["y"] == pytest.approx([8 * 0.8413447] * 4, rel=1e-5)  # gelu(1) summed over 8


class _FakeArtifacts:
    """torch.compiler's save/load of cache artifacts, with the artifact names chosen by the test."""

    def __init__(self, names: dict[str, list[str]]):
        self.names, self.loaded = names, []

    def save(self):
        return json.dumps(self.names).encode(), SimpleNamespace(artifacts=self.names)

    def load(self, data: bytes):
        self.loaded.append(data)
        return SimpleNamespace(artifacts=json.loads(data))


@pytest.fixture
def artifacts(monkeypatch):
    fake = _FakeArtifacts({"inductor": ["a"], "aot_autograd": ["b"]})
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", fake.save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", fake.load)
    monkeypatch.setattr(compile_cache, "_IN_PROCESS", {})  # a new process for every test
    return fake


def test_new_programs_are_written_and_known_ones_are_not(tmp_path, artifacts):
    cache = PortableCompileCache(tmp_path, {"k": 1})
    assert cache.load() == 0 and cache.save() == 2
    stamp = cache.path.stat().st_mtime_ns
    assert cache.save() == 0 and cache.path.stat().st_mtime_ns == stamp  # nothing new since
    artifacts.names = {"inductor": ["a", "c"], "aot_autograd": ["b"]}  # one more program
    assert cache.save() == 3 and json.loads(cache.path.read_bytes()) == artifacts.names


def test_the_file_is_loaded_once_per_process(tmp_path, artifacts):
    PortableCompileCache(tmp_path, {"k": 1}).save()
    compile_cache._IN_PROCESS.clear()  # the next process
    assert PortableCompileCache(tmp_path, {"k": 1}).load() == 2
    assert PortableCompileCache(tmp_path, {"k": 1}).load() == 2  # a sweep's second run: no second read
    assert len(artifacts.loaded) == 1
    assert PortableCompileCache(tmp_path, {"k": 1}).save() == 0  # all of it came from the file


def test_setups_get_their_own_files(tmp_path):
    cpu = torch.device("cpu")
    a = PortableCompileCache(tmp_path, setup_key(cpu, {"shape": [4, 512, 512]}))
    b = PortableCompileCache(tmp_path, setup_key(cpu, {"shape": [8, 512, 512]}))
    assert a.path != b.path and a.path.parent == b.path.parent == tmp_path
    assert PortableCompileCache(tmp_path, setup_key(cpu, {"shape": [4, 512, 512]})).path == a.path
    assert setup_key(cpu, {})["torch"] == torch.__version__


def test_a_broken_file_costs_a_compilation_not_the_run(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(compile_cache, "_IN_PROCESS", {})
    cache = PortableCompileCache(tmp_path, {"k": 1})
    cache.path.write_bytes(b"not a cache file")
    with caplog.at_level(logging.WARNING, logger="guidance.compile_cache"):
        assert cache.load() == 0
    assert "not a cache file" in caplog.text and str(cache.path) in caplog.text


def test_an_unwritable_folder_is_logged_and_the_run_goes_on(tmp_path, caplog, artifacts):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    cache = PortableCompileCache(blocker / "compile", {"k": 1})
    with caplog.at_level(logging.WARNING, logger="guidance.compile_cache"):
        assert cache.save() == 0
    assert "could not write" in caplog.text


def test_default_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_folder() == tmp_path / "segmentdreamer" / "compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_folder() == Path.home() / ".cache" / "segmentdreamer" / "compile"


class _SignedPrior(BackgroundCompilingPrior):
    """The background-compiling analytic prior, with a compile signature as the Stable Diffusion prior has."""

    events: list

    def compile_signature(self):
        return {"denoiser": "mixture_eps"}

    def warm_up(self, *shape):
        self.events.append("compile")
        super().warm_up(*shape)

    def adopt_compiled_programs(self) -> bool:
        adopted = super().adopt_compiled_programs()
        if adopted:
            self.events.append("adopt")
        return adopted


def _train_recording(tmp_path, monkeypatch, *extra) -> list:
    events = []
    monkeypatch.setattr(PortableCompileCache, "load", lambda self: events.append(("load", self.path)) or 0)
    monkeypatch.setattr(PortableCompileCache, "save", lambda self: events.append(("save", self.path)) or 0)

    def build(cfg, device):
        prior = _SignedPrior.from_config(cfg.guidance, device, backend=cfg.pipeline.renderer)
        prior.events, prior.hold = events, 5
        return prior

    monkeypatch.setattr(training.trainer, "build_prior", build)
    assert train.main(["--quiet", f"output_dir={tmp_path / 'out'}", *TINY, "OptimizationParams.iterations=8",
                       "checkpoint_interval=0", "save_video=false", "export_mesh=false", *extra]) == 0
    return [e if isinstance(e, str) else e[0] for e in events], [e[1] for e in events if not isinstance(e, str)]


def test_the_trainer_loads_before_compiling_and_saves_once_compiled(tmp_path, monkeypatch):
    order, paths = _train_recording(tmp_path, monkeypatch, f"PipelineParams.compile_cache={tmp_path / 'cc'}")
    assert order == ["load", "compile", "save"]
    assert paths[0] == paths[1] and paths[0].parent == tmp_path / "cc"


def test_a_background_compilation_saves_when_its_programs_are_adopted(tmp_path, monkeypatch):
    order, _ = _train_recording(tmp_path, monkeypatch, f"PipelineParams.compile_cache={tmp_path / 'cc'}",
                                "PipelineParams.compile_in_background=true")
    assert order == ["load", "adopt", "save"]


def test_compile_cache_none_turns_it_off(tmp_path, monkeypatch):
    order, _ = _train_recording(tmp_path, monkeypatch, "PipelineParams.compile_cache=none")
    assert order == ["compile"]


def test_an_empty_compile_cache_folder_is_refused_by_name():
    from utils.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="PipelineParams.compile_cache must be auto, none or a folder"):
        load_config("config/demo.yaml", ["PipelineParams.compile_cache="])
    assert load_config("config/demo.yaml", []).pipeline.compile_cache == "auto"
