"""The report's metrics: the Frechet distance (known answers), the FID Inception loader on a tiny
TorchScript detector, image folders, and ImageReward's glue (and its message without the package)."""
import numpy as np
import pytest
import torch

from evaluation.fid import (
    FeatureExtractorMissing,
    InceptionFeatures,
    feature_statistics,
    frechet_distance,
    load_image_folder,
    resize_for_inception,
)
from evaluation.image_reward import INSTALL_HINT, ImageRewardScorer, ImageRewardUnavailable, image_reward_installed
from tests.tiny_models import save_tiny_inception
from training.sweep.report import ReportOptions, Scorers
from utils.media import save_images


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="disagree"):
        frechet_distance(mu1, np.diag(s1), mu2[:2], np.diag(s2[:2]))


def test_feature_statistics_are_mean_and_unbiased_covariance():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])


def test_inception_file_is_loaded_with_torchscript_and_fed_8bit_images(tmp_path):
    path = tmp_path / "inception.pt"
    save_tiny_inception(path)
    extractor = InceptionFeatures(path)
    images = torch.rand(5, 3, 40, 40)
    feats = extractor(images, batch=2)
    assert feats.shape == (5, 8)
    quantised = (images * 255).round() / 255  # the detector sees the same 8-bit images
    torch.testing.assert_close(feats, extractor(quantised))
    with pytest.raises(FeatureExtractorMissing, match="wget"):
        InceptionFeatures(tmp_path / "missing.pt")


def test_image_folder_loads_resized_in_sorted_order(tmp_path):
    images = torch.stack([torch.full((3, 16, 16), v) for v in (0.0, 0.5, 1.0)])
    save_images(images, tmp_path / "a", "img")
    loaded = load_image_folder(tmp_path, 8)
    assert loaded.shape == (3, 3, 8, 8)
    torch.testing.assert_close(loaded.mean(dim=(1, 2, 3)), torch.tensor([0.0, 128 / 255, 1.0]))
    assert resize_for_inception(loaded).shape == (3, 3, 299, 299)


class _RewardModel:
    """What ImageReward.load returns, as far as the scorer uses it: score(prompt, PIL list)."""

    def score(self, prompt, images):
        values = [float(np.asarray(im).mean()) / 255.0 for im in images]
        return values[0] if len(values) == 1 else values


def test_image_reward_scores_every_view_through_pil_images():
    scorer = ImageRewardScorer(_RewardModel())
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.2, 1.0)])
    torch.testing.assert_close(scorer.score(images, "a cat", batch=2), torch.tensor([0.0, 51 / 255, 1.0]))


@pytest.mark.skipif(image_reward_installed(), reason="the ImageReward package is installed here")
def test_without_the_package_image_reward_says_how_to_install_it_and_the_report_notes_it():
    with pytest.raises(ImageRewardUnavailable, match="pip install image-reward"):
        ImageRewardScorer.from_pretrained()
    scorers = Scorers(ReportOptions(), torch.device("cpu"))
    assert scorers.image_reward() is None and scorers.notes == [f"ImageReward: not computed: {INSTALL_HINT}"]
