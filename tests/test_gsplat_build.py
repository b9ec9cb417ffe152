"""CPU tests of gsplat's background build: how many parallel jobs its JIT build gets (issue 20).

gsplat's `cuda/_backend.py` compiles its CUDA extension at import and caps the build at 10 jobs unless
MAX_JOBS is set. The import here is a stand-in module that records the environment it was imported in, so
no CUDA toolkit is needed.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import types

import pytest

from gaussian_renderer.gsplat_backend import build_gsplat_in_background, build_jobs


class _RecordingBackend(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `gsplat`, `gsplat.cuda` and `gsplat.cuda._backend`; the last records MAX_JOBS at import."""

    def __init__(self, fail: bool = False):
        self.seen: list[str | None] = []
        self.fail = fail

    def find_spec(self, name, path=None, target=None):
        if name in ("gsplat", "gsplat.cuda", "gsplat.cuda._backend"):
            return importlib.util.spec_from_loader(name, self, is_package=not name.endswith("_backend"))
        return None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        if module.__name__ == "gsplat.cuda._backend":
            self.seen.append(os.environ.get("MAX_JOBS"))
            if self.fail:
                raise RuntimeError("nvcc not found")


@pytest.fixture
def fake_gsplat(monkeypatch):
    for name in [n for n in sys.modules if n == "gsplat" or n.startswith("gsplat.")]:
        monkeypatch.delitem(sys.modules, name)
    finder = _RecordingBackend()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    yield finder
    for name in [n for n in sys.modules if n == "gsplat" or n.startswith("gsplat.")]:
        del sys.modules[name]  # monkeypatch restores the real modules it removed


def test_build_uses_one_job_per_core_when_unset(fake_gsplat, monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    build_gsplat_in_background().join(timeout=30)
    assert fake_gsplat.seen == [str(os.cpu_count())]
    assert "MAX_JOBS" not in os.environ  # left as found


def test_build_keeps_the_users_max_jobs(fake_gsplat, monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "3")
    build_gsplat_in_background().join(timeout=30)
    assert fake_gsplat.seen == ["3"]
    assert os.environ["MAX_JOBS"] == "3"


def test_failed_build_restores_the_environment(fake_gsplat, monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    fake_gsplat.fail = True
    thread = build_gsplat_in_background()
    thread.join(timeout=30)
    assert not thread.is_alive() and fake_gsplat.seen == [str(os.cpu_count())]
    assert "MAX_JOBS" not in os.environ


def test_build_jobs_context(monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    with build_jobs(7):
        assert os.environ["MAX_JOBS"] == "7"
    assert "MAX_JOBS" not in os.environ
    monkeypatch.setenv("MAX_JOBS", "")  # empty counts as unset, as in torch's cpp_extension
    with build_jobs(5):
        assert os.environ["MAX_JOBS"] == "5"
