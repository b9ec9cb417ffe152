"""Regional compilation: compile a model's repeated block class once instead of the whole model.

On a fresh machine, torch.compile of the whole Stable Diffusion UNet is most of the wait before the first
iteration (issue 20). The UNet repeats one block class, named in diffusers' `_repeated_blocks`
(BasicTransformerBlock in SD 1.x/2.x: 16 instances at three widths). Compiling that class's `forward` once,
with every instance's parameters as inputs of the same program, leaves one program per distinct input
shape (four in SD 2.1) instead of one graph of the whole UNet; the resnets, up/down-samplers and the
time embedding run eager (cuDNN convolutions either way; CUDA graphs remove their launch cost). This is
PyTorch's regional-compilation recipe and diffusers' `ModelMixin.compile_repeated_blocks`, with two changes:

- the batch dimension is marked symbolic on each block's inputs, so that SCTD's batches B and 2B (the CFG
  pair) share a program; a forward pre-hook could not do this, since Dynamo traces hooks;
- Dynamo's automatic dynamic shapes are off for these calls: the blocks' token counts and widths differ,
  and without this the second width would recompile with them symbolic (slower kernels);
- the blocks' parameters are traced as inputs (inline_inbuilt_nn_modules, the default since torch 2.5,
  set here for older versions), so every instance shares its shape's program instead of guarding on
  its own weights, and the recompile limit leaves room for every (shape, batch size) pair.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn
from torch._dynamo import config as dynamo_config

_DYNAMO_SETTINGS = {"automatic_dynamic_shapes": False}
if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):  # later: always on, deprecated
    _DYNAMO_SETTINGS["inline_inbuilt_nn_modules"] = True
_DYNAMO_SETTINGS["recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"] = 64


def compile_repeated_blocks(model: nn.Module, dynamic_batch: bool, backend: str | Callable = "inductor") -> int:
    """Route every instance of `model`'s repeated block classes (`model._repeated_blocks`, class names) through
    one torch.compile'd `forward` per class, compiled at the first call of each input shape. Returns how
    many instances now run compiled. The maths is the block's own (tests/test_regional_compile.py).

    dynamic_batch: dimension 0 of every tensor input symbolic (one program for every batch size); else one
        program per batch size too.
    backend: torch.compile's backend ("inductor"; tests use "eager" or "aot_eager").
    """
    names = tuple(getattr(model, "_repeated_blocks", None) or ())
    if not names:
        raise ValueError(f"{type(model).__name__} names no repeated blocks (diffusers' _repeated_blocks): regional "
                         "compilation has nothing to compile; set PipelineParams.compile_regions=false to compile "
                         "the whole UNet")
    programs: dict[type, Callable] = {}
    count = 0
    for module in model.modules():
        block_class = type(module)
        if block_class.__name__ not in names:
            continue
        if block_class not in programs:
            programs[block_class] = torch.compile(block_class.forward, backend=backend,
                                                  dynamic=None if dynamic_batch else False)
        module.forward = functools.partial(_call_compiled_block, programs[block_class], module, dynamic_batch)
        count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no module of its repeated block classes {names}: regional "
                         "compilation has nothing to compile; set PipelineParams.compile_regions=false")
    return count


def _call_compiled_block(program: Callable, module: nn.Module, dynamic_batch: bool, *args, **kwargs):
    if dynamic_batch:
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor) and value.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(value, 0)
    with dynamo_config.patch(**_DYNAMO_SETTINGS):
        return program(module, *args, **kwargs)
