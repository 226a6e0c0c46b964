"""params.yaml -> one validated, typed `Params` object.

Every section rejects unknown keys, every number is range-checked, and cross-field rules (list
lengths against the number of exits, the dataset's shape against the model) are checked here, so
the rest of the library can trust what it is given. Failures raise `ConfigError` with a single
line: ``<file>: <key>: <problem>``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeline.datasets import DATASETS, FOLDER_DATASETS, DatasetSpec, folder_spec


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
    # Field docstrings become their descriptions (the docs site's params reference).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataConfig(_Section):
    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "imagenet", "imagefolder"] = (
        "fashion-mnist"
    )
    """fashion-mnist, cifar10 and cifar100 are decoded into memory by prepare; imagenet and
    imagefolder are read from folders of images."""
    root: str | None = None
    """Where the data is; null: the dataset's usual locations (Debian's Fashion-MNIST, else
    torchvision's download). Folder datasets: the folder holding train/ and val/."""
    val_size: Annotated[int, Field(strict=True, ge=0)] = 5000
    """Images held out of the training split for selection and calibration; 0 trains on every
    image (the paper's anytime setting), leaving nothing to select or calibrate on."""
    train_subset: Count | None = None
    """Quick runs: train on this many images only; null: all of them."""
    test_subset: Count | None = None
    """Quick runs: evaluate on this many test images only; null: all of them."""
    image_size: Count | None = None
    """Folder datasets: the training crop and the evaluation side (required for imagefolder)."""
    resize: Count | None = None
    """Folder datasets: evaluation resize of the shorter side before the centre crop; null:
    image_size * 8/7."""
    skip_bad: bool = False
    """Folder datasets: true skips unreadable images and counts them; false stops at the first."""

    @model_validator(mode="after")
    def _check_folder_keys(self) -> DataConfig:
        if self.dataset in FOLDER_DATASETS:  # data.root is checked by prepare, which reads it
            if self.dataset == "imagefolder" and self.image_size is None:
                raise _KeyError("data.image_size", "is required for imagefolder")
            if self.resize is not None and self.resize < self.spec.image_size:
                raise _KeyError(
                    "data.resize",
                    f"is {self.resize}, below data.image_size ({self.spec.image_size})",
                )
            return self
        for key in ("image_size", "resize"):
            if getattr(self, key) is not None:
                raise _KeyError(f"data.{key}", f"applies to folder datasets, not {self.dataset}")
        if self.skip_bad:
            raise _KeyError("data.skip_bad", f"applies to folder datasets, not {self.dataset}")
        return self

    @property
    def is_folder(self) -> bool:
        return self.dataset in FOLDER_DATASETS

    @property
    def spec(self) -> DatasetSpec:
        if self.dataset == "imagefolder":
            return folder_spec(self.image_size, None)
        spec = DATASETS[self.dataset]
        if self.image_size is not None:
            return dataclasses.replace(spec, image_size=self.image_size)
        return spec

    @property
    def eval_resize(self) -> int:
        """Evaluation resizes the shorter side to this, then centre-crops image_size (8/7:
        256 for 224, as in the ImageNet reference recipe)."""
        return self.resize or round(self.spec.image_size * 8 / 7)


class MSDNetConfig(_Section):
    """MSDNet hyper-parameters, named after Huang et al. (2018) in snake_case."""

    arch: Literal["msdnet"] = "msdnet"
    """The backbone; each architecture takes its own keys."""
    n_blocks: Count
    """Blocks, each followed by an exit."""
    base: Count
    """Layers in the first block."""
    step: Count
    """Layers per later block (even), or the increment per block (lin_grow)."""
    step_mode: Literal["even", "lin_grow"] = "even"
    """How block depth grows: even (the same for every later block) or lin_grow (linearly)."""
    n_channels: Count
    """Stem width at the finest scale (times gr_factor at the others)."""
    growth_rate: Count
    """Channels each layer adds at the finest scale (times gr_factor at the others)."""
    gr_factor: list[Count] = Field(min_length=1)
    """Width multiplier per scale, finest first; its length is the number of scales."""
    bn_factor: list[Count] = Field(min_length=1)
    """Bottleneck width multiplier per scale (as many as gr_factor)."""
    bottleneck: bool = True
    """1x1 bottleneck convolutions before the 3x3 ones."""
    prune: Literal["max", "min"] = "max"
    """How finer scales are dropped as depth grows (max: the paper's choice)."""
    reduction: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.5
    """Channel compression of the transition layers."""
    in_channels: Count | None = None
    """Input channels; null: from the dataset (must match it when given)."""
    num_classes: Count | None = None
    """Classes; null: from the dataset (imagefolder: counted by prepare)."""
    head_channels: Count | None = None
    """Width of the exit heads; null: 128, or the input width with the ImageNet stem."""
    first_head_channels: Count | None = None
    """Width of exit 1's head only; null: head_channels. A narrow one makes a cheap, weak exit 1."""
    init: Literal["he", "torch-default"] = "he"
    """he: He (fan-out) convolutions, unit batch-norm, zero biases; torch-default: PyTorch's own
    layer defaults, which is what the reference implementation effectively runs (its init loop
    reaches no convolution)."""

    @property
    def n_exits(self) -> int:
        return self.n_blocks

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)

    def check_shapes(self, spec: DatasetSpec) -> None:
        """List lengths that must agree, and scales the dataset's images can support."""
        if len(self.bn_factor) != self.n_scales:
            raise _KeyError(
                "model.bn_factor",
                f"has {len(self.bn_factor)} values but gr_factor has "
                f"{self.n_scales} (one per scale)",
            )
        _check_coarsest(spec, self.n_scales, "model.gr_factor")


class RANetConfig(_Section):
    """RANet hyper-parameters (Yang et al., 2020), named after the reference's flags in snake_case.

    One entry of `scale_list`, `gr_factor` and `bn_factor` per sub-network, coarsest first;
    `n_blocks` exits per sub-network.
    """

    arch: Literal["ranet"]
    """The backbone; each architecture takes its own keys."""
    n_blocks: Count
    """Exits per sub-network."""
    step: Count
    """Layers per dense block (even), or the increment per block (lin_grow)."""
    step_mode: Literal["even", "lin_grow"] = "even"
    """How dense-block depth grows: even or lin_grow (step * b for the b-th block)."""
    n_channels: Count
    """Base width (times gr_factor per sub-network)."""
    growth_rate: Count
    """Channels each layer adds (times gr_factor per sub-network)."""
    scale_list: list[Count] = Field(min_length=1)
    """Resolution of each sub-network, coarsest (1) first; starts at 1, rises by 0 or 1."""
    gr_factor: list[Count] = Field(min_length=1)
    """Width multiplier per sub-network."""
    bn_factor: list[Count] = Field(min_length=1)
    """Bottleneck width multiplier per sub-network."""
    compress_factor: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.25
    """Share of a fused layer's new features computed from the coarser sub-network."""
    bn_after: bool = True
    """Bottleneck as conv-BN-ReLU (true, what the reference builds) or BN-ReLU-conv."""
    reduction: Annotated[float, Field(strict=True, gt=0, le=1)] = 0.5
    """Channel compression of the transition layers."""
    in_channels: Count | None = None
    """Input channels; null: from the dataset (must match it when given)."""
    num_classes: Count | None = None
    """Classes; null: from the dataset (imagefolder: counted by prepare)."""
    head_channels: Count | None = None
    """Width of the exit heads; null: 128."""

    @property
    def n_exits(self) -> int:
        return self.n_blocks * len(self.scale_list)

    def check_shapes(self, spec: DatasetSpec) -> None:
        for key in ("gr_factor", "bn_factor"):
            if len(getattr(self, key)) != len(self.scale_list):
                raise _KeyError(
                    f"model.{key}",
                    f"has {len(getattr(self, key))} values but scale_list has "
                    f"{len(self.scale_list)} (one per sub-network)",
                )
        scales = self.scale_list
        if scales[0] != 1 or any(b - a not in (0, 1) for a, b in itertools.pairwise(scales)):
            raise _KeyError(
                "model.scale_list",
                f"is {scales}; it must start at 1 and rise by 0 or 1 per sub-network",
            )
        if 1 in scales[1:]:
            raise _KeyError(
                "model.scale_list", "only the first sub-network may run at scale 1 (the coarsest)"
            )
        _check_coarsest(spec, max(scales), "model.scale_list")


ModelConfig = Annotated[MSDNetConfig | RANetConfig, Field(discriminator="arch")]
ARCHS = ("msdnet", "ranet")


def _default_arch(raw: Any) -> Any:
    """`arch` may be left out for MSDNet, as before RANet existed."""
    return {"arch": "msdnet", **raw} if isinstance(raw, dict) else raw


class BoostConfig(_Section):
    """BoostNet (Yu et al., AAAI 2023); enabled=false trains the joint-loss baseline."""

    enabled: bool = True
    """false trains the joint-loss baseline, each exit on its own logits."""
    temperature: NonNegativeList = [0.5]
    """t_n, the weight of the earlier ensemble in exit n's: one value, a [first, last] pair
    (spaced linearly), or one per exit."""
    loss_weights: NonNegativeList = [1.0]
    """w_n, each exit's weight in the loss: one value or one per exit."""
    grad_rescale: bool = True
    """IMTA's gradient equilibrium on the coarsest-scale feature (MSDNet only)."""

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

    workers: Literal["auto"] | Count = "auto"
    """Ray Train workers; auto: one per GPU, else two 1-CPU workers. A count the cluster cannot
    hold fails before training."""
    use_gpu: Literal["auto"] | bool = "auto"
    """Train on GPUs; auto: when the cluster has them."""
    cpus_per_worker: Positive = 2
    """CPUs each worker reserves."""
    sync_bn: bool = False
    """Synchronised batch-norm across workers."""


class TrainConfig(_Section):
    epochs: Count
    """Training epochs."""
    batch_size: Count = 64
    """Batch size per worker."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """sgd (with momentum) or adamw."""
    lr: Positive = 0.1
    """Learning rate (the peak, for onecycle)."""
    momentum: NonNegative = 0.9
    """SGD momentum."""
    weight_decay: NonNegative = 1e-4
    """Weight decay, one value for every parameter."""
    schedule: Literal["multistep", "cosine", "onecycle", "constant"] = "multistep"
    """Learning-rate schedule, stepped per batch; onecycle warms up to lr over the first 30 % of
    steps, then anneals (short runs)."""
    milestones: list[Count] = []
    """Epochs at which multistep multiplies the learning rate by gamma, increasing."""
    gamma: Positive = 0.1
    """multistep's factor at each milestone."""
    augment: Literal["none", "crop-flip", "random-resized-crop"] = "crop-flip"
    """Training augmentation: crop-flip pads, crops and flips whole batches; random-resized-crop
    is the ImageNet recipe (folder datasets)."""
    amp: bool = False
    """bfloat16 autocast when training on CUDA (ignored on CPU). It pays for large models only:
    on CIFAR-sized ones the extra cast kernels cost more than the narrower arithmetic saves."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the training step: true, false, or auto (on CUDA, and on CPU for runs of 20
    epochs or more, where the minutes of compilation pay for themselves)."""
    select: Literal["last", "best"] = "best"
    """Which epoch's weights the run keeps: the last, or the best on the held-out split."""
    select_metric: Literal["mean", "last-exit"] = "mean"
    """What best means: mean top-1 over exits, or the last exit's top-1 (the reference's)."""
    eval_batch_size: Count = 512
    """Batch size when scoring the held-out split after every epoch."""
    loader_workers: Annotated[int, Field(strict=True, ge=0)] | None = None
    """Folder datasets: decoding processes per Ray worker; null: the worker's CPUs minus one."""
    scaling: ScalingConfig = ScalingConfig()


class TimeBudgets(_Section):
    """Budgets in milliseconds per image, each in the regime the profile stage timed."""

    batch_1: list[Positive] = []  # one image at a time: a request-serving deployment's latency
    batch_n: list[Positive] = []  # full batches of evaluate.batch_size at every exit: throughput


class CalibrateConfig(_Section):
    # Target average FLOPs per test image; calibrate finds thresholds meeting each on validation.
    budgets: list[Positive] = []
    # Target average milliseconds per test image, against the profile stage's measured costs.
    budgets_ms: TimeBudgets = TimeBudgets()
    # true: calibrate on held-out images with the training augmentation, as the reference does
    # (its held-out loader reads the augmented training set); false: clean images (ours).
    augment: bool = False


class EvaluateConfig(_Section):
    batch_size: Count = 512
    timing_repeats: Count = 5  # early-exit wall times: median of this many interleaved runs
    # profile, calibrate and evaluate (scores and the early-exit timing): auto takes CUDA when
    # present
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch threads for profile, evaluate and predict (None: torch's default, the CPU count);
    # a time budget holds only at the thread count its profile was measured with
    threads: Count | None = None
    batch1_images: Count = 500  # batch-1 budgets: a seeded sample of the test split, timed
    # one image at a time


class ProfileConfig(_Section):
    repeats: Count = 5  # interleaved timing rounds per exit and regime; medians
    warmup: Annotated[int, Field(strict=True, ge=0)] = 1  # untimed rounds first
    images: Count | None = 2048  # batch-N: held-out images timed per round (None: all)
    batch1_images: Count = 200  # batch 1: held-out images timed one at a time per round


class TrackingConfig(_Section):
    uri: str | None = None
    """The MLflow store; null: MLFLOW_TRACKING_URI, else SQLite in the project root."""
    experiment: str = "boostpipe"
    """The MLflow experiment the runs go to."""
    registered_model: str | None = None
    """A registered-model name: evaluate registers the model it evaluated under it, with the
    alias `evaluated`; null: no registry entry."""


SECRET_OPTIONS = ("access_key", "secret_key", "session_token")


class RayConfig(_Section):
    """Where Ray keeps checkpoints and search state (pipeline/storage.py); how it runs, not
    what it learns, so no stage's results depend on it."""

    storage: str | None = None
    """null: a folder in the project (one machine). On a cluster: a mount every node shares, or
    object storage such as s3://bucket/prefix. BOOSTPIPE_STORAGE overrides it."""
    storage_options: dict[str, str | float | int | bool] = {}
    """pyarrow.fs.S3FileSystem options (endpoint_override, region, scheme, ...); credentials come
    from the standard AWS environment variables, never from params."""

    @model_validator(mode="after")
    def _no_secrets(self) -> RayConfig:
        for name in SECRET_OPTIONS:
            if name in self.storage_options:
                raise _KeyError(
                    f"ray.storage_options.{name}",
                    "credentials stay out of params: set AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) in the environment",
                )
        return self


class SearchRange(_Section):
    """A range [low, high] to sample from; `log` samples log-uniformly."""

    low: NonNegative
    """Lower end."""
    high: NonNegative
    """Upper end (above low)."""
    log: bool = False
    """Sample log-uniformly (low above 0)."""

    @model_validator(mode="after")
    def _check_order(self) -> SearchRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low == 0:
            raise ValueError("a log range must start above 0")
        return self


class TemperatureRange(SearchRange):
    per: Literal["shared", "pair", "exit"] = "shared"
    """shared: one t for every exit; pair: [first, last], spaced linearly; exit: one per exit."""


class SearchSpace(_Section):
    """What `boostpipe tune` samples; null leaves the params.yaml value in place."""

    temperature: TemperatureRange | None = TemperatureRange(low=0.0, high=1.0)
    """Range of boost.temperature; null keeps the params file's value."""
    loss_weights: SearchRange | None = SearchRange(low=0.5, high=2.0, log=True)
    """Range of boost.loss_weights, one weight sampled per exit; null keeps the file's value."""
    lr: SearchRange | None = None
    """Range of train.lr; null keeps the params file's value."""
    grad_rescale: bool = False
    """true: also try gradient rescaling on and off."""


class ConfirmConfig(_Section):
    """After the search, the best `top_k` configurations and the params file's values are
    retrained with `seeds` fresh seeds each (the trials' budget), so the winner is judged on a
    mean over seeds, not on one lucky draw. top_k 0: no confirmation."""

    top_k: Annotated[int, Field(strict=True, ge=0)] = 2
    """How many of the best trials are retrained; 0: no confirmation."""
    seeds: Annotated[int, Field(strict=True, ge=2)] = 3
    """Fresh seeds per configuration; two at least, for a paired interval."""


TUNE_METRICS = ("val_budget_auc", "val_mean_top1", "val_final_top1")


class TuneConfig(_Section):
    """Ray Tune search over BoostNet's temperatures and loss weights (`boostpipe tune`).

    Trials train on `train_subset` images for `epochs` epochs and are scored on the held-out
    split (never the test split) after every epoch, so ASHA can stop weak ones early.
    """

    trials: Count = 64
    """Trials; the params file's own values are the first."""
    search: Literal["random", "optuna"] = "random"
    """random sampling, or optuna (TPE)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha stops weak trials early; fifo runs every trial to the end."""
    grace_period: Count = 1
    """ASHA: epochs before a trial can be stopped."""
    reduction_factor: Annotated[float, Field(strict=True, gt=1)] = 3
    """ASHA: 1/reduction_factor of the trials go on at each rung."""
    metric: Literal[TUNE_METRICS] = "val_budget_auc"
    """The objective, on the held-out split: val_budget_auc is the mean best top-1 over budgets
    from exit 1's cost to the last exit's."""
    epochs: Count = 3
    """Epochs per trial."""
    train_subset: Count | None = 2500
    """Training images per trial; null: all."""
    val_subset: Count | None = 1500
    """Held-out images a trial is scored on after each epoch; null: all."""
    max_concurrent: Count = 2
    """Trials running at once."""
    cpus_per_trial: Positive = 1
    """CPUs each trial reserves."""
    gpus_per_trial: NonNegative = 0
    """GPUs each trial reserves; fractions share a GPU between trials."""
    workers_per_trial: Count = 1
    """Above 1: every trial is a Ray Train DDP job with this many workers."""
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    """The trials' seed; confirmation uses the next ones."""
    space: SearchSpace = SearchSpace()
    """What the search samples."""
    confirm: ConfirmConfig = ConfirmConfig()
    """Retraining the best over fresh seeds after the search."""

    @model_validator(mode="after")
    def _check_schedule(self) -> TuneConfig:
        if self.scheduler == "asha" and self.grace_period > self.epochs:
            raise _KeyError(
                "tune.grace_period", f"is {self.grace_period} but trials run {self.epochs} epochs"
            )
        return self


class Params(_Section):
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    """Seeds the held-out split, data order, augmentation and initialisation."""
    data: DataConfig = DataConfig()
    model: Annotated[ModelConfig, BeforeValidator(_default_arch)]
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
        self.model.check_shapes(spec)
        if self.model.arch == "ranet" and self.boost.grad_rescale:
            raise _KeyError(
                "boost.grad_rescale",
                "must be false with model.arch: ranet (gradient rescaling is defined for "
                "MSDNet's single coarsest-scale path; the reference trains RANet without it)",
            )
        if self.model.arch == "ranet" and self.tune.space.grad_rescale:
            raise _KeyError("tune.space.grad_rescale", "must be false with model.arch: ranet")
        for key, given, expected in (
            ("model.in_channels", self.model.in_channels, spec.channels),
            ("model.num_classes", self.model.num_classes, spec.num_classes),
        ):
            if given is not None and expected is not None and given != expected:
                raise _KeyError(key, f"is {given} but {self.data.dataset} has {expected}")
        if self.train.augment == "random-resized-crop" and not self.data.is_folder:
            raise _KeyError(
                "train.augment",
                f"random-resized-crop needs a folder dataset, not {self.data.dataset}",
            )
        if self.train.schedule == "multistep" and sorted(self.train.milestones) != list(
            self.train.milestones
        ):
            raise _KeyError("train.milestones", "must be in increasing order")
        if self.data.val_size == 0 and self.train.select == "best":
            raise _KeyError(
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


class _KeyError(ValueError):
    """Raised inside validators to report a problem with one dotted key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


def _check_coarsest(spec: DatasetSpec, n_scales: int, key: str) -> None:
    coarsest = _coarsest_resolution(spec, n_scales)
    if not 5 <= coarsest <= 12:  # two stride-2 convs and a 2x2 pool must leave 1x1
        raise _KeyError(
            key,
            f"{n_scales} scales take {spec.image_size}x{spec.image_size} inputs "
            f"to {coarsest}x{coarsest}; the exit heads need 5x5 to 12x12",
        )


def _coarsest_resolution(spec: DatasetSpec, n_scales: int) -> int:
    size = spec.image_size
    if spec.stem == "imagenet":  # 7x7 stride-2 conv, then 3x3 stride-2 max-pool
        size = math.ceil(math.ceil(size / 2) / 2)
    for _ in range(n_scales - 1):
        size = math.ceil(size / 2)
    return size


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
