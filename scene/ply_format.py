"""PLY files: the standard 3DGS layout of a GaussianModel, and reading with messages that say what a
file is and what to do.

`save_gaussian_ply` / `load_gaussian_ply` write and read the layout of the official `save_ply` /
`load_ply` (zjhJOJO/SegmentDreamer and EnVision-Research/LucidDreamer `scene/gaussian_model.py`):
binary little-endian float32 columns x, y, z, nx, ny, nz, f_dc_*, f_rest_* (channel-major), opacity
(logit), scale_* (log), rot_* (w, x, y, z), plus a header comment recording the file's up axis.
Gaussian-splat files circulate in several formats; only the standard (uncompressed) 3DGS PLY, or a
coloured point-cloud PLY for initialisation, is read here. The others are recognised by their first
bytes or header so the message can say how to convert them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from scene.gaussian_model import GaussianModel, num_sh_coeffs
from scene.orientation import UP_AXES, rotate_gaussians, world_to_export
from utils.files import atomic_write

logger = logging.getLogger(__name__)

# PLY header comment recording the axis convention of an exported file (scene/orientation.py).
UP_AXIS_COMMENT = "up_axis"
_CONVERT = "convert it to a standard (uncompressed) 3DGS PLY, e.g. in SuperSplat (File > Export > PLY)"


def sniff_format(path: Path) -> str | None:
    """A short name of a known non-standard splat format, from the file's first bytes; None when it
    looks like a PLY (or is unknown)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:2] == b"\x1f\x8b":
        return "a gzip-compressed file (.spz, Niantic's compressed splat format, is gzip)"
    if head[:4] == b"NGSP":
        return "an uncompressed .spz splat file"
    if not head.startswith(b"ply"):
        if path.suffix.lower() == ".splat" or (len(head) > 0 and os.path.getsize(path) % 32 == 0):
            return "a .splat file (antimatter15's 32-byte-per-splat format, no header)"
        return None
    header = head.split(b"end_header", 1)[0]
    if b"element chunk" in header or b"packed_position" in header:
        return "a compressed PLY (PlayCanvas/SuperSplat 'chunk' + packed properties)"
    return None


def read_ply(path: str | os.PathLike, key: str) -> PlyData:
    """PlyData of a readable PLY with a 'vertex' element; ValueError naming `key` (the config key or
    role of the file), the file, and, for a known splat format, what it is and how to convert it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no PLY file at {path.resolve()}")
    known = sniff_format(path)
    if known is not None:
        raise ValueError(f"{key}: {path} is {known}, not a standard PLY; {_CONVERT}")
    try:
        ply = PlyData.read(str(path))
    except Exception as exc:  # plyfile raises PlyParseError, ValueError, struct/numpy errors on damaged files
        raise ValueError(f"{key}: {path} is not a readable PLY file ({type(exc).__name__}: {exc}); "
                         "it may be truncated or damaged") from None
    if "vertex" not in [element.name for element in ply.elements]:
        elements = [element.name for element in ply.elements]
        raise ValueError(f"{key}: {path} has no 'vertex' element (elements: {elements}); {_CONVERT}")
    return ply


def save_gaussian_ply(model: GaussianModel, path: str | os.PathLike, pad_sh_degree: int | None = None,
                      up_axis: str = "z") -> None:
    """Write the model as a standard 3DGS PLY (binary little-endian float32), atomically, mode 0644.

    pad_sh_degree: write zero f_rest columns up to this degree (3 for viewers that expect it).
    up_axis: the axis convention of the file (scene/orientation.py): "-y" for splat viewers
        (SuperSplat, GaussianSplats3D), "y", or "z" (the training world). It is recorded in a
        header comment, which load_gaussian_ply reads to rotate back.
    """
    params = {name: tensor.detach().cpu() for name, tensor in model.params().items()}
    save_params_ply(params, model.max_sh_degree, path, pad_sh_degree, up_axis)


def save_params_ply(params: dict[str, torch.Tensor], max_sh_degree: int, path: str | os.PathLike,
                    pad_sh_degree: int | None = None, up_axis: str = "z") -> None:
    """save_gaussian_ply of a model's `params()` on the CPU (e.g. a host copy a background thread writes)."""
    degree = max_sh_degree if pad_sh_degree is None else pad_sh_degree
    if not max_sh_degree <= degree <= 3:
        raise ValueError(f"pad_sh_degree must be in [{max_sh_degree}, 3], got {pad_sh_degree}")
    n = params["xyz"].shape[0]
    means, quats, features = params["xyz"], params["rotation"], torch.cat([params["f_dc"], params["f_rest"]], dim=1)
    if up_axis != "z":
        means, quats, features = rotate_gaussians(means, quats, features, world_to_export(up_axis))
    rest = torch.zeros(n, 3, num_sh_coeffs(degree) - 1)
    rest[:, :, : features.shape[1] - 1] = features[:, 1:].transpose(1, 2)
    columns = {
        "xyz": means,
        "normals": torch.zeros(n, 3),
        "f_dc": features[:, 0],
        "f_rest": rest.reshape(n, -1),
        "opacity": params["opacity"],
        "scaling": params["scaling"],
        "rotation": quats,
    }
    values = torch.cat(list(columns.values()), dim=1).numpy().astype("<f4")
    names = ply_attribute_names(degree)
    vertices = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        vertices[name] = values[:, i]
    comments = [f"{UP_AXIS_COMMENT} {up_axis}"]
    ply = PlyData([PlyElement.describe(vertices, "vertex")], byte_order="<", comments=comments)
    atomic_write(Path(path), lambda tmp: ply.write(str(tmp)))


def load_gaussian_ply(
    path: str | os.PathLike, max_sh_degree: int | None = None, device: str | torch.device = "cpu",
    file_up_axis: str | None = None,
) -> GaussianModel:
    """Read a standard 3DGS PLY into the training world as a model (no optimizer). The SH degree is
    inferred from the f_rest columns unless given; extra (e.g. padded) coefficients above max_sh_degree are dropped,
    missing ones are zero.

    file_up_axis: the file's axis convention when its header does not record one (a PLY from
        another tool; default "z", the training world); a recorded one always wins.
    """
    ply, vertex = _read_vertex(path)
    if vertex.count == 0:
        raise ValueError(f"{path}: the PLY holds 0 Gaussians; nothing to load (was the run pruned empty?)")
    up_axis = _recorded_up_axis(ply, path) or file_up_axis or "z"
    file_degree = _ply_sh_degree(vertex, path)
    degree = file_degree if max_sh_degree is None else max_sh_degree
    n = vertex.count
    rest = torch.from_numpy(_columns(vertex, _indexed("f_rest", 3 * (num_sh_coeffs(file_degree) - 1))))
    rest = rest.reshape(n, 3, -1).transpose(1, 2)  # [N, K_file-1, 3]
    keep = num_sh_coeffs(degree) - 1
    if rest.shape[1] > keep and bool(rest[:, keep:].any()):
        logger.warning("%s: dropping non-zero SH coefficients above degree %d", path, degree)
    params = {"f_rest": torch.zeros(n, keep, 3)}
    params["f_rest"][:, : min(keep, rest.shape[1])] = rest[:, :keep]
    params["xyz"] = torch.from_numpy(_columns(vertex, ["x", "y", "z"]))
    params["f_dc"] = torch.from_numpy(_columns(vertex, _indexed("f_dc", 3)))[:, None, :]
    params["opacity"] = torch.from_numpy(_columns(vertex, ["opacity"]))
    params["scaling"] = torch.from_numpy(_columns(vertex, _indexed("scale", 3)))
    params["rotation"] = torch.from_numpy(_columns(vertex, _indexed("rot", 4)))
    if up_axis != "z":
        features = torch.cat([params["f_dc"], params["f_rest"]], dim=1)
        means, quats, features = rotate_gaussians(params["xyz"], params["rotation"], features,
                                                  world_to_export(up_axis).T)
        params.update(xyz=means, rotation=quats, f_dc=features[:, :1], f_rest=features[:, 1:])
    return GaussianModel.from_params(params, device)


def ply_attribute_names(sh_degree: int) -> list[str]:
    """Column names of the standard 3DGS PLY for a given SH degree."""
    return [
        "x", "y", "z", "nx", "ny", "nz",
        *_indexed("f_dc", 3),
        *_indexed("f_rest", 3 * (num_sh_coeffs(sh_degree) - 1)),
        "opacity",
        *_indexed("scale", 3),
        *_indexed("rot", 4),
    ]


def _indexed(prefix: str, count: int) -> list[str]:
    return [f"{prefix}_{i}" for i in range(count)]


def _read_vertex(path: str | os.PathLike):
    ply = read_ply(path, "3DGS PLY")
    return ply, ply["vertex"]


def _recorded_up_axis(ply: PlyData, path: str | os.PathLike) -> str | None:
    """The up axis a header comment records ("up_axis -y"), None when there is none."""
    for comment in ply.comments:
        words = comment.split()
        if len(words) == 2 and words[0] == UP_AXIS_COMMENT:
            if words[1] not in UP_AXES:
                raise ValueError(f"{path}: header records up_axis {words[1]!r}, not one of {UP_AXES}")
            return words[1]
    return None


def _ply_sh_degree(vertex, path: str | os.PathLike) -> int:
    names = {prop.name for prop in vertex.properties}
    n_rest = sum(1 for name in names if name.startswith("f_rest_"))
    degrees = [d for d in range(4) if 3 * (num_sh_coeffs(d) - 1) == n_rest]
    if not degrees:
        raise ValueError(f"{path}: {n_rest} f_rest columns match no SH degree (expected 0, 9, 24 or 45)")
    optional = {"nx", "ny", "nz"}
    missing = [name for name in ply_attribute_names(degrees[0]) if name not in names and name not in optional]
    if missing:
        raise ValueError(f"{path}: not a 3DGS PLY, missing properties {missing} (a plain point cloud? use it "
                         "with GenerateCamParams.init_shape=ply as an initialisation instead)")
    return degrees[0]


def _columns(vertex, names: list[str]) -> np.ndarray:
    """[N, len(names)] float32 array of the named vertex properties (N x 0 for no names: SH degree 0)."""
    if not names:
        return np.zeros((vertex.count, 0), dtype=np.float32)
    return np.stack([np.asarray(vertex[name], dtype=np.float32) for name in names], axis=1)
