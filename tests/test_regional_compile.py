"""Regional compilation of the UNet (guidance/regional_compile.py, PipelineParams.compile_regions; issue 20).

On a CPU with Dynamo's "aot_eager" backend (the same tracing and graph capture as Inductor, no kernel
generation): every repeated block runs through the compiled program, the UNet's output is the eager one,
the blocks share one program per distinct input shape (the known answer comes from hooks on the eager
UNet), a second batch size adds no program when the batch is symbolic, and bad input says what to set.
The GPU parity of the whole step is in tests/test_fast_path.py (the "regional" case).
"""
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.utils import counters

from guidance.regional_compile import compile_repeated_blocks
from utils.config import ConfigError, load_config


def _sd_like_unet() -> UNet2DConditionModel:
    """SD 2.x's layout (three cross-attention levels, linear projections, a cross-attention mid block) at toy
    widths: 16 BasicTransformerBlocks at four (tokens, width) shapes."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, norm_num_groups=8)
    return unet.eval().requires_grad_(False)


def _inputs(batch: int):
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.full((batch,), 500),
            torch.randn(batch, 7, 32, generator=g))


def _block_shapes(unet) -> set[tuple[int, ...]]:
    """The distinct hidden-state shapes (batch left out) the eager UNet feeds its transformer blocks."""
    shapes, handles = set(), []
    for m in unet.modules():
        if type(m).__name__ in unet._repeated_blocks:
            handles.append(m.register_forward_pre_hook(
                lambda _m, args, kwargs: shapes.add(tuple((args[0] if args else kwargs["hidden_states"]).shape[1:])),
                with_kwargs=True))
    with torch.no_grad():
        unet(*_inputs(2))
    for h in handles:
        h.remove()
    return shapes


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic_batch", [True, False], ids=["dynamic-batch", "static-batch"])
def test_the_blocks_share_one_program_per_shape_and_keep_the_outputs(fresh_dynamo, dynamic_batch):
    unet = _sd_like_unet()
    expected_shapes = _block_shapes(unet)
    assert len(expected_shapes) == 4  # the layout above: (256, 32), (64, 64), (16, 64), (4, 64)
    with torch.no_grad():
        eager = {b: unet(*_inputs(b)).sample for b in (2, 4)}

    compiled = compile_repeated_blocks(unet, dynamic_batch=dynamic_batch, backend="aot_eager")
    n_blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    assert compiled == n_blocks == 16
    with torch.no_grad():
        out = unet(*_inputs(2)).sample
        assert counters["stats"]["unique_graphs"] == len(expected_shapes)  # not one per block
        out4 = unet(*_inputs(4)).sample
    assert (out - eager[2]).abs().max().item() <= 1e-6 and (out4 - eager[4]).abs().max().item() <= 1e-6
    assert out.abs().max() > 0
    # a symbolic batch serves batch 4 with the batch-2 programs; a static one compiles them again
    assert counters["stats"]["unique_graphs"] == len(expected_shapes) * (1 if dynamic_batch else 2)


def test_the_latents_gradient_through_compiled_blocks_is_the_eager_one(fresh_dynamo):
    unet = _sd_like_unet()
    latents, t, context = _inputs(2)
    x = latents.clone().requires_grad_(True)
    unet(x, t, context).sample.square().sum().backward()
    eager_grad = x.grad.clone()
    compile_repeated_blocks(unet, dynamic_batch=True, backend="aot_eager")
    x.grad = None
    unet(x, t, context).sample.square().sum().backward()
    assert eager_grad.norm() > 0
    assert torch.allclose(x.grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_a_model_without_repeated_blocks_names_the_key_to_set():
    with pytest.raises(ValueError, match="PipelineParams.compile_regions=false"):
        compile_repeated_blocks(torch.nn.Linear(2, 2), dynamic_batch=True, backend="eager")


def test_regional_and_background_compilation_together_are_refused():
    with pytest.raises(ConfigError, match="compile_regions.*compile_in_background"):
        load_config("config/demo.yaml", ["PipelineParams.compile_regions=true",
                                         "PipelineParams.compile_in_background=true"])
    cfg = load_config("config/demo.yaml", ["PipelineParams.compile_regions=true"])
    assert cfg.pipeline.compile_regions and not cfg.pipeline.compile_in_background
