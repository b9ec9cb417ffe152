"""A coloured triangle mesh from 3D Gaussians: GLB and OBJ files for engines and glTF viewers.

    python -m export.mesh RUN_DIR_or_PLY [--out FOLDER] [--resolution 192] [--faces 50000] [--texture 1024]

Steps: the opacity field of the Gaussians on a grid (export/gaussian_field.py), marching cubes at
the iso-level `level`, clean-up (components smaller than a fraction of the largest are dropped:
floaters), decimation to a target face count (fast-simplification's quadric simplifier), and
per-vertex colours: from renders of the Gaussians where views see the surface (export/mesh_bake.py),
elsewhere the Gaussians' degree-0 SH (the view-independent colour) blended over the Gaussians near
each vertex, weighted by their opacity there. The OBJ always carries a baked UV texture
(export/mesh_texture.py), the GLB one when `texture` is set.

Files follow glTF's convention: +Y up, front facing +Z, 1 unit = 1 metre (the training scene's
units taken as metres; the object fits in about 1-2 units). Both are stated in the GLB (scene
extras) and the OBJ header.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from export.gaussian_field import NoSurfaceError, opacity_grid
from export.mesh_colors import color_sources, colors_at, vertex_normals
from scene.gaussian_model import GaussianModel
from scene.gaussian_tensors import GaussianTensors
from scene.orientation import MESH_UP_AXIS, world_to_export
from scene.ply_format import load_gaussian_ply
from utils.checkpoint_file import load_checkpoint
from utils.cli_errors import InputError, reading, require_writable_folder, run_command
from utils.files import atomic_write_bytes

if TYPE_CHECKING:
    from export.mesh_colors import ColorSources
    from export.mesh_texture import TexturedMesh

log = logging.getLogger(__name__)

ASSET_NOTE = {"up_axis": "+Y", "front": "+Z", "units": "metres (1 training-scene unit = 1 m)",
              "generator": "SegmentDreamer export/mesh.py"}


@dataclass(frozen=True)
class MeshOptions:
    resolution: int = 192  # grid cells per axis of the opacity field
    faces: int = 50000  # target face count after decimation (0 = no decimation)
    level: float = 0.3  # iso-level of the opacity field
    min_component: float = 0.05  # components with fewer faces than this fraction of the largest are dropped
    neighbours: int = 16  # Gaussians blended into a colour where no bake view sees the surface
    bake_views: int = 12  # views per ring (4 rings) whose Gaussian renders give the colours (0 = no renders)
    bake_size: int = 256  # their image size (pixels)
    texture: int = 0  # size of a baked UV texture for both files (0 = per-vertex colours in the GLB, a
    # texture sized by obj_texture_size in the OBJ)


@dataclass
class ColoredMesh:
    vertices: np.ndarray  # [V, 3] float32, training world (z up)
    faces: np.ndarray  # [F, 3] int64, counter-clockwise seen from outside
    colors: np.ndarray  # [V, 3] float32 in [0, 1]

    def exported_vertices(self) -> np.ndarray:
        """[V, 3] in the files' convention (y up, front +z)."""
        return self.vertices @ world_to_export(MESH_UP_AXIS).numpy().T


# ---------------------------------------------------------------------- extraction


def extract_surface(gaussians: GaussianTensors, options: MeshOptions) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes on the opacity field: (vertices [V, 3] world, faces [F, 3]), outward-facing."""
    import mcubes

    with torch.no_grad():
        grid = opacity_grid(gaussians, options.resolution)
    values = np.pad(grid.values.cpu().numpy().astype(np.float64), 1)  # closed surfaces at the box edges
    verts, faces = mcubes.marching_cubes(values, options.level)
    if len(faces) == 0:
        raise NoSurfaceError(f"the opacity field never reaches level {options.level} (max "
                         f"{float(grid.values.max()):.3f}): no surface; lower the level")
    verts = grid.origin.cpu().numpy() + (verts - 1.0) * grid.voxel
    faces = faces.astype(np.int64)
    if _signed_volume(verts, faces) < 0:  # orient outwards (the field is high inside)
        faces = faces[:, ::-1].copy()
    return verts.astype(np.float32), faces


def _signed_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (verts[faces[:, i]] for i in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def drop_small_components(verts: np.ndarray, faces: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the connected components (sharing vertices) with >= min_fraction of the largest's faces."""
    n = len(verts)
    rows = np.repeat(faces[:, 0], 2)
    cols = faces[:, 1:].reshape(-1)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    face_label = labels[faces[:, 0]]
    counts = np.bincount(face_label)
    keep = counts[face_label] >= min_fraction * counts.max()
    return remove_unreferenced(verts, faces[keep])


def remove_unreferenced(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used, inverse = np.unique(faces.reshape(-1), return_inverse=True)
    return verts[used], inverse.reshape(-1, 3).astype(np.int64)


def decimate(verts: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse simplification to about target_faces (no-op when already below)."""
    if target_faces <= 0 or len(faces) <= target_faces:
        return verts, faces
    import fast_simplification

    v, f = fast_simplification.simplify(verts.astype(np.float32), faces.astype(np.int64),
                                        target_reduction=1.0 - target_faces / len(faces))
    return remove_unreferenced(v.astype(np.float32), f.astype(np.int64))


# ---------------------------------------------------------------------- colour


def mesh_from_gaussians(gaussians: GaussianTensors, options: MeshOptions = MeshOptions()) -> ColoredMesh:
    """Extraction, clean-up, decimation and colouring (see the module docstring)."""
    return _mesh_and_sources(gaussians, options)[0]


def _mesh_and_sources(gaussians: GaussianTensors, options: MeshOptions) -> tuple[ColoredMesh, "ColorSources"]:
    """mesh_from_gaussians, and the colour sources (k-d tree, bake renders) its colours came from, for the
    texture of the same mesh to reuse."""
    verts, faces = extract_surface(gaussians, options)
    raw_faces = len(faces)
    verts, faces = drop_small_components(verts, faces, options.min_component)
    verts, faces = decimate(verts, faces, options.faces)
    sources = color_sources(gaussians, verts, faces, options)
    colors = colors_at(gaussians, verts, vertex_normals(verts, faces), verts, faces, options, sources)
    log.info("mesh: %d faces from marching cubes -> %d faces, %d vertices", raw_faces, len(faces), len(verts))
    return ColoredMesh(vertices=verts, faces=faces, colors=colors), sources


# ---------------------------------------------------------------------- files


def _to_trimesh(mesh: "ColoredMesh | TexturedMesh"):
    """A trimesh in the files' axes: per-vertex colours (linear: glTF's COLOR_0 is linear, ours are
    sRGB) or UVs with the baked image (sRGB, as glTF's baseColorTexture)."""
    import trimesh
    from PIL import Image

    if isinstance(mesh, ColoredMesh):
        c = mesh.colors
        linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return trimesh.Trimesh(vertices=mesh.exported_vertices(), faces=mesh.faces,
                               vertex_colors=_rgba8(linear), process=False)
    visual = trimesh.visual.TextureVisuals(uv=mesh.uv, image=Image.fromarray(mesh.image))
    return trimesh.Trimesh(vertices=mesh.exported_vertices(), faces=mesh.faces, visual=visual, process=False)


def write_glb(mesh: "ColoredMesh | TexturedMesh", path: Path, extras: dict | None = None) -> Path:
    """Binary glTF, +Y up, unlit material; `extras` land in the scene's extras."""
    import trimesh

    scene = trimesh.Scene(_to_trimesh(mesh))
    scene.metadata.update({**ASSET_NOTE, **(extras or {})})
    atomic_write_bytes(path, trimesh.exchange.gltf.export_glb(scene, tree_postprocessor=_unlit_materials))
    return path


def _unlit_materials(tree: dict) -> None:
    """Make every material unlit (KHR_materials_unlit), white and non-metallic, adding one where a
    primitive has none: colours show as they are, like the unlit splats. glTF's default material is
    fully metallic, which renders black under ambient light (e.g. three.js)."""
    materials = tree.setdefault("materials", [])
    for primitive in (p for mesh in tree["meshes"] for p in mesh["primitives"]):
        if "material" not in primitive:
            materials.append({"name": "vertex_color",
                              "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0]}})
            primitive["material"] = len(materials) - 1
    for material in materials:
        pbr = material.setdefault("pbrMetallicRoughness", {})
        pbr.update(baseColorFactor=[1.0, 1.0, 1.0, 1.0], metallicFactor=0.0, roughnessFactor=1.0)  # colour: ours only
        material.setdefault("extensions", {})["KHR_materials_unlit"] = {}
    tree["extensionsUsed"] = sorted(set(tree.get("extensionsUsed", [])) | {"KHR_materials_unlit"})


def obj_texture_size(faces: int) -> int:
    """The OBJ's texture size when none is configured: about 64 texels per face (finer than the vertex
    colours everywhere), a power of two from 256 to 1024."""
    size = 256
    while size < 1024 and size * size < 64 * faces:
        size *= 2
    return size


def write_obj(mesh: "TexturedMesh", path: Path) -> Path:
    """Wavefront OBJ + MTL with UVs and the baked texture as a PNG next to them (map_Kd). Per-vertex
    colours ("v x y z r g b") are not used: Blender's and three.js's OBJ importers ignore them as soon
    as a material is assigned, and without one they show no colour either."""
    import trimesh

    header = [f"# {key}: {value}" for key, value in ASSET_NOTE.items()]
    mtl = path.with_suffix(".mtl")
    text, files = trimesh.exchange.obj.export_obj(_to_trimesh(mesh), return_texture=True, mtl_name=mtl.name,
                                                  header=None)
    (texture,) = [name for name in files if name.endswith(".png")]
    atomic_write_bytes(path.parent / texture, files[texture])
    # trimesh's MTL has Kd 0.4, which viewers multiply into the texture: white instead.
    atomic_write_bytes(mtl, f"newmtl material_0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {texture}\n".encode())
    atomic_write_bytes(path, ("\n".join(header) + "\n" + text).encode())
    return path


def _rgba8(colors: np.ndarray) -> np.ndarray:
    rgb = np.clip(np.round(colors * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)


def export_mesh(gaussians: GaussianTensors, folder: Path, options: MeshOptions = MeshOptions(),
                extras: dict | None = None) -> dict[str, Path]:
    """mesh.glb and mesh.obj + mesh.mtl + the OBJ's texture PNG in `folder`.
    Returns {"glb": ..., "obj": ...}."""
    from export.mesh_texture import bake_texture

    mesh, sources = _mesh_and_sources(gaussians, options)  # one k-d tree and bake for vertices and texture
    if options.texture:
        mesh = textured = bake_texture(gaussians, mesh.vertices, mesh.faces, options, sources)
    else:  # the GLB keeps the vertex colours (glTF's COLOR_0 is shown by every viewer); the OBJ needs a texture
        size = obj_texture_size(len(mesh.faces))
        textured = bake_texture(gaussians, mesh.vertices, mesh.faces, replace(options, texture=size), sources)
    info = {"faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices)), "options": asdict(options),
            **(extras or {})}
    return {"glb": write_glb(mesh, folder / "mesh.glb", info), "obj": write_obj(textured, folder / "mesh.obj")}


# ---------------------------------------------------------------------- sources


def find_source(path: Path) -> tuple[Path, int | None]:
    """The Gaussians to mesh in a run folder: point_cloud.ply of a finished run, else the newest of
    checkpoints/last.pt and point_cloud/iteration_*/point_cloud.ply (an interrupted run). A .ply or
    .pt path is used as is. Returns (path, training step or None)."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise InputError(f"source {path}: no such run folder or file; pass a run folder, a 3DGS .ply or a "
                         "checkpoint .pt")
    if (path / "point_cloud.ply").is_file():
        return path / "point_cloud.ply", None
    candidates = [(int(m.group(1)), p) for p in path.glob("point_cloud/iteration_*/point_cloud.ply")
                  if (m := re.fullmatch(r"iteration_(\d+)", p.parent.name))]
    checkpoint = path / "checkpoints" / "last.pt"
    if checkpoint.is_file():
        candidates.append((int(load_checkpoint(checkpoint)["step"]), checkpoint))
    if not candidates:
        raise InputError(f"source {path}: no point_cloud.ply, checkpoints/last.pt or point_cloud/iteration_*/ in "
                         "this folder; pass a run folder written by train.py, a 3DGS .ply or a checkpoint .pt")
    step, best = max(candidates, key=lambda c: c[0])
    return best, step


def checkpoint_model(path: Path) -> GaussianModel:
    """The Gaussians of a train.py checkpoint (.pt), in the training world; CheckpointError or InputError
    naming the file when it is damaged or holds no Gaussians."""
    state = load_checkpoint(path)  # weights only: a received run folder runs no code
    if not isinstance(state.get("gaussians"), dict) or "max_sh_degree" not in state["gaussians"]:
        raise InputError(f"source {path}: a checkpoint without Gaussians; pass a train.py checkpoint")
    model = GaussianModel(state["gaussians"]["max_sh_degree"])
    model.load_state_dict({**state["gaussians"], "optimizer": None})
    return model


def load_gaussians(path: Path, file_up_axis: str | None = None) -> GaussianTensors:
    """Activated Gaussians (training world) from a 3DGS PLY or a training checkpoint (.pt); InputError or
    CheckpointError naming the file when it is of another kind, damaged, empty, non-finite or transparent."""
    if path.suffix.lower() not in (".pt", ".ply"):
        raise InputError(f"source {path}: a {path.suffix or 'suffix-less'} file; python -m export.mesh reads a run "
                         "folder, a 3DGS .ply or a checkpoint .pt")
    with reading("source", path):
        if path.suffix.lower() == ".pt":
            model = checkpoint_model(path)
        else:
            model = load_gaussian_ply(path, file_up_axis=file_up_axis)
        model.check_usable(str(path))
    with torch.no_grad():
        return model.gaussian_tensors(sh_degree=model.max_sh_degree)


def run_options(path: Path) -> MeshOptions:
    """The export settings of the run the file belongs to (its config.yaml), defaults otherwise."""
    from utils.config import load_config

    for folder in (path, *path.parents[:3]):
        if (folder / "config.yaml").is_file():
            return options_from_config(load_config(folder / "config.yaml", warn_no_effect=False))
    return MeshOptions()


def options_from_config(cfg) -> MeshOptions:
    return MeshOptions(resolution=cfg.mesh_resolution, faces=cfg.mesh_faces, level=cfg.mesh_level,
                       texture=cfg.mesh_texture, bake_views=cfg.mesh_bake_views)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.mesh", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="run folder (finished or interrupted), 3DGS .ply or checkpoint .pt")
    parser.add_argument("--out", type=Path, help="output folder (default: <run folder>/mesh or next to the file)")
    parser.add_argument("--resolution", type=int, help="grid cells per axis (default: the run's mesh_resolution)")
    parser.add_argument("--faces", type=int, help="target face count (default: the run's mesh_faces)")
    parser.add_argument("--level", type=float, help="iso-level of the opacity field (default: the run's mesh_level)")
    parser.add_argument("--texture", type=int, help="bake a UV texture of this size (default: the run's mesh_texture)")
    parser.add_argument("--bake-views", type=int, help="views per ring of the colour bake (default: the run's "
                                                        "mesh_bake_views; 0 = SH DC of nearby Gaussians)")
    parser.add_argument("--ply-up", choices=("-y", "y", "z"),
                        help="up axis of a PLY whose header does not record one (default z, our training world;"
                             " PLYs of COLMAP scenes are -y)")
    args = parser.parse_args(argv)
    for name, low in (("resolution", 8), ("faces", 0), ("texture", 0), ("bake_views", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.level is not None and not 0.0 < args.level < 1.0:
        parser.error(f"--level must be an opacity in (0, 1), got {args.level}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(lambda: _export(args), log, NoSurfaceError)


def _export(args: argparse.Namespace) -> int:
    """main()'s work: inputs and the output folder checked before the (minutes-long) extraction."""
    source, step = find_source(args.source)
    defaults = run_options(source.parent)
    options = MeshOptions(resolution=args.resolution or defaults.resolution,
                          faces=defaults.faces if args.faces is None else args.faces,
                          level=args.level or defaults.level,
                          texture=defaults.texture if args.texture is None else args.texture,
                          bake_views=defaults.bake_views if args.bake_views is None else args.bake_views)
    out = require_writable_folder("--out", args.out or (args.source / "mesh" if args.source.is_dir()
                                                        else source.parent))
    gaussians = load_gaussians(source, args.ply_up)
    extras = {"source": str(source), **({"step": step} if step is not None else {})}
    files = export_mesh(gaussians, out, options, extras)
    print(json.dumps({name: str(p) for name, p in files.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
