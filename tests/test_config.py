import subprocess
import sys
import typing
from typing import Any

import pytest
import yaml
from helpers import ROOT, compose, raw_params
from pydantic import BaseModel

from pipeline.config import ConfigError, Params, load_params, set_dotted


def test_every_shipped_params_file_validates(params_file):
    params = load_params(params_file)
    n = params.model.n_exits
    assert len(params.boost.temperatures(n)) == n
    assert len(params.boost.weights(n)) == n


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _sections(arg)]


def _omitted(schema: type[BaseModel], raw: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of the schema that `raw` leaves to a code default; a union of sections
    (model: msdnet | ranet) is walked by the variant whose `arch` the file names."""
    missing = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            missing.append(key)
            continue
        if not isinstance(raw[name], dict):
            continue
        variants = _sections(field.annotation)
        tagged = [v for v in variants if "arch" in v.model_fields]
        if tagged:
            arch = raw[name].get("arch", "msdnet")
            variants = [
                v for v in tagged if arch in typing.get_args(v.model_fields["arch"].annotation)
            ]
        for variant in variants[:1]:
            missing += _omitted(variant, raw[name], f"{key}.")
    return missing


def test_every_params_file_sets_every_field_of_the_schema(params_file):
    """params.yaml is the whole configuration: `dvc params diff` and `dvc exp show` see every
    value that can change a result, and no result depends on a default hidden in the code."""
    assert _omitted(Params, raw_params(params_file)) == []


def test_the_schema_walk_finds_omitted_nested_and_union_fields():
    raw = raw_params()
    del raw["train"]["scaling"]["sync_bn"], raw["model"]["first_head_channels"]
    del raw["tune"]["space"]["temperature"]["per"]
    assert _omitted(Params, raw) == [
        "model.first_head_channels",
        "train.scaling.sync_bn",
        "tune.space.temperature.per",
    ]
    ranet = raw_params(RANET)
    del ranet["model"]["compress_factor"]
    assert _omitted(Params, ranet) == ["model.compress_factor"]


def test_temperature_pair_is_spaced_linearly_from_first_to_last_exit():
    params = compose(**{"model.n_blocks": 5, "boost.temperature": [0.2, 1.0]})
    assert params.boost.temperatures(5) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_dotted_keys_reach_any_depth_and_a_top_level_key():
    raw = raw_params()
    set_dotted(raw, "tune.space.temperature.per", "pair")
    set_dotted(raw, "seed", 7)
    assert raw["tune"]["space"]["temperature"]["per"] == "pair" and raw["seed"] == 7
    with pytest.raises(KeyError):
        set_dotted(raw, "tune.nowhere.per", "pair")


def test_scalar_and_per_exit_lists_are_accepted():
    params = compose(
        **{"model.n_blocks": 4, "boost.temperature": [0.1, 0.2, 0.3, 0.4], "boost.loss_weights": 2}
    )
    assert params.boost.temperatures(4) == [0.1, 0.2, 0.3, 0.4]
    assert params.boost.weights(4) == [2.0] * 4


BAD_PARAMS = {
    "unknown key": ({"boost.shrinkage": 1.0}, "boost.shrinkage: unknown key"),
    "unknown section": ({"optimiser": {"lr": 1}}, "optimiser: unknown key"),
    "wrong type": ({"model.n_blocks": "four"}, "model.n_blocks:"),
    "bool for number": ({"boost.temperature": True}, "boost.temperature[0]:"),
    "negative temperature": ({"boost.temperature": -0.5}, "boost.temperature[0]:"),
    "negative weight in list": ({"boost.loss_weights": [1, 1, -1, 1]}, "boost.loss_weights[2]:"),
    "temperature length": ({"boost.temperature": [0.5, 0.5, 0.5]}, "boost.temperature: has 3"),
    "loss weight length": ({"boost.loss_weights": [1, 1]}, "boost.loss_weights: has 2"),
    "unknown dataset": ({"data.dataset": "mnist"}, "data.dataset:"),
    "unknown arch": ({"model.arch": "resnet"}, "model.arch:"),
    "missing key": ({"model.n_blocks": None}, "model.n_blocks:"),
    "class count": ({"model.num_classes": 100}, "model.num_classes: is 100"),
    "bn_factor length": ({"model.bn_factor": [1, 2]}, "model.bn_factor:"),
    "too few scales": ({"model.gr_factor": [1, 2], "model.bn_factor": [1, 2]}, "model.gr_factor:"),
    "select best without held-out split": (
        {"data.val_size": 0},
        "data.val_size: is 0 but train.select is best, which needs a held-out split",
    ),
    "negative val_size": ({"data.val_size": -1}, "data.val_size:"),
    "unknown selection": ({"train.select": "first"}, "train.select:"),
    "unknown selection metric": ({"train.select_metric": "top5"}, "train.select_metric:"),
    "unknown init": ({"model.init": "xavier"}, "model.init:"),
    "too many scales": (
        {"model.gr_factor": [1, 2, 4, 4], "model.bn_factor": [1, 2, 4, 4]},
        "model.gr_factor:",
    ),
    "data root a URL": (
        {"data.root": "s3://bucket/images"},
        "data.root: is s3://bucket/images: a URL",
    ),
    "momentum with adamw": (
        {"train.optimizer": "adamw"},  # the file's momentum: 0.9 would be ignored
        "train.momentum: is 0.9, but adamw has no momentum",
    ),
}


RANET = ROOT / "configs" / "fashion-mnist-ranet.yaml"
BAD_RANET_PARAMS = {
    "msdnet key on ranet": ({"model.base": 2}, "model.base: unknown key"),
    "ranet key on msdnet": ({"model.arch": "msdnet", "model.base": 1}, "model.bn_after: unknown"),
    "gr_factor length": ({"model.gr_factor": [4, 2]}, "model.gr_factor: has 2 values"),
    "bn_factor length": ({"model.bn_factor": [4, 2, 1, 1]}, "model.bn_factor: has 4 values"),
    "scale_list start": ({"model.scale_list": [2, 3, 4]}, "model.scale_list: is [2, 3, 4]"),
    "scale_list jump": ({"model.scale_list": [1, 3, 3]}, "model.scale_list: is [1, 3, 3]"),
    "second coarsest flow": ({"model.scale_list": [1, 1, 2]}, "model.scale_list: only the first"),
    "too few scales": ({"model.scale_list": [1, 2, 2]}, "model.scale_list: 2 scales"),
    "compress_factor": ({"model.compress_factor": 1.0}, "model.compress_factor:"),
    "grad_rescale": ({"boost.grad_rescale": True}, "boost.grad_rescale: must be false"),
}
BAD_CASES = [
    *((ROOT / "params.yaml", *case) for case in BAD_PARAMS.values()),
    *((RANET, *case) for case in BAD_RANET_PARAMS.values()),
]


@pytest.mark.parametrize(
    "source, overrides, expected", BAD_CASES, ids=[*BAD_PARAMS, *BAD_RANET_PARAMS]
)
def test_bad_params_fail_on_the_offending_key(tmp_path, source, overrides, expected):
    raw = raw_params(source)
    for dotted, value in overrides.items():
        if value is None:  # a key left out
            section, leaf = dotted.split(".")
            del raw[section][leaf]
        else:
            set_dotted(raw, dotted, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))

    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(error.value)


def test_cli_reports_bad_params_in_one_line_with_exit_code_2(tmp_path):
    raw = raw_params()
    raw["boost"]["temperature"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))

    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "flops", "--params", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "boost.temperature[0]" in lines[0] and str(path) in lines[0]


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "cannot read params file"),
        ("model: [unclosed", "invalid YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_unreadable_params_files_name_the_file(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected) as error:
        load_params(path)
    assert str(path) in str(error.value)


def test_adamw_takes_a_params_file_without_momentum():
    assert compose(**{"train.optimizer": "adamw", "train.momentum": None}).train.momentum is None
    assert compose(**{"train.momentum": None}).train.optimizer == "sgd"  # SGD without momentum
