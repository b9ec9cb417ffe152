"""The benchmark script end to end on the CPU with a tiny SD: table layout and per-iteration FLOPs."""
import pytest
import torch

from bench import benchmark
from bench.flops import network_flops
from guidance.stable_diffusion import SDComponents
from tests.tiny_models import tiny_sd_pipeline


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_sd_pipeline()
    components = SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    args = benchmark.parse_args(["--tiny", "--steps", "2", "--warmup", "1", "--resolution", "64",
                                 "--gaussians", "500"])
    return components, args, network_flops(components.unet, components.vae, 64)


@pytest.mark.parametrize("loss,mode,unet_samples,cameras", [
    ("sds", "default", 8, 4),  # one CFG call of 2 branches x 4 cameras
    ("sds", "large-gpu", 16, 8),
    ("cds", "straightforward", 16, 4),  # two CFG calls
])
def test_flops_per_iteration_count_every_unet_sample_and_the_encoder(setup, loss, mode, unet_samples, cameras):
    components, args, flops = setup
    result = benchmark.run_config(loss, mode, components, args, torch.device("cpu"), torch.float32, flops)
    expected = unet_samples * flops.unet_tflop_per_sample + cameras * flops.vae_tflop_fwd_bwd_per_image
    assert result.tflop == pytest.approx(expected, rel=1e-9)
    assert result.cameras == cameras and len(result.step_ms) == 1 and result.step_ms[0] > 0


def test_table_has_a_row_per_configuration_and_ratios_only_between_equal_batches(setup, tmp_path):
    out = tmp_path / "table.md"
    assert benchmark.main(["--tiny", "--steps", "1", "--warmup", "1", "--losses", "sds",
                           "--modes", "straightforward,default,large-gpu", "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert [c.strip() for c in header][:4] == ["mode", "loss", "GPUs", "B"]
    by_mode = {r[0].strip(): [c.strip() for c in r] for r in body}
    assert set(by_mode) == {"straightforward", "default", "large-gpu"}
    ratio = header.index(" vs straightforward ")
    assert by_mode["default"][ratio].endswith("x") and by_mode["large-gpu"][ratio] == "-"
    assert by_mode["large-gpu"][3] == "8" and by_mode["default"][2] == "1"
