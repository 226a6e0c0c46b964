"""Which torch device a stage or a Tune trial computes on, and how runs name it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.config import ConfigError


def trial_device(gpu_ids: Sequence[object]) -> torch.device:
    """The device of an in-process Tune trial, given `ray.get_gpu_ids()`: Ray sets the trial's
    CUDA_VISIBLE_DEVICES to the GPU it reserved (a fraction of one included), so that GPU is
    cuda:0 there; without a reservation the trial stays on the CPU."""
    return torch.device("cuda", 0) if gpu_ids else torch.device("cpu")


DEVICES = ("auto", "cpu", "cuda")


def stage_device(choice: str, key: str = "evaluate.device") -> torch.device:
    """`evaluate.device` for calibrate and evaluate (or the option `key`): auto takes CUDA when
    torch sees it; anything else, or cuda where there is none, is refused naming `key`."""
    if choice not in DEVICES:
        raise ConfigError(f"{key}: is {choice}; choose one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise ConfigError(f"{key}: is cuda, but torch sees no CUDA device on this machine")
    if choice == "cpu" or not available:
        return torch.device("cpu")
    return torch.device("cuda")


def describe_platform(device: torch.device) -> dict[str, str]:
    """What a run's numbers depend on besides its seed and params: results repeat exactly only
    on the same device (the GPU, or the CPU's vector instructions: AVX2 and AVX-512 round
    differently), thread count and library versions."""
    import platform

    import numpy

    described = {
        "device": describe_device(device),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        described["cuda"] = torch.version.cuda
    # Plain str only: it travels in checkpoints, which load with weights_only=True (torch's
    # version is a str subclass that such a load refuses).
    return {key: str(value) for key, value in described.items()}


def describe_device(device: torch.device) -> str:
    """What runs record as their device: cpu, or cuda and the GPU's name."""
    if device.type != "cuda":
        return device.type
    return f"cuda ({torch.cuda.get_device_name(device)})"
