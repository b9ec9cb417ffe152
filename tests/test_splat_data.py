"""SplatData: the arrays every splat writer and reader exchange (export/splat_data.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.splat_data import SplatData, SplatDataError
from scene.gaussian_model import GaussianModel
from scene.ply_format import save_gaussian_ply


def _random_model(n: int, degree: int, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return GaussianModel.from_params({
        "xyz": torch.randn(n, 3, generator=g), "f_dc": torch.randn(n, 1, 3, generator=g),
        "f_rest": 0.1 * torch.randn(n, k - 1, 3, generator=g), "opacity": torch.randn(n, 1, generator=g),
        "scaling": torch.randn(n, 3, generator=g) - 3.0, "rotation": torch.randn(n, 4, generator=g),
    })


@pytest.mark.parametrize("up_axis", ["-y", "y", "z"])
@pytest.mark.parametrize("degree", [0, 3])
def test_model_round_trip_through_every_frame(up_axis, degree):
    model = _random_model(37, degree)
    data = SplatData.from_model(model, up_axis)
    assert data.num_splats == 37 and data.sh_degree == degree and data.up_axis == up_axis
    np.testing.assert_allclose(np.linalg.norm(data.quats, axis=1), 1.0, atol=1e-6)
    back = data.to_model()
    np.testing.assert_allclose(back.means.detach().numpy(), model.means.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(back.features.detach().numpy(), model.features.detach().numpy(), atol=1e-5)
    # a quaternion and its negation are one rotation
    dots = (back.quats * model.quats).sum(-1).abs().detach().numpy()
    np.testing.assert_allclose(dots, 1.0, atol=1e-5)
    np.testing.assert_array_equal(data.log_scales, model.params()["scaling"].detach().numpy())


def test_minus_y_frame_matches_the_ply_the_run_writes(tmp_path):
    model = _random_model(20, 1)
    save_gaussian_ply(model, tmp_path / "a.ply", up_axis="-y")
    from_file = SplatData.from_ply(tmp_path / "a.ply", up_axis="-y")
    direct = SplatData.from_model(model, "-y")
    np.testing.assert_allclose(from_file.means, direct.means, atol=1e-6)
    np.testing.assert_allclose(from_file.sh_rest, direct.sh_rest, atol=1e-6)
    # -y frame: training-world z (up) becomes -y
    np.testing.assert_allclose(direct.means[:, 1], -model.means.detach().numpy()[:, 2], atol=1e-6)


def test_bad_arrays_are_refused_with_the_source_named():
    data = SplatData.from_model(_random_model(5, 0), "-y")
    means = data.means.copy()
    means[3, 1] = np.nan
    broken = SplatData(means, data.log_scales, data.quats, data.opacity_logits, data.sh_dc, data.sh_rest)
    with pytest.raises(SplatDataError, match=r"run/x\.ply: 1 Gaussians have non-finite means \(first index 3\)"):
        broken.check_writable("run/x.ply")
    empty = SplatData.from_model(_random_model(0, 0), "-y")
    with pytest.raises(SplatDataError, match="holds no Gaussians"):
        empty.check_writable("empty.ply")
    with pytest.raises(SplatDataError, match="quats must be"):
        SplatData(data.means, data.log_scales, data.quats[:, :3], data.opacity_logits, data.sh_dc, data.sh_rest)
    with pytest.raises(SplatDataError, match="no SH degree"):
        SplatData(data.means, data.log_scales, data.quats, data.opacity_logits, data.sh_dc, np.zeros((5, 2, 3)))
