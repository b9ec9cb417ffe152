"""Niantic's `.spz` splat format, versions 3 and 4: writer and reader.

Both versions hold the same quantised attributes (nianticlabs/spz, src/cc/load-spz.cc, packGaussians):

    positions  24-bit signed fixed point, 12 fractional bits (1/4096 unit steps, |x| < 2048)
    alphas     8 bits, sigmoid(opacity logit) * 255
    colors     8 bits, SH DC * 0.15 * 255 + 127.5 (a "wide" range: DC in about [-3.33, 3.33])
    scales     8 bits, (log-scale + 10) * 16 (log-scales in [-10, 5.94])
    rotations  smallest three: 2 bits for the index of the largest of (x, y, z, w), then the other three
               as sign + 9-bit magnitude over [0, 1/sqrt(2)], packed in 32 bits
    sh         8 bits, round(x * 128) + 128, rounded to buckets of 8 (degree 1, 5 bits) or 16 (degrees
               2-3, 4 bits); coefficient-major with the colour channel innermost

Version 3 is a 16-byte header and the six attribute arrays in that order, in one gzip stream (read by
Spark 2.x, three.js's SPZ loader, Babylon.js, SuperSplat). Version 4 is a 32-byte plain header, an
optional run of extension records, a table of contents (compressed and uncompressed size of each
stream, u64 each) and the attributes as separate zstd streams (read by Niantic's library, the
PlayCanvas engine's SpzParser, SuperSplat).

Coordinates: the format text says files are RUB, but Niantic's own tools convert only when the caller
names both frames, and by default (CoordinateSystem::UNSPECIFIED) copy PLY coordinates through
unchanged (nianticlabs/spz#84); Spark and PlayCanvas also use the stored numbers as they are. We do
the same: the coordinates are those of the PLY in the same `up_axis` (scene/orientation.py), so a
`.spz` opens upright wherever the PLY does, with the same viewer transform. Version 4 lets a file
state its frame (the SPZ_ADOBE_coordinate_system extension, nianticlabs/spz
extensions/cc/coordinate-system-adobe.cc: a descriptor of the frame the data is stored in), so our
v4 files state it: RDF for "-y", LUF for "y", RFU for "z".
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.splat_data import SplatData
from utils.files import atomic_write_bytes

MAGIC = 0x5053474E  # "NGSP" in file order
VERSIONS = (3, 4)
FRACTIONAL_BITS = 12  # the reference writer's choice (~0.25 mm at 1 unit = 1 m)
COLOR_SCALE = 0.15  # load-spz.cc colorScale: DC coefficients stored as a wide RGB
SH1_BUCKET = 1 << (8 - 5)  # PackOptions.sh1Bits = 5
SH_REST_BUCKET = 1 << (8 - 4)  # PackOptions.shRestBits = 4
FLAG_ANTIALIASED = 0x1
FLAG_HAS_EXTENSIONS = 0x2
ZSTD_LEVEL = 12  # load-spz.cc compressZstd's default level
GZIP_LEVEL = 9

V3_HEADER = struct.Struct("<IIIBBBB")  # magic, version, numPoints, shDegree, fractionalBits, flags, reserved
V4_HEADER = struct.Struct("<IIIBBBBI12x")  # ... flags, numStreams, tocByteOffset, 12 reserved bytes
TOC_ENTRY = struct.Struct("<QQ")  # compressed size, uncompressed size
EXTENSION_RECORD = struct.Struct("<II")  # type, payload byte length

# SPZ_ADOBE_coordinate_system: a u32 CoordinateSystem (src/cc/splat-types.h) naming the stored frame.
COORDINATE_SYSTEM_EXTENSION = 0xADBE0003
COORDINATE_SYSTEMS = {"-y": 6, "y": 7, "z": 12}  # RDF (3DGS/OpenCV), LUF (glTF), RFU (our z-up world)
COORDINATE_SYSTEM_NAMES = {0: "UNSPECIFIED", 1: "LDB", 2: "RDB", 3: "LUB", 4: "RUB", 5: "LDF", 6: "RDF", 7: "LUF",
                           8: "RUF", 9: "LFD", 10: "RFD", 11: "LFU", 12: "RFU", 13: "LBD", 14: "RBD", 15: "LBU",
                           16: "RBU"}

_MAX_POSITION = (1 << 23) - 1  # largest 24-bit signed fixed-point value
_SQRT1_2 = 0.7071067811865476


class SplatFormatError(ValueError):
    """A splat file that cannot be read (or splats that a format cannot hold): names the file, the rule
    and the value."""


def sh_dim(degree: int) -> int:
    """SH coefficients per colour channel beyond the DC term."""
    return (degree + 1) ** 2 - 1


@dataclass(frozen=True)
class PackedSplats:
    """The quantised attribute arrays exactly as the file stores them (uint8 each)."""

    positions: np.ndarray  # [N, 9]  x, y, z as 3-byte little-endian signed fixed point
    alphas: np.ndarray  # [N]
    colors: np.ndarray  # [N, 3]
    scales: np.ndarray  # [N, 3]
    rotations: np.ndarray  # [N, 4]  smallest-three, little-endian u32
    sh: np.ndarray  # [N, D * 3], D = sh_dim(sh_degree), channel innermost
    sh_degree: int
    fractional_bits: int = FRACTIONAL_BITS

    @property
    def num_splats(self) -> int:
        return self.alphas.shape[0]

    def streams(self) -> list[np.ndarray]:
        """The attribute arrays in file order (load-spz.cc serializePackedGaussians)."""
        return [self.positions, self.alphas, self.colors, self.scales, self.rotations, self.sh]


# ---------------------------------------------------------------------- quantisation


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def pack(data: SplatData) -> PackedSplats:
    """Quantise splats as the reference writer does (load-spz.cc packGaussians, no coordinate change)."""
    n = data.num_splats
    fixed = np.round(data.means.astype(np.float64) * (1 << FRACTIONAL_BITS))
    if np.abs(fixed).max(initial=0) > _MAX_POSITION:
        worst = float(np.abs(data.means).max())
        raise SplatFormatError(f".spz positions are 24-bit fixed point with {FRACTIONAL_BITS} fractional bits "
                               f"(|x| < {_MAX_POSITION / (1 << FRACTIONAL_BITS):.0f}); a Gaussian lies at "
                               f"|x| = {worst:.1f}: prune far floaters or rescale the scene")
    positions = fixed.astype(np.int32).astype("<i4").view(np.uint8).reshape(n, 3, 4)[:, :, :3].reshape(n, 9)
    alphas = _to_uint8(_sigmoid(data.opacity_logits.astype(np.float64)) * 255.0)
    colors = _to_uint8(data.sh_dc.astype(np.float64) * (COLOR_SCALE * 255.0) + 0.5 * 255.0)
    scales = _to_uint8((data.log_scales.astype(np.float64) + 10.0) * 16.0)
    rotations = pack_rotations(data.quats)
    sh = quantize_sh(data.sh_rest).reshape(n, -1)
    return PackedSplats(np.ascontiguousarray(positions), alphas, colors, scales, rotations, sh, data.sh_degree)


def unpack(packed: PackedSplats, up_axis: str) -> SplatData:
    """The splats a packed file holds (load-spz.cc unpackGaussians), in the frame `up_axis`."""
    n = packed.num_splats
    raw = packed.positions.reshape(n * 3, 3).astype(np.int32)
    fixed = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
    fixed = (fixed ^ 0x800000) - 0x800000  # sign-extend 24 bits
    means = (fixed.astype(np.float64) / (1 << packed.fractional_bits)).reshape(n, 3)
    # The reference decodes alpha 0 and 255 to -inf and +inf; half a step inside keeps the logits finite.
    alpha = np.clip(packed.alphas.astype(np.float64) / 255.0, 0.5 / 255.0, 1.0 - 0.5 / 255.0)
    return SplatData(
        means=means.astype(np.float32),
        log_scales=(packed.scales.astype(np.float32) / 16.0 - 10.0),
        quats=unpack_rotations(packed.rotations),
        opacity_logits=np.log(alpha / (1.0 - alpha)).astype(np.float32),
        sh_dc=((packed.colors.astype(np.float32) / 255.0 - 0.5) / COLOR_SCALE),
        sh_rest=((packed.sh.astype(np.float32) - 128.0) / 128.0).reshape(n, sh_dim(packed.sh_degree), 3),
        up_axis=up_axis,
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|


def pack_rotations(quats_wxyz: np.ndarray) -> np.ndarray:
    """[N, 4] (w, x, y, z) -> [N, 4] uint8 smallest-three words (load-spz.cc packQuaternionSmallestThree,
    which works on (x, y, z, w))."""
    q = quats_wxyz.astype(np.float64)[:, [1, 2, 3, 0]]
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    largest = np.abs(q).argmax(axis=1)
    negate = q[np.arange(len(q)), largest] < 0
    comp = largest.astype(np.uint32)
    for i in range(4):
        other = largest != i
        negbit = ((q[:, i] < 0) ^ negate).astype(np.uint32)
        mag = (511.0 * (np.abs(q[:, i]) / _SQRT1_2) + 0.5).astype(np.uint32)
        comp = np.where(other, (comp << np.uint32(10)) | (negbit << np.uint32(9)) | mag, comp)
    return comp.astype("<u4").view(np.uint8).reshape(-1, 4)


def unpack_rotations(words: np.ndarray) -> np.ndarray:
    """[N, 4] uint8 smallest-three words -> [N, 4] float32 unit quaternions (w, x, y, z)."""
    comp = np.ascontiguousarray(words).view("<u4")[:, 0].astype(np.uint32)
    largest = comp >> np.uint32(30)
    q = np.zeros((len(comp), 4), dtype=np.float64)  # (x, y, z, w)
    for i in (3, 2, 1, 0):
        other = largest != i
        value = _SQRT1_2 * (comp & np.uint32(511)).astype(np.float64) / 511.0
        value = np.where((comp >> np.uint32(9)) & np.uint32(1), -value, value)
        q[:, i] = np.where(other, value, 0.0)
        comp = np.where(other, comp >> np.uint32(10), comp)
    rest = (q ** 2).sum(axis=1)
    q[np.arange(len(q)), largest] = np.sqrt(np.maximum(0.0, 1.0 - rest))
    return q[:, [3, 0, 1, 2]].astype(np.float32)


def quantize_sh(sh_rest: np.ndarray) -> np.ndarray:
    """[N, K, 3] float -> [N, K, 3] uint8 (load-spz.cc quantizeSH): degree-1 coefficients in buckets
    of SH1_BUCKET, the rest in buckets of SH_REST_BUCKET."""
    q = np.round(sh_rest.astype(np.float64) * 128.0) + 128.0
    bucket = np.full(sh_rest.shape[1], SH_REST_BUCKET, dtype=np.float64)
    bucket[:3] = SH1_BUCKET
    bucket = bucket[None, :, None]
    q = np.floor((q + bucket / 2) / bucket) * bucket
    return np.clip(q, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- files


def encode(data: SplatData, version: int = 3) -> bytes:
    """The bytes of a `.spz` file of `version` (3: one gzip stream, 4: zstd streams) holding `data`."""
    if version not in VERSIONS:
        raise SplatFormatError(f".spz version must be one of {VERSIONS}, got {version!r}")
    packed = pack(data)
    if version == 3:
        header = V3_HEADER.pack(MAGIC, 3, packed.num_splats, packed.sh_degree, packed.fractional_bits, 0, 0)
        body = b"".join(np.ascontiguousarray(s).tobytes() for s in packed.streams())
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9)  # gzip wrapper
        return compressor.compress(header + body) + compressor.flush()
    return _encode_v4(packed, data.up_axis)


def _encode_v4(packed: PackedSplats, up_axis: str) -> bytes:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    raw = [np.ascontiguousarray(s).tobytes() for s in packed.streams()]
    raw = [r for r in raw if r]  # zero-size streams (SH at degree 0) are not stored
    chunks = [compressor.compress(r) for r in raw]
    extension = (EXTENSION_RECORD.pack(COORDINATE_SYSTEM_EXTENSION, 4)
                 + struct.pack("<I", COORDINATE_SYSTEMS[up_axis]))
    toc_offset = V4_HEADER.size + len(extension)
    header = V4_HEADER.pack(MAGIC, 4, packed.num_splats, packed.sh_degree, packed.fractional_bits,
                            FLAG_HAS_EXTENSIONS, len(chunks), toc_offset)
    toc = b"".join(TOC_ENTRY.pack(len(c), len(r)) for c, r in zip(chunks, raw))
    return header + extension + toc + b"".join(chunks)


def write_spz(data: SplatData, path: str | os.PathLike, version: int = 3) -> Path:
    """Write `data` as a `.spz` file of `version` (3 or 4), atomically; returns the path."""
    data.check_writable(str(path))
    path = Path(path)
    atomic_write_bytes(path, encode(data, version))
    return path


def read_spz(path: str | os.PathLike, up_axis: str = "-y") -> SplatData:
    """The splats of a `.spz` file (version 3 or 4). `up_axis` is the frame assumed when the file does not
    state one (version 3 never does; our writer uses the PLY's default, "-y"). SplatFormatError for a
    file that is truncated, not `.spz`, of another version, or whose counts disagree with its data."""
    path = Path(path)
    blob = path.read_bytes()
    if blob[:2] == b"\x1f\x8b":
        return _decode_v3(_gunzip(blob, path), path, up_axis)
    if len(blob) < 4:
        raise SplatFormatError(f"{path}: {len(blob)} bytes: truncated (a .spz file starts with a gzip stream "
                               f"(v3) or a 32-byte header (v4))")
    magic = struct.unpack_from("<I", blob)[0]
    if magic != MAGIC:
        raise SplatFormatError(f"{path}: not a .spz file: starts with 0x{magic:08x}, expected the gzip magic "
                               f"1f 8b (version 3) or 'NGSP' (version 4)")
    return _decode_v4(blob, path, up_axis)


def _gunzip(blob: bytes, path: Path) -> bytes:
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = decompressor.decompress(blob)
    except zlib.error as exc:
        raise SplatFormatError(f"{path}: corrupt gzip stream ({exc}): the file is damaged; export it again") from None
    if not decompressor.eof:
        raise SplatFormatError(f"{path}: the gzip stream ends early ({len(blob)} bytes): truncated file; "
                               f"export it again")
    return raw


def _check_header(path: Path, magic: int, version: int, count: int, degree: int, expected_version: int) -> None:
    if magic != MAGIC:
        raise SplatFormatError(f"{path}: wrong magic 0x{magic:08x} in the .spz header, expected 0x{MAGIC:08x} "
                               f"('NGSP'): not a .spz file")
    if version != expected_version:
        container = "gzip (versions 1-3)" if expected_version == 3 else "NGSP header (version 4)"
        supported = "3" if expected_version == 3 else "4"
        raise SplatFormatError(f"{path}: .spz version {version} in a {container} file is not supported "
                               f"(this reader takes version {supported} there)")
    if count == 0:
        raise SplatFormatError(f"{path}: the header counts 0 Gaussians: an empty .spz file")
    if degree > 3:
        raise SplatFormatError(f"{path}: SH degree {degree} in the header; degrees 0-3 are supported")


def _stream_sizes(count: int, degree: int) -> list[int]:
    """Bytes of each attribute array in file order, for `count` splats of SH `degree` (v3+)."""
    return [count * 9, count, count * 3, count * 3, count * 4, count * sh_dim(degree) * 3]


def _split(raw: list[bytes], count: int, degree: int, fractional_bits: int) -> PackedSplats:
    arrays = [np.frombuffer(r, dtype=np.uint8) for r in raw]
    if len(arrays) == 5:
        arrays.append(np.zeros(0, dtype=np.uint8))
    positions, alphas, colors, scales, rotations, sh = arrays
    return PackedSplats(positions.reshape(count, 9), alphas, colors.reshape(count, 3), scales.reshape(count, 3),
                        rotations.reshape(count, 4), sh.reshape(count, sh_dim(degree) * 3), degree, fractional_bits)


def _decode_v3(raw: bytes, path: Path, up_axis: str) -> SplatData:
    if len(raw) < V3_HEADER.size:
        raise SplatFormatError(f"{path}: {len(raw)} bytes after gunzip, fewer than the {V3_HEADER.size}-byte "
                               f"header: truncated file")
    magic, version, count, degree, bits, flags, _ = V3_HEADER.unpack_from(raw)
    _check_header(path, magic, version, count, degree, 3)
    sizes = _stream_sizes(count, degree)
    expected = V3_HEADER.size + sum(sizes)
    trailing_allowed = bool(flags & FLAG_HAS_EXTENSIONS)  # legacy extension records follow the arrays
    if len(raw) < expected or (len(raw) > expected and not trailing_allowed):
        raise SplatFormatError(f"{path}: the header counts {count} Gaussians (SH degree {degree}), which take "
                               f"{expected} bytes, but the stream holds {len(raw)}: the count disagrees with "
                               f"the data")
    offsets = np.cumsum([V3_HEADER.size, *sizes])
    streams = [raw[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
    return unpack(_split(streams, count, degree, bits), up_axis)


def _decode_v4(blob: bytes, path: Path, up_axis: str) -> SplatData:
    import zstandard

    if len(blob) < V4_HEADER.size:
        raise SplatFormatError(f"{path}: {len(blob)} bytes, fewer than the {V4_HEADER.size}-byte .spz v4 header: "
                               f"truncated file")
    magic, version, count, degree, bits, flags, num_streams, toc_offset = V4_HEADER.unpack_from(blob)
    _check_header(path, magic, version, count, degree, 4)
    sizes = [s for s in _stream_sizes(count, degree) if s]
    if num_streams != len(sizes):
        raise SplatFormatError(f"{path}: the header lists {num_streams} streams; {count} Gaussians of SH degree "
                               f"{degree} need {len(sizes)}")
    toc_end = toc_offset + num_streams * TOC_ENTRY.size
    if toc_offset < V4_HEADER.size or toc_end > len(blob):
        raise SplatFormatError(f"{path}: table of contents at bytes {toc_offset}-{toc_end} lies outside the "
                               f"{len(blob)}-byte file: truncated or corrupt")
    frame = _stated_frame(blob[V4_HEADER.size:toc_offset], path) if flags & FLAG_HAS_EXTENSIONS else None
    offset, streams = toc_end, []
    decompressor = zstandard.ZstdDecompressor()
    for i, size in enumerate(sizes):
        compressed, uncompressed = TOC_ENTRY.unpack_from(blob, toc_offset + i * TOC_ENTRY.size)
        if uncompressed != size:
            raise SplatFormatError(f"{path}: stream {i} holds {uncompressed} bytes, but {count} Gaussians (SH "
                                   f"degree {degree}) need {size}: the count disagrees with the data")
        if offset + compressed > len(blob):
            raise SplatFormatError(f"{path}: stream {i} ends at byte {offset + compressed}, past the end of the "
                                   f"{len(blob)}-byte file: truncated file")
        try:
            raw = decompressor.decompress(blob[offset:offset + compressed], max_output_size=size)
        except zstandard.ZstdError as exc:
            raise SplatFormatError(f"{path}: stream {i} is not a valid zstd frame ({exc}): corrupt file") from None
        if len(raw) != size:
            raise SplatFormatError(f"{path}: stream {i} decompresses to {len(raw)} bytes, expected {size}: the "
                                   f"count disagrees with the data")
        streams.append(raw)
        offset += compressed
    if offset != len(blob):
        raise SplatFormatError(f"{path}: {len(blob) - offset} bytes after the last stream: corrupt file")
    return unpack(_split(streams, count, degree, bits), frame or up_axis)


def _stated_frame(records: bytes, path: Path) -> str | None:
    """Our up axis for the frame a SPZ_ADOBE_coordinate_system record states; None without one."""
    offset = 0
    while offset + EXTENSION_RECORD.size <= len(records):
        kind, length = EXTENSION_RECORD.unpack_from(records, offset)
        payload = records[offset + EXTENSION_RECORD.size:offset + EXTENSION_RECORD.size + length]
        offset += EXTENSION_RECORD.size + length
        if kind == COORDINATE_SYSTEM_EXTENSION and len(payload) == 4:
            value = struct.unpack("<I", payload)[0]
            if value == 0:  # UNSPECIFIED: the same as no record (coordinate-system-adobe.h)
                return None
            for axis, system in COORDINATE_SYSTEMS.items():
                if system == value:
                    return axis
            name = COORDINATE_SYSTEM_NAMES.get(value, str(value))
            raise SplatFormatError(f"{path}: the file states coordinate system {name}; this reader takes "
                                   f"{', '.join(COORDINATE_SYSTEM_NAMES[v] for v in COORDINATE_SYSTEMS.values())}")
    return None
