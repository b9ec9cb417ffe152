"""Shap-E (diffusers' `ShapEPipeline`) as a text-to-3D start: prompt -> coloured mesh.

One config key, `GenerateCamParams.shapee_model_key`, names the model, loaded the way the Stable
Diffusion prior is (guidance/stable_diffusion.py):
    (a) a local diffusers folder (model_index.json, prior/ text_encoder/ tokenizer/ shap_e_renderer/ scheduler/),
    (b) a Hugging Face Hub id (default `openai/shap-e`), read through the local cache and honouring HF_HUB_OFFLINE.
`check_shapee_available` is the pre-flight check a run makes before it creates its folder: a missing model
raises `ModelNotFoundError` naming the key, what was tried and how to point the key at a local copy.

Sampling follows the official `utils/shapee_utils.py` (Shap-E text300M): classifier-free guidance 15,
64 Karras steps of the Heun sampler, fp16 on a GPU, the latent decoded to a mesh on a 128^3 grid
(marching cubes over the STF signed distance, vertex colours from its RGB head).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import torch

from scene.mesh_file import ColouredMesh
from utils.hub import ModelNotFoundError

logger = logging.getLogger(__name__)

KEY = "GenerateCamParams.shapee_model_key"
SUBFOLDERS = ("prior", "text_encoder", "tokenizer", "shap_e_renderer", "scheduler")
GUIDANCE_SCALE = 15.0  # official utils/shapee_utils.py
NUM_STEPS = 64  # official karras_steps
GRID_SIZE = 128  # marching-cubes grid of the official decode_latent_mesh
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_REMEDY = f"""Expected a diffusers Shap-E folder (as saved by ShapEPipeline.save_pretrained):
  <folder>/model_index.json
  <folder>/prior/            config.json + diffusion_pytorch_model.safetensors
  <folder>/text_encoder/     config.json + model.safetensors
  <folder>/tokenizer/        vocab.json, merges.txt, tokenizer_config.json
  <folder>/shap_e_renderer/  config.json + diffusion_pytorch_model.safetensors
  <folder>/scheduler/        scheduler_config.json
On a machine with internet access, `ShapEPipeline.from_pretrained("openai/shap-e").save_pretrained(DIR)`
writes one (or copy an existing Hugging Face cache, then set HF_HUB_OFFLINE=1). Point the key at it:
  {KEY}=/path/to/shap-e
or in the YAML config:
  GenerateCamParams:
    shapee_model_key: /path/to/shap-e
Without Shap-E, start from init_shape pointe, sphere, or mesh / ply with a file made by any other generator."""


def _not_found(key: object, tried: Sequence[str]) -> ModelNotFoundError:
    lines = [f"Shap-E model not found: {KEY} = {key!r}.", "Tried:"] + [f"  - {attempt}" for attempt in tried]
    return ModelNotFoundError("\n".join(lines + [_REMEDY]))


def _check_hub_model(repo_id: str) -> None:
    """Find (or fetch) only model_index.json of a hub id; raise ModelNotFoundError if absent."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    from utils.hub import hub_cache_dir, hub_offline

    cache_dir = hub_cache_dir()
    if hub_offline():
        if not isinstance(try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir), str):
            raise _not_found(repo_id, [f"Hugging Face Hub id {repo_id!r} in the local cache {cache_dir}: not cached",
                                       "downloading: not attempted, offline mode is on (HF_HUB_OFFLINE)"])
        return
    try:
        hf_hub_download(repo_id, "model_index.json", cache_dir=cache_dir)
    except (OSError, HFValidationError, EntryNotFoundError) as err:
        raise _not_found(repo_id, [f"Hugging Face Hub id {repo_id!r} (cache {cache_dir}, then the Hub): "
                                   f"{type(err).__name__}: {err}",
                                   "(set HF_HUB_OFFLINE=1 to skip the network look-up when working from a local cache)"]
                         ) from err


def locate_shapee(model_key: str | None) -> tuple[str, bool]:
    """-> (folder or hub id, is_hub) after checking that the model is there (no weights are read)."""
    if not model_key:
        raise _not_found(model_key, ["nothing: the key is empty"])
    key = os.path.expanduser(str(model_key))
    if os.path.isdir(key):
        missing = [name for name in SUBFOLDERS if not os.path.isdir(os.path.join(key, name))]
        if missing:
            raise _not_found(key, [f"local folder {key!r}: exists, but lacks the subfolders {missing}"])
        return key, False
    if not os.path.exists(key) and _HUB_ID.match(key):
        _check_hub_model(key)
        return key, True
    raise _not_found(key, [f"local path {os.path.abspath(key)!r}: not a folder"])


def check_shapee_available(model_key: str | None) -> None:
    """The pre-flight check: raise ModelNotFoundError unless the Shap-E model can be loaded."""
    locate_shapee(model_key)


def load_shapee_pipeline(model_key: str | None, device: torch.device):
    """ShapEPipeline on `device`, fp16 on CUDA (as the official sampler), fp32 on the CPU."""
    from diffusers import ShapEPipeline

    from utils.hub import hub_cache_dir, hub_offline

    key, is_hub = locate_shapee(model_key)
    hub = {"cache_dir": hub_cache_dir(), "local_files_only": hub_offline()} if is_hub else {}
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    logger.info("loading Shap-E from %s %s (%s)", "hub id" if is_hub else "folder", key, dtype)
    try:
        pipe = ShapEPipeline.from_pretrained(key, torch_dtype=dtype, **hub)
    except OSError as err:
        raise _not_found(key, [f"{'Hugging Face Hub id' if is_hub else 'local folder'} {key!r}: "
                               f"{type(err).__name__}: {err}"]) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate_mesh(pipe, prompt: str, seed: int, num_steps: int | None = None,
                  guidance_scale: float = GUIDANCE_SCALE, grid_size: int | None = None) -> ColouredMesh:
    """Sample one Shap-E latent for `prompt` and decode it to a vertex-coloured mesh (CPU, float64).

    num_steps and grid_size default to NUM_STEPS and GRID_SIZE (read at call time). Shap-E's frame:
    the object inside [-1, 1]^3, z up (the frame of the official Shap-E and Point-E output).
    """
    num_steps = NUM_STEPS if num_steps is None else num_steps
    grid_size = GRID_SIZE if grid_size is None else grid_size
    device = pipe.device
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = pipe(prompt, num_inference_steps=num_steps, guidance_scale=guidance_scale, generator=generator,
                   output_type="latent").images  # [1, num_embeddings, embedding_dim]
    try:
        mesh = pipe.shap_e_renderer.decode_to_mesh(latents[:1], device, grid_size=grid_size)
    except RuntimeError as err:
        if "non-empty" not in str(err):
            raise
        raise RuntimeError(f"Shap-E decoded an empty surface for the prompt {prompt!r}; try another "
                           "GenerateCamParams.init_prompt or seed") from err
    colours = torch.stack([mesh.vertex_channels[c] for c in "RGB"], dim=1).double().clamp(0.0, 1.0).cpu()
    return ColouredMesh(mesh.verts.double().cpu(), mesh.faces.long().cpu(), colours)


def shapee_mesh(prompt: str, model_key: str | None, generator: torch.Generator) -> ColouredMesh:
    """Load Shap-E, generate the prompt's mesh (seed drawn from `generator`), free the model again."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    pipe = load_shapee_pipeline(model_key, device)
    mesh = generate_mesh(pipe, prompt, seed)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the memory goes back to training
    logger.info("Shap-E %r: mesh with %d vertices, %d faces", prompt, mesh.verts.shape[0], mesh.faces.shape[0])
    return mesh
