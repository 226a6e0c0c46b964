"""What `boostpipe tune` prints once a search ends: the trials ranked, the confirmation and its
gain, and the `dvc exp run` line that adopts the chosen values. Free of Ray, so the live table
of the trials (tune_callbacks.py) and these share one way of writing sampled values."""

from __future__ import annotations

from rich.table import Table

from pipeline.outcome import Candidate, Confirmation, Override, Sampled, SearchOutcome


def describe_sampled(sampled: dict[str, Sampled]) -> str:
    """Compact, for tables: t=0.64 w=0.73/0.53/0.51/1.54 lr=0.1 grad_rescale=True."""
    groups: dict[str, list[str]] = {}
    for key, value in sampled.items():
        name = key.split("_")[0] if key.startswith(("t_", "w_")) else key
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        groups.setdefault(name, []).append(text)
    return " ".join(f"{name}={'/'.join(values)}" for name, values in groups.items())


def ranked_table(outcome: SearchOutcome, limit: int = 10) -> Table:
    """The best `limit` trials by the objective, with how each ended and its values."""
    table = Table(title=f"best trials by {outcome.metric} (validation)")
    for column in ("#", "trial", "ended", "epochs", outcome.metric, "values"):
        table.add_column(column, justify="left" if column in ("ended", "values") else "right")
    for rank, trial in enumerate(outcome.trials[:limit], start=1):
        score = f"{trial.score:.2f}" if trial.score is not None else "-"
        table.add_row(
            str(rank),
            trial.trial_id,
            trial.outcome,
            str(trial.epochs),
            score,
            describe_sampled(trial.sampled),
        )
    return table


def trial_counts(outcome: SearchOutcome) -> str:
    """How the trials ended, failures in red, and the MLflow run that holds them."""
    failed = outcome.count("failed")
    return (
        f"{len(outcome.trials)} trials: {outcome.count('finished')} finished, "
        f"{outcome.count('stopped_early')} stopped early, "
        f"{'[red]' if failed else ''}{failed} failed{'[/]' if failed else ''}; "
        f"MLflow parent run {outcome.parent_run_id}"
    )


def confirmation_table(confirmation: Confirmation, metric: str) -> Table:
    """Every confirmed configuration: its search score, and its mean over the fresh seeds."""
    seeds = len(confirmation.seeds)
    table = Table(title=f"confirmation: {metric} over {seeds} fresh seeds (validation)")
    for column in ("#", "configuration", "search", "mean +- std", "runs", "values"):
        table.add_column(column, justify="left" if column == "values" else "right")
    for rank, candidate in enumerate(confirmation.candidates, start=1):
        score, mean = candidate.search_score, candidate.mean
        table.add_row(
            str(rank),
            candidate.label,
            "-" if score is None else f"{score:.2f}",
            "-" if mean is None else f"{mean:.2f} +- {candidate.std:.2f}",
            f"{len(candidate.scores)}/{seeds}",
            describe_sampled(candidate.sampled),
        )
    return table


def confirmed_gain(confirmation: Confirmation, metric: str) -> str:
    """The confirmed best, and the gain of the best other configuration over the params file's
    values with its interval."""

    def mean_std(candidate: Candidate) -> str:
        return "-" if candidate.mean is None else f"{candidate.mean:.2f} +- {candidate.std:.2f}"

    new, default = confirmation.challenger, confirmation.default
    if confirmation.best is default:
        line = (
            f"confirmed best: the params file's values ({metric} {mean_std(default)}); "
            f"next {new.label}: {mean_std(new)}"
        )
    else:
        line = (
            f"confirmed best {new.label}: {metric} {mean_std(new)} vs {mean_std(default)} "
            "with the params file's values"
        )
    if (gain := confirmation.gain) is None:
        return line + "; no interval (fewer than two seeds finished for both)"
    return (
        f"{line}; gain {gain.mean:+.2f}, 95% CI [{gain.low:+.2f}, {gain.high:+.2f}] "
        f"({gain.n} paired seeds)"
    )


def exp_run_line(dotted: dict[str, Override]) -> str:
    """The values as the `dvc exp run -S` command that runs the pipeline with them."""

    def literal(value: Override) -> str:
        if isinstance(value, list):
            return "[" + ",".join(f"{v:.4g}" for v in value) + "]"
        return str(value).lower() if isinstance(value, bool) else f"{value:.4g}"

    return "dvc exp run " + " ".join(f"-S '{k}={literal(v)}'" for k, v in dotted.items())
