"""Writing images and videos that play everywhere."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from utils.files import DiskFullError, atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, C, H, W] (C = 1 or 3) in [0, 1] -> [B, H, W, 3] uint8."""
    x = images.detach().float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def frame_grid(frames: np.ndarray, per_row: int = 8) -> np.ndarray:
    """[B, H, W, 3] uint8 -> [rows * H, min(B, per_row) * W, 3], black where a row is short."""
    b, h, w, c = frames.shape
    rows, cols = -(-b // per_row), min(b, per_row)
    padded = np.zeros((rows * cols, h, w, c), dtype=frames.dtype)
    padded[:b] = frames
    return padded.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


# zlib level 1 instead of PNG's default 6: about 7x faster for about 20% more bytes on renders (smooth images).
# At level 6 a preview of 4 views took about 1 s on a 2-core CPU (python bench/image_logging.py), time the
# training thread waited before the loop's files moved to a worker thread (utils/background_writer.py).
PNG_COMPRESS_LEVEL = 1


def encode_png(frame: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (lossless, fast compression)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def save_images(images: Tensor, folder: Path, prefix: str) -> list[Path]:
    """[B, C, H, W] in [0, 1] -> folder/<prefix>_000.png ...; each encoded in memory, then written atomically
    (a kill or a full disk never leaves half a PNG)."""
    return save_frames(to_uint8(images), folder, prefix)


def save_frames(frames: np.ndarray, folder: Path, prefix: str) -> list[Path]:
    """[B, H, W, 3] uint8 -> folder/<prefix>_000.png ..., as save_images."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        path = folder / f"{prefix}_{i:03d}.png"
        atomic_write_bytes(path, encode_png(frame))
        paths.append(path)
    return paths


def _even(frames: np.ndarray) -> np.ndarray:
    """Crop to even height and width (yuv420p needs both even)."""
    h, w = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
    return frames[:, :h, :w]


def write_video(frames: np.ndarray, path: Path, fps: int = 30) -> Path:
    """[T, H, W, 3] uint8 -> H.264/yuv420p MP4 (plays in browsers and players); GIF where no encoder exists.

    Returns the path actually written (suffix .gif on the fallback). Written to a temporary
    name first, then renamed, so a crash never leaves a half-written video under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = _even(frames)
    def write_mp4(tmp: Path) -> None:
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1, quality=8) as writer:
            for frame in frames:
                writer.append_data(frame)

    try:
        atomic_write(path, write_mp4)
        return path
    except DiskFullError:
        raise  # not a missing encoder: a GIF would not fit either
    except (ImportError, RuntimeError, OSError) as exc:
        gif = path.with_suffix(".gif")
        log.warning("no H.264 encoder available (%s); writing %s instead", exc, gif.name)
        atomic_write_bytes(gif, iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0))
        return gif
