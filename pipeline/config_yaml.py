"""The documented stages.yaml: every config key with its default and its one-line help.

    python -c 'from pipeline.config_yaml import render_yaml; print(render_yaml(), end="")' > stages.yaml
"""
from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from pipeline.config import Config


def describe(cls=Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, help) for every key: used to write and to check stages.yaml."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, value, f.metadata.get("help", "")))
    return rows


def render_yaml() -> str:
    """The documented stages.yaml: every key with its default and a one-line comment."""
    lines = ["# knn-diffusion configuration. Defaults live in pipeline/config.py; this file and",
             "# `knnd run ... --set key.sub=value` only override them. Every key is listed with its default.", ""]
    current = None
    for key, default, help_text in describe():
        parts = key.split(".")
        if len(parts) == 2 and parts[0] != current:
            current = parts[0]
            lines.append(f"\n{current}:")
        elif len(parts) == 1 and current is not None:
            current = None
        indent = "  " * (len(parts) - 1)
        value = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
        value = value.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{indent}{parts[-1]}: {value}  # {help_text}")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
