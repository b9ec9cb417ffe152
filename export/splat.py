"""Compressed splat files (.spz v3 / v4, SOG) from a run folder or a 3DGS PLY.

    python -m export.splat RUN_DIR_or_PLY --format spz|spz4|sog [--out FILE] [--up-axis=-y|y|z] [--ply-up=-y|y|z]
    python -m export.splat FILE.spz --format spz4        # convert between formats (a .sog too, with export/sog.py)

A run folder gives its final point_cloud.ply, or for an interrupted run the newest of
point_cloud/iteration_*/point_cloud.ply and checkpoints/last.pt (a checkpoint .pt may be given too).
The file is written in the up axis the run wrote its PLY in (its config's `ply_up_axis`; "-y" when
the PLY is not from a run), so it opens the way the PLY opens; --up-axis overrides it. The default
name is the source's with the format's suffix, next to it (point_cloud.spz, point_cloud.v4.spz,
point_cloud.sog; checkpoints/last.spz for a checkpoint).

Errors in the input (no such file, a PLY with no Gaussians or with NaN, a damaged .spz, a scene too
large for the format) are one message on stderr and exit status 2; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from plyfile import PlyData, PlyParseError

from export.mesh import checkpoint_model, find_source
from export.sog import SogFormatError, read_sog, write_sog
from export.splat_data import SplatData, SplatDataError
from export.spz import SplatFormatError, read_spz, write_spz
from scene.orientation import UP_AXES
from scene.ply_format import load_gaussian_ply
from utils.cli_errors import run_command
from utils.threads import configure_threads

log = logging.getLogger(__name__)

FORMATS = ("spz", "spz4", "sog")
SOURCE_NAMES = {".ply": "PLY", ".pt": "checkpoint", ".spz": ".spz", ".sog": ".sog"}  # in the size message
FILE_SUFFIX = {"spz": ".spz", "spz4": ".spz", "sog": ".sog"}  # what viewers recognise; v4 also ends in .spz
SUFFIXES = {"ply": ".ply", "spz": ".spz", "spz4": ".v4.spz", "sog": ".sog"}  # v3 and v4 share .spz


class SplatExportError(ValueError):
    """A user error of the splat export: the message names the file or option, the rule and the value."""


def find_ply(source: Path) -> Path:
    """The file to export: `source` itself (a .ply, a checkpoint .pt, or a .spz / .sog to convert), or a
    run folder's point_cloud.ply, else (an interrupted run) the newest of its point_cloud/iteration_*
    snapshots and checkpoints/last.pt, as python -m export.mesh chooses."""
    if source.is_file():
        if source.suffix.lower() not in (".ply", ".pt", ".spz", ".sog"):
            raise SplatExportError(f"{source}: not a .ply, .pt, .spz or .sog file; give a run folder or a 3DGS .ply")
        return source
    if not source.is_dir():
        raise SplatExportError(f"{source}: no such run folder or .ply file")
    return find_source(source)[0]


def run_up_axis(ply: Path) -> str | None:
    """The `ply_up_axis` of the run the PLY belongs to (its config.yaml), None outside a run."""
    for folder in list(ply.parents)[:3]:
        if (folder / "config.yaml").is_file():
            from utils.config import load_config

            return load_config(folder / "config.yaml", warn_no_effect=False).ply_up_axis
    return None


def load_splats(ply: Path, up_axis: str, ply_up: str | None = None) -> SplatData:
    """The PLY's splats in the `up_axis` frame. A PLY that records its axis (ours do) is rotated from
    it; one that does not is taken to be in `ply_up`, or already in `up_axis` (copied unchanged)."""
    try:
        count = PlyData.read(str(ply))["vertex"].count
        model = load_gaussian_ply(ply, file_up_axis=ply_up or up_axis) if count else None
    except (ValueError, KeyError, OSError, PlyParseError) as exc:
        raise SplatExportError(f"{ply}: not a readable 3DGS PLY ({exc})") from None
    if model is None:  # (load_gaussian_ply cannot size the SH block of an empty file)
        raise SplatExportError(f"{ply} holds no Gaussians: there is nothing to export")
    data = SplatData.from_model(model, up_axis)
    data.check_writable(str(ply))
    return data


def read_splats(path: Path, up_axis: str, file_up: str | None = None) -> SplatData:
    """The splats of a .ply, .pt, .spz or .sog file in the `up_axis` frame (see load_splats for `file_up`)."""
    suffix = path.suffix.lower()
    if suffix == ".ply":
        return load_splats(path, up_axis, file_up)
    if suffix == ".pt":  # a checkpoint holds the training world
        data = SplatData.from_model(checkpoint_model(path), up_axis)
        data.check_writable(str(path))
        return data
    if suffix == ".spz":
        data = read_spz(path, up_axis=file_up or up_axis)
    else:
        data = read_sog(path)
    if data.up_axis != up_axis:
        data = SplatData.from_model(data.to_model(), up_axis)
    data.check_writable(str(path))
    return data


def write_splats(data: SplatData, path: Path, fmt: str) -> Path:
    """Write `data` to `path` in `fmt` (spz, spz4 or sog)."""
    if fmt == "spz":
        return write_spz(data, path, version=3)
    if fmt == "spz4":
        return write_spz(data, path, version=4)
    if fmt == "sog":
        write_sog(data, path)
        return path
    raise SplatExportError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")


def default_output(ply: Path, fmt: str) -> Path:
    return ply.with_name(ply.stem + SUFFIXES[fmt])


def export_splats(source: Path, fmt: str, out: Path | None = None, up_axis: str | None = None,
                  ply_up: str | None = None) -> Path:
    """Export the Gaussians of a run folder or PLY to `fmt`; returns the written file."""
    ply = find_ply(source)
    axis = up_axis or run_up_axis(ply) or "-y"
    data = read_splats(ply, axis, ply_up)
    path = out or default_output(ply, fmt)
    if path.resolve() == ply.resolve():
        raise SplatExportError(f"{path}: the output would overwrite its source; give another --out")
    if path.is_dir():
        example = path / default_output(ply, fmt).name
        raise SplatExportError(f"--out {path} is a folder; give a file name (e.g. {example})")
    if not path.name.lower().endswith(FILE_SUFFIX[fmt]):  # viewers choose their reader by the suffix alone
        raise SplatExportError(f"--out {path}: a --format {fmt} file must end in {FILE_SUFFIX[fmt]}, or viewers will "
                               f"not open it; give e.g. {path.with_suffix(FILE_SUFFIX[fmt]).name}")
    written = write_splats(data, path, fmt)
    ratio = ply.stat().st_size / max(written.stat().st_size, 1)
    size = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"  # a conversion may grow
    log.info("%s: %d Gaussians (SH degree %d, %s up) -> %s (%d bytes, %s than the %s)", ply, data.num_splats,
             data.sh_degree, axis, written, written.stat().st_size, size,
             SOURCE_NAMES.get(ply.suffix.lower(), "source"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.splat", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="run folder (finished or interrupted), 3DGS .ply, checkpoint .pt, "
                                                  "or a .spz / .sog to convert")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="spz (.spz version 3: Spark, three.js, Babylon.js, SuperSplat), spz4 (.spz version 4: "
                             "PlayCanvas, SuperSplat, Niantic's library), sog (PlayCanvas SOG)")
    parser.add_argument("--out", type=Path, help="output file (default: next to the PLY, its name with the "
                                                 "format's suffix)")
    parser.add_argument("--up-axis", choices=UP_AXES, help="up axis of the written file (default: the run's "
                                                           "ply_up_axis, else -y)")
    parser.add_argument("--ply-up", choices=UP_AXES, help="up axis of a source file that does not record one (a PLY "
                                                          "without our header comment, a .spz v3; default: the "
                                                          "same as the output, no rotation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_threads()  # SOG's k-means on a busy CPU: one thread per idle core, as train.py

    def body() -> int:
        path = export_splats(args.source, args.format, args.out, args.up_axis, args.ply_up)
        print(json.dumps({args.format: str(path)}))
        return 0

    return run_command(body, log, SplatExportError, SplatDataError, SplatFormatError, SogFormatError)


if __name__ == "__main__":
    raise SystemExit(main())
