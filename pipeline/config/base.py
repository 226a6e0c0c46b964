"""What every params section shares: the error type, number types and the strict base."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class ConfigError(ValueError):
    """A params file that cannot be used; the message is one line naming the file and key."""


def scalar_to_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


NonNegative = Annotated[float, Field(strict=True, ge=0)]
Positive = Annotated[float, Field(strict=True, gt=0)]
Count = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]


def time_budget(value: Any) -> float | str:
    """Milliseconds (a number above 0), or "N%": that share of the last exit's measured cost,
    from above 0 to 100 (a share holds on any machine; a count of ms suits one machine)."""
    share = isinstance(value, str) and value.endswith("%")
    try:
        amount = float(value[:-1]) if share else float(value)
    except (TypeError, ValueError):
        amount = float("nan")
    if isinstance(value, bool) or (isinstance(value, str) and not share):
        amount = float("nan")
    if not (0 < amount <= 100 if share else 0 < amount < math.inf):
        raise ValueError('must be ms above 0, or a share of the last exit\'s cost such as "60%"')
    return f"{amount:g}%" if share else amount


TimeBudget = Annotated[float | str, BeforeValidator(time_budget)]
# A number or a list of numbers; stored as a list so errors point at one element.
NonNegativeList = Annotated[list[NonNegative], BeforeValidator(scalar_to_list), Field(min_length=1)]


class Section(BaseModel):
    # Field docstrings become their descriptions (the docs site's params reference).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class KeyProblem(ValueError):
    """Raised inside validators to report a problem with one dotted key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
