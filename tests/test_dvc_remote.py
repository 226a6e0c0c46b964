"""Results shared the DVC way: a remote on S3 (here moto's real S3 server on 127.0.0.1), pushed
from the machine that trained and pulled into a fresh clone elsewhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import needs_data, run, s3_server
from helpers.shared import SharedRun, copy_project
from torchcodec.encoders import PngEncoder

from pipeline.data import load_split

BUCKET = "team"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def _predictions(repo: Path, images: Path) -> list[dict]:
    result = run(["boostpipe", "predict", str(images), "--json", "--device", "cpu"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout)["predictions"]
    return [{key: value for key, value in row.items() if key != "file"} for row in rows]


@pytest.mark.slow
@needs_data
def test_a_fresh_clone_pulls_the_results_and_predicts_as_the_training_machine(
    shared_run: SharedRun, tmp_path
):
    """`dvc remote add` an S3 bucket and `dvc push` on the machine that trained; in a fresh
    clone, `dvc pull` brings every output: `dvc status` is clean, `boostpipe predict` gives the
    same predictions and `dvc repro` retrains nothing."""
    trained = copy_project(shared_run.local, tmp_path / "trained")
    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(load_split(trained / "data/prepared.npz", "test").images[:8]):
        PngEncoder(image).to_file(images / f"{index}.png")
    with s3_server(tmp_path / "s3", BUCKET) as env:
        for command in (
            ["dvc", "remote", "add", "--default", "team", f"s3://{BUCKET}/dvc"],
            ["dvc", "remote", "modify", "team", "endpointurl", env["AWS_ENDPOINT_URL"]],
        ):
            assert run(command, trained).returncode == 0
        _git(trained, "add", "-A")
        _git(trained, "commit", "-qm", "trained, and the team's remote")
        pushed = run(["dvc", "push"], trained, **env)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr

        clone = tmp_path / "clone"
        _git(tmp_path, "clone", "-q", str(trained), str(clone))
        assert not (clone / "outputs/train/model.pt").exists()
        missing = run(["boostpipe", "predict", str(images)], clone)
        assert missing.returncode == 1 and "`dvc pull`" in missing.stderr, missing.stderr
        pulled = run(["dvc", "pull"], clone, **env)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    status = run(["dvc", "status", "dvc.yaml"], clone)  # the search (tune/dvc.yaml) never ran
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    for output in ("outputs/train/model.pt", "outputs/calibrate/thresholds.json"):
        assert (clone / output).read_bytes() == (trained / output).read_bytes(), output
    assert _predictions(clone, images) == _predictions(trained, images)
    repro = run(["dvc", "repro"], clone)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert "Running stage" not in repro.stdout, repro.stdout
