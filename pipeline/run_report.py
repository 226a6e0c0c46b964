"""What `boostpipe runs` and `boostpipe compare` show of the runs in the MLflow store: recent
runs as a table, and several runs' curves side by side, or one run against the paper's
numbers. MLflow is imported when a command runs, never with the command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from pipeline.config import Params

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.tracking.lookup import RunCurves


def store_client(params: Params) -> tuple[MlflowClient, str]:
    """An MLflow client on the project's store, and the id of the configured experiment."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import bound_waits, reach, tracking_uri

    bound_waits("interactive")
    reach(tracking_uri(params))
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        raise click.ClickException(f"no experiment {params.tracking.experiment!r} in the store")
    return MlflowClient(), experiment.experiment_id


def runs_table(params: Params, limit: int) -> Table:
    """The `limit` newest runs: per-exit and per-budget test top-1 and key params."""
    from pipeline.tracking import names
    from pipeline.tracking.lookup import top1_at_budgets

    client, experiment_id = store_client(params)
    found = client.search_runs(
        [experiment_id], max_results=limit, order_by=["attributes.start_time DESC"]
    )
    table = Table(title=f"runs in {params.tracking.experiment}")
    columns = ("run", "name", "started", "boost", "t", "seed", "top-1 per exit", "per budget")
    for column in columns:
        table.add_column(column)
    for run in found:
        by_exit = names.metric_history(client, run.info.run_id, names.EXIT_TOP1)
        exits = " ".join(f"{m.value:.1f}" for m in sorted(by_exit, key=lambda m: m.step))
        budgets = " ".join(f"{v:.1f}" for v in top1_at_budgets(run).values())
        p = run.data.params
        table.add_row(
            run.info.run_id[:8],
            run.info.run_name,
            time.strftime("%m-%d %H:%M", time.localtime(run.info.start_time / 1000)),
            p.get("boost.enabled", ""),
            p.get("boost.temperature", ""),
            p.get("seed", ""),
            exits or "-",
            budgets or "-",
        )
    return table


def show_comparison(params: Params, refs: tuple[str, ...], output: Path, paper: str | None) -> None:
    """The runs `refs` name, side by side: a table of per-exit and per-budget test top-1, one
    PNG of the curves, one of the effective-sample diagnostic; with `paper`, one run against
    the published numbers instead."""
    from pipeline.plots import compare_effective_samples, compare_runs
    from pipeline.tracking.lookup import RunNotFound, curves, find_run

    client, experiment_id = store_client(params)
    try:
        runs = [find_run(client, experiment_id, ref) for ref in refs]
    except RunNotFound as exc:
        raise click.ClickException(str(exc)) from None
    found = [curves(client, run) for run in runs]
    for run in found:
        if not run.exit_top1:
            raise click.ClickException(f"{run.label}: has no evaluation logged (unfinished run?)")
    if paper is not None:
        if len(runs) != 1:
            raise click.ClickException("--paper: give exactly one run")
        _compare_with_paper(runs[0].data.params, found[0], paper, output)
        return
    table = Table(title="test top-1 (%)")
    table.add_column("")
    for run in found:
        table.add_column(run.label, justify="right")
    for index in range(max(len(run.exit_top1) for run in found)):
        cells = [f"{r.exit_top1[index]:.2f}" if index < len(r.exit_top1) else "-" for r in found]
        table.add_row(f"exit {index + 1}", *cells)
    for budget in sorted({b for run in found for b in run.top1_at_budget}):
        cells = [
            f"{r.top1_at_budget[budget]:.2f}" if budget in r.top1_at_budget else "-" for r in found
        ]
        table.add_row(f"budget {budget:g} MFLOPs", *cells)
    Console().print(table)
    compare_runs(output, found)
    click.echo(f"wrote {output}")
    trained = [run for run in found if run.epochs]
    if trained:
        diagnostic = output.with_name(f"{output.stem}-effective-samples{output.suffix}")
        compare_effective_samples(diagnostic, trained)
        click.echo(f"wrote {diagnostic}")


def _compare_with_paper(
    run_params: dict[str, str], run: RunCurves, setting: str, output: Path
) -> None:
    """The run's top-1 beside the published numbers, with differences, and both in one PNG."""
    from pipeline.paper import NoPaperNumbers, compare_rows, guess_setting
    from pipeline.plots import paper_overlay

    try:
        if setting == "auto":
            setting = guess_setting(run_params, len(run.exit_top1))
        boosted = run_params.get("boost.enabled", "True") == "True"
        rows = compare_rows(run, setting, boosted, run_params.get("model.arch", "msdnet"))
    except NoPaperNumbers as exc:
        click.echo(str(exc))
        return
    method = "BoostNet" if boosted else "baseline"
    table = Table(title=f"test top-1 (%): {run.label} vs published {method}, {setting}")
    for column in ("", "MFLOPs", "ours", "paper", "ours - paper"):
        table.add_column(column, justify="left" if not column else "right")
    for row in rows:
        ours = "-" if row.ours is None else f"{row.ours:.2f}"
        diff = "-" if row.difference is None else f"{row.difference:+.2f}"
        table.add_row(row.label, f"{row.mflops:.2f}", ours, f"{row.paper:.2f}", diff)
    Console().print(table)
    paper_overlay(output, run, rows, f"published {method} ({setting})")
    click.echo(f"wrote {output}")
