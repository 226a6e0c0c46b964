"""params.yaml -> one validated, typed `Params` object.

Every section rejects unknown keys, every number is range-checked, and cross-field rules (list
lengths against the number of exits, the dataset's shape against the model) are checked here, so
the rest of the library can trust what it is given. Failures raise `ConfigError` with a single
line: ``<file>: <key>: <problem>``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, ValidationError, model_validator

from pipeline.config.base import ConfigError, KeyProblem, NonNegativeInt, Section
from pipeline.config.models import ARCHS, ModelConfig, default_arch
from pipeline.config.search import TuneConfig
from pipeline.config.sections import (
    BoostConfig,
    CalibrateConfig,
    DataConfig,
    EvaluateConfig,
    ProfileConfig,
    RayConfig,
    TimeBudgets,
    TrackingConfig,
    TrainConfig,
)

# What the rest of the project imports from here: the params object, its sections, and how to
# read, check and write params files.
__all__ = [
    "CalibrateConfig",
    "ConfigError",
    "DataConfig",
    "Params",
    "RayConfig",
    "TimeBudgets",
    "TrainConfig",
    "TuneConfig",
    "load_params",
    "parse_params",
    "parse_with_overrides",
    "set_dotted",
    "write_overrides",
]


class Params(Section):
    seed: NonNegativeInt = 0
    """Seeds the held-out split, data order, augmentation and initialisation."""
    data: DataConfig = DataConfig()
    model: Annotated[ModelConfig, BeforeValidator(default_arch)]
    boost: BoostConfig = BoostConfig()
    train: TrainConfig
    calibrate: CalibrateConfig = CalibrateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    profile: ProfileConfig = ProfileConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Params:
        n = self.model.n_exits
        spec = self.data.spec
        if len(self.boost.temperature) not in (1, 2, n):
            raise KeyProblem(
                "boost.temperature",
                f"has {len(self.boost.temperature)} values; give 1, a [first, last] pair, "
                f"or one per exit ({n})",
            )
        if len(self.boost.loss_weights) not in (1, n):
            raise KeyProblem(
                "boost.loss_weights",
                f"has {len(self.boost.loss_weights)} values; give 1 or one per exit ({n})",
            )
        self.model.check_shapes(spec)
        if self.model.arch == "ranet" and self.boost.grad_rescale:
            raise KeyProblem(
                "boost.grad_rescale",
                "must be false with model.arch: ranet (gradient rescaling is defined for "
                "MSDNet's single coarsest-scale path; the reference trains RANet without it)",
            )
        if self.model.arch == "ranet" and self.tune.space.grad_rescale:
            raise KeyProblem("tune.space.grad_rescale", "must be false with model.arch: ranet")
        for key, given, expected in (
            ("model.in_channels", self.model.in_channels, spec.channels),
            ("model.num_classes", self.model.num_classes, spec.num_classes),
        ):
            if given is not None and expected is not None and given != expected:
                raise KeyProblem(key, f"is {given} but {self.data.dataset} has {expected}")
        if self.train.augment == "random-resized-crop" and not self.data.is_folder:
            raise KeyProblem(
                "train.augment",
                f"random-resized-crop needs a folder dataset, not {self.data.dataset}",
            )
        if self.train.schedule == "multistep" and sorted(self.train.milestones) != list(
            self.train.milestones
        ):
            raise KeyProblem("train.milestones", "must be in increasing order")
        if self.data.val_size == 0 and self.train.select == "best":
            raise KeyProblem(
                "data.val_size",
                "is 0 but train.select is best, which needs a held-out split; "
                "set train.select: last or hold images out",
            )
        return self

    @property
    def in_channels(self) -> int:
        return self.model.in_channels or self.data.spec.channels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input image (C, H, W): the training crop and the evaluation size."""
        size = self.data.spec.image_size
        return (self.in_channels, size, size)

    @property
    def num_classes(self) -> int:
        n = self.model.num_classes or self.data.spec.num_classes
        if n is None:
            raise ConfigError(
                "model.num_classes: imagefolder counts its classes in prepare; "
                "run `dvc repro prepare` first (data/dataset.json)"
            )
        return n

    def with_dataset(self, info: dict[str, Any]) -> Params:
        """These params with the class count prepare found in the folder (data/dataset.json),
        so users never count classes; a model.num_classes that disagrees is refused."""
        found = info.get("num_classes")
        if found is None or self.data.spec.num_classes is not None:
            return self
        if self.model.num_classes not in (None, found):
            raise ConfigError(
                f"model.num_classes: is {self.model.num_classes} but data.root has {found} classes"
            )
        return self.model_copy(
            update={"model": self.model.model_copy(update={"num_classes": found})}
        )


def _format_error(error: dict[str, Any]) -> str:
    loc = error["loc"]
    if loc[:1] == ("model",) and loc[1:2] and loc[1] in ARCHS:  # the union's tag, not a key
        loc = loc[:1] + loc[2:]
    if error["type"] == "union_tag_invalid":
        return f"model.arch: must be one of {', '.join(ARCHS)} (got {error['ctx']['tag']!r})"
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    ctx_error = error.get("ctx", {}).get("error")
    if isinstance(ctx_error, KeyProblem):
        return str(ctx_error)
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {error['input']!r})" if key else message


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate an already-loaded mapping (for tests and `-S`-style overrides)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # A key that does not belong (say, another arch's) explains the rest; report it first.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise ConfigError(f"{source}: {_format_error(first)}") from None


def set_dotted(tree: MutableMapping[str, Any], dotted: str, value: Any) -> None:
    """Set the params key `a.b.c` (as `dvc exp run -S` names it) in nested mappings: a loaded
    params dict or a comment-keeping ruamel document."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[leaf] = value


def parse_with_overrides(raw: dict[str, Any], dotted: dict[str, Any], source: str) -> Params:
    """Loaded params with dotted-key overrides (changed in place), validated like a file."""
    for key, value in dotted.items():
        set_dotted(raw, key, value)
    return parse_params(raw, source)


def load_params(path: str | Path) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    return parse_params(raw, str(path))


def write_overrides(path: str | Path, dotted: dict[str, Any]) -> None:
    """Set dotted keys (`boost.temperature`) in a params file, keeping its comments and layout
    (ruamel.yaml round trip); the result is validated before it replaces the file."""
    from ruamel.yaml import YAML

    from pipeline.io import atomic_path

    path = Path(path)
    yaml_rt = YAML()
    document = yaml_rt.load(path.read_text())
    for key, value in dotted.items():
        set_dotted(document, key, value)
    with atomic_path(path) as tmp:
        with tmp.open("w") as out:
            yaml_rt.dump(document, out)
        load_params(tmp)
