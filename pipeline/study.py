"""`boostpipe study`: variants x seeds through the real pipeline, as DVC experiments.

Each (variant, seed) is one DVC experiment named `<study>-<variant>-s<seed>`, queued with
`dvc exp run --queue -S ...` and run by DVC's queue workers (`dvc queue start -j N`), so every
run is the user's own `dvc repro`: the same stages, run-cache, Ray clusters and MLflow runs, and
`dvc exp show` lists them. The experiment names make a study resumable: a name that finished is
never queued again, and an interrupted study queues only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import yaml

from pipeline.config import ConfigError, Params, parse_with_overrides
from pipeline.paths import METRICS

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STATUS_ATTEMPTS = 3
POLL_S = 2.0


@dataclass(frozen=True)
class Variant:
    """A named set of params overrides (dotted keys, values as `dvc exp run -S` takes them)."""

    name: str
    overrides: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`name` or `name=key=value[,key=value...]`, e.g. `t07=boost.temperature=0.7`."""
        name, _, rest = text.partition("=")
        if not NAME.fullmatch(name):
            raise ConfigError(f"--variant {text!r}: a name of letters, digits, '-', '_' first")
        overrides = dict(_assignment(item, f"--variant {name}") for item in rest.split(",") if item)
        return cls(name, overrides)


DEFAULT_VARIANTS = (Variant("boostnet"), Variant("baseline", {"boost.enabled": "false"}))


def _assignment(text: str, where: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{where}: {text!r} is not key=value")
    return key.strip(), value.strip()


def _joined(overrides: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "-"


def parse_sets(texts: tuple[str, ...]) -> dict[str, str]:
    return dict(_assignment(text, "--set") for text in texts)


@dataclass(frozen=True)
class Plan:
    """What a study runs: every variant at every seed, each with its full overrides."""

    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    common: dict[str, str]

    def experiment(self, variant: Variant, seed: int) -> str:
        return f"{self.name}-{variant.name}-s{seed}"

    def overrides(self, variant: Variant, seed: int) -> dict[str, str]:
        return {**self.common, **variant.overrides, "seed": str(seed)}

    def settings(self) -> dict[str, str]:
        """What the study ran, as the parent run's params."""
        variants = {f"variant.{v.name}": _joined(v.overrides) for v in self.variants}
        return {"seeds": str(len(self.seeds)), "set": _joined(self.common), **variants}

    def runs(self) -> Iterator[tuple[Variant, int, str]]:
        """Seed by seed, every variant at each (the queue's order): a study stopped early
        already holds whole pairs to compare."""
        for seed in self.seeds:
            for variant in self.variants:
                yield variant, seed, self.experiment(variant, seed)


def make_plan(
    name: str, variants: tuple[Variant, ...], seeds: int, common: dict[str, str], params: Path
) -> tuple[Plan, Params]:
    """The plan, every variant's params validated as DVC will write them (one line naming the
    variant and key otherwise), before anything is queued. Returns the first variant's params."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: letters, digits, '-', '_' and '.' only")
    if seeds < 2:
        raise ConfigError(f"--seeds {seeds}: at least 2, or no interval can be drawn")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant: names repeat ({', '.join(names)})")
    raw = yaml.safe_load(params.read_text())
    plan = Plan(name, variants, tuple(range(seeds)), common)
    checked = []
    for variant in variants:
        overrides = {k: yaml.safe_load(v) for k, v in plan.overrides(variant, 0).items()}
        where = f"variant {variant.name}"
        try:
            checked.append(parse_with_overrides(json.loads(json.dumps(raw)), overrides, where))
        except KeyError as exc:
            raise ConfigError(f"{where}: {exc.args[0]}: unknown params section") from None
    return plan, checked[0]


def dvc(*args: str, attempts: int = 1) -> subprocess.CompletedProcess:
    """A DVC command in the project, its output captured, tried up to `attempts` times; a
    failure is one line naming it: DVC's ERROR line, not the support footer it prints last."""
    for attempt in range(attempts):
        if attempt:
            time.sleep(POLL_S)
        done = subprocess.run(["dvc", *args], capture_output=True, text=True)
        if done.returncode == 0:
            return done
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
    raise StudyError(f"dvc {' '.join(args[:3])}: {errors[-1] if errors else done.returncode}")


class StudyError(RuntimeError):
    """A DVC command the study needs failed; the message is one line."""


def finished(plan: Plan) -> dict[str, dict[str, Any]]:
    """This study's experiments that finished: name -> their metrics.json, from `dvc exp show`.
    Queued, running, failed and killed ones are left out: they show the commit's metrics."""
    shown = json.loads(dvc("exp", "show", "--json").stdout)
    ours = {name for _, _, name in plan.runs()}
    found = {}
    for base in shown:
        for experiment in base.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state", "success")
            for rev in experiment["revs"]:
                metrics = ((rev.get("data") or {}).get("metrics") or {}).get(str(METRICS))
                ok = state == "success" and not rev.get("error") and metrics and "data" in metrics
                if ok and rev.get("name") in ours:
                    found[rev["name"]] = metrics["data"]
    return found


def queue_tasks() -> dict[str, tuple[str, str]]:
    """`dvc queue status` as {experiment name: (task id, status)}; DVC's kill and remove take
    the task id (they do not find a running experiment by its name)."""
    # It fails now and then while workers come and go.
    shown = dvc("queue", "status", attempts=STATUS_ATTEMPTS).stdout
    rows = (line.split() for line in shown.splitlines()[1:])
    return {row[1]: (row[0], row[-1]) for row in rows if len(row) >= 4 and row[0] != "Worker"}


def queue_statuses() -> dict[str, str]:
    return {name: status for name, (_, status) in queue_tasks().items()}


def enqueue(plan: Plan, done: set[str]) -> list[str]:
    """Queue every experiment that neither finished nor waits in the queue; an earlier
    attempt's failed or killed entry is removed first (its name would clash)."""
    tasks = queue_tasks()
    queued = []
    for variant, seed, name in plan.runs():
        if name in done:
            continue
        task, status = tasks.get(name, ("", ""))
        if status in {"Queued", "Running"}:
            queued.append(name)
            continue
        if task:
            dvc("queue", "remove", task)
        sets = [arg for k, v in plan.overrides(variant, seed).items() for arg in ("-S", f"{k}={v}")]
        dvc("exp", "run", "--queue", "--force", "-n", name, *sets)
        queued.append(name)
    return queued


@contextmanager
def running_queue(names: list[str], jobs: int, grace_s: float = 60.0) -> Iterator[None]:
    """DVC's queue workers for the block; on an interruption our queued experiments are removed
    and our running ones stopped as Ctrl-C stops them (then killed after `grace_s`), so nothing
    of the study runs on after it."""
    try:
        # The workers it starts outlive it and hold its output: captured, it would never end.
        started = subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)], stdout=DEVNULL, stderr=DEVNULL
        )
        if started.returncode != 0:
            raise StudyError(
                f"dvc queue start: exit {started.returncode} (`dvc queue start` says why)"
            )
        yield
    except BaseException:
        _stop(names, grace_s)
        raise


def _stop(names: list[str], grace_s: float) -> None:
    def ours(status: str) -> list[str]:
        return [
            task for name, (task, now) in queue_tasks().items() if name in names and now == status
        ]

    # One task at a time: a task may start or end between the status and the command (DVC then
    # refuses its id, and the rest of a list with it); one that started is killed next.
    for command, status in (("remove", "Queued"), ("kill", "Running")):
        for task in ours(status):
            with contextlib.suppress(StudyError):
                dvc("queue", command, task)
    deadline = time.monotonic() + grace_s
    while (running := ours("Running")) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if running:
        dvc("queue", "kill", "--force", *running)


def wait_for(names: list[str], on_change: Callable[[str, str], None], timeout_s: float) -> None:
    """Until none of `names` is queued or running; `on_change(name, status)` as each ends."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        statuses = queue_statuses()
        for name in names:
            status = statuses.get(name, "Success")
            if status != last.get(name) and status not in {"Queued", "Running"}:
                on_change(name, status)
            last[name] = status
        if not any(last[name] in {"Queued", "Running"} for name in names):
            return
        if time.monotonic() > deadline:
            raise StudyError(f"--timeout: {timeout_s:.0f} s passed with runs still going")
        time.sleep(POLL_S)


def default_jobs(params: Params, remaining: int) -> int:
    """Concurrent experiments: as many as this machine's CPUs and GPUs hold at the layout each
    run's training takes (`train.scaling`, `auto` resolved as the train stage resolves it), as
    `tune` bounds its trials."""
    import torch

    from pipeline.cluster import worker_layout

    cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    layout = worker_layout(params, {"CPU": cpus, "GPU": gpus})
    fits = cpus // (layout.workers * params.train.scaling.cpus_per_worker)
    if layout.use_gpu:
        fits = min(fits, gpus // layout.workers)
    return max(1, min(remaining, int(fits)))


def run_study(
    plan: Plan, params: Params, jobs: int | None, timeout_s: float, folder: Path, say: Callable
) -> tuple[list, list]:
    """Run what is missing, then summarise every run: files in `folder`, an MLflow parent run
    with each experiment's run as a child. Returns the results and the summary rows."""
    from pipeline.locks import exclusive
    from pipeline.study_report import RunResult, plot, summarise, write
    from pipeline.tracking import status_of
    from pipeline.tracking.studies import adopt, log_study, study_parent

    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / ".lock", f"study {plan.name}"):
        parent = study_parent(params, plan.name, plan.settings())
        with status_of(parent):  # KILLED on Ctrl-C, FAILED on an error
            done = finished(plan)
            missing = [name for _, _, name in plan.runs() if name not in done]
            say(f"{len(done)} of {len(done) + len(missing)} runs finished earlier")
            if missing:
                names = enqueue(plan, set(done))
                count = jobs or default_jobs(params, len(names))
                say(f"running {len(names)} with DVC's queue, {count} at a time")
                with running_queue(names, count):
                    wait_for(names, lambda name, status: say(f"{name}: {status}"), timeout_s)
                done = finished(plan)
                if failed := [name for name in names if name not in done]:
                    raise StudyError(
                        f"{', '.join(failed)}: did not finish (`dvc queue logs NAME` says why);"
                        " run the study again to retry them"
                    )
            results = [RunResult.from_metrics(v.name, s, n, done[n]) for v, s, n in plan.runs()]
            variants = [v.name for v in plan.variants]
            rows = summarise(results, variants)
            write(folder, results, rows, {"name": plan.name, **plan.settings()})
            plot(folder / PLOT, exit_curves(plan, results))
            adopt(params, parent, [r.experiment for r in results])
            log_study(parent, summary_metrics(rows, variants), [folder / f for f in FILES])
    return results, rows


PLOT = "accuracy_vs_cost.png"
FILES = ("summary.json", "summary.csv", "runs.json", "runs.csv", PLOT)


def exit_curves(plan: Plan, results: list) -> dict[str, tuple[list[float], list[list[float]]]]:
    """Per variant: each exit's MFLOPs (as its first seed's evaluate stage counted them) and,
    per seed, each exit's test top-1."""
    import dvc.api

    from pipeline.paths import ANYTIME

    curves = {}
    for variant in plan.variants:
        first = plan.experiment(variant, plan.seeds[0])
        exits = json.loads(dvc.api.read(str(ANYTIME), rev=first))
        per_seed = [
            [r.top1[f"exit_{row['exit']}"] for row in exits]
            for r in results
            if r.variant == variant.name
        ]
        curves[variant.name] = ([row["mflops"] for row in exits], per_seed)
    return curves


def summary_metrics(rows: list, variants: list[str]) -> dict[str, float]:
    """The parent run's metrics, a chart section per variant and per comparison."""
    reference = variants[0]
    out = {}
    for row in rows:
        for variant in variants:
            out[f"{variant}/{row.name}_mean"] = row.mean[variant]
            out[f"{variant}/{row.name}_sd"] = row.sd[variant]
        for variant, diff in row.diff.items():
            section = f"{variant}_vs_{reference}"
            out[f"{section}/{row.name}_diff"] = diff
            out[f"{section}/{row.name}_low"] = row.low[variant]
            out[f"{section}/{row.name}_high"] = row.high[variant]
    return out
