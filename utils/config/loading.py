"""Strict YAML loading, overrides, validation and saving of a :class:`~utils.config.schema.Config`.

Loading is strict and pure: an unknown key (with the closest valid key suggested), a wrong type,
a value outside its range or an inconsistent combination raises :class:`ConfigError` naming the
full key (``Section.key``), the rule and the value, before any heavy work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import re
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from utils.config.schema import (
    YAML_ALIASES,
    Config,
    ConfigError,
    FieldSpec,
    all_keys,
    field_choices,
    field_specs,
    full_key,
    no_effect_keys,
    section_attributes,
    section_class,
)

logger = logging.getLogger("utils.config")

# ---------------------------------------------------------------------------
# Type coercion and rule checks

# PyYAML (YAML 1.1) reads ``1e-4`` as a string; float fields accept such exponent literals.
_FLOAT_TEXT = re.compile(r"[+-]?(\d[\d_]*\.?\d*|\.\d+)[eE][+-]?\d+")


def describe_value(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be an integer, got {describe_value(value)}")


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        number = float(value.strip())
    else:
        raise ConfigError(f"{key} must be a number, got {describe_value(value)}")
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be true or false, got {describe_value(value)}")


def _to_str(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be a string, got {describe_value(value)}")


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def _optional_inner(tp: Any) -> Any:
    """``X`` for ``Optional[X]``, else None."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return None


def _coerce(key: str, value: Any, tp: Any, meta: Any) -> Any:
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(key, value, inner, meta)
    if typing.get_origin(tp) is list:
        return _coerce_list(key, value, typing.get_args(tp)[0], meta["length"])
    return _SCALARS[tp](key, value)


def _coerce_list(key: str, value: Any, elem: type, length: Optional[int]) -> list:
    kind = "numbers" if elem in (int, float) else elem.__name__
    expected = f"a list of {length} {kind}" if length else f"a list of {kind}"
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be {expected}, got {describe_value(value)}")
    if length is not None and len(value) != length:
        raise ConfigError(f"{key} must be {expected}, got {len(value)} items: {list(value)!r}")
    return [_SCALARS[elem](f"{key}[{i}]", v) for i, v in enumerate(value)]


def bounds_text(meta: Any) -> Optional[str]:
    low, high, gt = meta["min"], meta["max"], meta["gt"]
    if gt is not None:
        return f"in ({gt}, {high}]" if high is not None else f"> {gt}"
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else None


def _in_bounds(value: float, meta: Any) -> bool:
    low, high, gt = meta["min"], meta["max"], meta["gt"]
    return not ((low is not None and value < low) or (high is not None and value > high)
                or (gt is not None and value <= gt))


def _check_rules(key: str, value: Any, meta: Any) -> None:
    if value is None:
        return
    choices = field_choices(meta)
    if choices and isinstance(value, list):  # a list field: each element is one of the choices
        for index, item in enumerate(value):
            if item not in choices:
                raise ConfigError(f"{key}[{index}] must be one of {list(choices)}, got {item!r} (in {value!r})")
    elif choices and value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
    items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
    rule = bounds_text(meta)
    for index, item in items:
        if rule and not _in_bounds(item, meta):
            name = key if index is None else f"{key}[{index}]"
            raise ConfigError(f"{name} must be {rule}, got {item!r}")
    if meta["pair"] and value[0] > value[1]:
        raise ConfigError(f"{key} must be [low, high] with low <= high, got {value!r}")


# ---------------------------------------------------------------------------
# YAML reading

class _FlowListDumper(yaml.SafeDumper):
    """SafeDumper writing lists inline (``[0.02, 0.5]``) and mappings as blocks."""


def _represent_list(dumper: _FlowListDumper, data: list) -> yaml.SequenceNode:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_FlowListDumper.add_representer(list, _represent_list)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None


def text_looks_utf16(path: Path) -> bool:
    """A UTF-16 byte-order mark, or a zero byte in every other position of the first bytes."""
    head = path.read_bytes()[:64]
    return head[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(head) >= 4 and head[1::2].count(0) >= len(head) // 4)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file '{path}' is a folder; pass a YAML file (e.g. config/demo.yaml)") from None
    except UnicodeDecodeError as exc:
        hint = "saved as UTF-16; save it as UTF-8" if text_looks_utf16(path) else "a binary file, not YAML text"
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {exc.start}): {hint}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from None
    return _yaml_load(text, path.name)


# ---------------------------------------------------------------------------
# Applying values

def _suggest(section: Optional[str], key: str) -> Optional[str]:
    """Closest valid full key for a mistyped ``section.key``."""
    exact = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key]
    if exact:
        return exact[0]
    local = list(field_specs(section_class(section)))
    if section is None:
        local += list(section_attributes())
    close = difflib.get_close_matches(key, local, n=1)
    if close:
        return full_key(section, close[0])
    close = difflib.get_close_matches(full_key(section, key), all_keys(), n=1)
    return close[0] if close else None


def _unknown(kind: str, name: str, suggestion: Optional[str], source: str) -> ConfigError:
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return ConfigError(f"unknown {kind} '{name}' in {source}{hint}")


def _lookup(section: Optional[str], key: str, source: str) -> FieldSpec:
    if section is not None and section not in section_attributes():
        close = difflib.get_close_matches(section, list(section_attributes()), n=1)
        raise _unknown("section", section, close[0] if close else None, source)
    canonical = YAML_ALIASES.get(section or "", {}).get(key, key)
    spec = field_specs(section_class(section)).get(canonical)
    if spec is None:
        raise _unknown("key", full_key(section, key), _suggest(section, key), source)
    return spec


def _target(cfg: Config, section: Optional[str]) -> Any:
    return cfg if section is None else getattr(cfg, section_attributes()[section])


def _assign(cfg: Config, section: Optional[str], spec: FieldSpec, value: Any) -> str:
    key = full_key(section, spec.name)
    value = _coerce(key, value, spec.type, spec.meta)
    _check_rules(key, value, spec.meta)
    setattr(_target(cfg, section), spec.name, value)
    return key


def _apply_section(cfg: Config, section: str, values: Any, source: str) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' in {source} must be a mapping of keys, got {describe_value(values)}")
    done: dict[str, str] = {}
    for key, value in values.items():
        spec = _lookup(section, str(key), source)
        if spec.name in done:
            raise ConfigError(f"{full_key(section, spec.name)} is set twice in {source} "
                              f"(as '{done[spec.name]}' and '{key}')")
        done[spec.name] = str(key)
        _assign(cfg, section, spec, value)
    return [full_key(section, name) for name in done]


def _apply_document(cfg: Config, data: Any, source: str) -> list[str]:
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of sections and keys, got {describe_value(data)}")
    touched = []
    for name, value in data.items():
        name = str(name)
        if name in section_attributes():
            touched += _apply_section(cfg, name, value, source)
        elif name not in field_specs(Config) and isinstance(value, dict):
            close = difflib.get_close_matches(name, list(section_attributes()), n=1)
            raise _unknown("section", name, close[0] if close else None, source)
        else:
            touched.append(_assign(cfg, None, _lookup(None, name, source), value))
    return touched


def _split_override(text: str) -> tuple[Optional[str], str, str]:
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"malformed override {text!r}: expected Section.key=value or key=value")
    section, _, key = name.rpartition(".")
    if not section and key in section_attributes():
        raise ConfigError(f"malformed override {text!r}: name a key inside the section, e.g. {key}.<key>=value")
    return (section or None), key, raw.strip()


def _override_value(spec: FieldSpec, raw: str, source: str) -> Any:
    """Parse an override value with YAML; string fields keep the raw text when YAML gives a non-string."""
    wants_str = spec.type is str or _optional_inner(spec.type) is str
    try:
        value = _yaml_load(raw, source)
    except ConfigError:
        if wants_str:
            return raw
        raise
    if wants_str and not isinstance(value, str) and not (value is None and spec.type is not str):
        if isinstance(value, bool):  # e.g. GuidanceParams.negative=no: YAML 1.1 reads a boolean
            logger.warning("%s: %r is read as the text %r (the key is a string, not a switch)", source, raw, raw)
        return raw
    return value


def _apply_override(cfg: Config, text: str) -> str:
    section, key, raw = _split_override(text)
    source = f"override {text!r}"
    spec = _lookup(section, key, source)
    return _assign(cfg, section, spec, _override_value(spec, raw, source))


# ---------------------------------------------------------------------------
# Validation

def _check_all_fields(cfg: Config) -> None:
    for section in (None, *section_attributes()):
        target = _target(cfg, section)
        for spec in field_specs(section_class(section)).values():
            key = full_key(section, spec.name)
            value = _coerce(key, getattr(target, spec.name), spec.type, spec.meta)
            _check_rules(key, value, spec.meta)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_cross(cfg: Config) -> None:
    g, o, c = cfg.guidance, cfg.optim, cfg.camera
    _require(g.t_range[0] < g.t_range[1] <= g.max_t_range,
             "GuidanceParams.t_range and GuidanceParams.max_t_range must satisfy "
             f"t_range[0] < t_range[1] <= max_t_range, got t_range={g.t_range!r}, max_t_range={g.max_t_range!r}")
    _require(o.densify_from_iter <= o.densify_until_iter,
             "OptimizationParams.densify_from_iter must be <= OptimizationParams.densify_until_iter, "
             f"got {o.densify_from_iter} > {o.densify_until_iter}")
    _require(o.start_reset_iter <= o.end_reset_iter,
             "OptimizationParams.start_reset_iter must be <= OptimizationParams.end_reset_iter, "
             f"got {o.start_reset_iter} > {o.end_reset_iter}")
    _require(g.cds_t_end <= g.cds_t_start,
             "GuidanceParams.cds_t_end must be <= GuidanceParams.cds_t_start, "
             f"got {g.cds_t_end} > {g.cds_t_start}")
    _require(c.init_shape not in ("ply", "mesh") or bool(c.init_path),
             f"GenerateCamParams.init_shape is {c.init_shape!r} but GenerateCamParams.init_path is not set")
    _require(c.init_shape not in ("pointe", "shapee") or bool(c.init_prompt.strip()),
             f"GenerateCamParams.init_shape is {c.init_shape!r} but GenerateCamParams.init_prompt is empty")
    _require(cfg.ply_sh_degree is None or cfg.ply_sh_degree >= cfg.model.sh_degree,
             "ply_sh_degree must be >= ModelParams.sh_degree (PLYs are padded, never cut), "
             f"got ply_sh_degree={cfg.ply_sh_degree} < sh_degree={cfg.model.sh_degree}")
    _require(c.init_shape == "ply" or c.init_num_pts >= 2,
             "GenerateCamParams.init_num_pts must be >= 2 (initial scales come from each point's nearest "
             f"neighbours), got {c.init_num_pts}")
    _require(not (cfg.pipeline.compile_regions and cfg.pipeline.compile_in_background),
             "PipelineParams.compile_regions and PipelineParams.compile_in_background cannot both be true: regional "
             "compilation compiles the UNet's blocks in place, so no uncompiled UNet is left to train with while "
             "they compile")
    _require(bool(cfg.pipeline.compile_cache.strip()),
             "PipelineParams.compile_cache must be auto, none or a folder, got an empty string")
    _check_sctd_segments(g)
    _require(g.prior != "stable_diffusion" or (c.image_w % 8 == 0 and c.image_h % 8 == 0),
             "GenerateCamParams.image_w and image_h must be multiples of 8 with the Stable Diffusion prior (its "
             f"VAE downsamples by 8), got {c.image_w} x {c.image_h}; use e.g. "
             f"{8 * max(1, round(c.image_w / 8))} x {8 * max(1, round(c.image_h / 8))}")
    for key, value in (("default_fovy", c.default_fovy), ("fovy_range", c.fovy_range[1]),
                       ("max_fovy_range", c.max_fovy_range[1])):
        _require(value < math.pi,
                 f"GenerateCamParams.{key} must be a field of view below pi radians (180 degrees: the image plane "
                 f"would be infinitely wide), got {value!r}; the paper's cameras use about 0.55")


# every prior's noise schedule has 1000 training timesteps (Stable Diffusion's; the analytic prior copies it)
SCHEDULE_TIMESTEPS = 1000


def _check_sctd_segments(g) -> None:
    """SCTD's N_s segments (phase_num) must fit between the window's first and last timestep (Sec. 4.3);
    the same bounds as guidance/timesteps.py's TimestepWindow and segment_edges."""
    if g.guidance_type != "sctd":
        return
    first = int(SCHEDULE_TIMESTEPS * g.t_range[0])
    last = int(SCHEDULE_TIMESTEPS * g.t_range[1]) + int(SCHEDULE_TIMESTEPS * (g.max_t_range - g.t_range[1]))
    span = last - first
    _require(g.phase_num <= span,
             f"GuidanceParams.phase_num must be <= {span}, the timesteps between the first ({first}) and last "
             f"({last}) that t_range and max_t_range allow (one segment needs at least one timestep), got "
             f"{g.phase_num}; the paper uses 5")
    if g.t_mode == "mono" and g.phase_num > 1:
        base = g.t_threshold - first
        _require(0 < base and g.phase_num * base < span,
                 f"GuidanceParams.t_threshold={g.t_threshold} does not fit phase_num={g.phase_num} monotonic segments "
                 f"in [{first}, {last}]: need {first} < t_threshold and phase_num * (t_threshold - {first}) < {span}")


def validate_config(cfg: Config) -> Config:
    """Check every field's type and rules and the cross-field constraints; return ``cfg``."""
    _check_all_fields(cfg)
    _check_cross(cfg)
    return cfg


def _warn_no_effect(keys: Sequence[str]) -> None:
    reasons = no_effect_keys()
    for key in dict.fromkeys(keys):
        if key in reasons:
            logger.warning("%s has no effect here: %s", key, reasons[key])


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = (), *,
                warn_no_effect: bool = True, overlays: Sequence[Union[str, Path]] = ()) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None), then overlay files (partial YAML
    files such as config/low_vram.yaml) in order, then ``Section.key=value`` overrides in order;
    validate, and warn once for every no-effect key that was set."""
    cfg = Config()
    touched: list[str] = []
    for doc in ([path] if path is not None else []) + list(overlays):
        doc = Path(doc)
        data = _read_yaml(doc)
        if data is None:
            logger.warning("config file '%s' is empty: it changes nothing (the defaults and the overrides apply)", doc)
        touched += _apply_document(cfg, data, doc.name)
    for text in overrides:
        touched.append(_apply_override(cfg, text))
    validate_config(cfg)
    if warn_no_effect:
        _warn_no_effect(touched)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """YAML-shaped dict (top-level keys, then one mapping per section) that :func:`load_config` reads back."""
    out: dict[str, Any] = {name: copy.deepcopy(getattr(cfg, name)) for name in field_specs(Config)}
    for section, attr in section_attributes().items():
        out[section] = {f.name: copy.deepcopy(getattr(getattr(cfg, attr), f.name))
                        for f in dataclasses.fields(getattr(cfg, attr))}
    return out


def save_config(cfg: Config, path: Union[str, Path]) -> Path:
    """Write the resolved config as YAML (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=_FlowListDumper, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path
