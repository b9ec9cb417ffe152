"""The CLIP-score evaluation tool (evaluation/clip_score.py) on a tiny random CLIP saved as a folder."""
import json

import pytest
import torch

from evaluation import clip_score
from evaluation.clip_score import OPENAI_MEAN, OPENAI_STD, CLIPScorer
from guidance.prior import ModelNotFoundError
from scene.gaussian_model import GaussianModel
from scene.ply_format import save_gaussian_ply
from tests.tiny_models import save_tiny_clip
from utils.config import load_config, save_config


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    return CLIPScorer.from_pretrained(str(tiny_clip_dir))


def _normalised(value: float) -> torch.Tensor:
    return (value - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)


def test_preprocess_resizes_shortest_side_and_normalises(scorer):
    assert scorer.image_size == 32 and scorer.mean == OPENAI_MEAN  # no preprocessor config in the folder
    out = scorer.preprocess(torch.full((2, 3, 40, 60), 0.5))
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, _normalised(0.5).view(1, 3, 1, 1).expand(2, 3, 32, 32), atol=1e-5, rtol=0)


def test_preprocess_crops_the_centre(scorer):
    images = torch.zeros(1, 3, 32, 96)
    images[..., 32:64] = 1.0  # the middle third, exactly the 32x32 centre crop
    out = scorer.preprocess(images)
    torch.testing.assert_close(out[0], _normalised(1.0).view(3, 1, 1).expand(3, 32, 32), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        scorer.preprocess(torch.zeros(3, 32, 32))


def test_score_is_100_times_the_models_own_cosine(scorer):
    torch.manual_seed(1)
    images = torch.rand(5, 3, 48, 48)
    prompt = "a dslr photo of a bagel"
    scores = scorer.score(images, prompt)
    tok = scorer.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tok.input_ids, pixel_values=scorer.preprocess(images))
    cosine = (out.logits_per_image / scorer.model.logit_scale.exp()).squeeze(-1)  # [5]
    torch.testing.assert_close(scores, 100 * cosine.clamp_min(0), atol=1e-4, rtol=1e-4)
    assert scores.shape == (5,) and (scores >= 0).all() and (scores <= 100).all()
    torch.testing.assert_close(scorer.score(images.flip(0), prompt), scores.flip(0))


def test_missing_model_names_the_flag(tmp_path):
    with pytest.raises(ModelNotFoundError, match="--model"):
        CLIPScorer.from_pretrained(str(tmp_path / "absent"))


def test_cli_scores_the_newest_ply_of_a_run(tiny_clip_dir, tmp_path):
    run = tmp_path / "run"
    save_config(load_config("config/demo.yaml", warn_no_effect=False), run / "config.yaml")
    torch.manual_seed(0)
    for it, colour in ((3, 0.0), (10, 1.0)):
        xyz = torch.randn(300, 3) * 0.3
        save_gaussian_ply(GaussianModel.from_points(xyz, torch.full((300, 3), colour), 0),
                          run / "point_cloud" / f"iteration_{it}" / "point_cloud.ply")
    assert clip_score.asset_ply(run).parent.name == "iteration_10"  # interrupted run: no final PLY
    assert clip_score.main([str(run), "--model", str(tiny_clip_dir), "--views", "5", "--resolution", "32",
                            "--device", "cpu"]) == 0
    result = json.loads((run / "clip_score.json").read_text())
    cfg = load_config(run / "config.yaml", warn_no_effect=False)
    assert result["prompt"] == cfg.guidance.text and result["ply"].endswith("iteration_10/point_cloud.ply")
    assert len(result["per_view"]) == 5
    assert result["mean"] == pytest.approx(sum(result["per_view"]) / 5, rel=1e-6)


def test_a_finished_runs_final_ply_is_preferred(tmp_path):
    for path in (tmp_path / "point_cloud" / "iteration_20" / "point_cloud.ply", tmp_path / "point_cloud.ply"):
        save_gaussian_ply(GaussianModel.from_points(torch.randn(10, 3), torch.rand(10, 3), 0), path)
    assert clip_score.asset_ply(tmp_path) == tmp_path / "point_cloud.ply"
    with pytest.raises(FileNotFoundError, match="--ply"):
        clip_score.asset_ply(tmp_path / "empty")


def test_cli_rejects_a_folder_without_config(tmp_path, tiny_clip_dir, caplog):
    assert clip_score.main([str(tmp_path), "--model", str(tiny_clip_dir), "--device", "cpu"]) == 2
    assert f"{tmp_path / 'config.yaml'} not found: RUN_DIR must be a folder written by train.py" in caplog.text
    with pytest.raises(SystemExit):
        clip_score.parse_args([str(tmp_path), "--views", "0"])
