"""The docs site builds strictly (no broken link or anchor, no page missing from the nav), and
its generated pages cover what they claim to: every key of params.yaml, every result file."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(
        f"docs_hook_{name}", ROOT / "docs/hooks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{dotted}.")
    return keys


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    params = (tmp_path / "site/params/index.html").read_text()
    assert "train.scaling.workers" in params
    results = (tmp_path / "site/results/index.html").read_text()
    assert "boost_vs_baseline.json" in results


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/cifar100-ranet-anytime.yaml"])
def test_every_key_of_a_params_file_is_on_the_params_page(params_file):
    page = _hook("params_reference").render(ROOT / params_file)
    tree = yaml.safe_load((ROOT / params_file).read_text())
    missing = [key for key in _dotted_keys(tree) if f"`{key}`" not in page]
    assert missing == []


def test_every_key_has_a_type_and_a_default():
    page = _hook("params_reference").render()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 5 and all(cells[1:3]), row  # key, type, default, value, description


def test_every_result_file_reaches_the_results_page_with_its_provenance():
    hook = _hook("results")
    page = hook.render()
    files = sorted(p.name for p in (ROOT / "benchmarks/results").glob("*.json"))
    assert files, "no results"
    for name in files:
        assert name in page, name
        record = json.loads((ROOT / "benchmarks/results" / name).read_text())
        if "title" in record:
            for key in ("command", "date", "machine"):
                assert record[key] in page, (name, key)


def test_a_result_file_no_record_names_fails_the_build(tmp_path):
    (tmp_path / "orphan.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match=r"orphan\.json"):
        _hook("results").load(tmp_path)


def test_the_module_table_lists_every_module():
    page = _hook("modules").render()
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py") and "__pycache__" not in path.parts:
            assert f"`{path.relative_to(ROOT).as_posix()}`" in page, path


def test_the_default_run_on_the_results_page_is_the_committed_one():
    """The results page's default-run figures are the committed outputs', to the digit shown."""
    record = json.loads((ROOT / "benchmarks/results/default_run_committed.json").read_text())
    metrics = json.loads((ROOT / "outputs/evaluate/metrics.json").read_text())
    exits, budgets = ({row[0]: row[1:] for row in t["rows"]} for t in record["tables"][:2])
    for key in ("top1", "top5"):
        shown = [f"{v:.2f}" for v in metrics["anytime"][key].values()]
        assert exits[f"test {key[:3]}-{key[3:]} (%)"] == shown
    assert budgets["test top-1 (%)"] == [f"{b['top1']:.2f}" for b in metrics["budgets"].values()]
