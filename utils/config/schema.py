"""The typed configuration schema: one dataclass per YAML section, each field with its meaning and rules.

One dataclass per YAML section, using the official SegmentDreamer/LucidDreamer
section names (``ModelParams``, ``PipelineParams``, ``GuidanceParams``,
``GenerateCamParams``, ``OptimizationParams``) plus a few top-level keys. Class
defaults follow the official ``arguments/__init__.py``; the YAML files in
``config/`` set the rest.

Every field carries ``metadata["help"]`` (a one-line meaning) and optional
rules: ``choices`` (or ``choices_from``, a registry the names come from),
``min``/``max`` (inclusive), ``gt`` (exclusive lower bound), ``length`` (fixed
list length), ``pair`` (a ``[low, high]`` list with ``low <= high``) and
``no_effect`` (why the key is accepted but ignored). It also carries the key's
properties, from which every list of keys is derived (nothing else lists keys by
hand): ``resumable`` (may change when a run resumes), ``prior_free`` (a built
prior does not depend on it, so a sweep keeps one prior across runs differing in
it) and ``flag`` (its command-line flag). The defaults are the safe answers: a
key is refused on resume and rebuilds the prior unless it says otherwise.
Loading and validation live in :mod:`utils.config.loading`, the command line in
:mod:`utils.config.cli`, the printed reference (``train.py --help-config``) in
:mod:`utils.config.help`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


class ConfigError(ValueError):
    """A configuration value, key or combination is invalid."""


def param(default: Any, help: str, *, choices: Optional[Sequence[Any]] = None,
          choices_from: Optional[str] = None,
          min: Optional[float] = None, max: Optional[float] = None,
          gt: Optional[float] = None, length: Optional[int] = None,
          pair: bool = False, no_effect: Optional[str] = None,
          resumable: Optional[str] = None, prior_free: bool = False,
          flag: Optional[str] = None, cuda_only: bool = False) -> Any:
    """Declare a config field with its one-line meaning, validation rules and properties.

    ``min``/``max``/``gt`` apply to every element of a list field. ``choices_from`` names a
    registry as ``"package.module:NAME"`` (a mapping or sequence of the allowed values), read when
    a value is checked, so that registering a new entry (a loss) is enough to make it selectable.
    ``resumable`` says what the key changes when it may change on resume (None: refused).
    ``prior_free=True`` declares that no built prior depends on the key (default: one does).
    ``flag`` is the command-line flag (without ``--``) that sets the key.
    ``cuda_only=True``: the key acts only on a CUDA run (a CPU run warns when it is set away from its default).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "choices_from": choices_from,
            "min": min, "max": max, "gt": gt, "length": length, "pair": pair,
            "no_effect": no_effect, "resumable": resumable, "prior_free": prior_free, "flag": flag,
            "cuda_only": cuda_only}
    if isinstance(default, list):
        return field(default_factory=functools.partial(list, default), metadata=meta)
    return field(default=default, metadata=meta)


def _section(cls: type, name: str, prior_free: bool = False) -> Any:
    """A YAML section. ``prior_free=True``: no prior reads this section (build_prior in
    training/trainer.py is built from GuidanceParams and PipelineParams), so its keys are prior-free."""
    return field(default_factory=cls, metadata={"section": name, "help": cls.__doc__, "prior_free": prior_free})


_LR = "learning rate"
_UNUSED_OFFICIAL = "unused by the official SegmentDreamer training loop as well"
_NO_DATASET = "text-to-3D has no input dataset"


@dataclass
class ModelParams:
    """Scene/model options (official ``ModelParams``)."""

    sh_degree: int = param(0, "maximum spherical-harmonics degree of the Gaussian colours", min=0, max=3)
    source_path: str = param("", "dataset folder (YAML also accepts '_source_path')", no_effect=_NO_DATASET)
    model_path: str = param("", "official run folder (YAML also accepts '_model_path')",
                            no_effect="the run folder is derived from output_dir and workspace")
    pretrained_model_path: Optional[str] = param(None, "official pretrained Gaussians to start from",
                                                 no_effect="use GenerateCamParams.init_shape: ply with init_path")
    images: str = param("images", "dataset image folder (YAML also accepts '_images')", no_effect=_NO_DATASET)
    workspace: str = param("debug", "run-group name: runs go to <output_dir>/<workspace>/<run name>")
    batch: int = param(10, "number of cameras per pre-generated camera stack", min=1)
    resolution: int = param(-1, "dataset downscale factor (YAML also accepts '_resolution')", no_effect=_NO_DATASET)
    white_background: bool = param(True, "white (true) or black background for evaluation renders "
                                         "(YAML also accepts '_white_background')")
    data_device: str = param("cuda", "device holding dataset images", no_effect=_NO_DATASET)
    eval: bool = param(False, "hold out dataset test views", no_effect=_NO_DATASET)
    opt_path: Optional[str] = param(None, "path of the options file in the official code",
                                    no_effect="use --opt on the command line")
    sh_deg_aug_ratio: float = param(0.1, "probability per iteration of rendering the batch with SH degree 0 "
                                         "(augmentation)", min=0.0, max=1.0)
    bg_aug_ratio: float = param(0.5, "probability per camera of drawing its background: a random colour or black, "
                                     "half each (else black; augmentation)", min=0.0, max=1.0)
    shs_aug_ratio: float = param(0.0, "probability of SH-colour noise per batch, sh <- sh + N(0, 1) sqrt(0.2) sh "
                                      "(augmentation, as the official renderer)",
                                 min=0.0, max=1.0)
    scale_aug_ratio: float = param(1.0, "probability per iteration of noising the Gaussians' scales (augmentation)",
                                   min=0.0, max=1.0)


@dataclass
class PipelineParams:
    """Rendering pipeline options (official ``PipelineParams``)."""

    convert_SHs_python: bool = param(False, "evaluate SH colours in Python instead of the rasterizer",
                                     no_effect="the renderer backend decides where SH colours are evaluated",
                                     prior_free=True)
    compute_cov3D_python: bool = param(False, "build 3D covariances in Python instead of the rasterizer",
                                       no_effect="the renderer backend decides where covariances are built",
                                       prior_free=True)
    debug: bool = param(False, "rasterizer debug mode of the official CUDA extension",
                        no_effect="the official CUDA rasterizer is not used", prior_free=True)
    renderer: str = param("auto", "rasterizer backend: auto (gsplat on CUDA, else torch), gsplat or torch",
                          choices=("auto", "gsplat", "torch"))
    device: str = param("auto", "compute device: auto (cuda if available), cpu or cuda",
                        choices=("auto", "cpu", "cuda"))
    cuda_graphs: bool = param(True, "replay a CUDA graph of each fixed-shape UNet call (CUDA only)",
                              resumable="a speed lever", cuda_only=True)
    channels_last: bool = param(True, "channels-last UNet convolutions", resumable="a speed lever")
    vae_channels_last: bool = param(True, "channels-last VAE encoder with Triton NHWC GroupNorm+SiLU kernels "
                                          "(CUDA with Triton only)", resumable="a speed lever", cuda_only=True)
    compile: bool = param(True, "torch.compile the UNet and the VAE encoder (CUDA with Triton only; minutes of "
                                "compilation on the first run, cached for later runs)", resumable="a speed lever",
                         cuda_only=True)
    compile_dynamic_batch: bool = param(True, "one compiled UNet program for every batch size a loss uses (the "
                                              "batch dimension symbolic), not one per batch size",
                                        resumable="a speed lever", cuda_only=True)
    compile_regions: bool = param(False, "compile only the UNet's repeated transformer blocks (one program per "
                                          "block shape, the rest of the UNet eager) instead of the whole UNet: "
                                          "a shorter first compilation (opt-in until measured on a GPU: "
                                          "docs/speed.md)", resumable="a speed lever", cuda_only=True)
    compile_in_background: bool = param(False, "compile in a background thread while the first iterations run "
                                                "uncompiled (same maths), switching over when ready, instead of "
                                                "the first iteration waiting for compilation (compile=true, CUDA "
                                                "only; on an H100 the first iteration comes sooner but the asset "
                                                "later: docs/speed.md)",
                                         prior_free=True, resumable="a speed lever", cuda_only=True)
    compile_cache: str = param("auto", "folder of the portable compile cache: the compiled programs saved after "
                                       "compiling and loaded before, so that another machine sharing the folder "
                                       "starts warm (auto = $XDG_CACHE_HOME/segmentdreamer/compile, none = off)",
                               prior_free=True, resumable="a speed lever", cuda_only=True)
    cudnn_benchmark: bool = param(True, "let cuDNN pick the fastest convolution algorithms (CUDA only)",
                                  prior_free=True, resumable="a speed lever", cuda_only=True)
    render_per_camera: bool = param(False, "straightforward mode: one rasterizer call per camera, as the official code",
                                    prior_free=True)
    depth_grad_to_z: bool = param(False, "also pass the depth image's gradient to the Gaussians' view depth z "
                                          "(the exact derivative; false = the official rasterizer, which passes it "
                                          "through the blend weights only; they differ when depth is distilled)",
                                  prior_free=True)
    encode_chunk: int = param(0, "images per VAE-encoder forward+backward (0 = whole batch; 1 = lowest memory, "
                                 "recomputes the encoder and uses the posterior mean)", min=0)
    attention_slicing: bool = param(False, "compute UNet attention in slices (lower memory, slower)",
                                    resumable="a memory lever")
    vae_attention: str = param("matmul", "VAE-encoder attention (one head of width 512, slow in fused kernels): "
                                         "matmul = explicit matmul + softmax, sdpa = torch's fused kernels",
                               choices=("matmul", "sdpa"))


_T_CHOICES = ("uniform", "mono")


@dataclass
class GuidanceParams:
    """2D diffusion prior and distillation loss (official ``GuidanceParams`` plus our switches)."""

    guidance: str = param("SD", "official guidance family name",
                          no_effect="the prior is chosen by GuidanceParams.prior", prior_free=True)
    g_device: str = param("cuda", "device of the official guidance model",
                          no_effect="the prior runs on PipelineParams.device", prior_free=True)
    model_key: Optional[str] = param(None, "Stable Diffusion weights: local folder, hub id or .safetensors file")
    is_safe_tensor: bool = param(False, "model_key is a single .safetensors checkpoint (e.g. DreamShaper-8)")
    base_model_key: Optional[str] = param(None, "diffusers folder providing configs/tokenizer for a "
                                                ".safetensors model_key")
    controlnet_model_key: Optional[str] = param(None, "ControlNet weights", no_effect="ControlNet is not supported",
                                                prior_free=True)
    perpneg: bool = param(True, "use Perp-Neg view-dependent negative prompts")
    negative_w: float = param(-2.0, "Perp-Neg weight of the negative view prompts")
    front_decay_factor: float = param(2.0, "Perp-Neg decay of the front-view weight", min=0.0)
    side_decay_factor: float = param(10.0, "Perp-Neg decay of the side-view weight", min=0.0)
    vram_O: bool = param(False, "official memory-saving switch",
                         no_effect="superseded by the low-VRAM config overlay", prior_free=True)
    fp16: bool = param(True, "run the prior in half precision (used when precision is 'auto')")
    hf_key: Optional[str] = param(None, "official Hugging Face key alias", no_effect="use model_key", prior_free=True)
    t_range: list[float] = param([0.02, 0.5], "[low, high] timestep window, fractions of 1000, once the warm-up is "
                                              "over (before, it is shifted up: both bounds for SCTD/GCS, the "
                                              "upper one for ISM/SDS)", length=2, min=0.0, max=1.0, pair=True,
                                 prior_free=True)
    max_t_range: float = param(0.98, "upper timestep fraction at the start: the window's upper bound falls from it "
                                     "to t_range[1] over OptimizationParams.warmup_iter", min=0.0, max=1.0,
                               prior_free=True)
    scheduler_type: str = param("DDIM", "official scheduler name",
                                no_effect="a first-order DDIM-equivalent solver is always used", prior_free=True)
    num_train_timesteps: Optional[int] = param(None, "override of the prior's training timesteps",
                                               no_effect="the prior's own schedule is always used", prior_free=True)
    sds: bool = param(False, "official SDS switch", no_effect="use guidance_type: sds", prior_free=True)
    fix_noise: bool = param(False, "reuse one fixed noise tensor across iterations", prior_free=True)
    noise_seed: int = param(0, "seed of the fixed noise tensor", min=0, prior_free=True)
    ddim_inv: bool = param(False, "official DDIM-inversion switch",
                           no_effect="inversion is part of the chosen guidance_type", prior_free=True)
    delta_t: int = param(80, "ISM/GCS: interval t - s after the warm-up; SCTD: least gap t - s_m", min=1, max=999,
                         prior_free=True)
    delta_t_start: int = param(100, "ISM/GCS: interval t - s at the start, annealed to delta_t over the warm-up",
                               min=1, max=999, prior_free=True)
    annealing_intervals: bool = param(True, "ISM: anneal the inversion interval", prior_free=True)
    text: str = param("", "prompt", prior_free=True)
    inverse_text: str = param("", "prompt used during DDIM inversion (ISM)")
    textual_inversion_path: Optional[str] = param(None, "textual-inversion embedding file to load into the prior")
    LoRA_path: Optional[str] = param(None, "LoRA weights to load into the prior")
    controlnet_ratio: float = param(0.5, "ControlNet conditioning ratio", no_effect="ControlNet is not supported",
                                    prior_free=True)
    negative: str = param("", "negative prompt", prior_free=True)
    guidance_scale: float = param(7.5, "classifier-free guidance scale", min=0.0, prior_free=True, flag="guid_scale")
    denoise_guidance_scale: float = param(1.0, "guidance scale of the ISM denoising step", min=0.0,
                                          no_effect="ISM inverts with the empty prompt alone, i.e. scale 1.0, "
                                                    "the official default", prior_free=True)
    lambda_guidance: float = param(1.0, "weight of the distillation loss", min=0.0, prior_free=True)
    xs_delta_t: int = param(200, "ISM: timestep gap of the x_s inversion", min=1, max=999, prior_free=True)
    xs_inv_steps: int = param(5, "ISM: number of x_s inversion steps", min=1, prior_free=True)
    xs_eta: float = param(0.0, "ISM: DDIM eta of the x_s inversion", min=0.0, max=1.0,
                          no_effect="the x_s inversion is deterministic DDIM (eta 0, the official default)",
                          prior_free=True)
    C_batch_size: int = param(1, "cameras rendered and distilled per iteration", min=1, prior_free=True)
    vis_interval: int = param(100, "iterations between guidance visualisations (0 = off)", min=0,
                              no_effect="previews go to TensorBoard every preview_interval iterations", prior_free=True)
    t_mode: str = param("uniform", "timestep sampling: uniform or mono (monotonically increasing)",
                        choices=_T_CHOICES, prior_free=True)
    t_threshold: int = param(150, "SCTD: z_t is inverted from z_sm in two empty-prompt DDIM steps via s when "
                                  "t >= t_threshold, in one step below (Eq. 11); also t_tau of t_mode mono",
                             min=0, max=999, prior_free=True)
    w_cp: float = param(0.0, "weight of the pixel constraint L_CP (GCS; optional in SCTD): a gradient on the "
                             "rendered RGB towards the decoded x0 difference, cond - empty prompt (0 = off)",
                        min=0.0, prior_free=True)
    BEG: bool = param(False, "Brightness-Equalized Generation (GCS): scale the colours down when the renders get "
                             "too bright (OptimizationParams.thresh, lgt_thresh, reset_rate)", prior_free=True)
    rgb_scale: float = param(1.0, "extra multiplier of the pixel constraint L_CP (w_cp)", min=0.0, prior_free=True)
    clip_skip: int = param(1, "CLIP text-encoder layers to skip (as in the official DreamShaper configs)", min=0)
    interval_ratio: Optional[float] = param(None, "official SegmentDreamer key", no_effect=_UNUSED_OFFICIAL,
                                            prior_free=True)
    guidance_type: str = param("sctd", "distillation loss: a name registered in guidance/losses/",
                               choices_from="guidance.losses:LOSSES", prior_free=True, flag="guidance_type")
    phase_num: int = param(4, "number of trajectory segments N_s (README/paper use 5)", min=1,
                           prior_free=True, flag="phase_num")
    num_ddim_timesteps: int = param(50, "accepted for compatibility with the published command", min=1,
                                    no_effect=_UNUSED_OFFICIAL, prior_free=True, flag="num_ddim_timesteps")
    prior: str = param("stable_diffusion", "2D prior: stable_diffusion or analytic (offline, closed form)",
                       choices=("stable_diffusion", "analytic"))
    precision: str = param("auto", "prior precision; auto = fp16 if fp16 else fp32",
                           choices=("auto", "fp16", "bf16", "fp32"))
    sctd_cross_prediction: str = param("cfg", "SCTD cross term: cfg (official CFG noise) or cond "
                                              "(paper's pure conditional)", choices=("cfg", "cond"), prior_free=True)
    sctd_approximate_null: bool = param(True, "approximate G(z_t, t, empty) by z_sm (paper Sec. 4.4)", prior_free=True)
    sctd_generative_prior: bool = param(False, "add the generative-prior term of Eq. 9", prior_free=True)
    sctd_weighting: str = param("official", "SCTD loss weighting: official code or paper",
                                choices=("official", "paper"), prior_free=True)
    w_cc: float = param(1.0, "GCS: weight of the cross-consistency term", min=0.0, prior_free=True)
    w_gc: float = param(0.5, "GCS: weight of the generative-consistency term", min=0.0, prior_free=True)
    cds_t_start: int = param(700, "CDS: timestep at the start of annealing", min=0, max=999, prior_free=True)
    cds_t_end: int = param(100, "CDS: timestep at the end of annealing", min=0, max=999, prior_free=True)
    cds_anneal_iters: int = param(3000, "CDS: iterations to anneal from cds_t_start to cds_t_end", min=0,
                                  prior_free=True)
    cds_gap: list[int] = param([100, 300], "CDS: [low, high] gap between the two timesteps",
                               length=2, min=0, max=999, pair=True, prior_free=True)
    analytic_scene: str = param("blobs", "analytic prior: procedural scene name or a .ply path")
    analytic_std: float = param(0.05, "analytic prior: pixel std of the mixture components", gt=0.0)
    analytic_distractors: int = param(2, "analytic prior: distractor components in the unconditional mixture",
                                      min=0)
    analytic_seed: int = param(0, "analytic prior: seed of the hidden scene and distractors", min=0)


_INIT_SHAPES = ("sphere", "box", "rectangle_x", "rectangle_z", "scene", "ply", "pointe", "shapee", "mesh")
_PI = math.pi


@dataclass
class GenerateCamParams:
    """Initial point cloud and camera sampling (official ``GenerateCamParams``)."""

    init_shape: str = param("sphere", "initial point cloud", choices=_INIT_SHAPES)
    init_prompt: str = param("", "prompt of the Point-E/Shap-E initialisation")
    use_pointe_rgb: bool = param(False, "keep the colours of the pointe, shapee and mesh initialisations "
                                        "(false: the official near-grey)")
    init_path: Optional[str] = param(None, "file used when init_shape is 'ply' (point-cloud or 3DGS PLY) or "
                                           "'mesh' (mesh or point cloud: PLY, OBJ, GLB, ...)")
    shapee_model_key: str = param("openai/shap-e", "Shap-E weights for init_shape 'shapee': local diffusers "
                                                   "folder or hub id")
    mesh_up_axis: str = param("z", "up axis of the init_shape 'mesh' file; 'y' (glTF/GLB convention) is "
                                   "rotated to z up with its +z front facing the azimuth-0 camera",
                              choices=("z", "y"))
    mesh_fit_radius: float = param(0.0, "init_shape 'mesh': 0 keeps the file's coordinates; > 0 centres its "
                                        "bounding box and scales its farthest point to this radius", min=0.0)
    radius_range: list[float] = param([5.2, 5.5], "initial [low, high] camera distance", length=2, gt=0.0, pair=True)
    max_radius_range: list[float] = param([3.5, 5.0], "final [low, high] camera distance after expansion",
                                          length=2, gt=0.0, pair=True)
    default_radius: float = param(3.5, "camera distance of the evaluation cameras", gt=0.0)
    theta_range: list[float] = param([45.0, 105.0], "initial [low, high] polar angle in degrees",
                                     length=2, min=0.0, max=180.0, pair=True)
    max_theta_range: list[float] = param([45.0, 105.0], "final [low, high] polar angle in degrees",
                                         length=2, min=0.0, max=180.0, pair=True)
    phi_range: list[float] = param([-180.0, 180.0], "initial [low, high] azimuth in degrees",
                                   length=2, min=-360.0, max=360.0, pair=True)
    max_phi_range: list[float] = param([-180.0, 180.0], "final [low, high] azimuth in degrees",
                                       length=2, min=-360.0, max=360.0, pair=True)
    fovy_range: list[float] = param([0.32, 0.60], "initial [low, high] vertical field of view in radians",
                                    length=2, gt=0.0, max=_PI, pair=True)
    max_fovy_range: list[float] = param([0.16, 0.60], "final [low, high] vertical field of view in radians",
                                        length=2, gt=0.0, max=_PI, pair=True)
    rand_cam_gamma: float = param(1.0, "exponent of the sampled polar angle and azimuth around their range's "
                                       "middle: mid +- u^gamma half-width (1 = uniform, > 1 towards the middle)",
                                  gt=0.0)
    angle_overhead: float = param(30.0, "overhead-view angle of the official view prompts",
                                  no_effect="view prompts use the fixed Perp-Neg/azimuth rules")
    angle_front: float = param(60.0, "front-view angle of the official view prompts",
                               no_effect="view prompts use the fixed Perp-Neg/azimuth rules")
    render_45: bool = param(True, "add a second ring of test views at polar floor(default_polar * 2/3) "
                                  "(60 degrees for 90)")
    uniform_sphere_rate: float = param(0.0, "probability of sampling uniformly on the sphere",
                                       min=0.0, max=1.0, no_effect=_UNUSED_OFFICIAL)
    image_w: int = param(512, "render width in pixels", min=8)
    image_h: int = param(512, "render height in pixels", min=8)
    SSAA: int = param(1, "supersampling factor", min=1, no_effect=_UNUSED_OFFICIAL)
    init_num_pts: int = param(100000, "number of points of the initial point cloud", min=1)
    default_polar: float = param(90.0, "polar angle of the evaluation cameras in degrees", min=0.0, max=180.0)
    default_azimuth: float = param(0.0, "starting azimuth of the evaluation cameras in degrees")
    default_fovy: float = param(0.55, "vertical field of view of the evaluation cameras in radians",
                                gt=0.0, max=_PI)
    jitter_pose: bool = param(True, "jitter the training camera poses")
    jitter_center: float = param(0.05, "std of the camera-centre jitter", min=0.0)
    jitter_target: float = param(0.05, "std of the look-at target jitter", min=0.0)
    jitter_up: float = param(0.01, "std of the up-vector jitter", min=0.0)
    device: str = param("cuda", "device of the official camera generator",
                        no_effect="cameras follow PipelineParams.device")


_NOT_LOGGED = "process frames are not recorded (turntable videos cover this)"


@dataclass
class OptimizationParams:
    """Optimiser, schedules and densification (official ``OptimizationParams``)."""

    iterations: int = param(5000, "number of training iterations", min=1,
                            resumable="train further (past the original end the learning rates stay at their "
                                      "final values)")
    position_lr_init: float = param(0.00016, "initial position " + _LR + " (times the scene extent)", min=0.0)
    position_lr_final: float = param(0.0000016, "final position " + _LR + " (times the scene extent)", min=0.0)
    position_lr_delay_mult: float = param(0.01, "official position lr delay multiplier", min=0.0,
                                          no_effect="the position lr decays exponentially without delay")
    position_lr_max_steps: int = param(30000, "official position lr decay length", min=1,
                                       no_effect="the position lr decays over 'iterations'")
    feature_lr: float = param(0.005, "initial colour-feature " + _LR, min=0.0)
    feature_lr_final: float = param(0.003, "final colour-feature " + _LR, min=0.0)
    opacity_lr: float = param(0.05, "opacity " + _LR, min=0.0)
    scaling_lr: float = param(0.005, "initial scaling " + _LR, min=0.0)
    rotation_lr: float = param(0.001, "initial rotation " + _LR, min=0.0)
    geo_iter: int = param(0, "first iterations that distil the depth map instead of the RGB (geometry warm-up)", min=0)
    as_latent_ratio: float = param(0.2, "probability of distilling the depth map (as a 3-channel image) instead of "
                                        "the RGB", min=0.0, max=1.0)
    resnet_lr: float = param(1e-4, "official ResNet " + _LR, min=0.0, no_effect=_UNUSED_OFFICIAL)
    resnet_lr_init: float = param(2e-3, "official initial ResNet " + _LR, min=0.0, no_effect=_UNUSED_OFFICIAL)
    resnet_lr_final: float = param(5e-5, "official final ResNet " + _LR, min=0.0, no_effect=_UNUSED_OFFICIAL)
    scaling_lr_final: float = param(0.001, "final scaling " + _LR, min=0.0)
    rotation_lr_final: float = param(0.0002, "final rotation " + _LR, min=0.0)
    percent_dense: float = param(0.003, "fraction of the scene extent separating clone from split",
                                 min=0.0, max=1.0)
    densify_grad_threshold: float = param(0.00075, "view-space gradient norm that triggers densification",
                                          min=0.0)
    lambda_tv: float = param(1.0, "weight of the total-variation loss", min=0.0)
    lambda_bin: float = param(10.0, "weight of the binary opacity loss", min=0.0, no_effect=_UNUSED_OFFICIAL)
    lambda_scale: float = param(1.0, "weight of the scale regulariser", min=0.0)
    lambda_sat: float = param(1.0, "weight of the saturation loss", min=0.0, no_effect=_UNUSED_OFFICIAL)
    lambda_radius: float = param(1.0, "weight of the radius loss", min=0.0, no_effect=_UNUSED_OFFICIAL)
    densification_interval: int = param(100, "iterations between densify-and-prune steps", min=1)
    opacity_reset_interval: int = param(300, "iterations between opacity resets", min=1)
    densify_from_iter: int = param(100, "first iteration of densification", min=0)
    densify_until_iter: int = param(3000, "last iteration of densification", min=0)
    use_control_net_iter: int = param(10000000, "iteration from which ControlNet is used",
                                      no_effect="ControlNet is not supported")
    warmup_iter: int = param(1500, "iterations over which the timestep window falls from max_t_range to t_range",
                             min=0)
    use_progressive: bool = param(False, "disable progressive camera expansion when true (official naming)")
    save_process: bool = param(True, "record training-process frames", no_effect=_NOT_LOGGED)
    pro_frames_num: int = param(600, "number of training-process frames", min=0, no_effect=_NOT_LOGGED)
    pro_render_45: bool = param(False, "render process frames at 45 degrees", no_effect=_NOT_LOGGED)
    progressive_view_iter: int = param(500, "iterations between progressive camera-range expansions", min=1)
    progressive_view_init_ratio: float = param(0.2, "official initial ratio of the progressive range",
                                               min=0.0, max=1.0, no_effect=_UNUSED_OFFICIAL)
    scale_up_cameras_iter: int = param(500, "iterations between camera-distance scale-ups", min=1)
    scale_up_factor: float = param(0.95, "camera-distance multiplier per scale-up", gt=0.0)
    fovy_scale_up_factor: list[float] = param([0.75, 1.1], "[low, high] multipliers of the fovy range per "
                                                           "expansion", length=2, gt=0.0)
    phi_scale_up_factor: float = param(1.5, "azimuth-range multiplier per expansion", gt=0.0)
    grad_clip: Optional[list[float]] = param([2.0, 8.0, 1000.0], "per-tensor clipping of the Gaussians' gradients: "
                                                                 "clip_grad_norm_ on each parameter tensor, max norm "
                                                                 "start -> end over ramp iterations ([start, end, "
                                                                 "ramp]); null = off", length=3, min=0.0)
    thresh: float = param(0.85, "BEG: quantile level, per view over bright pixels and then over the views",
                          min=0.0, max=1.0)
    start_reset_iter: int = param(1000, "BEG: first iteration of brightness resets", min=0)
    end_reset_iter: int = param(4500, "BEG: last iteration of brightness resets", min=0)
    reset_rate: float = param(0.8, "BEG: factor scaling every SH colour coefficient at a reset", min=0.0, max=1.0)
    lgt_thresh: float = param(0.9, "BEG: brightness above which the colours are scaled by reset_rate", min=0.0, max=1.0)
    min_opacity: float = param(0.005, "Gaussians below this opacity are pruned", min=0.0, max=1.0)
    max_screen_size: int = param(20, "prune Gaussians larger than this many pixels after the first "
                                     "opacity reset (0 = off)", min=0)
    densify_stats_all_cameras: bool = param(False, "densification statistic (screen-space gradient, max radius) "
                                                    "from every camera of a batch (C_batch_size times the samples, "
                                                    "less noisy); false = the official rule, the batch's last camera "
                                                    "only")


@dataclass
class Config:
    """The whole run configuration: five sections plus top-level keys."""

    model: ModelParams = _section(ModelParams, "ModelParams", prior_free=True)
    pipeline: PipelineParams = _section(PipelineParams, "PipelineParams")
    guidance: GuidanceParams = _section(GuidanceParams, "GuidanceParams")
    camera: GenerateCamParams = _section(GenerateCamParams, "GenerateCamParams", prior_free=True)
    optim: OptimizationParams = _section(OptimizationParams, "OptimizationParams", prior_free=True)
    port: int = param(2355, "official network-GUI port", no_effect="the official SIBR network GUI is not served; "
                                                             "the live viewer uses viewer_port", flag="port")
    save_video: bool = param(True, "write a turntable video (RGB | depth) at the end of the run",
                             resumable="whether the turntable video is written", flag="save_video")
    seed: int = param(0, "global random seed (Python, NumPy, torch)", min=0, flag="seed")
    output_dir: str = param("outputs", "root folder of the run folders", flag="output")
    test_ratio: int = param(5, "test renders every iterations/test_ratio iterations", min=1,
                            resumable="how often test views are rendered", flag="test_ratio")
    save_ratio: int = param(2, "point clouds saved every iterations/save_ratio iterations", min=1,
                            resumable="how often point clouds are saved", flag="save_ratio")
    checkpoint_interval: int = param(500, "iterations between full checkpoints (0 = only at the end)", min=0,
                                     resumable="how often checkpoints are written")
    background_writes: bool = param(True, "write checkpoints, snapshots, test views and TensorBoard images on a "
                                          "worker thread while training goes on (false: each iteration that writes "
                                          "waits for its files)", resumable="where the loop's files are written")
    video_frames: int = param(120, "turntable frames per ring", min=1, resumable="frames of the turntable video")
    log_interval: int = param(10, "iterations between scalar log entries", min=1,
                              resumable="how often scalars are logged")
    preview_interval: int = param(100, "iterations between preview images (0 = off)", min=0,
                                  resumable="how often preview images are logged")
    eval_resolution: Optional[int] = param(None, "height in pixels of test views, held-out views and videos (width "
                                                 "keeps the training aspect); null = the training size", min=8,
                                                 resumable="the size of test views and videos")
    nonfinite_patience: int = param(20, "consecutive iterations with NaN/Inf gradients or Gaussians (each one "
                                        "skipped) before the run stops", min=1,
                                        resumable="how long NaN/Inf steps are tolerated")
    viewer: bool = param(False, "serve a live browser view of the Gaussians while training (needs viser), "
                                "with pause/resume", resumable="whether the live viewer is served", flag="viewer")
    viewer_host: str = param("127.0.0.1", "address the viewer listens on (127.0.0.1 = this machine only; reach it "
                                          "over ssh -L, or 0.0.0.0 for every interface)",
                                          resumable="where the live viewer listens", flag="viewer_host")
    viewer_port: int = param(8080, "viewer port (the next free one is taken when it is busy)", min=1, max=65535,
                             resumable="the live viewer's port", flag="viewer_port")
    viewer_max_fps: float = param(10.0, "most frames per second the viewer renders (each competes with training)",
                                  gt=0.0, resumable="the live viewer's frame rate")
    viewer_render_share: float = param(0.25, "most fraction of the wall-clock time the viewer spends rendering "
                                             "while training runs (1 = only viewer_max_fps limits it)",
                                       gt=0.0, max=1.0, resumable="the live viewer's share of the time")
    viewer_resolution: int = param(512, "longer side in pixels of the viewer's images (a slider on the page "
                                        "changes it)", min=64, max=2048, resumable="the live viewer's image size")
    ply_sh_degree: Optional[int] = param(None, "pad the exported PLYs' SH coefficients to this degree for viewers "
                                               "that expect it (e.g. 3); null = the model's degree", min=0, max=3,
                                               resumable="the SH padding of exported PLYs")
    ply_up_axis: str = param("-y", "up axis of the exported PLYs: -y (3DGS/COLMAP convention: SuperSplat, "
                                   "GaussianSplats3D show it upright), y, or z (training world)",
                       choices=("-y", "y", "z"), resumable="the up axis of exported PLYs")
    export_formats: list[str] = param(["ply"], "splat files written next to point_cloud.ply at the end, in its up "
                                               "axis: ply (always written), spz (.spz v3), spz4 (.spz v4, "
                                               "point_cloud.v4.spz), sog (point_cloud.sog)",
                                      choices=("ply", "spz", "spz4", "sog"),
                                      resumable="which splat files are written at the end")
    export_mesh: bool = param(True, "write mesh/mesh.glb and mesh/mesh.obj (+Y up, metres) at the end of the run",
                              resumable="whether the mesh is exported at the end")
    mesh_resolution: int = param(192, "grid cells per axis of the opacity field the mesh is extracted from", min=16,
                                 resumable="the mesh export's grid")
    mesh_faces: int = param(50000, "target face count of the exported mesh (0 = no decimation)", min=0,
                            resumable="the mesh export's face count")
    mesh_level: float = param(0.3, "opacity iso-level of the mesh surface", gt=0.0, max=0.99,
                              resumable="the mesh export's opacity level")
    mesh_bake_views: int = param(12, "views per ring (4 rings) whose Gaussian renders colour the mesh; 0 = colours "
                                     "from the nearby Gaussians' SH DC only", min=0,
                                     resumable="the mesh export's colour views")
    mesh_texture: int = param(0, "size of a baked UV texture for the GLB and the OBJ (0 = per-vertex colours in "
                                 "the GLB, a texture sized by face count in the OBJ)",
                              choices=(0, 256, 512, 1024, 2048, 4096), resumable="the mesh export's texture size")


# No prior reads the top-level keys (run folder, outputs, exports, viewer, seed): like the sections
# declared with _section(..., prior_free=True), they are prior-free (tests/test_key_properties.py checks it).
TOP_LEVEL_PRIOR_FREE = True

# ---------------------------------------------------------------------------
# Schema introspection

YAML_ALIASES = {"ModelParams": {"_" + k: k for k in
                            ("source_path", "model_path", "images", "resolution", "white_background")}}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: Any
    meta: Any


@functools.lru_cache(maxsize=None)
def field_specs(cls: type) -> dict[str, FieldSpec]:
    hints = typing.get_type_hints(cls)
    return {f.name: FieldSpec(f.name, hints[f.name], f.metadata)
            for f in dataclasses.fields(cls) if "section" not in f.metadata}


@functools.lru_cache(maxsize=None)
def section_attributes() -> dict[str, str]:
    """YAML section name -> attribute name on :class:`Config`."""
    return {f.metadata["section"]: f.name for f in dataclasses.fields(Config) if "section" in f.metadata}


def section_class(section: Optional[str]) -> type:
    if section is None:
        return Config
    return typing.get_type_hints(Config)[section_attributes()[section]]


def full_key(section: Optional[str], key: str) -> str:
    return f"{section}.{key}" if section else key


@functools.lru_cache(maxsize=None)
def all_keys() -> tuple[str, ...]:
    keys = list(field_specs(Config))
    for section in section_attributes():
        keys += [full_key(section, k) for k in field_specs(section_class(section))]
    return tuple(keys)


def cuda_only_changes(pipe: "PipelineParams") -> list[str]:
    """'PipelineParams.key=value' for every CUDA-only key set away from its default (no effect on a CPU)."""
    return [f"PipelineParams.{f.name}={getattr(pipe, f.name)!r}" for f in dataclasses.fields(pipe)
            if f.metadata.get("cuda_only") and getattr(pipe, f.name) != f.default]


def no_effect_keys() -> dict[str, str]:
    """Full key -> reason, for every key accepted but ignored by this implementation."""
    out = {}
    for section in (None, *section_attributes()):
        for name, spec in field_specs(section_class(section)).items():
            if spec.meta["no_effect"]:
                out[full_key(section, name)] = spec.meta["no_effect"]
    return out


def iter_keys() -> typing.Iterator[tuple[Optional[str], FieldSpec]]:
    """(YAML section or None for a top-level key, field spec) of every key, in declaration order."""
    for section in (None, *section_attributes()):
        yield from ((section, spec) for spec in field_specs(section_class(section)).values())


def key_spec(key: str) -> FieldSpec:
    """The field spec of a full key (``Section.key`` or a top-level key)."""
    section, _, name = key.rpartition(".")
    return field_specs(section_class(section or None))[name]


def field_choices(meta: Any) -> Optional[tuple[Any, ...]]:
    """The allowed values of a field: its ``choices``, or the names in its ``choices_from`` registry now.

    A registry lives above this package (the losses in guidance/losses/registry.py), so it is imported
    by name when a value is checked, and a loss registered at any time is a valid choice from then on."""
    if meta["choices_from"] is None:
        return meta["choices"]
    module, _, name = meta["choices_from"].partition(":")
    return tuple(getattr(importlib.import_module(module), name))


def section_prior_free(section: Optional[str]) -> bool:
    """Whether no prior reads any key of this section (None: the top-level keys)."""
    if section is None:
        return TOP_LEVEL_PRIOR_FREE
    return next(f.metadata["prior_free"] for f in dataclasses.fields(Config) if f.metadata.get("section") == section)


def prior_keys() -> tuple[str, ...]:
    """Full keys a built prior may depend on: every key not declared prior-free (by itself or its section).
    Runs that differ in these keys need different priors (training/sweep/worker.py prior_fingerprint)."""
    return tuple(full_key(section, spec.name) for section, spec in iter_keys()
                 if not (spec.meta["prior_free"] or section_prior_free(section)))


def resumable_keys() -> dict[str, str]:
    """Full key -> what it changes, for the keys a resumed run may change (utils/config/resume.py)."""
    return {full_key(section, spec.name): spec.meta["resumable"] for section, spec in iter_keys()
            if spec.meta["resumable"]}


def flag_keys() -> dict[str, str]:
    """Command-line flag (without ``--``) -> the full key it sets (utils/config/cli.py)."""
    return {spec.meta["flag"]: full_key(section, spec.name) for section, spec in iter_keys() if spec.meta["flag"]}
