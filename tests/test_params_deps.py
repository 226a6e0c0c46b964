"""DVC's params deps are declared key by key, so that a knob which cannot change a stage's result
re-runs nothing, while every key that can is a dep of the stages that read it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, needs_data, run, set_params

# Keys no stage declares: they decide how fast or where, never what a stage computes.
INERT = {
    "train.loader_workers": "decoding processes per Ray worker: the same images either way",
    "evaluate.timing_repeats": "how many timings a median takes",
    "evaluate.timing_warmup": "how many untimed rounds come first",
    "tune.max_concurrent": "how many trials run at once",
    "tracking.uri": "where runs are logged",
    "tracking.experiment": "where runs are logged",
    "tracking.catch_up_s": "how long to wait for a store that stopped answering",
    "ray.storage": "where Ray keeps checkpoints",
    "ray.storage_options": "where Ray keeps checkpoints",
}
WHOLE = {"tune.space", "tune.confirm", "calibrate.budgets_ms"}  # one key, its value a mapping


def _leaves(section: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in WHOLE | set(INERT):
            keys += _leaves(value, f"{dotted}.")
        else:
            keys.append(dotted)
    return keys


def _declared() -> set[str]:
    declared = set()
    for dvc_file in ("dvc.yaml", "tune/dvc.yaml"):
        for stage in yaml.safe_load((ROOT / dvc_file).read_text())["stages"].values():
            declared.update(stage.get("params", []))
    return declared


def test_every_params_key_is_a_dep_of_some_stage_or_known_inert():
    declared = _declared()
    covered = {
        key
        for key in _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
        if any(key == d or key.startswith(f"{d}.") for d in declared)
    }
    leaves = set(_leaves(yaml.safe_load((ROOT / "params.yaml").read_text())))
    assert sorted(leaves - covered - set(INERT)) == []
    assert sorted(set(INERT) & declared) == []  # an inert knob re-runs nothing
    assert sorted(declared - leaves - {k.rsplit(".", 1)[0] for k in leaves}) == []  # no typo


@pytest.mark.slow
@needs_data
def test_an_inert_knob_leaves_every_stage_up_to_date_and_a_real_one_does_not(shared_copy: Path):
    repo = shared_copy
    set_params(repo, **{"train.loader_workers": 1, "evaluate.timing_repeats": 2})
    status = run(["dvc", "status", "dvc.yaml"], repo)  # the shared run never ran the search
    assert status.returncode == 0, status.stderr
    assert "up to date" in status.stdout, status.stdout
    set_params(repo, **{"train.lr": 0.05})
    status = run(["dvc", "status", "dvc.yaml"], repo)
    assert "train:" in status.stdout and "changed deps" in status.stdout, status.stdout
