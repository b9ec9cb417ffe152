"""bench/splat_formats.py: every format measured on one PLY with the file's own splat order, and the issue's
goals judged per row."""
from __future__ import annotations

from bench import splat_formats
from scene.ply_format import save_gaussian_ply
from tests.test_spz import TRAINED_SH_STD, splat_asset


def test_each_format_is_compared_splat_by_splat(tmp_path):
    data = splat_asset(301, 1, seed=3, sh_std=TRAINED_SH_STD)
    ply = tmp_path / "a.ply"
    save_gaussian_ply(data.to_model(), ply, up_axis="-y")
    rows = {row["format"]: row for row in splat_formats.measure(ply, 32, reference=None)}
    assert set(rows) == {".spz v3", ".spz v4", "SOG"}
    for row in rows.values():
        assert row["encoder"] == "ours" and row["splats"] == 301 and row["sh"] == 1
        assert row["ratio"] > 1.5 and row["psnr"] > 35.0, row  # random splats: little for the compressors
    # SOG stores the splats in Morton order: compared in the source's order its largest position error would
    # be the size of the asset, in the file's order it is the 16-bit step after the log map
    assert rows["SOG"]["errors"].position < 1e-4
    assert rows[".spz v3"]["errors"].position < 0.5 / 4096 / 0.5  # half a 12-bit step over an extent >= 0.5


def test_goals_name_the_bar_and_fail_below_it():
    row = {"format": ".spz v3", "sh": 0, "ratio": 4.29, "psnr": 41.0, "bytes": 100}
    assert splat_formats.goals(row, None) == "size >= 4.3x: NO; PSNR >= 40 dB: yes"
    row = {"format": "SOG", "sh": 3, "ratio": 4.0, "psnr": 50.0, "bytes": 106}
    reference = {"bytes": 100, "psnr": 50.5}
    assert splat_formats.goals(row, reference) == ("size within 5 % of reference: NO; "
                                                   "PSNR >= reference - 1 dB: yes")
    assert splat_formats.goals({**row, "bytes": 105, "psnr": 49.4}, reference) == (
        "size within 5 % of reference: yes; PSNR >= reference - 1 dB: NO")
    assert splat_formats.goals({**row, "sh": 0, "ratio": 4.4}, None) == "size >= 4.4x: yes; PSNR vs reference: not run"
