"""The loop's files written beside it (utils/background_writer.py, `background_writes`): in order, failures
raised on the training thread, bounded, nothing lost when the run stops, and the same files as inline."""
import errno
import json
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

import train
import training.run as run_module
from tests.test_train import TINY
from training.run_dir import host_copy
from training.trainer import Trainer
from utils.background_writer import BackgroundWriter
from utils.files import DiskFullError

# ---------------------------------------------------------------------- the writer


def test_writes_run_beside_the_caller_in_submission_order():
    writer = BackgroundWriter(max_pending=50)
    gate, done, caller = threading.Event(), [], threading.get_ident()

    def write(i):
        gate.wait(10)
        done.append((i, threading.get_ident() != caller))

    for i in range(20):
        writer.submit("item", write, i)
    assert done == []  # every submit returned while the first write still waited
    gate.set()
    writer.wait()
    assert done == [(i, True) for i in range(20)]
    assert writer.seconds_by_kind["item"][1] == 20
    writer.close()


def test_disabled_and_closed_writers_write_at_once_on_the_calling_thread():
    for writer in (BackgroundWriter(enabled=False), BackgroundWriter()):
        writer.close()  # closing a writer that never started a thread is fine
        threads = []

        def record(threads=threads):
            threads.append(threading.get_ident())  # the thread the write runs on

        writer.submit("item", record)
        assert threads == [threading.get_ident()]


def test_a_failed_write_is_raised_unchanged_at_the_next_call_and_what_follows_it_is_skipped(tmp_path):
    writer = BackgroundWriter(max_pending=10)
    gate, later = threading.Event(), []
    error = DiskFullError(tmp_path / "checkpoints" / "last.pt")

    def fail():
        gate.wait(10)
        raise error

    writer.submit("checkpoint", fail)
    writer.submit("metrics", later.append, 1)  # queued behind the failing write
    gate.set()
    with pytest.raises(DiskFullError) as raised:
        writer.wait()
    assert raised.value is error and raised.value.errno == errno.ENOSPC
    assert later == []  # not attempted after the failure
    writer.submit("metrics", later.append, 2)  # raised once: the writer takes work again
    writer.close()
    assert later == [2]


def test_close_raises_a_pending_failure_once_and_stops_the_worker():
    writer = BackgroundWriter()
    writer.submit("item", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.close()
    assert writer.closed
    writer.close()  # nothing left to raise
    assert not [t for t in threading.enumerate() if t.name == "background-writes"]


def test_submit_blocks_once_max_pending_writes_wait():
    writer = BackgroundWriter(max_pending=1)
    gate, started = threading.Event(), threading.Event()

    def blocked():
        started.set()
        gate.wait(10)

    writer.submit("item", blocked)
    assert started.wait(10)  # the worker runs the first write: the queue is empty again
    writer.submit("item", lambda: None)  # fills the queue
    third = threading.Thread(target=writer.submit, args=("item", lambda: None))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # waits for room
    gate.set()
    third.join(10)
    assert not third.is_alive()
    writer.close()
    assert writer.seconds_by_kind["item"][1] == 3


def test_a_submit_that_waits_long_for_room_says_so_once(caplog):
    writer = BackgroundWriter(max_pending=1, slow_seconds=0.05)
    gate, started = threading.Event(), threading.Event()

    def blocked():
        started.set()
        gate.wait(10)

    writer.submit("checkpoint", blocked)
    assert started.wait(10)
    writer.submit("preview", lambda: None)  # fills the queue
    threading.Timer(0.3, gate.set).start()
    with caplog.at_level("WARNING", logger="utils.background_writer"):
        writer.submit("preview", lambda: None)  # waits ~0.3 s for room
        writer.submit("preview", lambda: None)
    writer.close()
    slow = [r for r in caplog.records if "waited" in r.getMessage()]
    assert len(slow) == 1 and "for room among the files written beside it (preview)" in slow[0].getMessage()


def test_max_pending_below_one_is_refused():
    with pytest.raises(ValueError, match="max_pending must be >= 1, got 0"):
        BackgroundWriter(max_pending=0)


def test_host_copy_is_a_snapshot_the_original_cannot_change():
    Pair = namedtuple("Pair", "a b")
    live = torch.arange(4.0)
    state = {"x": live, "nested": [live, (live, 3)], "pair": Pair(live, "s"), "step": 7}
    copy = host_copy(state)
    live.add_(100)
    assert torch.equal(copy["x"], torch.arange(4.0))
    assert torch.equal(copy["nested"][1][0], torch.arange(4.0)) and copy["nested"][1][1] == 3
    assert isinstance(copy["pair"], Pair) and copy["pair"].b == "s" and torch.equal(copy["pair"].a, torch.arange(4.0))
    assert copy["step"] == 7 and copy["x"].device.type == "cpu"


# ---------------------------------------------------------------------- in a run

# previews off, test views only at steps 1 and 6: between the checkpoints of steps 2 and 4 the loop writes nothing
QUIET_LOOP = ("OptimizationParams.iterations=6", "checkpoint_interval=2", "preview_interval=0", "test_ratio=1",
              "save_ratio=1", "save_video=false", "export_mesh=false")


def _run(out: Path, *extra) -> int:
    return train.main(["--quiet", f"output_dir={out}", *TINY, *QUIET_LOOP, *extra])


def _run_dir(out: Path) -> Path:
    (run,) = [p for p in out.glob("*/*") if p.is_dir()]
    return run


def _slow_checkpoints(monkeypatch, release: threading.Event | None = None, seconds: float = 0.0) -> list:
    """checkpoints/last.pt writes that wait for `release` (or sleep); returns the steps they wrote."""
    written, original = [], run_module.atomic_torch_save

    def slow(state, path):
        if release is not None:
            release.wait(30)
        time.sleep(seconds)
        original(state, path)
        written.append(state["step"])

    monkeypatch.setattr(run_module, "atomic_torch_save", slow)
    return written


def _at_step(monkeypatch, step: int, action) -> None:
    original = Trainer.train_step

    def train_step(self, k, before_update=None):
        result = original(self, k, before_update)
        if k == step:
            action(self)
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_the_loop_trains_on_while_its_checkpoint_is_written(tmp_path, monkeypatch):
    release, seen = threading.Event(), []
    written = _slow_checkpoints(monkeypatch, release)

    def step_3(trainer):
        seen.append(list(written))  # the step-2 checkpoint is still being written
        release.set()

    _at_step(monkeypatch, 3, step_3)
    assert _run(tmp_path) == 0
    assert seen == [[]] and written == [2, 4, 6]
    run = _run_dir(tmp_path)
    timings = json.loads((run / "metrics.json").read_text())["timings"]
    assert timings["background_writes"]["checkpoint"]["count"] == 3
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == 6


def test_background_and_inline_writes_give_the_same_files(tmp_path):
    assert _run(tmp_path / "a", "preview_interval=2", "test_ratio=2", "save_ratio=2") == 0
    assert _run(tmp_path / "b", "preview_interval=2", "test_ratio=2", "save_ratio=2", "background_writes=false") == 0
    a, b = _run_dir(tmp_path / "a"), _run_dir(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*.png")) + sorted(p.relative_to(a) for p in a.rglob("*.ply"))
    views = {f.parent.name for f in files if f.suffix == ".png"}
    assert views == {"iter_00000", "iter_00001", "iter_00003", "iter_00006"}  # start, step 1, test_ratio 2, end
    assert {Path("point_cloud/iteration_3/point_cloud.ply"), Path("point_cloud.ply")} <= set(files)
    assert sorted(p.relative_to(b) for p in b.rglob("*.png")) + sorted(p.relative_to(b) for p in b.rglob("*.ply")) \
        == files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ca, cb = (torch.load(r / "checkpoints/last.pt", weights_only=True) for r in (a, b))
    flat_a, flat_b = _flatten(ca), _flatten(cb)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        same = torch.equal(flat_a[key], flat_b[key]) if isinstance(flat_a[key], torch.Tensor) \
            else flat_a[key] == flat_b[key]
        assert same, key
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    for m in (ma, mb):
        m.pop("timings"), m.pop("sessions"), m.pop("train_seconds")
    assert ma == mb and set(ma) >= {"iter_1", "iter_3", "iter_6", "final"}
    background = json.loads((a / "metrics.json").read_text())["timings"]["background_writes"]
    inline = json.loads((b / "metrics.json").read_text())["timings"]["background_writes"]
    assert background["tensorboard images"]["count"] == inline["tensorboard images"]["count"] > 0


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _flatten(value, f"{prefix}/{i}").items()}
    return {prefix: obj}


def test_a_crash_waits_for_the_checkpoint_handed_over_and_says_it_is_kept(tmp_path, monkeypatch, capsys):
    written = _slow_checkpoints(monkeypatch, seconds=1.0)

    def crash(trainer):
        raise KeyboardInterrupt

    _at_step(monkeypatch, 3, crash)
    assert _run(tmp_path) == 130
    assert written == [2]
    run = _run_dir(tmp_path)
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == 2
    assert "the checkpoint of step 2 is kept" in capsys.readouterr().err


def test_a_full_disk_in_a_background_write_stops_the_run_with_the_file_named(tmp_path, monkeypatch, capsys):
    def full(state, path):
        raise DiskFullError(path)

    monkeypatch.setattr(run_module, "atomic_torch_save", full)
    assert _run(tmp_path) == 1
    err = capsys.readouterr().err
    run = _run_dir(tmp_path)
    assert f"the disk is full: could not write {run / 'checkpoints' / 'last.pt'}" in err
    assert "No checkpoint was written yet" in err and "Traceback" not in err
    assert not (run / "checkpoints" / "last.pt").exists()


def test_frames_handed_over_are_host_copies(tmp_path):
    """What evaluate() hands to the writer cannot change when the loop goes on (to_uint8 returns new arrays)."""
    from utils.media import to_uint8

    images = torch.rand(2, 3, 4, 4)
    expected = (images.permute(0, 2, 3, 1) * 255 + 0.5).floor().numpy().astype(np.uint8)  # [B, H, W, 3]
    frames = to_uint8(images)
    images.zero_()  # the loop goes on: the render's memory is reused
    assert frames.dtype == np.uint8 and np.array_equal(frames, expected)
