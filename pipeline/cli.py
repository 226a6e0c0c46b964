"""The `boostpipe` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, Params, load_params

PARAMS_OPTION = click.option(
    "--params",
    "params_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="Params file (same schema as params.yaml).",
)


def exits_on_config_error(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad params end the command with one line on stderr and exit code 2, no traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """boostpipe: train, calibrate and evaluate BoostNet early-exit networks."""


@main.command()
@PARAMS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with raw counts.")
@exits_on_config_error
def flops(params_path: Path, as_json: bool) -> None:
    """Cumulative FLOPs (multiply-accumulates) and parameters of every exit."""
    from pipeline.boosting import BoostNet
    from pipeline.flops import count_exit_costs

    params = load_params(params_path)
    backbone = BoostNet.from_params(params).backbone
    spec = params.data.spec
    costs = count_exit_costs(backbone, (params.in_channels, spec.image_size, spec.image_size))
    if as_json:
        click.echo(json.dumps(costs.as_dict()))
        return
    Console().print(_cost_table(params, costs.flops, costs.params))


def _cost_table(params: Params, flops: list[int], n_params: list[int]) -> Table:
    size = params.data.spec.image_size
    table = Table(
        title=f"{params.model.arch} on {params.data.dataset} ({size}x{size}), cumulative per exit"
    )
    table.add_column("exit", justify="right")
    table.add_column("MFLOPs", justify="right")
    table.add_column("added", justify="right")
    table.add_column("params (M)", justify="right")
    previous = 0
    for index, (cost, count) in enumerate(zip(flops, n_params, strict=True), start=1):
        table.add_row(
            str(index), f"{cost / 1e6:.2f}", f"+{(cost - previous) / 1e6:.2f}", f"{count / 1e6:.3f}"
        )
        previous = cost
    return table
