"""The `boostpipe` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, Params, load_params
from pipeline.entry import exits_on_config_error
from pipeline.rayenv import prepare_ray
from pipeline.verbosity import VERBOSE_ENV, quiet_driver

if TYPE_CHECKING:
    from pipeline.predict import Outcome

OptionValue = str | int | float  # a `tune` option given on the command line

PARAMS_OPTION = click.option(
    "--params",
    "params_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="Params file (same schema as params.yaml).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="boostpipe", message="boostpipe %(version)s")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help=f"Libraries' own lines (Ray, MLflow) and tracebacks on the console ({VERBOSE_ENV}=1).",
)
def main(verbose: bool) -> None:
    """boostpipe: train, calibrate and evaluate BoostNet early-exit networks."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # for this process and the Ray workers it starts
    prepare_ray()  # before a command imports ray
    quiet_driver()


@main.command()
@PARAMS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with raw counts.")
@exits_on_config_error
def flops(params_path: Path, as_json: bool) -> None:
    """Cumulative FLOPs (multiply-accumulates) and parameters of every exit."""
    from pipeline import paths
    from pipeline.boosting import BoostNet
    from pipeline.flops import count_exit_costs
    from pipeline.io import read_json

    params = load_params(params_path)
    if params.data.is_folder and paths.DATASET_INFO.exists():  # the class count prepare found
        params = params.with_dataset(read_json(paths.DATASET_INFO))
    backbone = BoostNet.from_params(params).backbone
    costs = count_exit_costs(backbone, params.input_shape)
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


def _store(params_path: Path) -> str:
    from pipeline.tracking import tracking_uri

    return tracking_uri(load_params(params_path))


@main.command()
@PARAMS_OPTION
@click.option("--port", default=5000, show_default=True)
@exits_on_config_error
def ui(params_path: Path, port: int) -> None:
    """The MLflow UI for the project's store, on 127.0.0.1 with one worker; Ctrl-C stops it.
    A store that is already a tracking server serves its own UI: its address is printed."""
    from pipeline.mlflow_ui import serve
    from pipeline.tracking import connect, reach

    uri = _store(params_path)
    if uri.startswith(("http://", "https://")):
        reach(uri)  # one line within seconds when it does not answer
        click.echo(f"the tracking store is a server with its own UI: {uri}")
        return
    serve(uri, port, lambda: connect(load_params(params_path)))


@main.command()
@PARAMS_OPTION
@click.option("--limit", default=20, show_default=True)
@exits_on_config_error
def runs(params_path: Path, limit: int) -> None:
    """Recent runs: per-exit and per-budget test top-1 and key params."""
    from pipeline.run_report import runs_table

    Console().print(runs_table(load_params(params_path), limit))


@main.command()
@exits_on_config_error
def sync() -> None:
    """Send the MLflow records the stages kept in .boostpipe/outbox while the store did not
    answer (each to the store it was meant for), oldest first."""
    from pipeline import paths
    from pipeline.errors import TrackingUnavailable, describe_failure
    from pipeline.tracking import send_kept
    from pipeline.tracking.outbox import kept

    try:
        sent = send_kept()
    except Exception as exc:
        raise TrackingUnavailable(
            f"{describe_failure(exc)}; {len(kept())} record(s) still kept in {paths.OUTBOX}"
        ) from None
    click.echo(f"sent {sent} kept record(s)" if sent else f"nothing kept in {paths.OUTBOX}")


@main.command()
@click.argument("refs", nargs=-1, required=True)
@PARAMS_OPTION
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default="compare.png",
    show_default=True,
    help="PNG with every run's exit-accuracy and budget curves; the effective-sample "
    "diagnostic of every run, side by side, goes next to it (<name>-effective-samples.png).",
)
@click.option(
    "--paper",
    metavar="SETTING",
    help="Compare one run with the published numbers of SETTING (e.g. cifar100-msdnet-anytime), "
    "or `auto`: the setting matching the run's dataset, architecture and exits.",
)
@exits_on_config_error
def compare(refs: tuple[str, ...], params_path: Path, output: Path, paper: str | None) -> None:
    """Per-exit and per-budget test top-1 of several runs: a table, one PNG of the curves, and
    one of the effective-sample diagnostic (paper Fig. 3) per run side by side.

    REFS are MLflow run ids or prefixes (as `boostpipe runs` prints), run names, or DVC
    experiments / git revisions / `workspace` (the run their train stage logged), e.g.
    `boostpipe compare workspace baseline-seed0`.
    """
    from pipeline.run_report import show_comparison

    show_comparison(load_params(params_path), refs, output, paper)


def _tune_params(params_path: Path, options: dict[str, OptionValue]) -> Params:
    """params.yaml's `tune` section with the command-line options on top. A bad value from an
    option is reported under the option's name (`--trials: ...`), one from the file under its
    key."""
    import yaml

    from pipeline.config import parse_params

    load_params(params_path)
    raw = yaml.safe_load(params_path.read_text())
    section = raw.setdefault("tune", {})
    for key, value in options.items():
        group, _, leaf = key.rpartition(".")
        (section.setdefault(group, {}) if group else section)[leaf] = value
    try:
        return parse_params(raw, str(params_path))
    except ConfigError as exc:
        for key in options:
            prefix = f"{params_path}: tune.{key}:"
            if str(exc).startswith(prefix):
                option = TUNE_OPTION_NAMES.get(key) or "--" + key.replace("_", "-")
                raise ConfigError(f"{option}:{str(exc)[len(prefix) :]}") from None
        raise


TUNE_OPTION_NAMES = {"confirm.top_k": "--confirm"}
STUDY_VARIANT_HELP = (
    "NAME or NAME=key=value[,key=value], repeated; the first is the reference (default: boostnet,"
    " and baseline with boost.enabled=false)."
)  # keys whose option is not named after them


@main.command()
@PARAMS_OPTION
@click.option("--trials", type=int, help="Number of trials (default: tune.trials).")
@click.option("--search", help="random or optuna (TPE).")
@click.option("--scheduler", help="asha (stops weak trials early) or fifo.")
@click.option("--metric", help="val_budget_auc, val_mean_top1 or val_final_top1.")
@click.option("--max-concurrent", type=int, help="Trials at once.")
@click.option("--cpus-per-trial", type=float)
@click.option("--gpus-per-trial", type=float, help="Fractions share a GPU.")
@click.option("--workers-per-trial", type=int, help=">1: each trial is a Ray Train DDP job.")
@click.option("--address", help="An existing Ray cluster (default: $RAY_ADDRESS, else local).")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted search these params name, else the latest interrupted one.",
)
@click.option(
    "--confirm",
    "confirm_top_k",
    type=int,
    help="Retrain the best K and the params file's values over fresh seeds (tune.confirm.top_k).",
)
@click.option("--no-confirm", is_flag=True, help="No confirmation (--confirm 0).")
@click.option(
    "--apply",
    is_flag=True,
    help="Write the confirmed best into the params file if its gain's 95% interval is above 0.",
)
@click.option("--force", is_flag=True, help="With --apply: write the best values regardless.")
@exits_on_config_error
def tune(
    params_path: Path,
    address: str | None,
    resume: bool,
    apply: bool,
    force: bool,
    confirm_top_k: int | None,
    no_confirm: bool,
    **options: OptionValue | None,
) -> None:
    """Search temperatures and loss weights with Ray Tune; every trial in MLflow.

    The search space, budget and scheduler come from the `tune` section of the params file;
    options override them. Trials are scored on the held-out validation split.
    """
    from pipeline import paths
    from pipeline.confirmation import apply_confirmed
    from pipeline.io import read_json
    from pipeline.search import run_search
    from pipeline.tracking import bound_waits
    from pipeline.tune_report import (
        confirmation_table,
        confirmed_gain,
        exp_run_line,
        ranked_table,
        trial_counts,
    )
    from pipeline.tuning import SearchFinished, SearchInterrupted, SearchNotFound

    if force and not apply:
        raise ConfigError("--force: only with --apply")
    given = {k: v for k, v in options.items() if v is not None}
    if no_confirm or confirm_top_k is not None:
        given["confirm.top_k"] = 0 if no_confirm else confirm_top_k
    params = _tune_params(params_path, given)
    if not paths.PREPARED.exists() or not paths.DATASET_INFO.exists():
        raise click.ClickException(f"{paths.PREPARED}: missing; run `dvc repro prepare` first")
    if address:
        os.environ["RAY_ADDRESS"] = address
    dataset = read_json(paths.DATASET_INFO)
    params = params.with_dataset(dataset)  # a folder's class count, as the tune stage applies it
    bound_waits("interactive")
    try:
        outcome = run_search(params, paths.PREPARED, dataset, paths.TUNE_STORAGE, resume)
    except SearchNotFound as exc:
        raise click.ClickException(str(exc)) from None
    except SearchFinished as exc:
        click.echo(str(exc))
        return
    except SearchInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(130)
    console = Console()
    console.print(ranked_table(outcome))
    console.print(trial_counts(outcome))
    best, default = outcome.best, outcome.default
    if best is None:
        raise click.ClickException("no trial finished; see the failed trials' runs in MLflow")
    if default is not None and default.score is not None:
        console.print(
            f"best trial {outcome.metric} {best.score:.2f} vs {default.score:.2f} with the params "
            f"file's values ({best.score - default.score:+.2f}, one seed each)"
        )
    if outcome.confirmation is not None:
        console.print(confirmation_table(outcome.confirmation, outcome.metric))
        console.print(confirmed_gain(outcome.confirmation, outcome.metric))
    if outcome.chosen:
        console.print(exp_run_line(outcome.chosen))
    if apply:
        console.print(apply_confirmed(params_path, outcome, force))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--budget", type=float, help="Average FLOPs per image (calibrated thresholds).")
@click.option("--budget-ms", help='Average ms per image as profiled, or "N%" of the last exit\'s.')
@click.option(
    "--regime",
    type=click.Choice(["batch-1", "batch-N"]),
    help="Of --budget-ms: one image at a time, or batches of evaluate.batch_size "
    "(default: batch-1 with --batch-size 1, else batch-N).",
)
@click.option(
    "--thresholds",
    "thresholds_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON: one threshold per exit (a list, or an object with a `thresholds` list).",
)
@PARAMS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows.")
@click.option("--batch-size", type=int, help="Images per batch (default: evaluate.batch_size).")
@click.option("--workers", type=int, help="Decoding processes (default: CPUs - 1).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if any), cpu, cuda.")
@exits_on_config_error
def predict(
    images: tuple[Path, ...],
    budget: float | None,
    budget_ms: str | None,
    regime: str | None,
    thresholds_path: Path | None,
    params_path: Path,
    as_json: bool,
    as_csv: bool,
    batch_size: int | None,
    workers: int | None,
    device: str,
) -> None:
    """Early-exit inference on image files and folders (recursively) with the workspace's model.

    Each image leaves at the first exit confident enough for the thresholds calibrated for
    --budget FLOPs or --budget-ms milliseconds per image in a --regime (default: the middle of
    calibrate.budgets), or those in --thresholds. Exit
    code 0: all predicted; 3: some files were unreadable (named on stderr) and skipped; 1: a
    pipeline output is missing; 2: a bad option or params file.
    """
    import os

    from rich.progress import Progress

    from pipeline import predict as inference
    from pipeline.devices import stage_device
    from pipeline.inputs import default_loader_workers

    if sum(v is not None for v in (budget, budget_ms, thresholds_path)) > 1:
        raise ConfigError("--budget, --budget-ms and --thresholds: give one of them")
    if regime is not None and budget_ms is None:
        raise ConfigError("--regime: applies to --budget-ms only")
    if regime == "batch-1" and batch_size not in (None, 1):
        raise ConfigError(f"--regime batch-1 and --batch-size {batch_size}: give one")
    if as_json and as_csv:
        raise ConfigError("--json and --csv: give one, not both")
    on = stage_device(device, "--device")
    try:
        space = inference.load_workspace(params_path, on)
        batch = 1 if regime == "batch-1" else batch_size or space.params.evaluate.batch_size
        if budget_ms is not None:
            regime = regime or ("batch-1" if batch == 1 else "batch-N")
            inference.time_budget_profile(space.params, on, regime, batch)
    except inference.MissingOutput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if thresholds_path is not None:
        thresholds = inference.read_thresholds(thresholds_path, space.net.n_exits)
    elif budget_ms is not None and regime is not None:
        thresholds = inference.thresholds_for(space.calibration, budget_ms, regime, "--budget-ms")
    else:
        thresholds = inference.thresholds_for(space.calibration, budget, "flops", "--budget")
    files = inference.find_images(images)
    if not files:
        click.echo("error: no image files in " + " ".join(map(str, images)), err=True)
        sys.exit(1)
    if workers is None:
        workers = 0 if len(files) <= batch else default_loader_workers(os.cpu_count() or 1, None)
    with Progress(console=Console(stderr=True), transient=True, disable=len(files) <= batch) as bar:
        task = bar.add_task("predicting", total=len(files))
        outcome = inference.predict(
            space.net,
            space.params,
            files,
            thresholds,
            space.exit_flops,
            names=space.names,
            batch_size=batch,
            workers=workers,
            device=on,
            progress=lambda done: bar.advance(task, done),
        )
    _print_predictions(outcome, as_json, as_csv)
    for bad in outcome.unreadable:
        click.echo(f"unreadable, skipped: {bad}", err=True)
    click.echo(
        f"{len(outcome.predictions)} images in {outcome.seconds:.2f} s "
        f"({outcome.images_per_second:.0f} images/s)"
        + (f"; {len(outcome.unreadable)} unreadable file(s) skipped" if outcome.unreadable else ""),
        err=True,
    )
    if outcome.unreadable:
        sys.exit(inference.UNREADABLE_EXIT_CODE)


def _print_predictions(outcome: Outcome, as_json: bool, as_csv: bool) -> None:
    """JSON or CSV on stdout for machines, a rich table for people."""
    rows = [vars(p) for p in outcome.predictions]
    if as_json:
        payload = {
            "predictions": rows,
            "unreadable": outcome.unreadable,
            "seconds": outcome.seconds,
            "images_per_second": outcome.images_per_second,
        }
        click.echo(json.dumps(payload))
        return
    if as_csv:
        import csv

        columns = ["file", "label", "name", "confidence", "exit", "flops"]
        writer = csv.DictWriter(sys.stdout, columns)
        writer.writeheader()
        writer.writerows(rows)
        return
    table = Table()
    for column in ("file", "class", "confidence", "exit", "MFLOPs"):
        table.add_column(column, justify="left" if column in ("file", "class") else "right")
    for p in outcome.predictions:
        label = p.name if p.name is not None else str(p.label)
        table.add_row(p.file, label, f"{p.confidence:.3f}", str(p.exit), f"{p.flops / 1e6:.2f}")
    Console().print(table)


@main.command()
@click.option("--variant", "variants", multiple=True, help=STUDY_VARIANT_HELP)
@click.option("--seeds", default=5, show_default=True, help="Seeds 0..N-1 for every variant.")
@click.option("--set", "sets", multiple=True, help="key=value for every run, as dvc exp run -S.")
@click.option("--name", default="study", show_default=True, help="Names its experiments.")
@click.option("--jobs", type=int, help="Runs at once (default: as many as the CPUs hold).")
@click.option("--timeout", default=86400.0, show_default=True, help="Seconds to wait for runs.")
@exits_on_config_error
def study(
    variants: tuple[str, ...],
    seeds: int,
    sets: tuple[str, ...],
    name: str,
    jobs: int | None,
    timeout: float,
) -> None:
    """Is a variant better than the first on my data? Variants x seeds as DVC experiments
    (`dvc exp run --queue`, named NAME-VARIANT-sSEED; one that finished never runs again, so an
    interrupted study resumes). Per exit and budget: mean ± sd over seeds and the paired
    difference from the first variant with its 95 % t interval, in outputs/study/NAME/ and an
    MLflow parent run."""
    import signal

    from pipeline import interrupts
    from pipeline.paths import PARAMS, STUDIES
    from pipeline.study import (
        DEFAULT_VARIANTS,
        StudyError,
        Variant,
        make_plan,
        parse_sets,
        run_study,
    )
    from pipeline.study_report import table
    from pipeline.tracking import bound_waits

    chosen = tuple(Variant.parse(text) for text in variants) or DEFAULT_VARIANTS
    plan, params = make_plan(name, chosen, seeds, parse_sets(sets), PARAMS)
    signal.signal(signal.SIGTERM, interrupts.as_ctrl_c)
    bound_waits("interactive")
    console = Console()
    try:
        _, rows = run_study(plan, params, jobs, timeout, STUDIES / name, console.print)
    except StudyError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("study interrupted: run the same command again to finish it", err=True)
        sys.exit(130)
    console.print(table(rows, [v.name for v in plan.variants], len(plan.seeds)))
    console.print(f"files: {STUDIES / name}/")
