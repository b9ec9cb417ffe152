"""The configuration reference printed by ``train.py --help-config [Section]``, read from the schema.

Every key with its default, its one-line meaning, its rules (choices, ranges, list shapes) and its
properties: whether a resumed run may change it, whether a sweep rebuilds its prior when it changes,
and why it has no effect where it has none. Nothing here is written by hand per key.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from utils.config.loading import bounds_text
from utils.config.schema import (
    ConfigError,
    FieldSpec,
    field_choices,
    field_specs,
    section_attributes,
    section_class,
    section_prior_free,
)

TOP_LEVEL = "top-level"  # the name --help-config uses for the keys outside every section


def help_sections() -> tuple[str, ...]:
    """The names --help-config accepts: the YAML sections, then the top-level keys."""
    return (*section_attributes(), TOP_LEVEL)


def resolve_section(name: str) -> Optional[str]:
    """The YAML section (None: the top-level keys) named by ``name``, ignoring case."""
    for section in help_sections():
        if section.lower() == name.strip().lower():
            return None if section == TOP_LEVEL else section
    raise ConfigError(f"--help-config: no section {name!r}; the sections are {', '.join(help_sections())} "
                      "(or no name for all of them)")


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: null, true, "text", [0.02, 0.5]


def _rules(spec: FieldSpec) -> list[str]:
    meta = spec.meta
    rules = []
    choices = field_choices(meta)
    if choices:
        rules.append("one of " + ", ".join(str(c) for c in choices))
    if meta["length"]:
        rules.append(f"a list of {meta['length']}")
    bounds = bounds_text(meta)
    if bounds:
        rules.append(("each " if meta["length"] else "") + bounds)
    if meta["pair"]:
        rules.append("[low, high] with low <= high")
    return rules


def _properties(section: Optional[str], spec: FieldSpec) -> list[str]:
    meta = spec.meta
    props = [f"may change on resume: {meta['resumable']}"] if meta["resumable"] else []
    if not (meta["prior_free"] or section_prior_free(section)):
        props.append("a sweep rebuilds the prior when it changes")
    if meta["no_effect"]:
        props.append(f"NO EFFECT: {meta['no_effect']}")
    if meta["cuda_only"]:
        props.append("CUDA only: no effect on a CPU run")
    return props


def format_key(section: Optional[str], spec: FieldSpec) -> str:
    """key = default (--flag), then the meaning, then the rules and properties (when there are any)."""
    flag = f"   (--{spec.meta['flag']})" if spec.meta["flag"] else ""
    head = f"  {spec.name} = {_yaml_value(getattr(section_class(section)(), spec.name))}{flag}"
    notes = "; ".join(_rules(spec) + _properties(section, spec))
    return "\n".join([head, f"      {spec.meta['help']}"] + ([f"      {notes}"] if notes else []))


def format_section(section: Optional[str]) -> str:
    """One section's keys (None: the top-level keys) under a title line."""
    if section is None:
        title = f"{TOP_LEVEL} keys (write them outside every section, e.g. seed: 3 or seed=3)"
    else:
        doc = section_class(section).__doc__.replace("``", "").rstrip(".")
        title = f"{section}: {doc} (override as {section}.<key>=value)"
    keys = [format_key(section, spec) for spec in field_specs(section_class(section)).values()]
    return "\n".join([title, *keys])


LEGEND = ("Configuration keys: YAML (--opt FILE), overrides Section.key=value, or the flag shown.\n"
          "A key is fixed when a run resumes unless it says 'may change on resume'; 'a sweep rebuilds the prior'\n"
          "marks the keys a built prior depends on; 'NO EFFECT' keys are accepted for the official configs only.")


def format_config_help(name: Optional[str] = None) -> str:
    """The reference of one section (``name``) or of all of them; ConfigError for an unknown name."""
    sections = [resolve_section(name)] if name else [None if s == TOP_LEVEL else s for s in help_sections()]
    return "\n\n".join([LEGEND, *(format_section(s) for s in sections)]) + "\n"
