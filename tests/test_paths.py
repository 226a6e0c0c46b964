"""pipeline/paths.py and the dvc.yaml files name the same files: the stages read and write
through paths.py, DVC tracks what dvc.yaml declares, and a path changed on one side only would
leave DVC tracking a file no stage writes (or a stage writing a file DVC never caches)."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT

DVC_FILES = ("dvc.yaml", "tune/dvc.yaml")
TRACKED = ("data/", "outputs/")  # what DVC tracks; the rest of paths.py is git's or scratch
KINDS = ("deps", "outs", "metrics", "plots")


def _paths_module(source: str) -> dict[str, str]:
    """paths.py's file constants under DVC's folders, by name, from its source text."""
    namespace: dict[str, Any] = {}
    exec(compile(source, "pipeline/paths.py", "exec"), namespace)
    return {
        name: value.as_posix()
        for name, value in namespace.items()
        if isinstance(value, Path) and value.suffix and value.as_posix().startswith(TRACKED)
    }


def _entry(item: str | dict) -> str:
    return item if isinstance(item, str) else next(iter(item))


def _declared(dvc_texts: dict[str, str]) -> dict[str, set[str]]:
    """Stage name -> the files under DVC's folders it declares (deps, outs, metrics, plots),
    relative to the project root; `plots:` at the top counts as the file's own."""
    declared: dict[str, set[str]] = {}
    for dvc_file, text in dvc_texts.items():
        spec = yaml.safe_load(text)
        for name, stage in spec.get("stages", {}).items():
            base = Path(dvc_file).parent / stage.get("wdir", ".")
            files = {os.path.normpath(base / _entry(i)) for k in KINDS for i in stage.get(k, [])}
            for token in stage["cmd"].split():  # a path passed on the command line
                if token.startswith(TRACKED):
                    files.add(os.path.normpath(base / token))
            declared[name] = {f for f in files if f.startswith(TRACKED)}
        for plot in spec.get("plots", []):
            y = next(iter(plot.values())).get("y", {})
            names = y if isinstance(y, dict) else {}
            declared.setdefault(f"{dvc_file} plots", set()).update(
                os.path.normpath(Path(dvc_file).parent / f) for f in names
            )
    return declared


def mismatches(paths_source: str, dvc_texts: dict[str, str]) -> dict[str, list[str]]:
    """What one side names and the other does not."""
    in_paths = set(_paths_module(paths_source).values())
    in_dvc = set().union(*_declared(dvc_texts).values())
    return {
        "only in pipeline/paths.py": sorted(in_paths - in_dvc),
        "only in dvc.yaml": sorted(in_dvc - in_paths),
    }


def _real() -> tuple[str, dict[str, str]]:
    texts = {name: (ROOT / name).read_text() for name in DVC_FILES}
    return (ROOT / "pipeline/paths.py").read_text(), texts


def test_paths_py_and_every_dvc_yaml_name_the_same_files():
    assert mismatches(*_real()) == {"only in pipeline/paths.py": [], "only in dvc.yaml": []}


@pytest.mark.parametrize("side", ["pipeline/paths.py", "dvc.yaml", "tune/dvc.yaml"])
def test_a_path_changed_on_one_side_only_fails(side):
    """The check above on a copy where one file is renamed on one side: it must notice."""
    source, texts = _real()
    old, new = (
        ("outputs/tune/summary.json", "outputs/tune/summary2.json")
        if side == "tune/dvc.yaml"
        else ("thresholds.json", "thresholds2.json")
    )
    if side == "pipeline/paths.py":
        assert f'"{old}"' in source
        source = source.replace(f'"{old}"', f'"{new}"')
    else:
        assert old in texts[side]
        texts[side] = texts[side].replace(old, new)
    found = mismatches(source, texts)
    assert found["only in pipeline/paths.py"] and found["only in dvc.yaml"], found


def _stage_uses(module: str) -> set[str]:
    """The names of paths.py's constants a stage script uses (`paths.NAME`)."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "paths"
    }


@pytest.mark.parametrize("dvc_file", DVC_FILES)
def test_every_stage_declares_the_files_its_script_names(dvc_file):
    """A stage script reading or writing a DVC file its stage does not declare: DVC would not
    re-run it when the file changes (stages/tune.py once read data/dataset.json undeclared)."""
    source, texts = _real()
    constants = _paths_module(source)
    declared = _declared(texts)
    missing = {}
    for name, stage in yaml.safe_load(texts[dvc_file])["stages"].items():
        module = stage["cmd"].split("-m ", 1)[1].split()[0]
        used = {constants[c] for c in _stage_uses(module) if c in constants}
        if used - declared[name]:
            missing[name] = sorted(used - declared[name])
    assert missing == {}
