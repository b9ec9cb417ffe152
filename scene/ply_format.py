"""Reading PLY files with messages that name what the file actually is and what to do.

Gaussian-splat files circulate in several formats; only the standard (uncompressed) 3DGS PLY,
or a coloured point-cloud PLY for initialisation, is read here. The others are recognised by
their first bytes or header so the message can say how to convert them.
"""
from __future__ import annotations

import os
from pathlib import Path

from plyfile import PlyData

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
