"""k-means with torch for vector palettes (SOG's SH palette, export/sog.py), on the GPU or within bounded
time on a CPU.

Lloyd's algorithm as splat-transform's spatial/k-means.ts (random distinct points as seeds, an empty
cluster re-seeded to a random point), with the nearest-centroid search done as chunked matrix products so
that 1M points x 64K centroids never build more than a bounded [rows, k] block. One final assignment
follows the last centroid update, so every label names its nearest final centroid.

A flat search costs N * k * D multiply-adds per iteration: 3e12 for 1M SH-3 splats and 64K entries, a
fraction of a second on a GPU but tens of minutes on a small CPU. When that cost passes `flat_limit`, the
palette is built coarse to fine instead (hierarchical k-means): sqrt(k) coarse clusters over all points,
trained on a sample of 256 points each and then labelling every point once; each coarse cluster then gets
a share of the k entries proportional to its size and runs its own k-means over all its points. The work
drops to about N * sqrt(k) * D per iteration, at a slightly higher distortion.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor
from tqdm import tqdm

log = logging.getLogger(__name__)

# [rows, k] distance block per chunk, in elements (64 MiB of float32 on a CPU, 1 GiB on a GPU)
CPU_BLOCK = 1 << 24
GPU_BLOCK = 1 << 28
# N * k above which a CPU builds the palette coarse to fine (about 2 s of flat search per iteration)
CPU_FLAT_LIMIT = 1 << 28
COARSE_SAMPLE = 256  # points per coarse centroid that the coarse level trains on
BAR_MIN_WORK = 1 << 30  # N * k * D from which a progress bar is worth showing


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assign(points: Tensor, centroids: Tensor, block: int | None = None) -> Tensor:
    """[N] int64 index of the centroid ([k, D]) nearest each point ([N, D]), in row chunks of at most
    `block` distance entries."""
    k = centroids.shape[0]
    block = block or (GPU_BLOCK if points.is_cuda else CPU_BLOCK)
    rows = max(1, block // k)
    squared = (centroids * centroids).sum(dim=1)  # [k]; |x|^2 is the same for every centroid of a row
    labels = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    for start in range(0, points.shape[0], rows):
        chunk = points[start:start + rows]
        distances = torch.addmm(squared, chunk, centroids.T, alpha=-2.0)  # [rows, k] = |c|^2 - 2 x.c
        labels[start:start + rows] = distances.argmin(dim=1)
    return labels


def _update(points: Tensor, labels: Tensor, centroids: Tensor, generator: torch.Generator) -> Tensor:
    """Each centroid moved to the mean of its points; an empty one re-seeded to a random point."""
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids, dtype=torch.float64).index_add_(0, labels, points.double())
    counts = torch.bincount(labels, minlength=k)
    updated = (sums / counts.clamp(min=1)[:, None]).to(points.dtype)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        picks = torch.randint(points.shape[0], (empty.numel(),), generator=generator).to(points.device)
        updated[empty] = points[picks]
    return updated


def kmeans_flat(points: Tensor, k: int, iterations: int, generator: torch.Generator,
                bar: tqdm | None = None) -> tuple[Tensor, Tensor]:
    """(centroids [min(k, N), D], labels [N] int64) after `iterations` Lloyd steps over all k centroids."""
    n = points.shape[0]
    if n <= k:  # too few points: each is its own centroid (as the reference)
        return points.clone(), torch.arange(n, device=points.device)
    seeds = torch.randperm(n, generator=generator)[:k].to(points.device)
    centroids = points[seeds].clone()
    for _ in range(iterations):
        centroids = _update(points, assign(points, centroids), centroids, generator)
        if bar is not None:
            bar.update(n * k)
    return centroids, assign(points, centroids)


def _shares(sizes: Tensor, k: int) -> list[int]:
    """Entries per coarse cluster: proportional to its size (largest remainders first), at least one for
    a non-empty cluster and never more than its points."""
    sizes = sizes.double()
    exact = sizes / sizes.sum() * k
    shares = exact.floor().long().clamp(min=1)
    spare = k - int(shares.sum())
    if spare > 0:
        for index in torch.argsort(exact - exact.floor(), descending=True)[:spare]:
            shares[index] += 1
    shares = torch.minimum(shares, sizes.long())
    return shares.tolist()


def kmeans_two_level(points: Tensor, k: int, iterations: int, generator: torch.Generator,
                     bar: tqdm | None = None) -> tuple[Tensor, Tensor]:
    """Coarse-to-fine k-means: sqrt(k) coarse clusters, then k-means inside each with a proportional
    share of the k entries. (centroids [<= k, D], labels [N] int64)."""
    coarse_k = max(1, round(math.sqrt(k)))
    # the coarse centroids only split the work: trained on a sample, then one pass labels every point
    sample = torch.randperm(points.shape[0], generator=generator)[: COARSE_SAMPLE * coarse_k].to(points.device)
    coarse_centroids, _ = kmeans_flat(points[sample], coarse_k, iterations, generator, bar)
    coarse = assign(points, coarse_centroids)
    sizes = torch.bincount(coarse, minlength=coarse_k).cpu()
    shares = _shares(sizes, k)
    labels = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    parts, offset = [], 0
    for cluster, share in enumerate(shares):
        if share == 0:
            continue
        members = torch.nonzero(coarse == cluster).flatten()
        centroids, local = kmeans_flat(points[members], share, iterations, generator, bar)
        labels[members] = local + offset
        parts.append(centroids)
        offset += centroids.shape[0]
    return torch.cat(parts), labels


def kmeans(points: Tensor, k: int, iterations: int, *, device: torch.device | None = None, seed: int = 0,
           progress: bool = True, flat_limit: int | None = None) -> tuple[Tensor, Tensor]:
    """k-means of `points` [N, D] into at most k centroids.

    Returns (centroids [k', D] float32, labels [N] int64) on `device`, k' = min(k, N) for a flat search and
    at most that coarse to fine. device: None picks CUDA when available. flat_limit: the N * k above which
    the search runs coarse to fine (default: never on a GPU, CPU_FLAT_LIMIT on a CPU). Seeded: the same
    input gives the same palette on the same device."""
    device = device or default_device()
    points = points.to(device=device, dtype=torch.float32)
    n, dims = points.shape
    if flat_limit is None:
        flat_limit = CPU_FLAT_LIMIT if device.type == "cpu" else None
    two_level = flat_limit is not None and n * k > flat_limit
    generator = torch.Generator().manual_seed(seed)
    work = n * k * dims * iterations
    log.debug("k-means: %d points of %d dims into %d entries, %d iterations on %s (%s)", n, dims, k,
              iterations, device, "coarse to fine" if two_level else "flat")
    # the bar counts point-centroid distances; a coarse-to-fine run does fewer than n * k per iteration
    with tqdm(total=n * k * iterations if not two_level else None, desc="SH palette k-means", unit="dist",
              unit_scale=True, disable=not progress or work < BAR_MIN_WORK, leave=False) as bar:
        run = kmeans_two_level if two_level else kmeans_flat
        return run(points, k, iterations, generator, bar)
