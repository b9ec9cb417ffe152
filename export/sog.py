"""SOG, version 2: PlayCanvas "spatially ordered Gaussians", written and read in Python.

A `.sog` file is a zip (entries stored, not deflated) of `meta.json` and lossless WebP images. Every
per-splat image holds one splat per pixel, row-major, splats in Morton order of their centres, on a
W x H canvas with W = ceil(sqrt(N) / 4) * 4 and H = ceil(N / W / 4) * 4 (padding pixels are zero):

    means_l.webp, means_u.webp  low / high byte of 16-bit x, y, z after l = sign(x) * ln(|x| + 1), mapped
                                linearly from meta means.mins..maxs (the per-axis range of l) to 0..65535
    quats.webp                  smallest three: the three other components of the unit quaternion
                                (w, x, y, z), sign chosen so the largest is positive, times sqrt(2), as
                                255 * (v / 2 + 1 / 2); alpha = 252 + index of the dropped (largest) one
    scales.webp                 x, y, z log-scales as indices into the 256-entry scales codebook
    sh0.webp                    r, g, b DC coefficients as indices into the 256-entry sh0 codebook;
                                alpha = 255 * sigmoid(opacity logit)
    shN_labels.webp             (bands 1-3) 16-bit palette index, low byte in r, high byte in g
    shN_centroids.webp          the SH palette, 64 entries per row, entry e at row e // 64, columns
                                (e % 64) * C .. + C - 1 (C = 3, 8, 15 coefficients); channel r/g/b =
                                index into the 256-entry shN codebook of that colour's coefficient

The layout, codebooks and palette follow PlayCanvas splat-transform (src/lib/writers/write-sog.ts, its
reader src/lib/readers/read-sog.ts) and are read by the PlayCanvas engine
(src/scene/gsplat/gsplat-sog-data.js), SuperSplat and Spark. The 256-entry codebooks are built as the
reference builds them (spatial/quantize-1d-core.ts: optimal 1-D quantisation by dynamic programming over
a 1024-bin histogram whose bins blend quantile and uniform positions, bins weighted by count^0.5). The SH
palette is k-means over the 45-float (SH 3) coefficient vectors with min(64, 2^floor(log2(N / 1024))) * 1024
entries; here it runs with torch (export/kmeans.py), on the GPU when there is one.

Deviation from the reference, on purpose: bytes are rounded, not truncated (half the error, same format).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from export.kmeans import kmeans
from export.splat_data import SplatData
from scene.orientation import UP_AXES
from utils.files import atomic_write

log = logging.getLogger(__name__)

SOG_VERSION = 2
CODEBOOK_SIZE = 256
MAX_TEXELS = 16383  # WebP's largest image side
PALETTE_ROW = 64  # SH palette entries per row of shN_centroids.webp
SH_REST_COEFFS = (0, 3, 8, 15)  # per colour, by SH degree
DEFAULT_SH_ITERATIONS = 10  # splat-transform's default k-means iteration count
GENERATOR = "SegmentDreamer export.sog"
# files in the zip, in the order the reference writes them
MEANS_FILES = ("means_l.webp", "means_u.webp")
QUATS_FILE, SCALES_FILE, SH0_FILE = "quats.webp", "scales.webp", "sh0.webp"
SHN_FILES = ("shN_centroids.webp", "shN_labels.webp")
META_FILE = "meta.json"


class SogFormatError(ValueError):
    """A file that is not a readable SOG version 2, or splats that SOG cannot hold."""


# ---------------------------------------------------------------------------------------------- layout


def texture_size(count: int) -> tuple[int, int]:
    """(width, height) of every per-splat image: the reference's rule, both sides multiples of 4."""
    width = math.ceil(math.sqrt(count) / 4) * 4
    height = math.ceil(count / width / 4) * 4
    return width, height


def palette_size(count: int) -> int:
    """Number of SH palette entries for `count` splats (write-sog.ts): 1K per doubling above 1K, at most 64K."""
    return int(min(64, 2 ** math.floor(math.log2(count / 1024))) * 1024)


def _part1by2(v: np.ndarray) -> np.ndarray:
    """Spread the low 10 bits of v so that two zero bits follow each (Morton interleave, uint32)."""
    v = v.astype(np.uint32) & 0x3FF
    v = (v ^ (v << 16)) & 0xFF0000FF
    v = (v ^ (v << 8)) & 0x0300F00F
    v = (v ^ (v << 4)) & 0x030C30C3
    return (v ^ (v << 2)) & 0x09249249


def morton_order(means: np.ndarray) -> np.ndarray:
    """[N] int64 permutation sorting `means` [N, 3] along a Z-order curve of 10 bits per axis over their
    bounding box; runs of more than 256 splats sharing one code are ordered again within their own box
    (ops/morton-order.ts). Stable, so equal codes keep their input order."""
    order = np.arange(means.shape[0], dtype=np.int64)
    pending = [(0, order.size)]
    while pending:
        start, end = pending.pop()
        index = order[start:end]
        points = means[index].astype(np.float64)
        low, extent = points.min(axis=0), np.ptp(points, axis=0)
        if not np.all(extent == 0):
            scale = np.divide(1024.0, extent, out=np.zeros(3), where=extent > 0)
            cells = np.minimum(1023, (points - low) * scale).astype(np.uint32)  # [n, 3]
            codes = (_part1by2(cells[:, 2]) << 2) + (_part1by2(cells[:, 1]) << 1) + _part1by2(cells[:, 0])
            by_code = np.argsort(codes, kind="stable")
            order[start:end] = index[by_code]
            codes = codes[by_code]
            run_starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
            run_ends = np.r_[run_starts[1:], codes.size]
            pending.extend((start + a, start + b) for a, b in zip(run_starts, run_ends) if b - a > 256)
    return order


# ---------------------------------------------------------------------------------------------- codebooks


def quantize_1d(values: np.ndarray, k: int = CODEBOOK_SIZE, alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A k-entry ascending float32 codebook for all of `values` (any shape, finite) and each value's
    nearest entry (uint8 labels, values' shape).

    Optimal weighted 1-D quantisation as splat-transform's spatial/quantize-1d-core.ts: the sorted values
    fall into min(1024, n) bins placed by a blend of rank (quantile) and value (uniform) position, the blend
    leaning to quantiles when outliers stretch the range; bins weigh count^alpha; dynamic programming splits
    the bins into k runs of least weighted squared error; each entry is its run's weighted mean. Entries
    beyond the number of non-empty bins repeat the last one."""
    flat = values.astype(np.float32).reshape(-1)
    n = flat.size
    ordered = np.sort(flat).astype(np.float64)
    v_min, v_max = ordered[0], ordered[-1]
    if v_max - v_min < 1e-20:
        return np.full(k, v_min, np.float32), np.zeros(values.shape, np.uint8)
    v_range = v_max - v_min
    bins = min(1024, n)
    iqr = ordered[int(n * 0.75)] - ordered[int(n * 0.25)]
    beta = max(0.5, min(0.999, 1 - iqr / v_range))
    position = beta * (np.arange(n) / n) + (1 - beta) * (ordered - v_min) / v_range
    bin_of = np.minimum(bins - 1, np.floor(bins * position)).astype(np.int64)
    counts = np.bincount(bin_of, minlength=bins).astype(np.float64)
    sums = np.bincount(bin_of, weights=ordered, minlength=bins)
    empty_centres = v_min + (np.arange(bins) + 0.5) / bins * v_range
    centres = np.where(counts > 0, sums / np.maximum(counts, 1), empty_centres)
    weights = np.where(counts > 0, counts ** alpha, 0.0)
    pref_w = np.r_[0.0, np.cumsum(weights)]
    pref_wx = np.r_[0.0, np.cumsum(weights * centres)]
    pref_wxx = np.r_[0.0, np.cumsum(weights * centres * centres)]

    # run_cost[a, b]: weighted squared error of bins a..b around their weighted mean (a <= b)
    a, b = np.arange(bins)[:, None], np.arange(bins)[None, :]
    w = pref_w[b + 1] - pref_w[a]
    wx = pref_wx[b + 1] - pref_wx[a]
    run_cost = np.where(w > 0, (pref_wxx[b + 1] - pref_wxx[a]) - wx * wx / np.where(w > 0, w, 1), 0.0)
    # last_run[j, s] = cost of the last run being bins s + 1..j (only s < j is a split); [j, s] so that
    # the minimum over s runs along contiguous memory
    last_run = np.full((bins, bins), np.inf)
    last_run[:, :-1] = run_cost[1:].T
    last_run[b >= a] = np.inf

    k_eff = min(k, int(np.count_nonzero(counts)))
    best = run_cost[0].copy()  # best[j]: least cost of bins 0..j in m runs
    splits = np.full((k_eff + 1, bins), -1, np.int64)
    total = np.empty_like(last_run)
    for m in range(2, k_eff + 1):
        np.add(last_run, best[None, :], out=total)  # [j, s]
        splits[m] = np.argmin(total, axis=1)
        best = total[np.arange(bins), splits[m]]

    def run_mean(lo: int, hi: int) -> float:
        weight = pref_w[hi + 1] - pref_w[lo]
        return (pref_wx[hi + 1] - pref_wx[lo]) / weight if weight > 0 else (centres[lo] + centres[hi]) / 2

    entries = np.empty(k_eff)
    j = bins - 1
    for m in range(k_eff, 0, -1):
        s = splits[m, j] if m > 1 else -1
        entries[m - 1] = run_mean(s + 1, j)
        j = s
    codebook = np.full(k, np.sort(entries)[-1], np.float32)
    codebook[:k_eff] = np.sort(entries)
    return codebook, nearest_entry(codebook, flat).reshape(values.shape)


def nearest_entry(codebook: np.ndarray, values: np.ndarray) -> np.ndarray:
    """uint8 index of the codebook entry (ascending) nearest each value: the count of midpoints below it."""
    entries = codebook.astype(np.float64)
    midpoints = (entries[:-1] + entries[1:]) * 0.5
    return np.searchsorted(midpoints, values.astype(np.float64), side="right").astype(np.uint8)


# ---------------------------------------------------------------------------------------------- encoding


def _log_transform(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _inverse_log_transform(y: np.ndarray) -> np.ndarray:
    return np.sign(y) * np.expm1(np.abs(y))


def _to_byte(v: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def encode_means(means: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float], list[float]]:
    """16-bit codes: low bytes [N, 3], high bytes [N, 3], and the per-axis mins / maxs of the log map."""
    logged = _log_transform(means.astype(np.float64))
    mins, maxs = logged.min(axis=0), logged.max(axis=0)
    span = maxs - mins
    unit = np.divide(logged - mins, span, out=np.zeros_like(logged), where=span > 0)
    codes = np.clip(np.rint(65535 * unit), 0, 65535).astype(np.uint16)
    return (codes & 0xFF).astype(np.uint8), (codes >> 8).astype(np.uint8), mins.tolist(), maxs.tolist()


def encode_quats(quats: np.ndarray) -> np.ndarray:
    """[N, 4] RGBA bytes of the smallest-three encoding of (w, x, y, z) quaternions."""
    q = quats.astype(np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    largest = np.argmax(np.abs(q), axis=1)  # first of equals, as the reference
    rows = np.arange(q.shape[0])
    q = q * (np.where(q[rows, largest] < 0, -1.0, 1.0) * math.sqrt(2))[:, None]
    others = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])[largest]  # [N, 3]
    rgba = np.empty((q.shape[0], 4), np.uint8)
    rgba[:, :3] = _to_byte(255 * (np.take_along_axis(q, others, axis=1) * 0.5 + 0.5))
    rgba[:, 3] = 252 + largest
    return rgba


def decode_quats(rgba: np.ndarray) -> np.ndarray:
    """[N, 4] unit (w, x, y, z) quaternions from smallest-three RGBA bytes (alpha 252..255)."""
    largest = rgba[:, 3].astype(np.int64) - 252
    three = (rgba[:, :3].astype(np.float64) / 255 * 2 - 1) / math.sqrt(2)
    q = np.zeros((rgba.shape[0], 4))
    others = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])[largest]
    np.put_along_axis(q, others, three, axis=1)
    q[np.arange(q.shape[0]), largest] = np.sqrt(np.maximum(0.0, 1 - (three ** 2).sum(axis=1)))
    return q.astype(np.float32)


def _json_floats(codebook: np.ndarray) -> list[float]:
    """float32 entries as the shortest decimals that read back to the same float32 (readers keep codebooks
    in float32), which halves meta.json against float64 digits."""
    return [float(str(value)) for value in codebook.astype(np.float32)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _canvas(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """[height, width, 4] uint8 image holding `pixels` [N, 4] row-major, zero padding after them."""
    canvas = np.zeros((width * height, 4), np.uint8)
    canvas[: pixels.shape[0]] = pixels
    return canvas.reshape(height, width, 4)


def _rgba(channels: list[np.ndarray], alpha: np.ndarray | int = 255) -> np.ndarray:
    """[N, 4] uint8 from three [N] channels and an alpha (array or constant)."""
    out = np.empty((channels[0].shape[0], 4), np.uint8)
    for c, channel in enumerate(channels):
        out[:, c] = channel
    out[:, 3] = alpha
    return out


def encode_webp(image: np.ndarray) -> bytes:
    """Lossless WebP of an [H, W, 4] uint8 image; `exact` keeps the colour of transparent pixels (an sh0
    pixel of opacity 0 still holds the splat's colour indices)."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGBA").save(buffer, format="WEBP", lossless=True, quality=70, method=4, exact=True)
    return buffer.getvalue()


def _sh_palette(sh_rest: np.ndarray, iterations: int, device: torch.device | None, progress: bool,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(palette [P, K * 3] float32 channel-major like PLY f_rest, labels [N] int64) by k-means."""
    n, coeffs, _ = sh_rest.shape
    points = torch.from_numpy(np.ascontiguousarray(sh_rest.transpose(0, 2, 1).reshape(n, coeffs * 3)))
    centroids, labels = kmeans(points, palette_size(n), iterations, device=device, progress=progress)
    return centroids.cpu().numpy().astype(np.float32), labels.cpu().numpy()


def write_sog(data: SplatData, path: str | os.PathLike, *, sh_iterations: int = DEFAULT_SH_ITERATIONS,
              device: str | torch.device | None = None, progress: bool = True, source: str | None = None) -> None:
    """Write `data` as a SOG version 2 bundle at `path` (atomically: a failure leaves no file).

    sh_iterations: Lloyd iterations of the SH palette k-means (SH degree >= 1 only).
    device: where k-means runs; None picks CUDA when available, else the CPU.
    progress: show a tqdm bar over the k-means iterations of long encodes.
    source: the file or run the splats came from, named in errors (default: `path`).
    The coordinates are written as they are (SOG, like the PLY, holds the file frame `data.up_axis`, which
    meta.json records under asset.up_axis; viewers ignore that key)."""
    path = Path(path)
    data.check_writable(source or str(path))
    if sh_iterations < 1:
        raise SogFormatError(f"sh_iterations must be at least 1, got {sh_iterations}")
    n = data.num_splats
    width, height = texture_size(n)
    if max(width, height) > MAX_TEXELS:
        raise SogFormatError(f"{source or path}: {n} splats need a {width}x{height} image; a SOG image side is at "
                             f"most {MAX_TEXELS} (about 268M splats): prune the asset first")
    order = morton_order(data.means)

    low, high, mins, maxs = encode_means(data.means[order])
    scales_codebook, scale_labels = quantize_1d(data.log_scales)
    dc_codebook, dc_labels = quantize_1d(data.sh_dc)
    opacity = _to_byte(255 * _sigmoid(data.opacity_logits))
    images = {  # [H, W, 4] uint8 each, in the reference's zip order
        MEANS_FILES[0]: _rgba([low[:, 0], low[:, 1], low[:, 2]]),
        MEANS_FILES[1]: _rgba([high[:, 0], high[:, 1], high[:, 2]]),
        QUATS_FILE: encode_quats(data.quats[order]),
        SCALES_FILE: _rgba([scale_labels[order, c] for c in range(3)]),
        SH0_FILE: _rgba([dc_labels[order, c] for c in range(3)], opacity[order]),
    }
    images = {name: _canvas(pixels, width, height) for name, pixels in images.items()}
    meta = {
        "version": SOG_VERSION,
        "asset": {"generator": GENERATOR, "up_axis": data.up_axis},
        "count": n,
        "means": {"mins": mins, "maxs": maxs, "files": list(MEANS_FILES)},
        "scales": {"codebook": _json_floats(scales_codebook), "files": [SCALES_FILE]},
        "quats": {"files": [QUATS_FILE]},
        "sh0": {"codebook": _json_floats(dc_codebook), "files": [SH0_FILE]},
    }
    if data.sh_degree > 0:
        coeffs = SH_REST_COEFFS[data.sh_degree]
        resolved = torch.device(device) if device is not None else None
        palette, labels = _sh_palette(data.sh_rest, sh_iterations, resolved, progress)
        sh_codebook, palette_labels = quantize_1d(palette)  # [P, coeffs * 3], channel-major
        entries = palette.shape[0]
        # entry e, coefficient j: texel (e % 64) * coeffs + j of row e // 64; r, g, b = the three colours
        texels = palette_labels.reshape(entries, 3, coeffs).transpose(0, 2, 1).reshape(entries * coeffs, 3)
        rows = math.ceil(entries / PALETTE_ROW)
        centroids = np.zeros((rows * PALETTE_ROW * coeffs, 4), np.uint8)
        centroids[: entries * coeffs, :3] = texels
        centroids[: entries * coeffs, 3] = 255
        label = labels[order]
        label_pixels = _rgba([label & 0xFF, label >> 8, np.zeros_like(label)])
        images[SHN_FILES[0]] = centroids.reshape(rows, PALETTE_ROW * coeffs, 4)
        images[SHN_FILES[1]] = _canvas(label_pixels, width, height)
        meta["shN"] = {"count": palette_size(n), "bands": data.sh_degree, "codebook": _json_floats(sh_codebook),
                       "files": list(SHN_FILES)}
    with ThreadPoolExecutor(max_workers=len(images)) as pool:  # libwebp runs without the GIL
        encoded = dict(zip(images, pool.map(encode_webp, images.values())))
    encoded[META_FILE] = json.dumps(meta, separators=(",", ":")).encode()

    def write_zip(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, payload in encoded.items():
                archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), payload)

    atomic_write(path, write_zip)
    log.info("wrote %s: %d splats, SH degree %d, %d bytes", path, n, data.sh_degree, path.stat().st_size)


# ---------------------------------------------------------------------------------------------- reading


def _fail(path: Path, message: str) -> SogFormatError:
    return SogFormatError(f"{path}: {message}")


def _codebook(path: Path, meta: dict, key: str) -> np.ndarray:
    codebook = meta[key].get("codebook") if isinstance(meta[key], dict) else None
    if not isinstance(codebook, list) or len(codebook) != CODEBOOK_SIZE:
        size = len(codebook) if isinstance(codebook, list) else codebook
        raise _fail(path, f"meta.json {key}.codebook must be a list of {CODEBOOK_SIZE} numbers, got {size!r}")
    return np.asarray(codebook, np.float32)


def _file_names(path: Path, meta: dict, key: str, count: int) -> list[str]:
    files = meta[key].get("files") if isinstance(meta[key], dict) else None
    if not isinstance(files, list) or len(files) != count or not all(isinstance(f, str) for f in files):
        raise _fail(path, f"meta.json {key}.files must list {count} image file name(s), got {files!r}")
    return files


class _Bundle:
    """The entries of an open .sog zip, each WebP decoded to RGBA and checked against the expected size."""

    def __init__(self, path: Path, archive: zipfile.ZipFile):
        self.path, self.archive = path, archive

    def image(self, name: str, size: tuple[int, int], rule: str, rows_at_least: bool = False) -> np.ndarray:
        """[H, W, 4] uint8 pixels of entry `name`, which must be a WebP of `size` (width, height), or of at
        least that height when `rows_at_least`."""
        try:
            payload = self.archive.read(name)
        except KeyError:
            raise _fail(self.path, f"meta.json names {name}, which the zip does not contain") from None
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise _fail(self.path, f"zip entry {name} cannot be read ({error}): the file is damaged") from None
        try:
            with Image.open(io.BytesIO(payload)) as image:
                if image.format != "WEBP":
                    raise _fail(self.path, f"{name} is a {image.format} image; SOG images are WebP")
                width, height = image.size
                if width != size[0] or (height < size[1] if rows_at_least else height != size[1]):
                    raise _fail(self.path, f"{name} is {width}x{height} pixels; {rule} it must be {size[0]}x"
                                           f"{'at least ' if rows_at_least else ''}{size[1]}")
                return np.asarray(image.convert("RGBA"))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise _fail(self.path, f"{name} is not a readable WebP image ({error})") from None


def read_sog(path: str | os.PathLike) -> SplatData:
    """The splats of a SOG version 2 bundle (`.sog` zip), in the file's frame (meta.json asset.up_axis when
    recorded, else "-y", the frame PLY viewers assume). Raises SogFormatError naming the file and the broken
    rule for a missing, truncated or non-zip file, a missing or unreadable meta.json, a version other than 2,
    images of the wrong size and a count that disagrees with them."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise _fail(path, f"not a complete zip archive ({error}): a .sog file is a zip; the file is truncated "
                          "or is not a SOG bundle") from None
    with archive:
        if META_FILE not in archive.namelist():
            raise _fail(path, f"the zip holds no {META_FILE}; a SOG bundle describes its images there "
                              f"(entries: {', '.join(archive.namelist()[:8]) or 'none'})")
        try:
            meta = json.loads(archive.read(META_FILE))
        except (ValueError, zipfile.BadZipFile, OSError, EOFError) as error:
            raise _fail(path, f"{META_FILE} cannot be read as JSON ({error})") from None
        if not isinstance(meta, dict):
            raise _fail(path, f"{META_FILE} must hold a JSON object")
        return _decode(path, meta, _Bundle(path, archive))


def _decode(path: Path, meta: dict, bundle: _Bundle) -> SplatData:
    version = meta.get("version")
    if version != SOG_VERSION:
        raise _fail(path, f"meta.json version is {version!r}; only SOG version {SOG_VERSION} is read "
                          "(re-export the file with a current splat-transform or SuperSplat)")
    count = meta.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise _fail(path, f"meta.json count must be a positive integer, got {count!r}")
    for key in ("means", "scales", "quats", "sh0"):
        if not isinstance(meta.get(key), dict):
            raise _fail(path, f"meta.json has no {key} object")
    size = texture_size(count)
    rule = f"for count {count} (width = ceil(sqrt(count) / 4) * 4, height = ceil(count / width / 4) * 4)"

    def pixels(name: str) -> np.ndarray:  # [count, 4] uint8, splats in file order
        return bundle.image(name, size, rule).reshape(-1, 4)[:count]

    mins, maxs = (np.asarray(meta["means"].get(key), np.float64) for key in ("mins", "maxs"))
    if mins.shape != (3,) or maxs.shape != (3,):
        raise _fail(path, f"meta.json means.mins and means.maxs must hold 3 numbers, got {mins.tolist()} "
                          f"and {maxs.tolist()}")
    low_name, high_name = _file_names(path, meta, "means", 2)
    codes = pixels(low_name)[:, :3].astype(np.float64) + 256.0 * pixels(high_name)[:, :3]
    means = _inverse_log_transform(mins + (maxs - mins) * codes / 65535)

    quat_pixels = pixels(_file_names(path, meta, "quats", 1)[0])
    bad = np.flatnonzero((quat_pixels[:, 3] < 252))
    if bad.size:
        raise _fail(path, f"quats.webp alpha must be 252-255 (the dropped component) for every splat; splat "
                          f"{bad[0]} has {quat_pixels[bad[0], 3]} ({bad.size} such): the count or image is wrong")
    scale_codebook = _codebook(path, meta, "scales")
    log_scales = scale_codebook[pixels(_file_names(path, meta, "scales", 1)[0])[:, :3]]
    dc_codebook = _codebook(path, meta, "sh0")
    sh0 = pixels(_file_names(path, meta, "sh0", 1)[0])
    opacity = np.clip(sh0[:, 3].astype(np.float64) / 255, 1e-6, 1 - 1e-6)
    sh_rest = np.zeros((count, 0, 3), np.float32)
    if isinstance(meta.get("shN"), dict):
        sh_rest = _decode_sh_rest(path, meta, count, pixels, bundle)
    up_axis = meta.get("asset", {}).get("up_axis", "-y") if isinstance(meta.get("asset"), dict) else "-y"
    return SplatData(
        means=means.astype(np.float32), log_scales=log_scales, quats=decode_quats(quat_pixels),
        opacity_logits=np.log(opacity / (1 - opacity)).astype(np.float32), sh_dc=dc_codebook[sh0[:, :3]],
        sh_rest=sh_rest, up_axis=up_axis if up_axis in UP_AXES else "-y",
    )


def _decode_sh_rest(path: Path, meta: dict, count: int, pixels, bundle: _Bundle) -> np.ndarray:
    """[count, K, 3] SH coefficients of degree >= 1 from the palette, its labels and its codebook."""
    shn = meta["shN"]
    bands, entries = shn.get("bands"), shn.get("count")
    if bands not in (1, 2, 3):
        raise _fail(path, f"meta.json shN.bands must be 1, 2 or 3, got {bands!r}")
    if not isinstance(entries, int) or not 1 <= entries <= 65536:
        raise _fail(path, f"meta.json shN.count must be a palette size of 1 to 65536, got {entries!r}")
    coeffs = SH_REST_COEFFS[bands]
    codebook = _codebook(path, meta, "shN")
    centroid_name, label_name = _file_names(path, meta, "shN", 2)
    labels_rgba = pixels(label_name)
    labels = labels_rgba[:, 0].astype(np.int64) | (labels_rgba[:, 1].astype(np.int64) << 8)
    if labels.max() >= entries:
        raise _fail(path, f"{label_name} holds palette index {labels.max()}, beyond shN.count {entries}")
    rows = math.ceil((labels.max() + 1) / PALETTE_ROW)
    palette = bundle.image(centroid_name, (PALETTE_ROW * coeffs, rows),
                           f"for SH band count {bands} (64 entries of {coeffs} texels per row) and labels up to "
                           f"{labels.max()}", rows_at_least=True)
    texels = palette.reshape(-1, 4)  # texel (e % 64) * coeffs + j of row e // 64 == flat index e * coeffs + j
    index = labels[:, None] * coeffs + np.arange(coeffs)[None, :]  # [count, coeffs]
    return codebook[texels[index][..., :3]]  # [count, coeffs, 3]
