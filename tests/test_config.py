"""Tests for utils/config.py: schema defaults, strict loading, overrides and the CLI."""

import dataclasses
import logging

import pytest

from utils.config import (
    Config,
    ConfigError,
    build_arg_parser,
    config_to_dict,
    load_config,
    no_effect_keys,
    parse_cli,
    save_config,
    validate_config,
)

# Official SegmentDreamer config/bagel.yaml layout (nested sections, `100_000`, `1.`, comments),
# plus LucidDreamer-style `_white_background` and a YAML-1.1 exponent literal.
BAGEL_YAML = """\
port: 2355
save_video: true
seed: 0

PipelineParams:
  convert_SHs_python: False #true = using direct rgb
ModelParams:
  workspace: sctd
  sh_degree: 0
  bg_aug_ratio: 0.66
  _white_background: false

GuidanceParams:
  model_key: 'stable-diffusion-2-1-base'
  text: 'a DSLR photo of a bagel filled with cream cheese and lox.'
  negative: 'unrealistic, blurry, low quality.'
  inverse_text: ''
  BEG: false
  perpneg: false
  C_batch_size: 4
  t_range: [0.02, 0.5]
  max_t_range: 0.98
  lambda_guidance: 0.1
  guidance_scale: 7.5
  noise_seed: 0
  fix_noise: True
  delta_t: 80
  t_threshold: 150
  t_mode: 'uniform' # ['mono', 'uniform']
  w_cp: 0.0

GenerateCamParams:
  init_shape: 'pointe'
  init_prompt: 'a bagel.'
  init_num_pts: 100_000
  phi_range: [-180, 180]
  rand_cam_gamma: 1.
  radius_range: [5.2, 5.5]
  default_fovy: 0.55

OptimizationParams:
  iterations: 5000
  warmup_iter: 1500 # 2500
  as_latent_ratio : 0.2
  densify_grad_threshold: 0.00075
  fovy_scale_up_factor: [0.75, 1.1]
  resnet_lr: 1e-4
"""


def _write(tmp_path, text, name="bagel.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text) if text is not None else None, overrides)
    return str(info.value)


def test_defaults_match_official_class_defaults():
    cfg = Config()
    assert cfg.optim.iterations == 5000
    assert cfg.optim.position_lr_init == 0.00016
    assert cfg.optim.position_lr_final == 0.0000016
    assert cfg.optim.densify_grad_threshold == 0.00075
    assert cfg.optim.opacity_reset_interval == 300
    assert cfg.optim.grad_clip == [2.0, 8.0, 1000.0]
    assert cfg.guidance.t_range == [0.02, 0.5]
    assert cfg.guidance.max_t_range == 0.98
    assert cfg.guidance.lambda_guidance == 1.0
    assert cfg.guidance.perpneg is True
    assert cfg.guidance.phase_num == 4
    assert cfg.guidance.guidance_type == "sctd"
    assert cfg.camera.fovy_range == [0.32, 0.60]
    assert cfg.camera.max_radius_range == [3.5, 5.0]
    assert cfg.camera.init_num_pts == 100000
    assert cfg.model.bg_aug_ratio == 0.5
    assert (cfg.port, cfg.seed, cfg.save_video) == (2355, 0, True)
    assert load_config(None) == cfg


def test_every_field_has_help_and_lists_are_not_shared():
    for section in (Config(), *[getattr(Config(), f.name) for f in dataclasses.fields(Config)
                                if "section" in f.metadata]):
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f.name
    a, b = Config(), Config()
    a.guidance.t_range[0] = 0.3
    assert b.guidance.t_range[0] == 0.02


def test_no_effect_keys_cover_the_documented_set():
    keys = no_effect_keys()
    for key in ("port", "GuidanceParams.num_ddim_timesteps", "GuidanceParams.vram_O",
                "OptimizationParams.resnet_lr", "GenerateCamParams.device", "PipelineParams.debug"):
        assert key in keys
    assert "GuidanceParams.guidance_scale" not in keys
    assert "PipelineParams.device" not in keys


def test_official_yaml_loads(tmp_path):
    cfg = load_config(_write(tmp_path, BAGEL_YAML))
    assert cfg.model.workspace == "sctd"
    assert cfg.model.white_background is False
    assert cfg.camera.init_num_pts == 100000
    assert cfg.camera.phi_range == [-180.0, 180.0]
    assert cfg.camera.init_shape == "pointe"
    assert cfg.guidance.lambda_guidance == 0.1
    assert cfg.guidance.C_batch_size == 4
    assert cfg.optim.resnet_lr == 1e-4
    assert cfg.camera.rand_cam_gamma == 1.0
    assert cfg.optim.iterations == 5000


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing\n")) == Config()


def test_unknown_key_names_full_key_and_suggestion(tmp_path):
    message = _error(tmp_path, "GuidanceParams:\n  guidance_scal: 7.5\n")
    assert "'GuidanceParams.guidance_scal'" in message
    assert "bagel.yaml" in message
    assert "did you mean 'GuidanceParams.guidance_scale'?" in message


def test_unknown_section_and_misplaced_key(tmp_path):
    assert "did you mean 'GuidanceParams'" in _error(tmp_path, "GuidanceParam:\n  text: x\n")
    message = _error(tmp_path, "GuidanceParams:\n  iterations: 10\n")
    assert "'GuidanceParams.iterations'" in message and "'OptimizationParams.iterations'" in message


def test_duplicate_spellings_are_rejected(tmp_path):
    message = _error(tmp_path, "ModelParams:\n  _white_background: true\n  white_background: false\n")
    assert "ModelParams.white_background" in message and "twice" in message
    assert "twice" in _error(tmp_path, "seed: 1\nseed: 2\n")


@pytest.mark.parametrize("text, expected", [
    ("OptimizationParams:\n  iterations: abc\n",
     "OptimizationParams.iterations must be an integer, got 'abc' (str)"),
    ("OptimizationParams:\n  iterations: 5000.0\n", "OptimizationParams.iterations must be an integer"),
    ("seed: true\n", "seed must be an integer, got True (bool)"),
    ("GuidanceParams:\n  perpneg: 1\n", "GuidanceParams.perpneg must be true or false, got 1 (int)"),
    ("GuidanceParams:\n  guidance_scale: high\n", "GuidanceParams.guidance_scale must be a number"),
    ("GuidanceParams:\n  text: 3\n", "GuidanceParams.text must be a string, got 3 (int)"),
    ("GuidanceParams:\n  t_range: 0.5\n", "GuidanceParams.t_range must be a list of 2 numbers"),
    ("GuidanceParams:\n  t_range: [0.1, 0.2, 0.3]\n", "GuidanceParams.t_range must be a list of 2 numbers"),
    ("OptimizationParams:\n  grad_clip: [1, 2]\n", "OptimizationParams.grad_clip must be a list of 3 numbers"),
    ("GenerateCamParams:\n  phi_range: [a, 1]\n", "GenerateCamParams.phi_range[0] must be a number"),
    ("GuidanceParams: 3\n", "section 'GuidanceParams'"),
])
def test_wrong_type(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


def test_int_accepted_for_float_and_null_for_optional(tmp_path):
    cfg = load_config(_write(tmp_path, "GuidanceParams:\n  guidance_scale: 10\nOptimizationParams:\n"
                                       "  grad_clip: null\n"))
    assert cfg.guidance.guidance_scale == 10.0 and isinstance(cfg.guidance.guidance_scale, float)
    assert cfg.optim.grad_clip is None


@pytest.mark.parametrize("text, expected", [
    ("OptimizationParams:\n  iterations: 0\n", "OptimizationParams.iterations must be >= 1, got 0"),
    ("ModelParams:\n  bg_aug_ratio: 1.5\n", "ModelParams.bg_aug_ratio must be in [0.0, 1.0], got 1.5"),
    ("ModelParams:\n  sh_degree: 4\n", "ModelParams.sh_degree must be in [0, 3], got 4"),
    ("GuidanceParams:\n  C_batch_size: 0\n", "GuidanceParams.C_batch_size must be >= 1, got 0"),
    ("GuidanceParams:\n  phase_num: 0\n", "GuidanceParams.phase_num must be >= 1, got 0"),
    ("GuidanceParams:\n  guidance_scale: -1\n", "GuidanceParams.guidance_scale must be >= 0.0, got -1.0"),
    ("GuidanceParams:\n  t_threshold: 1000\n", "GuidanceParams.t_threshold must be in [0, 999], got 1000"),
    ("GuidanceParams:\n  t_range: [0.02, 1.5]\n", "GuidanceParams.t_range[1] must be in [0.0, 1.0], got 1.5"),
    ("GenerateCamParams:\n  image_w: 4\n", "GenerateCamParams.image_w must be >= 8, got 4"),
    ("OptimizationParams:\n  feature_lr: -0.1\n", "OptimizationParams.feature_lr must be >= 0.0, got -0.1"),
    ("GuidanceParams:\n  guidance_type: foo\n", "GuidanceParams.guidance_type must be one of"),
    ("GenerateCamParams:\n  init_shape: cube\n", "got 'cube'"),
])
def test_out_of_range(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


def test_range_pair_low_above_high(tmp_path):
    message = _error(tmp_path, "GenerateCamParams:\n  radius_range: [5.5, 5.2]\n")
    assert "GenerateCamParams.radius_range must be [low, high] with low <= high, got [5.5, 5.2]" in message


@pytest.mark.parametrize("text, keys", [
    ("GuidanceParams:\n  t_range: [0.5, 0.5]\n", ["GuidanceParams.t_range"]),
    ("GuidanceParams:\n  t_range: [0.02, 0.99]\n", ["GuidanceParams.max_t_range"]),
    ("OptimizationParams:\n  densify_from_iter: 4000\n",
     ["OptimizationParams.densify_from_iter", "OptimizationParams.densify_until_iter"]),
    ("GenerateCamParams:\n  init_shape: ply\n", ["GenerateCamParams.init_path"]),
])
def test_cross_field_checks(tmp_path, text, keys):
    message = _error(tmp_path, text)
    assert all(key in message for key in keys)


def test_ply_init_with_path_loads(tmp_path):
    cfg = load_config(None, ["GenerateCamParams.init_shape=ply", "GenerateCamParams.init_path=pts.ply"])
    assert cfg.camera.init_path == "pts.ply"


def test_overrides_lists_bools_strings_and_top_level(tmp_path):
    cfg = load_config(_write(tmp_path, BAGEL_YAML), [
        "GenerateCamParams.theta_range=[60, 90]", "GuidanceParams.perpneg=true", "seed=3",
        "GuidanceParams.text=a photo: of yes", "GuidanceParams.negative=yes",
        "OptimizationParams.grad_clip=null", "ModelParams._white_background=true",
        "GuidanceParams.model_key=null", "GuidanceParams.guidance_scale=1e1",
    ])
    assert cfg.camera.theta_range == [60.0, 90.0]
    assert cfg.guidance.perpneg is True
    assert cfg.seed == 3
    assert cfg.guidance.text == "a photo: of yes"
    assert cfg.guidance.negative == "yes"
    assert cfg.optim.grad_clip is None
    assert cfg.model.white_background is True
    assert cfg.guidance.model_key is None
    assert cfg.guidance.guidance_scale == 10.0


@pytest.mark.parametrize("override, expected", [
    ("seed3", "malformed override 'seed3'"),
    ("=3", "malformed override"),
    ("GuidanceParams=3", "malformed override"),
    ("seed=abc", "seed must be an integer, got 'abc' (str)"),
    ("GuidanceParams.guidance_scal=2", "did you mean 'GuidanceParams.guidance_scale'?"),
    ("Guidance.text=x", "unknown section 'Guidance'"),
    ("OptimizationParams.iterations=0", "OptimizationParams.iterations must be >= 1, got 0"),
])
def test_bad_overrides(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    assert "not valid YAML" in _error(tmp_path, "GuidanceParams: [unclosed\n")
    assert "must be a mapping" in _error(tmp_path, "- a\n- b\n")


def test_flag_precedence(tmp_path):
    path = _write(tmp_path, "GuidanceParams:\n  guidance_scale: 10.5\n", "spiderboy.yaml")
    cfg, _ = parse_cli(["--opt", str(path)])
    assert cfg.guidance.guidance_scale == 10.5
    cfg, _ = parse_cli(["--opt", str(path), "--guid_scale", "7.5"])
    assert cfg.guidance.guidance_scale == 7.5


def test_published_command_parses(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    _write(tmp_path / "config", BAGEL_YAML)
    monkeypatch.chdir(tmp_path)
    argv = "--opt ./config/bagel.yaml --guidance_type sctd --phase_num 5 --num_ddim_timesteps 50 --guid_scale 7.5"
    cfg, args = parse_cli(argv.split())
    assert args.opt == "./config/bagel.yaml"
    assert (cfg.guidance.guidance_type, cfg.guidance.phase_num, cfg.guidance.num_ddim_timesteps) == ("sctd", 5, 50)
    assert cfg.guidance.guidance_scale == 7.5
    assert cfg.guidance.text.startswith("a DSLR photo of a bagel")


def test_cli_flags_and_intermixed_overrides(tmp_path, caplog):
    argv = ["seed=1", "--opt", str(_write(tmp_path, BAGEL_YAML)), "GuidanceParams.text=a cat",
            "--output", "runs", "--test_ratio", "4", "--save_video", "false",
            "--ip", "0.0.0.0", "--quiet", "--detect_anomaly"]
    with caplog.at_level(logging.WARNING, logger="utils.config"):
        cfg, args = parse_cli(argv)
    assert (cfg.seed, cfg.guidance.text, cfg.output_dir) == (1, "a cat", "runs")
    assert (cfg.test_ratio, cfg.save_video) == (4, False)
    assert args.resume is None and args.quiet and args.detect_anomaly
    assert any("--ip has no effect" in r.getMessage() for r in caplog.records)
    assert build_arg_parser().parse_args([]).seed is None
    with pytest.raises(ConfigError, match="GuidanceParams.phase_num must be an integer"):
        parse_cli(["--phase_num", "five"])


def test_no_effect_key_warns_once(tmp_path, caplog):
    path = _write(tmp_path, "GuidanceParams:\n  vram_O: true\n  guidance_scale: 5\n")
    with caplog.at_level(logging.WARNING, logger="utils.config"):
        load_config(path, ["GuidanceParams.vram_O=false"])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("GuidanceParams.vram_O has no effect here:" in m for m in messages) == 1
    assert not any("guidance_scale" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.config"):
        load_config(path, warn_no_effect=False)
    assert not caplog.records


def test_config_to_dict_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, BAGEL_YAML), ["OptimizationParams.grad_clip=null", "seed=7"])
    data = config_to_dict(cfg)
    assert data["seed"] == 7 and data["GuidanceParams"]["lambda_guidance"] == 0.1
    assert "white_background" in data["ModelParams"]
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(saved, warn_no_effect=False) == cfg
    assert load_config(save_config(Config(), tmp_path / "d.yaml"), warn_no_effect=False) == Config()


def test_validate_config_catches_programmatic_changes():
    cfg = Config()
    cfg.optim.iterations = "many"
    with pytest.raises(ConfigError, match="OptimizationParams.iterations must be an integer"):
        validate_config(cfg)
