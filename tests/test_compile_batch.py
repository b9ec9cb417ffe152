"""One compiled UNet program for every batch size (PipelineParams.compile_dynamic_batch, issue 20).

Checked at the Dynamo level on the CPU (the "eager" backend: no Inductor build): after calls at the
batch sizes a loss uses (B, the CFG pair 2B) and one more, exactly one graph was traced, and every output
equals the uncompiled UNet's.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from guidance.stable_diffusion import _dynamic_batch
from tests.tiny_models import tiny_sd_pipeline


@pytest.mark.slow  # Dynamo traces the tiny UNet: about a minute on 2 busy cores
def test_one_traced_graph_serves_every_batch_size():
    """Without the marks, torch.compile would trace twice (static at 4, then dynamic after 8)."""
    unet = tiny_sd_pipeline().unet.eval().requires_grad_(False)

    def eps(latents, t, context):
        return unet(latents, t, encoder_hidden_states=context).sample

    torch._dynamo.reset()
    counters.clear()
    compiled = _dynamic_batch(torch.compile(eps, backend="eager"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in (4, 8, 4, 12):
            args = (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g),
                    torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g))
            out = compiled(*args)
            assert out.shape == (batch, 4, 8, 8)
            torch.testing.assert_close(out, eps(*args), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
