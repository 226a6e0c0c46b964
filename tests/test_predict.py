"""`boostpipe predict` on real PNG/JPEG files of the Fashion-MNIST test split, with a BoostNet
trained for a few steps in-process and saved as the train stage saves it."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT, compose, needs_data
from torchcodec.encoders import JpegEncoder, PngEncoder
from torchvision.datasets import FashionMNIST

from pipeline.boosting import BoostNet
from pipeline.budgets import calibrate
from pipeline.cli import main
from pipeline.data import Split, load_dataset
from pipeline.evaluation import Source, collect_scores, early_exit, exit_costs, load_model
from pipeline.io import write_json
from pipeline.predict import UNREADABLE_EXIT_CODE
from pipeline.profiling import BATCH_1, BATCH_N, ExitProfile, apply_threads, measure

pytestmark = needs_data
CPU = torch.device("cpu")
N_IMAGES = 96


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Split, list[float]]:
    """A project folder with params, dataset facts, a model and calibrated thresholds, and
    N_IMAGES test images written as PNG under images/ (a JPEG and a broken file beside them)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    params = compose()
    train, test, _ = load_dataset(params.data, root / "downloads")
    torch.manual_seed(0)
    net = BoostNet.from_params(params)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(20):  # a few steps: confidences spread, so the exits split the images
        batch = slice(64 * step, 64 * (step + 1))
        x = (train.images[batch].float() / 255 - 0.286) / 0.353
        loss = net.total_loss(net.exit_losses(net(x), train.targets[batch]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    (root / "outputs/train").mkdir(parents=True)
    torch.save({"model": net.state_dict()}, root / "outputs/train/model.pt")
    write_json(root / "data/dataset.json", {"dataset": "fashion-mnist", "test": len(test)})

    images = Split(test.images[:N_IMAGES], test.targets[:N_IMAGES])
    model = load_model(params, root / "outputs/train/model.pt", CPU)
    flops = exit_costs(model, params)
    scores, _ = collect_scores(model, Source(images, params.data, 32), CPU)
    apply_threads(params.evaluate.threads)  # as predict will
    batched, single = (
        Source(images, params.data, 32),
        Source(images.subset(torch.arange(8)), params.data, 1),
    )
    profile = measure(model, batched, single, CPU, flops, repeats=1, warmup=1)
    # One quick round on a busy machine can time every exit alike; these tests are about how
    # predict reads a profile, so the exits' ms follow their FLOPs at the measured scale.
    for regime, ms in profile.ms.items():
        profile.ms[regime] = [ms[-1] * f / flops[-1] for f in flops]
    write_json(root / "outputs/profile/exit_costs.json", profile.to_json())
    middle = {r: (ms[0] + ms[-1]) / 2 for r, ms in profile.ms.items()}
    config = params.calibrate.model_validate(
        {"budgets": [(flops[0] + flops[-1]) / 2],
         "budgets_ms": {"batch_1": [middle[BATCH_1]], "batch_n": [middle[BATCH_N]]}}
    )  # fmt: skip
    calibration = calibrate(scores, flops, profile, config)
    write_json(root / "outputs/calibrate/thresholds.json", calibration.to_json())
    folder = root / "images" / "shirts"
    folder.mkdir(parents=True)
    for i in range(N_IMAGES):
        PngEncoder(images.images[i]).to_file(folder / f"{i:05d}.png")
    JpegEncoder(images.images[0].expand(3, -1, -1).contiguous()).to_file(root / "images/rgb.jpg")
    (root / "images/broken.png").write_bytes(b"\x89PNG not really")
    return root, images, calibration.budgets[0].thresholds


def _predict(root: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.chdir(root)
    return CliRunner().invoke(main, ["predict", *args], catch_exceptions=False)


@pytest.mark.slow
def test_predictions_equal_in_process_early_exit(workspace, monkeypatch):
    root, images, thresholds = workspace
    result = _predict(root, monkeypatch, "images/shirts", "--json", "--batch-size", "32")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    rows = payload["predictions"]
    assert [Path(r["file"]).name for r in rows] == [f"{i:05d}.png" for i in range(N_IMAGES)]

    params = compose()
    model = load_model(params, root / "outputs/train/model.pt", CPU)
    run = early_exit(model, Source(images, params.data, 32), thresholds, CPU)
    assert [r["label"] for r in rows] == run.predictions.tolist()
    assert [r["exit"] - 1 for r in rows] == run.exits.tolist()
    assert len(set(run.exits.tolist())) > 1  # the thresholds really spread the images
    flops = exit_costs(model, params)
    assert all(r["flops"] == flops[r["exit"] - 1] and 0 < r["confidence"] <= 1 for r in rows)
    assert all(r["name"] == FashionMNIST.classes[r["label"]] for r in rows)
    assert payload["images_per_second"] > 0 and payload["unreadable"] == []


@pytest.mark.slow
def test_unreadable_file_is_named_skipped_and_exit_code_says_so(workspace, monkeypatch):
    root, _, _ = workspace
    result = _predict(root, monkeypatch, "images", "--csv")
    assert result.exit_code == UNREADABLE_EXIT_CODE
    assert "unreadable, skipped: images/broken.png" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == N_IMAGES + 1  # every PNG and the (RGB, decoded grey) JPEG
    assert {"images/rgb.jpg", "images/shirts/00000.png"} <= {r["file"] for r in rows}
    assert "images/s" in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_budget_below_the_first_exit_is_one_line(workspace, monkeypatch):
    root, _, _ = workspace
    result = _predict(root, monkeypatch, "images/shirts/00000.png", "--budget", "1e5")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--budget" in result.stderr and "first exit" in result.stderr


@pytest.mark.slow
def test_thresholds_file_and_budget_choose_the_exits(workspace, monkeypatch):
    root, _, _ = workspace
    (root / "first.json").write_text(json.dumps([0.0] * 5))  # everyone leaves at exit 1
    result = _predict(root, monkeypatch, "images/shirts", "--thresholds", "first.json", "--json")
    assert {r["exit"] for r in json.loads(result.stdout)["predictions"]} == {1}
    result = _predict(root, monkeypatch, "images/shirts", "--budget", "1e12", "--json")
    assert {r["exit"] for r in json.loads(result.stdout)["predictions"]} == {5}


def _cost(rows: list[dict], exit_ms: list[float]) -> float:
    """The profile's ms per image of these predictions' exits."""
    return sum(exit_ms[r["exit"] - 1] for r in rows) / len(rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("regime", "args", "share"),
    [(BATCH_N, ["--batch-size", "32"], False), (BATCH_1, ["--regime", "batch-1"], True)],
)
def test_budget_ms_picks_thresholds_within_the_time_budget(
    workspace, monkeypatch, regime, args, share
):
    """In ms, or as a share of the last exit's cost ("N%", as params.yaml may state it)."""
    root, _, _ = workspace
    profile = ExitProfile.from_json(
        json.loads((root / "outputs/profile/exit_costs.json").read_text())
    )
    exit_ms = profile.ms[regime]
    budget = exit_ms[0] + 0.6 * (exit_ms[-1] - exit_ms[0])
    typed = f"{100 * budget / exit_ms[-1]:.6g}%" if share else str(budget)
    result = _predict(root, monkeypatch, "images/shirts", "--budget-ms", typed, "--json", *args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["predictions"]
    # The images are the ones calibrated on, so their profiled cost meets the budget (to one
    # image: batch 1 may round an image at a threshold the other way) and uses most of it.
    one_image = (exit_ms[-1] - exit_ms[0]) / len(rows)
    assert exit_ms[0] < _cost(rows, exit_ms) <= budget + one_image
    assert len({r["exit"] for r in rows}) > 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("budget", "says"),
    [("1e-9", "first exit"), ("1e9", "last exit"), ("0.1%", "first exit"), ("fast", "such as")],
)
def test_time_budget_outside_the_exits_costs_is_one_line(workspace, monkeypatch, budget, says):
    root, _, _ = workspace
    args = ["images/shirts/00000.png", "--budget-ms", budget, "--batch-size", "32"]
    result = _predict(root, monkeypatch, *args)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--budget-ms" in result.stderr and says in result.stderr


@pytest.mark.slow
def test_time_budget_with_a_profile_of_another_setup_is_refused(workspace, monkeypatch):
    root, _, _ = workspace
    path = root / "outputs/profile/exit_costs.json"
    measured = path.read_text()
    data = json.loads(measured)
    try:
        path.write_text(json.dumps({**data, "threads": data["threads"] + 1}))
        args = ["images/shirts/00000.png", "--budget-ms", "1", "--batch-size", "32"]
        result = _predict(root, monkeypatch, *args)
        assert result.exit_code == 2
        assert result.stderr.strip().count("\n") == 0
        assert "exit_costs.json" in result.stderr and "threads" in result.stderr
        # the same batch-N budget read at another batch size than profiled is refused too
        path.write_text(measured)
        args = ["images/shirts/00000.png", "--budget-ms", "1", "--batch-size", "16"]
        result = _predict(root, monkeypatch, *args)
        assert result.exit_code == 2 and "batch size 32" in result.stderr
    finally:
        path.write_text(measured)


@pytest.mark.slow
def test_missing_model_says_to_run_dvc_repro(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    result = _predict(tmp_path, monkeypatch, "x.png")
    assert result.exit_code == 1
    assert "outputs/train/model.pt" in result.stderr and "dvc repro" in result.stderr
    assert "`dvc pull`" in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("device", "says"),
    [("tpu", "--device: is tpu; choose one of auto, cpu, cuda"), ("cuda", "--device: is cuda")],
)
def test_a_device_that_does_not_exist_is_one_line_before_any_work(
    tmp_path, monkeypatch, device, says
):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _predict(tmp_path, monkeypatch, "x.png", "--device", device)  # no workspace at all
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and says in result.stderr, result.stderr
