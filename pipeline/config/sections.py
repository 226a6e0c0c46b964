"""The sections of params.yaml other than the model and the search."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import model_validator

from pipeline.config.base import (
    Count,
    KeyProblem,
    NonNegative,
    NonNegativeInt,
    NonNegativeList,
    Positive,
    Section,
    TimeBudget,
)
from pipeline.datasets import DATASETS, FOLDER_DATASETS, DatasetSpec, folder_spec


class DataConfig(Section):
    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "imagenet", "imagefolder"] = (
        "fashion-mnist"
    )
    """fashion-mnist, cifar10 and cifar100 are decoded into memory by prepare; imagenet and
    imagefolder are read from folders of images."""
    root: str | None = None
    """Where the data is; null: the dataset's usual locations (Debian's Fashion-MNIST, else
    torchvision's download). Folder datasets: the folder holding train/ and val/."""
    val_size: NonNegativeInt = 5000
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
        if self.root and "://" in self.root:
            raise KeyProblem(
                "data.root",
                f"is {self.root}: a URL; data is read from a folder on this machine (copy it "
                "there, or mount the bucket and give the mount's path)",
            )
        if self.dataset in FOLDER_DATASETS:  # data.root is checked by prepare, which reads it
            if self.dataset == "imagefolder" and self.image_size is None:
                raise KeyProblem("data.image_size", "is required for imagefolder")
            if self.resize is not None and self.resize < self.spec.image_size:
                raise KeyProblem(
                    "data.resize",
                    f"is {self.resize}, below data.image_size ({self.spec.image_size})",
                )
            return self
        for key in ("image_size", "resize"):
            if getattr(self, key) is not None:
                raise KeyProblem(f"data.{key}", f"applies to folder datasets, not {self.dataset}")
        if self.skip_bad:
            raise KeyProblem("data.skip_bad", f"applies to folder datasets, not {self.dataset}")
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


class BoostConfig(Section):
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


class ScalingConfig(Section):
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


class TrainConfig(Section):
    epochs: Count
    """Training epochs."""
    batch_size: Count = 64
    """Batch size per worker."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """sgd (with momentum) or adamw."""
    lr: Positive = 0.1
    """Learning rate (the peak, for onecycle)."""
    momentum: NonNegative | None = 0.9
    """SGD momentum (null: none). AdamW has none (its betas stay PyTorch's): leave the key out
    or null with adamw."""
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
    loader_workers: NonNegativeInt | None = None
    """Folder datasets: decoding processes per Ray worker; null: the worker's CPUs minus one."""
    scaling: ScalingConfig = ScalingConfig()

    @model_validator(mode="after")
    def _momentum_is_sgds(self) -> TrainConfig:
        given = "momentum" in self.model_fields_set and self.momentum is not None
        if self.optimizer == "adamw" and given:
            raise KeyProblem(
                "train.momentum",
                f"is {self.momentum}, but adamw has no momentum (its betas stay PyTorch's); "
                "remove the key or set it to null",
            )
        return self


class TimeBudgets(Section):
    """Budgets per image in the regime the profile stage timed: milliseconds, or "N%" of the
    last exit's measured cost (a share holds on any machine; ms are one machine's figures)."""

    batch_1: list[TimeBudget] = []
    """One image at a time: a request-serving deployment's latency."""
    batch_n: list[TimeBudget] = []
    """Full batches of evaluate.batch_size at every exit: throughput."""


class CalibrateConfig(Section):
    # Target average FLOPs per test image; calibrate finds thresholds meeting each on validation.
    budgets: list[Positive] = []
    # Target average milliseconds per test image, against the profile stage's measured costs.
    budgets_ms: TimeBudgets = TimeBudgets()
    # true: calibrate on held-out images with the training augmentation, as the reference does
    # (its held-out loader reads the augmented training set); false: clean images (ours).
    augment: bool = False


class EvaluateConfig(Section):
    batch_size: Count = 512
    timing_repeats: Count = 5  # early-exit wall times: median of this many interleaved runs
    timing_warmup: NonNegativeInt = 1  # untimed rounds first
    # profile, calibrate and evaluate (scores and the early-exit timing): auto takes CUDA when
    # present
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch threads for profile, evaluate and predict (None: torch's default, the CPU count);
    # a time budget holds only at the thread count its profile was measured with
    threads: Count | None = None
    batch1_images: Count = 500  # batch-1 budgets: a seeded sample of the test split, timed
    # one image at a time


class ProfileConfig(Section):
    repeats: Count = 5  # interleaved timing rounds per exit and regime; medians
    warmup: NonNegativeInt = 1  # untimed rounds first
    images: Count | None = 2048  # batch-N: held-out images timed per round (None: all)
    batch1_images: Count = 200  # batch 1: held-out images timed one at a time per round


class TrackingConfig(Section):
    uri: str | None = None
    """The MLflow store; null: MLFLOW_TRACKING_URI, else SQLite in the project root."""
    experiment: str = "boostpipe"
    """The MLflow experiment the runs go to."""
    registered_model: str | None = None
    """A registered-model name: evaluate registers the model it evaluated under it, with the
    alias `evaluated`; null: no registry entry."""
    catch_up_s: NonNegative = 60.0
    """How long evaluate, the last stage, waits for a store that stopped answering to take the
    records kept in .boostpipe/outbox; after that `boostpipe sync` sends them."""


SECRET_OPTIONS = ("access_key", "secret_key", "session_token")


class RayConfig(Section):
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
                raise KeyProblem(
                    f"ray.storage_options.{name}",
                    "credentials stay out of params: set AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) in the environment",
                )
        return self
