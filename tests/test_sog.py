"""SOG version 2 (export/sog.py, export/kmeans.py): layout rules, codebooks, round trips, renders, bad files."""
from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from export import sog
from export.kmeans import assign, kmeans
from export.sog import (
    SogFormatError,
    decode_quats,
    encode_quats,
    morton_order,
    nearest_entry,
    palette_size,
    quantize_1d,
    read_sog,
    texture_size,
    write_sog,
)
from export.splat_data import SplatData, SplatDataError
from gaussian_renderer import render
from scene.camera_sampler import orbit_cameras
from scene.ply_format import save_gaussian_ply
from utils.metrics import psnr

# A PLY and the .sog that PlayCanvas splat-transform 2.7.1 (the reference encoder, `splat-transform -g cpu
# splats_301_sh1.ply out.sog`) wrote from it.
DATA = Path(__file__).parent / "data" / "sog"


def _splats(n: int, degree: int, seed: int = 0, prototypes: int | None = None) -> SplatData:
    """n splats in a ball of radius ~1, scales ~0.03; SH rest drawn around `prototypes` vectors (tight
    clusters that a palette can hold) or, without, independently."""
    rng = np.random.default_rng(seed)
    k = (degree + 1) ** 2 - 1
    means = rng.normal(size=(n, 3)) * 0.4
    if prototypes:
        centres = rng.normal(size=(prototypes, k, 3)) * 0.2
        sh_rest = centres[rng.integers(prototypes, size=n)] + rng.normal(size=(n, k, 3)) * 1e-3
    else:
        sh_rest = rng.normal(size=(n, k, 3)) * 0.1
    quats = rng.normal(size=(n, 4))
    return SplatData(
        means=means.astype(np.float32), log_scales=(rng.normal(size=(n, 3)) * 0.4 - 3.5).astype(np.float32),
        quats=(quats / np.linalg.norm(quats, axis=1, keepdims=True)).astype(np.float32),
        opacity_logits=rng.normal(size=n).astype(np.float32) * 2, sh_dc=rng.normal(size=(n, 3)).astype(np.float32),
        sh_rest=sh_rest.astype(np.float32), up_axis="-y",
    )


def _meta(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("meta.json"))


def _match(a: SplatData, b: SplatData) -> np.ndarray:
    """Index into b of each splat of a: the file reorders splats along the Morton curve, and positions
    (distinct, 16-bit accurate) identify them."""
    return cKDTree(b.means).query(a.means)[1]


# ---------------------------------------------------------------------------------------------- layout rules


def test_texture_and_palette_sizes_follow_the_reference_rules():
    assert texture_size(4477) == (68, 68)  # the demo asset
    assert texture_size(1) == (4, 4)
    assert texture_size(1_000_000) == (1000, 1000)
    assert texture_size(1_000_001) == (1004, 1000)
    width, height = texture_size(3001)
    assert width % 4 == 0 and height % 4 == 0 and width * height >= 3001 > width * (height - 4)
    assert [palette_size(n) for n in (1, 37, 1023, 1024, 2047, 3001, 60_000, 1_000_000, 10_000_000)] == [
        1, 32, 512, 1024, 1024, 2048, 32768, 65536, 65536]


def test_morton_order_interleaves_x_y_z_bits_and_refines_crowded_cells():
    corners = np.array([[x, y, z] for z in (0, 1) for y in (0, 1) for x in (0, 1)], np.float32)
    shuffled = np.random.default_rng(0).permutation(8)
    # code = x | y << 1 | z << 2 on the 2x2x2 grid: the corners in the order written above
    np.testing.assert_array_equal(corners[shuffled][morton_order(corners[shuffled])], corners)
    # 300 points in one 1/1024 cell of a box stretched by one far point: ordered again inside their own box
    rng = np.random.default_rng(1)
    cluster = rng.random((300, 3)).astype(np.float32) * 1e-4
    points = np.concatenate([cluster, [[1000.0, 1000.0, 1000.0]]]).astype(np.float32)
    order = morton_order(points)
    assert order[-1] == 300
    np.testing.assert_array_equal(order[:-1], morton_order(cluster))
    assert sorted(order.tolist()) == list(range(301))


def test_quantize_1d_recovers_a_small_set_of_values_and_labels_the_nearest():
    values = np.repeat(np.array([-1.5, 0.25, 2.0], np.float32), [50, 30, 20])
    codebook, labels = quantize_1d(values.reshape(25, 4), k=3)
    np.testing.assert_allclose(codebook, [-1.5, 0.25, 2.0], atol=1e-6)
    np.testing.assert_array_equal(codebook[labels].reshape(-1), values)
    codebook, labels = quantize_1d(values)  # 256 entries, ascending; the three values among them
    assert codebook.shape == (256,) and np.all(np.diff(codebook) >= 0) and {-1.5, 0.25, 2.0} <= set(codebook)
    np.testing.assert_array_equal(codebook[labels], values)
    # on spread data every value gets its nearest entry, and 256 entries beat a uniform 256-step grid
    spread = np.random.default_rng(0).standard_normal(20_000).astype(np.float32)
    codebook, labels = quantize_1d(spread)
    distance = np.abs(codebook[None, :].astype(np.float64) - spread[:, None])
    np.testing.assert_allclose(np.abs(codebook[labels] - spread), distance.min(axis=1), atol=1e-7)
    uniform = np.linspace(spread.min(), spread.max(), 256)
    uniform_error = np.abs(uniform[nearest_entry(uniform, spread)] - spread)
    assert np.mean((codebook[labels] - spread) ** 2) < np.mean(uniform_error ** 2)


def test_quaternions_use_the_reference_smallest_three_layout():
    q = np.array([[0.1, 0.9, -0.3, 0.2], [-0.8, 0.1, 0.1, 0.2], [0.0, 0.0, 0.0, 1.0]], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rgba = encode_quats(q)
    # alpha = 252 + index of the largest |component| (w x y z); the others in order, sign making it positive
    np.testing.assert_array_equal(rgba[:, 3], [253, 252, 255])
    expected_first = 255 * (q[0, [0, 2, 3]] * math.sqrt(2) * 0.5 + 0.5)
    np.testing.assert_array_equal(rgba[0, :3], np.rint(expected_first))
    expected_second = 255 * (-q[1, [1, 2, 3]] * math.sqrt(2) * 0.5 + 0.5)  # w < 0: the whole quaternion flips
    np.testing.assert_array_equal(rgba[1, :3], np.rint(expected_second))
    back = decode_quats(rgba)
    dots = np.abs((back * q).sum(axis=1))
    assert np.all(dots > np.cos(0.006)) and np.all(back[:, :][np.arange(3), rgba[:, 3] - 252] > 0)


# ---------------------------------------------------------------------------------------------- k-means


def test_chunked_assignment_equals_brute_force():
    rng = torch.Generator().manual_seed(0)
    points, centroids = torch.randn(500, 9, generator=rng), torch.randn(37, 9, generator=rng)
    brute = torch.cdist(points, centroids).argmin(dim=1)
    torch.testing.assert_close(assign(points, centroids, block=37 * 7), brute)  # 7 rows per chunk


@pytest.mark.parametrize("flat_limit", [None, 0])  # flat search, and coarse to fine forced
def test_kmeans_finds_well_separated_clusters(flat_limit):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(16, 12, generator=g) * 5
    truth = torch.randint(16, (4000,), generator=g)
    points = centres[truth] + 0.01 * torch.randn(4000, 12, generator=g)
    palette, labels = kmeans(points, 64, 8, device=torch.device("cpu"), progress=False, flat_limit=flat_limit)
    assert palette.shape[0] <= 64 and labels.shape == (4000,) and int(labels.max()) < palette.shape[0]
    # every point ends on a centroid of its own cluster (no palette entry straddles two clusters)
    assert (palette[labels] - centres[truth]).abs().max() < 0.05
    if flat_limit is None:  # a flat search labels every point with its nearest final centroid
        torch.testing.assert_close(labels, assign(points, palette))


# ---------------------------------------------------------------------------------------------- round trips


def _largest_errors(original: SplatData, back: SplatData) -> dict[str, float]:
    match = _match(original, back)
    b = {name: getattr(back, name)[match] for name in ("means", "log_scales", "quats", "opacity_logits", "sh_dc",
                                                       "sh_rest")}
    extent = float(np.ptp(original.means, axis=0).max())
    dots = np.clip(np.abs((b["quats"].astype(np.float64) * original.quats).sum(axis=1)), 0, 1)
    sigmoid = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))  # noqa: E731
    return {
        "position / extent": float(np.abs(b["means"] - original.means).max() / extent),
        "rotation angle (rad)": float((2 * np.arccos(dots)).max()),
        "log-scale": float(np.abs(b["log_scales"] - original.log_scales).max()),
        "opacity": float(np.abs(sigmoid(b["opacity_logits"]) - sigmoid(original.opacity_logits)).max()),
        "colour (DC)": float(np.abs(b["sh_dc"] - original.sh_dc).max()),
        "SH rest": float(np.abs(b["sh_rest"] - original.sh_rest).max()) if original.sh_degree else 0.0,
        "_matched": float(len(set(match.tolist())) == original.num_splats),
    }


@pytest.mark.parametrize("n, degree", [(1999, 0), (3001, 3)])
def test_round_trip_errors_are_what_the_codebooks_give(tmp_path, n, degree):
    data = _splats(n, degree, prototypes=200)
    path = tmp_path / "a.sog"
    write_sog(data, path, sh_iterations=4, progress=False)
    meta = _meta(path)
    back = read_sog(path)
    assert back.num_splats == n and back.sh_degree == degree and back.up_axis == "-y"
    assert meta["version"] == 2 and meta["count"] == n and len(meta["scales"]["codebook"]) == 256
    assert ("shN" in meta) == (degree > 0)
    errors = _largest_errors(data, back)
    assert errors["_matched"] == 1.0  # decoded positions identify every splat

    match = _match(data, back)
    # positions: half a 16-bit step of the log map, stretched by d/dl (e^|l| - 1) = |x| + 1
    half_step = 0.5 * (np.asarray(meta["means"]["maxs"]) - meta["means"]["mins"]) / 65535
    bound = half_step * (np.abs(data.means) + 1) * 1.001 + 1e-6 * np.abs(data.means) + 1e-7
    assert np.all(np.abs(back.means[match] - data.means) <= bound)
    # scales and DC colours: exactly the nearest entry of their 256-entry codebooks
    for name, key in (("log_scales", "scales"), ("sh_dc", "sh0")):
        codebook = np.asarray(meta[key]["codebook"], np.float32)
        original = getattr(data, name)
        np.testing.assert_array_equal(getattr(back, name)[match], codebook[nearest_entry(codebook, original)])
    assert errors["log-scale"] < 0.02 and errors["colour (DC)"] < 0.05
    # rotations: each stored component is off by at most e = 1 / (255 sqrt 2); the rebuilt largest one
    # (>= 1/2) adds at most sqrt(3) times that: chord <= 2 sqrt(3) e, rotation angle <= 2 x chord
    assert errors["rotation angle (rad)"] <= 4 * math.sqrt(3) / (255 * math.sqrt(2)) + 1e-5
    assert errors["opacity"] <= 0.5 / 255 + 1e-6
    if degree:
        # 200 tight SH clusters fit a 2048-entry palette: what is left is the shN codebook's rounding
        codebook = np.asarray(meta["shN"]["codebook"])
        assert meta["shN"]["count"] == palette_size(n) and meta["shN"]["bands"] == 3
        assert errors["SH rest"] < 0.5 * np.diff(codebook).max() + 0.01
        assert np.abs(back.sh_rest[match] - data.sh_rest).mean() < 0.005


def _renders(data: SplatData, views: int = 16, size: int = 32) -> torch.Tensor:
    model = data.to_model()
    one = torch.ones(views)
    cameras = orbit_cameras(3.0 * one, torch.linspace(50, 110, views), torch.linspace(0, 337.5, views),
                            0.7 * one, size, size)
    with torch.no_grad():
        return render(model.gaussian_tensors(), cameras, torch.ones(3), backend="torch").rgb


def test_sixteen_view_psnr_and_size_against_the_ply(tmp_path):
    data = _splats(1501, 3, seed=1)  # independent SH: the palette really has to cluster
    path = tmp_path / "a.sog"
    write_sog(data, path, sh_iterations=4, progress=False)
    back = read_sog(path)
    reference, decoded = _renders(data), _renders(back)
    assert reference.std() > 0.05  # the views see the splats
    value = float(psnr(decoded.clamp(0, 1), reference.clamp(0, 1)))
    # independent random SH is the palette's worst case (1501 unrelated 45-D vectors, 1024 entries); the
    # palette must still beat dropping the higher bands, which is what a degree-0 export would give
    no_sh = SplatData(back.means, back.log_scales, back.quats, back.opacity_logits, back.sh_dc,
                      np.zeros_like(back.sh_rest))
    without = float(psnr(_renders(no_sh).clamp(0, 1), reference.clamp(0, 1)))
    assert value > 32.0 and value > without + 3.0, f"16-view PSNR {value:.2f} dB, {without:.2f} dB without SH"
    save_gaussian_ply(data.to_model(), tmp_path / "a.ply", up_axis="z")  # a PLY of the same splats, same frame
    ratio = (tmp_path / "a.ply").stat().st_size / path.stat().st_size
    # small N: the 1024-entry palette of random vectors is ~40 % of the file (real SH-3 scenes: 14-18x)
    assert ratio > 4.5, f"PLY / SOG = {ratio:.2f}"
    sh0 = SplatData(data.means, data.log_scales, data.quats, data.opacity_logits, data.sh_dc,
                    np.zeros((1501, 0, 3), np.float32))
    write_sog(sh0, tmp_path / "b.sog", progress=False)
    save_gaussian_ply(sh0.to_model(), tmp_path / "b.ply", up_axis="z")
    ratio = (tmp_path / "b.ply").stat().st_size / (tmp_path / "b.sog").stat().st_size
    # random, incompressible attributes (~16 B a splat) and a fixed ~5 KB meta.json; the demo asset gives 4.95x
    assert ratio > 3.0, f"PLY / SOG = {ratio:.2f} at SH 0"


def test_reads_the_reference_encoders_file_with_its_order_and_codebooks(tmp_path):
    data = SplatData.from_ply(DATA / "splats_301_sh1.ply", up_axis="-y")
    reference = DATA / "splat_transform_2.7.1.sog"
    back, meta = read_sog(reference), _meta(reference)
    assert back.num_splats == 301 and back.sh_degree == 1 and meta["shN"]["count"] == palette_size(301) == 256
    match = _match(data, back)
    # the same Morton order: the reference's texel j holds the splat our order puts at j
    np.testing.assert_array_equal(match[morton_order(data.means)], np.arange(301))
    # the same 1-D quantiser: our codebooks equal the reference's on the same values
    for name, key in (("log_scales", "scales"), ("sh_dc", "sh0")):
        np.testing.assert_allclose(quantize_1d(getattr(data, name))[0], meta[key]["codebook"], rtol=0, atol=2e-6)
    # the reference truncates where we round: its errors are within one full step
    half_step = 0.5 * (np.asarray(meta["means"]["maxs"]) - meta["means"]["mins"]) / 65535
    assert np.all(np.abs(back.means[match] - data.means) <= 2 * half_step * (np.abs(data.means) + 1) * 1.001 + 1e-7)
    dots = np.clip(np.abs((back.quats[match].astype(np.float64) * data.quats).sum(axis=1)), 0, 1)
    assert (2 * np.arccos(dots)).max() <= 8 * math.sqrt(3) / (255 * math.sqrt(2))
    opacity = 1 / (1 + np.exp(-data.opacity_logits.astype(np.float64)))
    assert np.abs(1 / (1 + np.exp(-back.opacity_logits[match].astype(np.float64))) - opacity).max() <= 1 / 255 + 1e-6
    # colours of fully transparent splats may be lost to its WebP encoder (no `exact`): the others are exact
    visible = opacity >= 1 / 255
    codebook = np.asarray(meta["sh0"]["codebook"], np.float32)
    np.testing.assert_array_equal(back.sh_dc[match][visible], codebook[nearest_entry(codebook, data.sh_dc)][visible])
    # the SH palette (256 entries for 301 random vectors): ours comes as close as the reference's
    reference_error = np.abs(back.sh_rest[match] - data.sh_rest).mean()
    write_sog(data, tmp_path / "ours.sog", progress=False)
    ours = read_sog(tmp_path / "ours.sog")
    our_error = np.abs(ours.sh_rest[_match(data, ours)] - data.sh_rest).mean()
    assert reference_error < 0.02 and our_error < 1.25 * reference_error, (our_error, reference_error)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sog") / "good.sog"
    write_sog(_splats(301, 1), path, sh_iterations=2, progress=False)
    return path


def _rewrite(source, target, replace: dict[str, bytes | None]):
    """Copy the zip `source` to `target`, replacing entries (None drops one)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            payload = replace.get(name, old.read(name))
            if payload is not None:
                new.writestr(name, payload)


def _webp(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def test_bad_files_are_refused_with_the_file_and_the_rule(good_file, tmp_path):
    meta = _meta(good_file)
    truncated = tmp_path / "truncated.sog"
    truncated.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    with pytest.raises(SogFormatError, match=r"truncated\.sog: not a complete zip archive"):
        read_sog(truncated)

    no_meta = tmp_path / "no_meta.sog"
    _rewrite(good_file, no_meta, {"meta.json": None})
    with pytest.raises(SogFormatError, match=r"no_meta\.sog: the zip holds no meta\.json"):
        read_sog(no_meta)

    version = tmp_path / "version.sog"
    _rewrite(good_file, version, {"meta.json": json.dumps({**meta, "version": 3}).encode()})
    with pytest.raises(SogFormatError, match=r"version\.sog: meta\.json version is 3; only SOG version 2"):
        read_sog(version)

    wrong_size = tmp_path / "size.sog"
    _rewrite(good_file, wrong_size, {"quats.webp": _webp(24, 16)})
    with pytest.raises(SogFormatError, match=r"size\.sog: quats\.webp is 24x16 pixels; for count 301 .* "
                                             r"must be 20x16"):
        read_sog(wrong_size)

    count = tmp_path / "count.sog"  # 1000 splats would need 32x32 images
    _rewrite(good_file, count, {"meta.json": json.dumps({**meta, "count": 1000}).encode()})
    with pytest.raises(SogFormatError, match=r"count\.sog: means_l\.webp is 20x16 pixels; for count 1000"):
        read_sog(count)
    fewer = tmp_path / "fewer.sog"  # same layout, fewer splats than the file claims to hold in quats
    _rewrite(good_file, fewer, {"meta.json": json.dumps({**meta, "count": 310}).encode()})
    with pytest.raises(SogFormatError, match=r"fewer\.sog: quats\.webp alpha must be 252-255"):
        read_sog(fewer)

    not_zip = tmp_path / "plain.sog"
    not_zip.write_text("hello")
    with pytest.raises(SogFormatError, match="not a complete zip archive"):
        read_sog(not_zip)
    with pytest.raises(SogFormatError, match="no such file"):
        read_sog(tmp_path / "missing.sog")


def test_unwritable_splats_leave_no_file(tmp_path, monkeypatch):
    data = _splats(50, 0)
    means = data.means.copy()
    means[7, 0] = np.nan
    broken = SplatData(means, data.log_scales, data.quats, data.opacity_logits, data.sh_dc, data.sh_rest)
    with pytest.raises(SplatDataError, match=r"run/x\.ply: 1 Gaussians have non-finite means"):
        write_sog(broken, tmp_path / "x.sog", source="run/x.ply")
    empty = SplatData(*(getattr(data, name)[:0] for name in ("means", "log_scales", "quats", "opacity_logits",
                                                            "sh_dc", "sh_rest")))
    with pytest.raises(SplatDataError, match="holds no Gaussians"):
        write_sog(empty, tmp_path / "x.sog")

    def fail(image):
        raise OSError("disk full")

    monkeypatch.setattr(sog, "encode_webp", fail)
    with pytest.raises(OSError, match="disk full"):
        write_sog(data, tmp_path / "x.sog")
    assert list(tmp_path.iterdir()) == []
