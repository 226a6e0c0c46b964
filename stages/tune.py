"""DVC stage `tune` (tune/dvc.yaml, run only when asked: `dvc repro tune/dvc.yaml`): the Ray Tune
search of `boostpipe tune` with the params file's settings, confirmation included; writes the
confirmed best values (none when the params file's values stay best)."""

from pipeline import paths
from pipeline.entry import stage_main
from pipeline.io import check_writable, replaced_together, write_json
from pipeline.rayenv import prepare_ray
from pipeline.stage_input import stage_input


@stage_main
def main() -> None:
    prepare_ray()  # Ray reads it on import: before pipeline.search imports ray
    from pipeline.search import run_search

    given = stage_input()
    check_writable([paths.TUNE_DIR])
    outcome = run_search(given.params, paths.PREPARED, given.dataset, paths.TUNE_STORAGE)
    if outcome.best is None:
        raise SystemExit("tune: no trial finished; see the failed trials' runs in MLflow")
    default = outcome.default.score if outcome.default else None
    confirmed = outcome.confirmation.figures(outcome.metric) if outcome.confirmation else {}
    with replaced_together():
        write_json(
            paths.TUNE_SUMMARY,
            {
                "metric": outcome.metric,
                f"best_{outcome.metric}": outcome.best.score,
                f"default_{outcome.metric}": default,
                **{
                    f"trials_{k}": outcome.count(k) for k in ("finished", "stopped_early", "failed")
                },
                **confirmed,
                "mlflow_parent_run": outcome.parent_run_id,
            },
        )
        write_json(paths.BEST_PARAMS, outcome.chosen)


if __name__ == "__main__":
    main()
