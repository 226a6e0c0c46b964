"""Parametrised cases whose cost differs: the costly ones carry the `slow` mark (see conftest)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _name(value: Any) -> str:
    return value.stem if isinstance(value, Path) else str(value)


def slow_cases(values: list[Any], slow: Callable[[Any], bool], name: Callable = _name) -> list:
    """Parameters for `parametrize`, named by `name` (a file by its stem), the cases `slow`
    picks marked slow."""
    return [
        pytest.param(value, id=name(value), marks=[pytest.mark.slow] * slow(value))
        for value in values
    ]


def is_imagenet(value: Any) -> bool:
    """ImageNet-sized configurations cost seconds each on a CPU: slow cases."""
    return "imagenet" in str(value)
