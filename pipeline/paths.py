"""Where each stage reads and writes, relative to the project root (DVC runs stages there)."""

from pathlib import Path

PARAMS = Path("params.yaml")
DVC_FILES = (Path("dvc.yaml"), Path("tune/dvc.yaml"))  # the pipelines; stages declare params there
DVC_LOCK = Path("dvc.lock")
PREPARED = Path("data/prepared.npz")
DATASET_INFO = Path("data/dataset.json")
DOWNLOADS = Path("data/downloads")

TRAIN_DIR = Path("outputs/train")
MODEL = TRAIN_DIR / "model.pt"
HISTORY = TRAIN_DIR / "history.json"  # its `run` names the MLflow run (tracking.training_run)
CURVES = TRAIN_DIR / "curves.json"  # per epoch and exit, for `dvc plots`
RAY_STORAGE = Path(".boostpipe/ray")  # Ray Train checkpoints of unfinished runs (not DVC-tracked)
TUNE_STORAGE = Path(".boostpipe/tune")  # Ray Tune searches: trials, checkpoints, state
OUTBOX = Path(".boostpipe/outbox")  # MLflow records kept while the store did not answer
UI_LOG = Path(".boostpipe/mlflow-ui.log")  # `boostpipe ui`'s server, unless -v

PROFILE_DIR = Path("outputs/profile")
EXIT_COSTS = PROFILE_DIR / "exit_costs.json"  # per exit: FLOPs, ms per image at batch 1 and N

CALIBRATE_DIR = Path("outputs/calibrate")
THRESHOLDS = CALIBRATE_DIR / "thresholds.json"

EVALUATE_DIR = Path("outputs/evaluate")
METRICS = EVALUATE_DIR / "metrics.json"
ANYTIME = EVALUATE_DIR / "anytime.json"
BUDGET_CURVE = EVALUATE_DIR / "budget_curve.json"
ACCURACY_PLOT = EVALUATE_DIR / "accuracy_vs_flops.png"
TIME_PLOT = EVALUATE_DIR / "accuracy_vs_time.png"
TIME_BUDGETS = EVALUATE_DIR / "time_budgets.json"  # each time budget: target and measured ms
EFFECTIVE_SAMPLES_PLOT = EVALUATE_DIR / "effective_samples.png"

TUNE_DIR = Path("outputs/tune")  # the optional `tune` stage (tune/dvc.yaml)
BEST_PARAMS = TUNE_DIR / "best_params.json"
TUNE_SUMMARY = TUNE_DIR / "summary.json"

STUDIES = Path("outputs/study")  # `boostpipe study NAME`: outputs/study/NAME/ (no DVC stage)
