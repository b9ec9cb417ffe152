""".spz versions 3 and 4 (export/spz.py): byte layout, round trips within the quantisation steps, render
PSNR, size, and every kind of bad file."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from export.splat_compare import SH_C0, attribute_errors, render_psnr
from export.splat_data import SplatData
from export.spz import (
    COLOR_SCALE,
    FRACTIONAL_BITS,
    SH1_BUCKET,
    SH_REST_BUCKET,
    SplatFormatError,
    encode,
    pack,
    pack_rotations,
    read_spz,
    unpack_rotations,
    write_spz,
)
from scene.ply_format import save_gaussian_ply

N = 1001  # neither a power of two nor a multiple of 256


# per-band standard deviation of the SH coefficients of a trained SH-3 asset (the demo with sh_degree 3,
# 1600 iterations: bench/results/splat_formats_cpu.md)
TRAINED_SH_STD = (0.05, 0.035, 0.012)


def splat_asset(n: int, degree: int, seed: int = 0, sh_std: tuple[float, ...] = (0.25, 0.25, 0.25),
                up_axis: str = "-y") -> SplatData:
    """A shell of n splats with every attribute inside the range .spz represents (so each error is pure
    quantisation): log-scales in [-10, 5.9], DC within +-3.3, SH within +-1 (std sh_std[band - 1])."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    k = (degree + 1) ** 2 - 1
    band_std = np.array([sh_std[band - 1] for band in range(1, degree + 1) for _ in range(2 * band + 1)])
    return SplatData(
        means=(direction * rng.uniform(0.3, 0.5, (n, 1))).astype(np.float32),
        log_scales=rng.uniform(-4.5, -2.5, (n, 3)).astype(np.float32),
        quats=quats.astype(np.float32),
        opacity_logits=rng.uniform(-3.0, 6.0, n).astype(np.float32),
        sh_dc=rng.uniform(-1.6, 1.6, (n, 3)).astype(np.float32),
        sh_rest=np.clip(band_std[None, :, None] * rng.normal(size=(n, k, 3)), -0.95, 0.95).astype(np.float32),
        up_axis=up_axis,
    )


# ---------------------------------------------------------------------- known answers


def test_rotation_and_position_bytes_match_the_reference_layout():
    identity = np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)  # (w, x, y, z)
    # largest component w is index 3 in spz's (x, y, z, w) order: 3 << 30, the other three zero
    assert pack_rotations(identity).tobytes() == struct.pack("<I", 3 << 30)
    half_turn_x = np.array([[0.0, -1.0, 0.0, 0.0]], dtype=np.float32)
    # index 0; negating to make x positive sets the sign bit of each zero (as the reference does)
    assert pack_rotations(half_turn_x).tobytes() == struct.pack("<I", (0x200 << 20) | (0x200 << 10) | 0x200)
    np.testing.assert_allclose(unpack_rotations(pack_rotations(half_turn_x)), -half_turn_x, atol=1e-7)
    tilted = np.array([[0.8, 0.6, 0.0, 0.0]], dtype=np.float32)
    mag = int(511 * 0.6 / np.sqrt(0.5) + 0.5)  # x = 0.6, stored as sign 0 and this magnitude
    assert pack_rotations(tilted).tobytes() == struct.pack("<I", (((3 << 10 | mag) << 10) << 10))
    np.testing.assert_allclose(unpack_rotations(pack_rotations(tilted)), tilted, atol=2e-3)

    data = splat_asset(3, 0)
    means = np.array([[1.0, -1.0 / 4096, 0.5]], dtype=np.float32)
    one = SplatData(means, data.log_scales[:1], data.quats[:1], np.array([0.0], np.float32),
                    np.zeros((1, 3), np.float32), np.zeros((1, 0, 3), np.float32))
    packed = pack(one)
    # 1.0 -> 4096 = 0x001000; -1/4096 -> -1 = 0xffffff; 0.5 -> 0x000800 (little-endian, 3 bytes each)
    assert packed.positions.tobytes() == bytes([0x00, 0x10, 0x00, 0xFF, 0xFF, 0xFF, 0x00, 0x08, 0x00])
    assert packed.alphas.tolist() == [128]  # sigmoid(0) * 255 = 127.5 rounds to 128
    assert packed.colors.tolist() == [[128, 128, 128]]


def test_sh_quantisation_uses_the_reference_buckets():
    data = splat_asset(4, 3)
    sh = np.zeros((1, 15, 3), np.float32)
    sh[0, 0, 0] = 0.1  # degree 1: round(12.8) + 128 = 141 -> bucket of 8 -> 144
    sh[0, 3, 0] = 0.1  # degree 2: 141 -> bucket of 16 -> 144
    sh[0, 4, 0] = -0.2  # degree 2: round(-25.6) + 128 = 102 -> 96
    sh[0, 0, 1] = 1.0  # clamps at 255
    one = SplatData(data.means[:1], data.log_scales[:1], data.quats[:1], data.opacity_logits[:1], data.sh_dc[:1], sh)
    stored = pack(one).sh.reshape(15, 3)
    assert (SH1_BUCKET, SH_REST_BUCKET) == (8, 16)
    assert stored[0, 0] == 144 and stored[3, 0] == 144 and stored[4, 0] == 96 and stored[0, 1] == 255
    assert stored[1:, 1:].tolist() == [[128, 128]] * 14 and stored[0, 2] == 128


def test_headers_v3_and_v4(tmp_path):
    data = splat_asset(N, 2, up_axis="y")
    v3 = gzip.decompress(encode(data, 3))
    magic, version, count, degree, bits, flags, reserved = struct.unpack_from("<IIIBBBB", v3)
    assert (magic, version, count, degree, bits, flags, reserved) == (0x5053474E, 3, N, 2, FRACTIONAL_BITS, 0, 0)
    assert len(v3) == 16 + N * (9 + 1 + 3 + 3 + 4 + 8 * 3)

    v4 = encode(data, 4)
    assert v4[:4] == b"NGSP"
    version, count, degree, bits, flags, streams, toc = struct.unpack_from("<IIBBBBI", v4, 4)
    assert (version, count, degree, bits, streams) == (4, N, 2, FRACTIONAL_BITS, 6)
    assert flags == 0x2 and toc == 32 + 12 and v4[20:32] == bytes(12)
    # the frame is stated: SPZ_ADOBE_coordinate_system = LUF (7) for a +y-up, +z-front file
    assert struct.unpack_from("<III", v4, 32) == (0xADBE0003, 4, 7)
    sizes = [struct.unpack_from("<QQ", v4, toc + 16 * i)[1] for i in range(6)]
    assert sizes == [9 * N, N, 3 * N, 3 * N, 4 * N, 24 * N]
    # SH degree 0: no SH stream
    assert struct.unpack_from("<B", encode(splat_asset(N, 0), 4), 15)[0] == 5


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_round_trip_within_the_quantisation_steps(tmp_path, version, degree):
    data = splat_asset(N, degree, seed=degree)
    path = write_spz(data, tmp_path / "a.spz", version)
    back = read_spz(path)
    assert back.num_splats == N and back.sh_degree == degree and back.up_axis == "-y"
    errors = attribute_errors(data, back)
    extent = float(np.ptp(data.means, axis=0).max())
    half_step = {
        "position": 0.5 / (1 << FRACTIONAL_BITS) / extent,
        # each stored component is within half of (1/sqrt 2)/511; the largest one follows from them, so
        # |q - q'| <= sqrt(3 + 9) * that, and the angle is 2 |q - q'|
        "rotation_deg": np.degrees(2 * np.sqrt(12) * 0.5 * np.sqrt(0.5) / 511),
        "log_scale": 0.5 / 16,
        "opacity": 0.5 / 255,
        "color": SH_C0 * 0.5 / (COLOR_SCALE * 255),
    }
    for name, bound in half_step.items():
        value = getattr(errors, name)
        assert value <= bound * (1 + 1e-4) + 1e-7, (name, value, bound)
        assert value > 0.2 * bound, (name, value, bound)  # quantised, not copied
    if degree:
        sh_error = np.abs(back.sh_rest - data.sh_rest)
        assert sh_error[:, :3].max() <= (SH1_BUCKET / 2 + 0.5) / 128 + 1e-6
        assert sh_error[:, 3:].max(initial=0) <= (SH_REST_BUCKET / 2 + 0.5) / 128 + 1e-6
        # bucket centres: every stored value is a multiple of the bucket size (or the clamp 255)
        stored = np.round(back.sh_rest * 128 + 128).astype(int)
        assert np.all((stored[:, :3] % SH1_BUCKET == 0) | (stored[:, :3] == 255))
        assert np.all((stored[:, 3:] % SH_REST_BUCKET == 0) | (stored[:, 3:] == 255))
    else:
        assert errors.sh == 0.0


def test_v4_states_its_frame_and_v3_takes_the_default(tmp_path):
    data = splat_asset(300, 1, up_axis="z")
    assert read_spz(write_spz(data, tmp_path / "a.spz", 4)).up_axis == "z"
    assert read_spz(write_spz(data, tmp_path / "b.spz", 3)).up_axis == "-y"  # v3 cannot say
    assert read_spz(tmp_path / "b.spz", up_axis="z").up_axis == "z"
    np.testing.assert_allclose(read_spz(tmp_path / "b.spz").means, read_spz(tmp_path / "a.spz").means)


@pytest.mark.parametrize("version,degree,floor", [(3, 0, 40.0), (4, 1, 40.0), (4, 3, 36.0)])
def test_render_psnr_and_size(tmp_path, version, degree, floor):
    # SH amplitudes of a trained asset, but independent per splat and every splat in view: the 4-bit SH of
    # degrees 2-3 (anything below 1/16 becomes 0) then costs ~38 dB here, while the trained SH-3 demo itself
    # keeps 42.7 dB (bench/results/splat_formats_cpu.md); degrees 0-1 stay above 40 dB
    data = splat_asset(400, degree, seed=7, sh_std=TRAINED_SH_STD)
    path = write_spz(data, tmp_path / "a.spz", version)
    value = render_psnr(data, read_spz(path), size=64)
    assert floor <= value < 80.0, value  # lossy, but below the visible
    ply = tmp_path / "a.ply"
    save_gaussian_ply(data.to_model(), ply, up_axis="-y")
    ratio = ply.stat().st_size / path.stat().st_size
    # raw .spz is 20 bytes a splat + 9 / 45 at SH 1 / 3, against 62 + 36 / 180 in the PLY: at least 3.1x, 3.3x
    # and 3.7x before any compression (random positions and colours compress little; the trained demo gives
    # 4.49x / 4.93x)
    assert ratio > {0: 3.1, 1: 3.3, 3: 3.7}[degree], ratio


# ---------------------------------------------------------------------- bad files


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw)


@pytest.fixture
def good_files(tmp_path):
    data = splat_asset(300, 1)
    return write_spz(data, tmp_path / "v3.spz", 3).read_bytes(), write_spz(data, tmp_path / "v4.spz", 4).read_bytes()


def _bad(tmp_path, blob: bytes, *parts: str):
    path = tmp_path / "bad.spz"
    path.write_bytes(blob)
    with pytest.raises(SplatFormatError) as info:
        read_spz(path)
    text = str(info.value)
    assert str(path) in text, text
    for part in parts:
        assert part in text, (part, text)


def test_truncated_files(tmp_path, good_files):
    v3, v4 = good_files
    _bad(tmp_path, v3[: len(v3) // 2], "truncated")
    _bad(tmp_path, v4[:20], "fewer than the 32-byte", "truncated")
    _bad(tmp_path, v4[:50], "table of contents", "truncated")
    _bad(tmp_path, v4[:-10], "past the end", "truncated")
    _bad(tmp_path, b"", "0 bytes", "truncated")


def test_wrong_magic_and_version(tmp_path, good_files):
    v3, v4 = good_files
    raw = bytearray(gzip.decompress(v3))
    _bad(tmp_path, b"PK\x03\x04" + bytes(40), "not a .spz file", "0x04034b50")
    wrong = bytearray(raw)
    wrong[0:4] = b"XXXX"
    _bad(tmp_path, _gz(bytes(wrong)), "wrong magic", "0x58585858")
    for version in (2, 5):
        wrong = bytearray(raw)
        wrong[4:8] = struct.pack("<I", version)
        _bad(tmp_path, _gz(bytes(wrong)), f"version {version}", "not supported")
    wrong = bytearray(v4)
    wrong[4:8] = struct.pack("<I", 3)
    _bad(tmp_path, bytes(wrong), "version 3", "not supported")


def test_counts_that_disagree_with_the_data(tmp_path, good_files):
    v3, v4 = good_files
    raw = bytearray(gzip.decompress(v3))
    for count in (299, 301):
        wrong = bytearray(raw)
        wrong[8:12] = struct.pack("<I", count)
        _bad(tmp_path, _gz(bytes(wrong)), f"counts {count} Gaussians", "disagrees")
    _bad(tmp_path, _gz(bytes(raw) + b"\x00" * 7), "counts 300 Gaussians", "disagrees")
    wrong = bytearray(v4)
    wrong[8:12] = struct.pack("<I", 301)
    _bad(tmp_path, bytes(wrong), "301 Gaussians", "disagrees")
    wrong = bytearray(v4)
    wrong[12] = 0  # SH degree 0 claims 5 streams, the file lists 6
    _bad(tmp_path, bytes(wrong), "lists 6 streams", "need 5")
    empty = bytearray(raw)
    empty[8:12] = struct.pack("<I", 0)
    _bad(tmp_path, _gz(bytes(empty)), "0 Gaussians")


def test_corrupt_streams(tmp_path, good_files):
    v3, v4 = good_files
    wrong = bytearray(v4)
    wrong[-40:-20] = bytes(20)
    with pytest.raises(SplatFormatError, match="zstd|disagrees"):
        (tmp_path / "z.spz").write_bytes(bytes(wrong))
        read_spz(tmp_path / "z.spz")
    wrong = bytearray(v3)
    wrong[30:60] = bytes(range(30))
    _bad(tmp_path, bytes(wrong), "gzip")
