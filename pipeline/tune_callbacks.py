"""Ray Tune callbacks of `boostpipe tune`, run in the driver: one MLflow child run per trial,
and a live rich table of the trials.

All MLflow writes happen here, in one process, so trials never race on the store; a resumed
search finds each trial's child run again by its `ray.trial_id` tag instead of making another.
A store that fails during the search costs one warning line (`tracking.best_effort`), not the
search.
Both callbacks are pickled with the search's state (Tuner.restore brings them back), so they
keep no open clients or consoles in that state.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.config import Params
from pipeline.tracking import best_effort
from pipeline.tune_report import describe_sampled
from pipeline.tuning import overrides
from pipeline.verbosity import console_file, verbose

# What a trial reports that is worth a chart (step = epoch).
LOGGED_PREFIXES = ("val_", "train_loss_exit_", "train_seconds", "score_seconds")


class MlflowTrials(Callback):
    """A nested MLflow run per trial under the search's parent run: the sampled values and
    the params they become, per-epoch metrics, and how the trial ended (tag `tune.outcome`:
    finished, stopped_early or failed; MLflow status FINISHED, KILLED or FAILED). Tag
    `boostpipe.phase` tells the search's trials (`search`) from its confirmation's (`confirm`)."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        epochs: int,
        n_exits: int,
        phase: str = "search",
    ) -> None:
        self.uri, self.experiment_id, self.parent = uri, experiment_id, parent_run_id
        self.epochs, self.n_exits, self.phase = epochs, n_exits, phase
        self.seconds = 0.0  # time spent logging, for the overhead figure
        self._client: Any = None
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def _timed(self, action: Any) -> Any:
        """MLflow's own HTTP retries (bounded by `tracking.bound_waits`), no more of ours."""
        start = time.perf_counter()
        try:
            return action()
        finally:
            self.seconds += time.perf_counter() - start

    def run_id(self, trial: Any) -> str:
        """The trial's child run: made on first sight, found again after a resume."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self._timed(
            lambda: self.client.search_runs(
                [self.experiment_id],
                filter_string=(
                    f"tags.`mlflow.parentRunId` = '{self.parent}' "
                    f"and tags.`ray.trial_id` = '{trial.trial_id}'"
                ),
            )
        )
        if found:
            run_id = found[0].info.run_id
            self._timed(lambda: self.client.update_run(run_id, status="RUNNING"))
        else:
            run_id = self._create(trial)
        self._runs[trial.trial_id] = run_id
        return run_id

    def _create(self, trial: Any) -> str:
        from mlflow.entities import Param

        dotted = overrides(trial.config, self.n_exits)
        config = trial.config
        name = f"trial-{trial.trial_id}"
        if self.phase == "confirm":
            name = f"confirm-{config['candidate']}-seed{config['seed']}"
        tags = {
            "mlflow.parentRunId": self.parent,
            "ray.trial_id": trial.trial_id,
            "boostpipe.phase": self.phase,
        }
        run = self._timed(
            lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        )
        values = {k: str(v) for k, v in {**trial.config, **dotted}.items()}
        params = [Param(k, v) for k, v in values.items()]
        self._timed(lambda: self.client.log_batch(run.info.run_id, params=params))
        return run.info.run_id

    def ended(self) -> int | None:
        """How many of this phase's trials have ended, over every attempt at the search; None
        when the store cannot say (it failed during the search)."""
        counted: list[int] = []
        _best_effort(lambda: counted.append(self._count_ended()))
        return counted[0] if counted else None

    def _count_ended(self) -> int:
        children = self._timed(
            lambda: self.client.search_runs(
                [self.experiment_id],
                filter_string=(
                    f"tags.`mlflow.parentRunId` = '{self.parent}' "
                    f"and tags.`boostpipe.phase` = '{self.phase}'"
                ),
                max_results=10_000,
            )
        )
        return sum("tune.outcome" in run.data.tags for run in children)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _best_effort(lambda: self.run_id(trial))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        _best_effort(lambda: self._log_result(trial, result))

    def _log_result(self, trial: Any, result: dict) -> None:
        from mlflow.entities import Metric

        step = int(result["training_iteration"])
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in result.items()
            if key.startswith(LOGGED_PREFIXES) and isinstance(value, int | float)
        ]
        run_id = self.run_id(trial)
        self._timed(lambda: self.client.log_batch(run_id, metrics=metrics))

    def _end(self, trial: Any, outcome: str, status: str) -> None:
        run_id = self.run_id(trial)
        self._timed(lambda: self.client.set_tag(run_id, "tune.outcome", outcome))
        self._timed(lambda: self.client.set_terminated(run_id, status))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _best_effort(lambda: self._complete(trial))

    def _complete(self, trial: Any) -> None:
        result = trial.last_result or {}
        if not result.get("done"):  # stopped by Ctrl-C, not by its end or the scheduler:
            return  # the run stays open for `--resume`
        if result.get("training_iteration", 0) >= self.epochs:
            self._end(trial, "finished", "FINISHED")
        else:
            self._end(trial, "stopped_early", "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _best_effort(lambda: self._failed(trial))

    def _failed(self, trial: Any) -> None:
        run_id = self.run_id(trial)
        # The traceback's last line, from the error file Tune has just written beside the trial.
        error_file = Path(trial.error_file) if trial.error_file else None
        lines = (
            error_file.read_text().strip().splitlines()
            if error_file and error_file.exists()
            else []
        )
        message = lines[-1][-500:] if lines else "the trial raised"
        self._timed(lambda: self.client.set_tag(run_id, "tune.error", message))
        self._end(trial, "failed", "FAILED")


def _best_effort(action: Any) -> None:
    best_effort(action, "the trials")


class LiveTrialTable(Callback):
    """The trials as a table that redraws while the search runs (status, epoch, objective)."""

    def __init__(
        self, metric: str, epochs: int, limit: int = 20, title: str = "boostpipe tune"
    ) -> None:
        self.metric, self.epochs, self.limit, self.title = metric, epochs, limit, title
        self._live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None}

    def _table(self, trials: list) -> Table:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        table = Table(title=f"{self.title}: {done}/{len(trials)} trials ended")
        for column in ("trial", "status", "epoch", self.metric, "values"):
            table.add_column(column, justify="left" if column in ("status", "values") else "right")
        ranked = sorted(
            trials,
            key=lambda t: (t.status != "RUNNING", -(t.last_result or {}).get(self.metric, -1)),
        )
        for trial in ranked[: self.limit]:
            result = trial.last_result or {}
            score = result.get(self.metric)
            table.add_row(
                trial.trial_id,
                trial.status,
                f"{result.get('training_iteration', 0)}/{self.epochs}",
                f"{score:.2f}" if score is not None else "-",
                describe_sampled(trial.config),
            )
        return table

    def _draw(self, trials: list) -> None:
        if self._live is None:
            # Prints go where they were going (Ray's chatter: its log file), not above the table.
            self._live = Live(
                console=Console(file=console_file()),
                refresh_per_second=2,
                redirect_stdout=verbose(),
            )
            self._live.start()
        self._live.update(self._table(trials))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if iteration % 20 == 0 or self._live is None:  # the driver loop turns often
            self._draw(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._draw(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._live is not None:
            self._live.update(self._table(trials))
            self._live.stop()
            if not self._live.console.is_terminal:  # Live leaves its last line unended there
                self._live.console.line()
            self._live = None


def trial_callbacks(params: Params, parent: str, phase: str, title: str) -> list[Any]:
    """A phase's trials as MLflow child runs of `parent` and as a live table."""
    import mlflow

    config = params.tune
    uri = mlflow.get_tracking_uri()
    experiment_id = mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id
    return [
        MlflowTrials(uri, experiment_id, parent, config.epochs, params.model.n_exits, phase),
        LiveTrialTable(config.metric, config.epochs, title=title),
    ]
