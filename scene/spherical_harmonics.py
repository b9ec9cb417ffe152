"""Real spherical harmonics of bands 0..3 in the 3DGS convention (the colour model of the Gaussians)."""
from __future__ import annotations

from torch import Tensor

_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
_SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluates real SH (3DGS convention) of bands 0..degree.

    Args:
        degree: 0..3.
        dirs: [..., 3] unit view directions.
        coeffs: [..., K, 3] coefficients, K >= (degree + 1) ** 2.

    Returns:
        [..., 3] raw SH value (before the +0.5 offset).
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"sh degree must be in 0..3, got {degree}")
    result = _SH_C0 * coeffs[..., 0, :]
    if degree == 0:
        return result
    x, y, z = (d[..., None] for d in dirs.unbind(-1))  # each [..., 1]
    result = (
        result
        - _SH_C1 * y * coeffs[..., 1, :]
        + _SH_C1 * z * coeffs[..., 2, :]
        - _SH_C1 * x * coeffs[..., 3, :]
    )
    if degree == 1:
        return result
    xx, yy, zz = x * x, y * y, z * z
    xy, yz, xz = x * y, y * z, x * z
    result = (
        result
        + _SH_C2[0] * xy * coeffs[..., 4, :]
        + _SH_C2[1] * yz * coeffs[..., 5, :]
        + _SH_C2[2] * (2.0 * zz - xx - yy) * coeffs[..., 6, :]
        + _SH_C2[3] * xz * coeffs[..., 7, :]
        + _SH_C2[4] * (xx - yy) * coeffs[..., 8, :]
    )
    if degree == 2:
        return result
    return (
        result
        + _SH_C3[0] * y * (3.0 * xx - yy) * coeffs[..., 9, :]
        + _SH_C3[1] * xy * z * coeffs[..., 10, :]
        + _SH_C3[2] * y * (4.0 * zz - xx - yy) * coeffs[..., 11, :]
        + _SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * coeffs[..., 12, :]
        + _SH_C3[4] * x * (4.0 * zz - xx - yy) * coeffs[..., 13, :]
        + _SH_C3[5] * z * (xx - yy) * coeffs[..., 14, :]
        + _SH_C3[6] * x * (xx - 3.0 * yy) * coeffs[..., 15, :]
    )
