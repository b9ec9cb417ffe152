"""Tests of scene/densification.py: the statistics and their camera rule, the official clone / split /
prune on a hand-built model (known answers), the schedule, the NaN-step rule and the state dict."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from scene.densification import AllPrunedError, DensificationStrategy
from scene.gaussian_model import GaussianModel, quat_to_rotmat
from utils.config.schema import OptimizationParams


def stats(grad2d: list[float], count: list[float], max_radii: list[float]) -> dict:
    return {"version": 1, "grad2d": torch.tensor(grad2d), "count": torch.tensor(count),
            "max_radii": torch.tensor(max_radii)}


def with_optimizer(model: GaussianModel) -> GaussianModel:
    """An Adam optimizer that has taken one step (non-zero moments)."""
    model.setup_optimizer(OptimizationParams(iterations=100), spatial_lr_scale=1.0)
    for tensor in model.params().values():
        tensor.grad = torch.ones_like(tensor)
    model.optimizer_step()
    return model


def hand_built() -> tuple[GaussianModel, DensificationStrategy]:
    """7 Gaussians with hand-set scales, opacities and statistics (extent 1, percent_dense 0.01):
    G0 clone; G1 split (anisotropic); G2 prune (opacity); G3 big in the world; G4 kept, large on screen;
    G5 never visible; G6 cloned, then pruned with its clone (opacity)."""
    log_scale = torch.log(torch.tensor([0.005, 0.05, 0.005, 0.2, 0.005, 0.005, 0.005]))[:, None].repeat(1, 3)
    log_scale[1, 2] = math.log(0.01)
    model = GaussianModel.from_params({
        "xyz": torch.arange(21, dtype=torch.float32).reshape(7, 3),
        "f_dc": torch.zeros(7, 1, 3), "f_rest": torch.zeros(7, 3, 3),
        "opacity": torch.tensor([0.5, 0.5, 0.001, 0.5, 0.5, 0.5, 0.001]).logit()[:, None],
        "scaling": log_scale,
        "rotation": torch.tensor([0.9, 0.1, -0.3, 0.2]).expand(7, 4),
    })
    strategy = DensificationStrategy(grad_threshold=0.005, min_opacity=0.005, percent_dense=0.01, extent=1.0)
    # average gradients 0.01, 0.01, 0, 0, 0.001, 0 (never seen), 0.01
    strategy.load_state_dict(stats([0.02, 0.03, 0.0, 0.0, 0.001, 0.0, 0.01], [2.0, 3.0, 1.0, 1.0, 1.0, 0.0, 1.0],
                                   [1.0, 1.0, 1.0, 1.0, 30.0, 0.0, 1.0]))
    return with_optimizer(model), strategy


def test_clone_split_prune_known_answer():
    model, strategy = hand_built()
    before = {name: t.detach().clone() for name, t in model.params().items()}
    moments = model.optimizer.state[model.params()["opacity"]]["exp_avg"].clone()
    counts = strategy.densify_and_prune(model, max_screen_size=None)
    assert counts == {"cloned": 2, "split": 1, "pruned": 3}
    # survivors: originals G0, G3, G4, G5, then the clone of G0, then the two children of G1
    assert model.num_points == 7
    assert torch.equal(model.means[:5], before["xyz"][[0, 3, 4, 5, 0]])
    assert torch.equal(model.params()["scaling"][:5], before["scaling"][[0, 3, 4, 5, 0]])
    assert torch.allclose(model.scales[5:], (before["scaling"][1].exp() / 1.6).expand(2, 3), rtol=1e-6)
    assert torch.equal(model.params()["rotation"][5:], before["rotation"][[1, 1]])
    # originals keep their Adam moments, new Gaussians start at zero
    state = model.optimizer.state[model.params()["opacity"]]
    assert torch.equal(state["exp_avg"][:4], moments[[0, 3, 4, 5]]) and not state["exp_avg"][4:].any()
    after = strategy.state_dict()
    assert all(after[name].shape == (7,) and not after[name].any() for name in ("grad2d", "count", "max_radii"))


def test_split_children_are_sampled_in_the_rotated_parent():
    model, strategy = hand_built()
    strategy.generator = torch.Generator().manual_seed(5)
    mean, rot, s = model.means[1].detach().clone(), quat_to_rotmat(model.params()["rotation"][1:2])[0], model.scales[1]
    strategy.densify_and_prune(model, max_screen_size=None)
    local = (model.means[-2:].detach() - mean) @ rot  # back to the parent's axes
    expected = torch.normal(torch.zeros(2, 3), s.detach().expand(2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(local, expected, atol=1e-6)


def test_world_size_and_screen_size_pruning():
    model, strategy = hand_built()
    assert strategy.densify_and_prune(model, max_screen_size=20) == {"cloned": 2, "split": 1, "pruned": 4}  # + G3
    assert not (model.scales.amax(dim=1) > 0.1).any()
    model, strategy = hand_built()
    strategy.screen_size_prune = True
    assert strategy.densify_and_prune(model, max_screen_size=20) == {"cloned": 2, "split": 1, "pruned": 5}  # + G4
    assert model.num_points == 7 + 2 + 2 - 1 - 5


def test_all_pruned_is_an_error_naming_the_rule():
    model, strategy = hand_built()
    strategy.min_opacity = 0.9
    with pytest.raises(AllPrunedError, match="densify_and_prune would remove all 11 Gaussians .opacity below 0.9"):
        strategy.densify_and_prune(model, max_screen_size=None)


def test_statistics_from_every_camera_given():
    strategy = DensificationStrategy(grad_threshold=1.0, min_opacity=0.0, percent_dense=0.01, extent=1.0)
    grad = torch.zeros(2, 3, 2)
    radii = torch.zeros(2, 3, dtype=torch.int32)
    grad[0, 0] = torch.tensor([1e-3, 2e-3])  # G0 seen by camera 0 only
    radii[0, 0] = 5
    grad[1, 1] = torch.tensor([-3e-3, 0.0])  # G1 seen by camera 1 only
    radii[1, 1] = 7
    grad[:, 2] = torch.tensor([1e-3, 1e-3])  # G2 seen by both
    radii[:, 2] = torch.tensor([2, 9], dtype=torch.int32)
    grad[1, 0] = 1.0  # not visible: ignored
    strategy.add_statistics(grad, radii, width=64, height=32)
    ndc = lambda gx, gy: math.hypot(gx * 32, gy * 16)  # noqa: E731
    state = strategy.state_dict()
    assert torch.allclose(state["grad2d"], torch.tensor([ndc(1e-3, 2e-3), ndc(-3e-3, 0.0), 2 * ndc(1e-3, 1e-3)]))
    assert torch.equal(state["count"], torch.tensor([1.0, 1.0, 2.0]))
    assert torch.equal(state["max_radii"], torch.tensor([5.0, 7.0, 9.0]))
    strategy.add_statistics(grad[:1], radii[:1], width=64, height=32)
    assert torch.equal(strategy.state_dict()["count"], torch.tensor([2.0, 1.0, 3.0]))
    with pytest.raises(ValueError, match="statistics are kept for 3 Gaussians, the gradients have 4"):
        strategy.add_statistics(torch.zeros(2, 4, 2), torch.zeros(2, 4), 64, 32)
    with pytest.raises(ValueError, match="radii"):
        strategy.add_statistics(grad, radii[:, :2], 64, 32)


@pytest.mark.parametrize("all_cameras", [False, True])
def test_statistic_takes_the_last_camera_unless_all_are_asked_for(all_cameras):
    model = GaussianModel.from_points(torch.rand(2, 3), torch.rand(2, 3), 0)
    strategy = DensificationStrategy(grad_threshold=1.0, min_opacity=0.0, percent_dense=0.01, extent=1.0,
                                     densify_until_iter=10, densification_interval=100, opacity_reset_interval=100,
                                     stats_all_cameras=all_cameras)
    grad = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 4.0]]])  # G0 by camera 0, G1 by camera 1
    radii = torch.tensor([[3, 0], [0, 5]])
    assert strategy.step_post_backward(model, 1, grad, radii, width=2, height=2) is None  # no densification
    state = strategy.state_dict()
    assert torch.equal(state["grad2d"], torch.tensor([2.0 if all_cameras else 0.0, 4.0]))
    assert torch.equal(state["count"], torch.tensor([1.0 if all_cameras else 0.0, 1.0]))
    assert torch.equal(state["max_radii"], torch.tensor([3.0 if all_cameras else 0.0, 5.0]))


def test_schedule_densify_reset_and_size_threshold_after_the_first_reset():
    """densify at from < step, step % interval == 0; opacity reset every reset interval; the world-size
    prune (max_screen_size) only after the first reset; nothing from densify_until_iter on."""
    model = with_optimizer(GaussianModel.from_params({
        "xyz": torch.zeros(3, 3), "f_dc": torch.zeros(3, 1, 3), "f_rest": torch.zeros(3, 0, 3),
        "opacity": torch.full((3, 1), 0.5).logit(), "scaling": torch.log(torch.tensor([0.01, 0.01, 0.5]))[:, None]
        .repeat(1, 3), "rotation": torch.tensor([1.0, 0, 0, 0]).expand(3, 4)}))
    strategy = DensificationStrategy(grad_threshold=1.0, min_opacity=0.005, percent_dense=0.01, extent=1.0,
                                     max_screen_size=20, densify_from_iter=2, densify_until_iter=8,
                                     densification_interval=2, opacity_reset_interval=4)
    ran, opacities = {}, {}
    for step in range(1, 10):
        n = model.num_points
        ran[step] = strategy.step_post_backward(model, step, torch.zeros(1, n, 2), torch.ones(1, n), 8, 8)
        opacities[step] = model.opacities.detach().clone()
    assert {step: counts for step, counts in ran.items() if counts is not None} == {
        4: {"cloned": 0, "split": 0, "pruned": 0},  # 4 is not after the first reset: G2 (0.5 > 0.1) stays
        6: {"cloned": 0, "split": 0, "pruned": 1},  # after it: G2 pruned
    }
    assert torch.equal(opacities[3], opacities[1]) and bool((opacities[3] > 0.4).all())  # no reset before 4
    assert torch.allclose(opacities[4], torch.full((3,), 0.01)) and torch.equal(opacities[9], opacities[4][:2])
    assert model.num_points == 2 and strategy.state_dict()["count"].tolist() == [1.0, 1.0]  # step 7 only


def test_a_skipped_step_adds_no_gradient_and_does_not_densify():
    model = with_optimizer(GaussianModel.from_points(torch.rand(2, 3), torch.rand(2, 3), 0))
    strategy = DensificationStrategy(grad_threshold=1e-9, min_opacity=0.0, percent_dense=0.01, extent=1.0,
                                     densify_until_iter=10, densification_interval=1, opacity_reset_interval=100)
    grad, radii = torch.full((1, 2, 2), float("nan")), torch.ones(1, 2)
    assert strategy.step_post_backward(model, 2, grad, radii, 8, 8, skip=torch.tensor(1.0)) is None
    state = strategy.state_dict()
    assert torch.equal(state["grad2d"], torch.zeros(2)) and torch.equal(state["count"], torch.ones(2))
    assert model.num_points == 2
    counts = strategy.step_post_backward(model, 3, torch.ones(1, 2, 2), radii, 8, 8, skip=torch.tensor(0.0))
    assert counts["cloned"] + counts["split"] == 2


def test_state_dict_round_trip_and_errors():
    _, strategy = hand_built()
    other = DensificationStrategy(grad_threshold=0.005, min_opacity=0.005, percent_dense=0.01, extent=1.0)
    assert other.state_dict() == {"version": 1, "grad2d": None, "count": None, "max_radii": None}
    other.load_state_dict(strategy.state_dict())
    for name in ("grad2d", "count", "max_radii"):
        assert torch.equal(other.state_dict()[name], strategy.state_dict()[name])
    with pytest.raises(ValueError, match="densification state version 7"):
        other.load_state_dict({**strategy.state_dict(), "version": 7})
    small = GaussianModel.from_points(torch.rand(3, 3), torch.rand(3, 3), 0)
    with pytest.raises(ValueError, match="statistics are kept for 7 Gaussians, the model has 3"):
        other.densify_and_prune(small, None)


def test_from_config_reads_the_optimization_keys():
    optim = dataclasses.replace(OptimizationParams(), densify_grad_threshold=0.1, min_opacity=0.2, percent_dense=0.3,
                                max_screen_size=4, densify_from_iter=5, densify_until_iter=6,
                                densification_interval=7, opacity_reset_interval=8, densify_stats_all_cameras=True)
    strategy = DensificationStrategy.from_config(optim, extent=2.5)
    assert (strategy.grad_threshold, strategy.min_opacity, strategy.percent_dense, strategy.extent) == (0.1, 0.2, 0.3,
                                                                                                       2.5)
    assert (strategy.max_screen_size, strategy.densify_from_iter, strategy.densify_until_iter,
            strategy.densification_interval, strategy.opacity_reset_interval) == (4, 5, 6, 7, 8)
    assert strategy.stats_all_cameras and not strategy.screen_size_prune
