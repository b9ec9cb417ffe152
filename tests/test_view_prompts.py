"""View-dependent prompt weights against the official rule (official `train.py::adjust_text_embeddings`)."""
import math

import pytest
import torch

from guidance.view_prompts import perp_neg_weights, view_embeddings, view_interpolation

FRONT, SIDE, BACK = 0, 1, 2


def test_interpolation_known_views():
    w = view_interpolation(torch.tensor([0.0, 45.0, 90.0, -90.0, 135.0, 180.0, -180.0]))
    expected = torch.tensor([
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.5, 0.5],
        [0.0, 0.0, 1.0],
        [0.0, 0.0, 1.0],
    ])
    torch.testing.assert_close(w, expected)


def test_interpolation_sums_to_one_and_is_nonnegative():
    w = view_interpolation(torch.linspace(-180.0, 180.0, 721))
    torch.testing.assert_close(w.sum(-1), torch.ones(721))
    assert (w >= 0).all()


@pytest.mark.parametrize("edge", [90.0, -90.0, 180.0, -180.0])
def test_interpolation_continuous_at_half_boundaries(edge):
    eps = 1e-3
    w = view_interpolation(torch.tensor([edge - eps, edge, edge + eps]))
    assert (w[0] - w[1]).abs().max() < 1e-4
    assert (w[2] - w[1]).abs().max() < 1e-4


def test_interpolation_wraps_azimuth():
    torch.testing.assert_close(
        view_interpolation(torch.tensor([270.0, -270.0, 360.0])),
        view_interpolation(torch.tensor([-90.0, 90.0, 0.0])),
    )


def _official(a: float):
    """The official Perp-Neg numbers written with the literal constants -2, 2, 10."""
    if -90 <= a < 90:
        r = 1 - abs(a) / 90
        w_front = 0.0 if r > 0.8 else -2 * math.exp(-2 * r)
        w_side = 0.0 if r < 0.2 else -2 * math.exp(-10 * (1 - r))
        return [FRONT, SIDE], [w_front, w_side]
    r = 1 - (abs(a) - 90) / 90
    w_side = 0.0 if r > 0.8 else -math.exp(-10 * r)
    return [SIDE, FRONT], [w_side, -2.0]


def test_perp_neg_official_numbers():
    azimuths = [0.0, 30.0, 89.0, 91.0, 135.0, 180.0, -30.0, -90.0, -170.0]
    ids, weights = perp_neg_weights(torch.tensor(azimuths))
    assert ids.dtype == torch.long and ids.shape == (len(azimuths), 2)
    for i, a in enumerate(azimuths):
        expected_ids, expected_w = _official(a)
        assert ids[i].tolist() == expected_ids, a
        torch.testing.assert_close(weights[i], torch.tensor(expected_w), rtol=1e-5, atol=1e-6)


def test_perp_neg_hand_values():
    ids, weights = perp_neg_weights(torch.tensor([0.0, 91.0, 180.0]))
    torch.testing.assert_close(weights[0], torch.tensor([0.0, -2.0]))  # r = 1: no front term, full side
    torch.testing.assert_close(weights[1], torch.tensor([0.0, -2.0]))  # r = 89/90 > 0.8: no side term
    torch.testing.assert_close(weights[2], torch.tensor([-1.0, -2.0]))  # r = 0: -exp(0), front -2
    assert ids.tolist() == [[FRONT, SIDE], [SIDE, FRONT], [SIDE, FRONT]]


def test_perp_neg_general_parameters():
    _, weights = perp_neg_weights(torch.tensor([30.0, 135.0]), negative_w=-3.0, front_decay=1.0, side_decay=4.0)
    r = 2 / 3
    torch.testing.assert_close(
        weights[0], torch.tensor([-3.0 * math.exp(-r), -3.0 * math.exp(-4.0 * (1 - r))])
    )
    torch.testing.assert_close(weights[1], torch.tensor([-3.0 * math.exp(-4.0 * 0.5) / 2, -3.0]))


def test_view_embeddings_mix():
    torch.manual_seed(0)
    front, side, back = (torch.randn(1, 5, 3) for _ in range(3))
    pos = view_embeddings(front, side, back, torch.tensor([0.0, 90.0, 180.0, 45.0, -135.0]))
    assert pos.shape == (5, 5, 3)
    assert torch.equal(pos[0], front[0])
    assert torch.equal(pos[1], side[0])
    assert torch.equal(pos[2], back[0])
    torch.testing.assert_close(pos[3], 0.5 * front[0] + 0.5 * side[0])
    torch.testing.assert_close(pos[4], 0.5 * side[0] + 0.5 * back[0])
