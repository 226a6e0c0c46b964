"""params.yaml -> one validated, typed `Params` object.

Every section rejects unknown keys, every number is range-checked, and cross-field rules (list
lengths against the number of exits, the dataset's shape against the model) are checked here, so
the rest of the library can trust what it is given. Failures raise `ConfigError` with a single
line: ``<file>: <key>: <problem>``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeline.datasets import DATASETS, DatasetSpec


class ConfigError(ValueError):
    """A params file that cannot be used; the message is one line naming the file and key."""


def _scalar_to_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


NonNegative = Annotated[float, Field(strict=True, ge=0)]
Positive = Annotated[float, Field(strict=True, gt=0)]
Count = Annotated[int, Field(strict=True, ge=1)]
# A number or a list of numbers; stored as a list so errors point at one element.
NonNegativeList = Annotated[
    list[NonNegative], BeforeValidator(_scalar_to_list), Field(min_length=1)
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "imagenet"] = "fashion-mnist"
    root: str | None = None  # None: the dataset's usual locations (see the prepare stage)
    val_size: Count = 5000  # images held out of the training split for selection and calibration
    train_subset: Count | None = None  # quick runs: train on this many images only
    test_subset: Count | None = None

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.dataset]


class ModelConfig(_Section):
    """MSDNet hyper-parameters, named after Huang et al. (2018) in snake_case."""

    arch: Literal["msdnet"] = "msdnet"
    n_blocks: Count
    base: Count
    step: Count
    step_mode: Literal["even", "lin_grow"] = "even"
    n_channels: Count
    growth_rate: Count
    gr_factor: list[Count] = Field(min_length=1)
    bn_factor: list[Count] = Field(min_length=1)
    bottleneck: bool = True
    prune: Literal["max", "min"] = "max"
    reduction: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.5
    in_channels: Count | None = None  # None: from the dataset
    num_classes: Count | None = None  # None: from the dataset
    head_channels: Count | None = None  # None: 128, or the input width with the ImageNet stem
    first_head_channels: Count | None = None  # None: head_channels (a narrow one: a weak exit 1)

    @property
    def n_exits(self) -> int:
        return self.n_blocks

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)


class BoostConfig(_Section):
    """BoostNet (Yu et al., AAAI 2023); enabled=false trains the joint-loss baseline."""

    enabled: bool = True
    temperature: NonNegativeList = [0.5]  # one value, a [first, last] pair, or one per exit
    loss_weights: NonNegativeList = [1.0]  # one value or one per exit
    grad_rescale: bool = True  # IMTA gradient equilibrium on the coarsest-scale feature

    def temperatures(self, n_exits: int) -> list[float]:
        """Per-exit t_n. A pair is spaced linearly from the first exit to the last."""
        t = self.temperature
        if len(t) == 1:
            return t * n_exits
        if len(t) == 2 and n_exits != 2:
            return [t[0] + (t[1] - t[0]) * i / (n_exits - 1) for i in range(n_exits)]
        return list(t)

    def weights(self, n_exits: int) -> list[float]:
        w = self.loss_weights
        return w * n_exits if len(w) == 1 else list(w)


class ScalingConfig(_Section):
    """How many Ray Train workers, and on what (`auto`: GPU when the cluster has one)."""

    workers: Count = 1
    use_gpu: Literal["auto"] | bool = "auto"
    cpus_per_worker: Positive = 2
    sync_bn: bool = False


class TrainConfig(_Section):
    epochs: Count
    batch_size: Count = 64  # per worker
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Positive = 0.1
    momentum: NonNegative = 0.9
    weight_decay: NonNegative = 1e-4
    # onecycle: warm up to lr over the first 30 % of steps, then anneal (short runs)
    schedule: Literal["multistep", "cosine", "onecycle", "constant"] = "multistep"
    milestones: list[Count] = []  # epochs at which multistep multiplies the lr by gamma
    gamma: Positive = 0.1
    augment: Literal["none", "crop-flip", "random-resized-crop"] = "crop-flip"
    amp: bool = True  # bfloat16 autocast when training on CUDA; ignored on CPU
    eval_batch_size: Count = 512  # scoring the held-out split after every epoch
    scaling: ScalingConfig = ScalingConfig()


class CalibrateConfig(_Section):
    # Target average FLOPs per test image; calibrate finds thresholds meeting each on validation.
    budgets: list[Positive] = []


class EvaluateConfig(_Section):
    batch_size: Count = 512
    timing_repeats: Count = 5  # early-exit wall times: median of this many interleaved runs


class TrackingConfig(_Section):
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite in the project root
    experiment: str = "boostpipe"


class SearchRange(_Section):
    """A range [low, high] to sample from; `log` samples log-uniformly."""

    low: NonNegative
    high: NonNegative
    log: bool = False

    @model_validator(mode="after")
    def _check_order(self) -> SearchRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low == 0:
            raise ValueError("a log range must start above 0")
        return self


class TemperatureRange(SearchRange):
    # shared: one t for every exit; pair: [first, last], spaced linearly; exit: one per exit
    per: Literal["shared", "pair", "exit"] = "shared"


class SearchSpace(_Section):
    """What `boostpipe tune` samples; null leaves the params.yaml value in place."""

    temperature: TemperatureRange | None = TemperatureRange(low=0.0, high=1.0)
    loss_weights: SearchRange | None = SearchRange(low=0.5, high=2.0, log=True)  # one per exit
    lr: SearchRange | None = None
    grad_rescale: bool = False  # true: also try gradient rescaling on and off


TUNE_METRICS = ("val_budget_auc", "val_mean_top1", "val_final_top1")


class TuneConfig(_Section):
    """Ray Tune search over BoostNet's temperatures and loss weights (`boostpipe tune`).

    Trials train on `train_subset` images for `epochs` epochs and are scored on the held-out
    split (never the test split) after every epoch, so ASHA can stop weak ones early.
    """

    trials: Count = 64
    search: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: Count = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: Annotated[float, Field(strict=True, gt=1)] = 3
    metric: Literal[TUNE_METRICS] = "val_budget_auc"
    epochs: Count = 3
    train_subset: Count | None = 4000
    val_subset: Count | None = 2000
    max_concurrent: Count = 2
    cpus_per_trial: Positive = 1
    gpus_per_trial: NonNegative = 0  # fractions share a GPU between trials
    workers_per_trial: Count = 1  # >1: every trial is a Ray Train job with this many workers
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    space: SearchSpace = SearchSpace()

    @model_validator(mode="after")
    def _check_schedule(self) -> TuneConfig:
        if self.scheduler == "asha" and self.grace_period > self.epochs:
            raise _KeyError(
                "tune.grace_period", f"is {self.grace_period} but trials run {self.epochs} epochs"
            )
        return self


class Params(_Section):
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    data: DataConfig = DataConfig()
    model: ModelConfig
    boost: BoostConfig = BoostConfig()
    train: TrainConfig
    calibrate: CalibrateConfig = CalibrateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Params:
        n = self.model.n_exits
        spec = self.data.spec
        if len(self.boost.temperature) not in (1, 2, n):
            raise _KeyError(
                "boost.temperature",
                f"has {len(self.boost.temperature)} values; give 1, a [first, last] pair, "
                f"or one per exit ({n})",
            )
        if len(self.boost.loss_weights) not in (1, n):
            raise _KeyError(
                "boost.loss_weights",
                f"has {len(self.boost.loss_weights)} values; give 1 or one per exit ({n})",
            )
        if len(self.model.bn_factor) != self.model.n_scales:
            raise _KeyError(
                "model.bn_factor",
                f"has {len(self.model.bn_factor)} values but gr_factor has "
                f"{self.model.n_scales} (one per scale)",
            )
        for key, given, expected in (
            ("model.in_channels", self.model.in_channels, spec.channels),
            ("model.num_classes", self.model.num_classes, spec.num_classes),
        ):
            if given is not None and given != expected:
                raise _KeyError(key, f"is {given} but {self.data.dataset} has {expected}")
        coarsest = _coarsest_resolution(spec, self.model.n_scales)
        if not 5 <= coarsest <= 12:  # two stride-2 convs and a 2x2 pool must leave 1x1
            raise _KeyError(
                "model.gr_factor",
                f"{self.model.n_scales} scales take {spec.image_size}x{spec.image_size} inputs "
                f"to {coarsest}x{coarsest}; the exit heads need 5x5 to 12x12",
            )
        if self.train.schedule == "multistep" and sorted(self.train.milestones) != list(
            self.train.milestones
        ):
            raise _KeyError("train.milestones", "must be in increasing order")
        return self

    @property
    def in_channels(self) -> int:
        return self.model.in_channels or self.data.spec.channels

    @property
    def num_classes(self) -> int:
        return self.model.num_classes or self.data.spec.num_classes


class _KeyError(ValueError):
    """Raised inside validators to report a problem with one dotted key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


def _coarsest_resolution(spec: DatasetSpec, n_scales: int) -> int:
    size = spec.image_size
    if spec.stem == "imagenet":  # 7x7 stride-2 conv, then 3x3 stride-2 max-pool
        size = math.ceil(math.ceil(size / 2) / 2)
    for _ in range(n_scales - 1):
        size = math.ceil(size / 2)
    return size


def _format_error(error: dict[str, Any]) -> str:
    key = ""
    for part in error["loc"]:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    ctx_error = error.get("ctx", {}).get("error")
    if isinstance(ctx_error, _KeyError):
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
        raise ConfigError(f"{source}: {_format_error(exc.errors()[0])}") from None


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
        section, leaf = key.split(".")
        document[section][leaf] = value
    with atomic_path(path) as tmp:
        with tmp.open("w") as out:
            yaml_rt.dump(document, out)
        load_params(tmp)
