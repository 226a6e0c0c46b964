"""A stage's declared params, read as it starts and again before it writes its outputs.

DVC records a stage's params in dvc.lock from the file on disk after the stage ends, so an edit
made while the stage ran (a changed learning rate during epoch 1) would be recorded as the params
the outputs came from, and the run-cache would map the new values to outputs of the old ones.
The guard stops such a stage before it writes anything, naming what changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline import paths
from pipeline.config import ConfigError

_MISSING = object()


def declared_params(stage: str) -> list[str]:
    """The params.yaml keys (dotted; a section stands for all its keys) `stage` declares in the
    project's dvc.yaml files; none if no file declares the stage."""
    for dvc_file in paths.DVC_FILES:
        if not dvc_file.exists():
            continue
        spec = yaml.safe_load(dvc_file.read_text()) or {}
        declared = spec.get("stages", {}).get(stage)
        if declared is None:
            continue
        keys: list[str] = []
        for entry in declared.get("params", []):
            if isinstance(entry, str):
                keys.append(entry)
            elif isinstance(entry, dict):  # {file: [keys]}: only params.yaml is ours to read
                for file, names in entry.items():
                    if Path(dvc_file.parent, file).resolve() == paths.PARAMS.resolve():
                        keys.extend(names or [])
        return keys
    return []


def _values(keys: list[str]) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(paths.PARAMS.read_text()) or {}
    except (OSError, yaml.YAMLError):
        raw = {}  # unreadable now: every key reads as changed
    values = {}
    for key in keys:
        node: Any = raw
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        values[key] = node
    return values


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(removed)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


class ParamsGuard:
    """The values of `stage`'s declared params when the guard is made; `check()` raises a
    ConfigError naming the first key whose value differs now."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.keys = declared_params(stage)
        self.start = _values(self.keys)

    def check(self) -> None:
        now = _values(self.keys)
        changed = [key for key in self.keys if now[key] != self.start[key]]
        if not changed:
            return
        key = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(
            f"{paths.PARAMS}: {key} changed from {_show(self.start[key])} to {_show(now[key])} "
            f"while stage {self.stage} ran{more}; nothing was written: run `dvc repro` again"
        )
