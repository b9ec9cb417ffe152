"""python -m export.splat (export/splat.py) and the export_formats key: which PLY a run folder gives,
the up axis, the file names, and every user error (one message, exit 2, nothing written)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

import train
from export.sog import read_sog
from export.splat import main
from export.splat_data import SplatData
from export.spz import read_spz
from scene.gaussian_model import GaussianModel
from scene.ply_format import save_gaussian_ply
from tests.test_train import TINY
from utils.config import ConfigError, load_config


def _model(n: int = 37, degree: int = 1, seed: int = 0, scale: float = 0.3) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return GaussianModel.from_params({
        "xyz": scale * torch.randn(n, 3, generator=g), "f_dc": torch.rand(n, 1, 3, generator=g) - 0.5,
        "f_rest": 0.05 * torch.randn(n, k - 1, 3, generator=g), "opacity": torch.randn(n, 1, generator=g),
        "scaling": torch.randn(n, 3, generator=g) - 3.0, "rotation": torch.randn(n, 4, generator=g),
    })


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _user_error(caplog, argv, *parts) -> None:
    """The shared contract (utils/cli_errors.py): exit 2, one error message naming what is wrong, no traceback."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv) == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, caplog.text
    assert all(r.exc_info is None for r in caplog.records) and "Traceback" not in caplog.text
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_ply_to_spz_v3_and_v4_next_to_it(tmp_path, capsys):
    model = _model(301, 2)
    save_gaussian_ply(model, tmp_path / "a.ply", up_axis="-y")
    assert main([str(tmp_path / "a.ply"), "--format", "spz"]) == 0
    assert main([str(tmp_path / "a.ply"), "--format", "spz4"]) == 0
    assert (tmp_path / "a.spz").read_bytes()[:2] == b"\x1f\x8b"  # gzip: version 3
    assert (tmp_path / "a.v4.spz").read_bytes()[:4] == b"NGSP"
    expected = SplatData.from_model(model, "-y")
    for name in ("a.spz", "a.v4.spz"):
        back = read_spz(tmp_path / name)
        assert back.up_axis == "-y" and back.num_splats == 301 and back.sh_degree == 2
        np.testing.assert_allclose(back.means, expected.means, atol=0.5 / 4096 + 1e-6)


def test_run_folder_follows_the_runs_up_axis_and_newest_snapshot(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "point_cloud" / "iteration_300").mkdir(parents=True)
    (run / "point_cloud" / "iteration_2000").mkdir(parents=True)
    (run / "config.yaml").write_text("ply_up_axis: y\n")
    old, new = _model(10, 0, seed=1), _model(12, 0, seed=2)
    save_gaussian_ply(old, run / "point_cloud" / "iteration_300" / "point_cloud.ply", up_axis="y")
    save_gaussian_ply(new, run / "point_cloud" / "iteration_2000" / "point_cloud.ply", up_axis="y")
    assert main([str(run), "--format", "spz4"]) == 0  # interrupted run: the newest snapshot (2000 > 300)
    out = run / "point_cloud" / "iteration_2000" / "point_cloud.v4.spz"
    back = read_spz(out)
    assert back.num_splats == 12 and back.up_axis == "y"  # v4 states the run's frame
    np.testing.assert_allclose(back.means, SplatData.from_model(new, "y").means, atol=2e-4)

    save_gaussian_ply(new, run / "point_cloud.ply", up_axis="y")  # a finished run: its final PLY
    assert main([str(run), "--format", "spz", "--up-axis", "z", "--out", str(tmp_path / "z.spz")]) == 0
    back = read_spz(tmp_path / "z.spz", up_axis="z")
    # --up-axis z: the training world, e.g. world up (z) is the file's z, where the y-up PLY had it in y
    np.testing.assert_allclose(back.means, new.means.detach().numpy(), atol=2e-4)


def test_an_interrupted_run_with_only_a_checkpoint_exports_it(tmp_path, capsys, caplog):
    """A run stopped before its first snapshot has only checkpoints/last.pt (as python -m export.mesh reads);
    the newest of it and the snapshots is exported, in the run's frame."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("ply_up_axis: y\n")
    trained = _model(23, 1, seed=3)
    torch.save({"step": 800, "gaussians": trained.state_dict()}, run / "checkpoints" / "last.pt")
    assert main([str(run), "--format", "spz4", "--out", str(tmp_path / "ck.spz")]) == 0
    back = read_spz(tmp_path / "ck.spz")
    assert back.num_splats == 23 and back.sh_degree == 1 and back.up_axis == "y"
    np.testing.assert_allclose(back.means, SplatData.from_model(trained, "y").means, atol=2e-4)

    (run / "point_cloud" / "iteration_600").mkdir(parents=True)  # older than the checkpoint: not chosen
    save_gaussian_ply(_model(9, 0, seed=4), run / "point_cloud" / "iteration_600" / "point_cloud.ply", up_axis="y")
    assert main([str(run), "--format", "spz"]) == 0
    assert read_spz(run / "checkpoints" / "last.spz", up_axis="y").num_splats == 23  # next to its source

    torch.save({"step": 900}, run / "checkpoints" / "last.pt")  # newer, but without Gaussians
    before = _files(run)
    _user_error(caplog, [str(run), "--format", "sog"], "last.pt", "checkpoint without Gaussians")
    assert _files(run) == before


def test_a_ply_without_a_recorded_axis_is_copied_unchanged(tmp_path, capsys):
    model = _model(20, 0)
    save_gaussian_ply(model, tmp_path / "a.ply", up_axis="z")
    ply = PlyData.read(str(tmp_path / "a.ply"))
    PlyData([ply["vertex"]], byte_order="<").write(str(tmp_path / "foreign.ply"))  # no comment
    assert main([str(tmp_path / "foreign.ply"), "--format", "spz"]) == 0
    np.testing.assert_allclose(read_spz(tmp_path / "foreign.spz").means, model.means.detach().numpy(), atol=2e-4)


def _ply_with(tmp_path: Path, name: str, n: int, nan: bool = False, far: bool = False) -> Path:
    model = _model(max(n, 1), 0)
    save_gaussian_ply(model, tmp_path / name, up_axis="-y")
    if n == 0 or nan or far:
        ply = PlyData.read(str(tmp_path / name))
        vertex = ply["vertex"].data.copy()
        if nan:
            vertex["opacity"][3] = np.nan
        if far:
            vertex["x"][5] = 3000.0
        vertex = vertex[:n]
        PlyData([PlyElement.describe(vertex, "vertex")], byte_order="<", comments=ply.comments).write(
            str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("fmt", ["spz", "spz4"])
def test_user_errors_exit_2_and_write_nothing(tmp_path, caplog, fmt):
    folder = tmp_path / "in"
    folder.mkdir()
    nan = _ply_with(folder, "nan.ply", 37, nan=True)
    empty = _ply_with(folder, "empty.ply", 0)
    far = _ply_with(folder, "far.ply", 37, far=True)
    (folder / "notes.txt").write_text("hello")
    (folder / "run").mkdir()
    before = _files(folder)
    _user_error(caplog, [str(nan), "--format", fmt], "nan.ply", "1 Gaussians have non-finite opacity_logits")
    _user_error(caplog, [str(empty), "--format", fmt], "empty.ply", "holds no Gaussians")
    _user_error(caplog, [str(far), "--format", fmt], "24-bit fixed point", "3000.0", "prune")
    _user_error(caplog, [str(folder / "missing.ply"), "--format", fmt], "missing.ply", "no such")
    _user_error(caplog, [str(folder / "notes.txt"), "--format", fmt], "notes.txt", "not a .ply")
    _user_error(caplog, [str(folder / "run"), "--format", fmt], "no point_cloud.ply")
    save_gaussian_ply(_model(), folder / "ok.ply", up_axis="-y")
    before.add("ok.ply")
    _user_error(caplog, [str(folder / "ok.ply"), "--format", fmt, "--out", str(folder / "run")], "is a folder")
    for wrong in ("ok.spz4", "ok.sog", "ok"):  # a viewer picks its reader by the suffix: .spz for v3 and v4
        _user_error(caplog, [str(folder / "ok.ply"), "--format", fmt, "--out", str(folder / wrong)],
                    f"--out {folder / wrong}", "must end in .spz", "ok.spz")
    assert _files(folder) == before  # no output, no temporary file


def test_spz_converts_between_versions_and_frames(tmp_path, caplog):
    model = _model(77, 1)
    save_gaussian_ply(model, tmp_path / "a.ply", up_axis="-y")
    assert main([str(tmp_path / "a.ply"), "--format", "spz"]) == 0
    # a v3 file records no frame: copied unchanged unless --ply-up names it (the v4 file states its own)
    same = tmp_path / "same.spz"
    assert main([str(tmp_path / "a.spz"), "--format", "spz4", "--up-axis", "y", "--out", str(same)]) == 0
    np.testing.assert_allclose(read_spz(same).means, read_spz(tmp_path / "a.spz").means)
    assert main([str(tmp_path / "a.spz"), "--format", "spz4", "--up-axis", "y", "--ply-up=-y"]) == 0
    back = read_spz(tmp_path / "a.v4.spz")
    assert back.up_axis == "y" and back.num_splats == 77
    np.testing.assert_allclose(back.means, SplatData.from_model(model, "y").means, atol=2.5e-4)
    _user_error(caplog, [str(tmp_path / "a.spz"), "--format", "spz"], "overwrite its source")


def test_bad_files_through_the_command(tmp_path, caplog):
    import gzip
    import struct

    model = _model(300, 1)
    save_gaussian_ply(model, tmp_path / "a.ply", up_axis="-y")
    assert main([str(tmp_path / "a.ply"), "--format", "spz", "--out", str(tmp_path / "good.spz")]) == 0
    assert main([str(tmp_path / "a.ply"), "--format", "spz4", "--out", str(tmp_path / "good4.spz")]) == 0
    v3, v4 = (tmp_path / "good.spz").read_bytes(), (tmp_path / "good4.spz").read_bytes()
    raw = gzip.decompress(v3)
    bad = {
        "truncated.spz": (v3[: len(v3) // 2], "truncated"),
        "truncated4.spz": (v4[:-9], "truncated"),
        "magic.spz": (b"\x00" * 64, "not a .spz file"),
        "version.spz": (gzip.compress(raw[:4] + struct.pack("<I", 7) + raw[8:]), "version 7"),
        "count.spz": (gzip.compress(raw[:8] + struct.pack("<I", 301) + raw[12:]), "disagrees"),
        "count4.spz": (v4[:8] + struct.pack("<I", 299) + v4[12:], "disagrees"),
        "truncated.ply": ((tmp_path / "a.ply").read_bytes()[:-100], "not a readable 3DGS PLY"),
    }
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, (blob, _) in bad.items():
        (folder / name).write_bytes(blob)
    before = _files(folder)
    for name, (_, part) in bad.items():
        _user_error(caplog, [str(folder / name), "--format", "spz4", "--out", str(folder / "out.spz")], name, part)
    assert _files(folder) == before


def test_sog_through_the_command_and_back(tmp_path, caplog):
    model = _model(301, 1)
    save_gaussian_ply(model, tmp_path / "a.ply", up_axis="-y")
    assert main([str(tmp_path / "a.ply"), "--format", "sog"]) == 0
    back = read_sog(tmp_path / "a.sog")
    ply = SplatData.from_ply(tmp_path / "a.ply", "-y")
    assert back.num_splats == 301 and back.sh_degree == 1 and back.up_axis == "-y"
    extent = float(np.abs(ply.means).max())
    # SOG stores 16-bit positions after sign * log(|x| + 1): the step grows with |x|, far below 1e-3 of the extent here
    assert np.abs(np.sort(back.means, axis=0) - np.sort(ply.means, axis=0)).max() < 1e-3 * extent
    assert main([str(tmp_path / "a.sog"), "--format", "spz", "--out", str(tmp_path / "from_sog.spz")]) == 0
    assert read_spz(tmp_path / "from_sog.spz").num_splats == 301
    (tmp_path / "bad.sog").write_bytes(b"PK\x03\x04 not a zip")
    _user_error(caplog, [str(tmp_path / "bad.sog"), "--format", "spz"], "bad.sog")
    _user_error(caplog, [str(tmp_path / "a.ply"), "--format", "sog", "--out", str(tmp_path / "a.spz")],
                "must end in .sog", "a.sog")
    assert not (tmp_path / "a.spz").exists()


# ---------------------------------------------------------------------- the config key and the run


def test_export_formats_key(tmp_path):
    assert load_config(None).export_formats == ["ply"]
    assert load_config(None, ["export_formats=[ply,spz,spz4]"]).export_formats == ["ply", "spz", "spz4"]
    with pytest.raises(ConfigError, match=r"export_formats\[1\] must be one of \['ply', 'spz', 'spz4', 'sog'\], "
                                          r"got 'glb'"):
        load_config(None, ["export_formats=[spz,glb]"])
    with pytest.raises(ConfigError, match="export_formats must be a list"):
        load_config(None, ["export_formats=spz"])


def test_the_run_writes_the_listed_formats_next_to_its_ply(tmp_path):
    out = tmp_path / "out"
    argv = ["--quiet", f"output_dir={out}", *TINY, "save_video=false", "export_mesh=false",
            "export_formats=[ply,spz,spz4,sog]", "ply_up_axis=y"]
    assert train.main(argv) == 0
    run = next(out.glob("*/*"))
    ply = SplatData.from_ply(run / "point_cloud.ply", "y")
    for name in ("point_cloud.spz", "point_cloud.v4.spz"):
        back = read_spz(run / name, up_axis="y")
        assert back.num_splats == ply.num_splats and back.up_axis == "y"
        np.testing.assert_allclose(back.means, ply.means, atol=0.5 / 4096 + 1e-6)
    sog = read_sog(run / "point_cloud.sog")
    assert sog.num_splats == ply.num_splats and sog.up_axis == "y"
