"""Fixtures, the `slow` convention and the order `make test` hands tests to its two workers.
Tests compose the project's real params files and shrink them, never a hand-written config;
the scaffolding they share lives in tests/helpers (import it from there, not from here).

Slow tests: a test that runs a real pipeline, cluster, search or an ImageNet-sized model (a
minute or more on 2 CPU cores, or seconds that add up) carries pytest's `slow` mark where the
cost is: `@pytest.mark.slow` on the test, or `marks=pytest.mark.slow` on a costly case of a
parametrised test (`slow_cases`). Never a module-wide `pytestmark`: every test's own line says
whether `make test-fast` (`pytest -m "not slow"`) runs it.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from helpers import PARAMS_FILES
from helpers.cases import is_imagenet, slow_cases
from helpers.shared import shared_run as _shared_run

from pipeline.rayenv import prepare_ray

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
prepare_ray()  # before any test module imports ray


@pytest.fixture(params=slow_cases(PARAMS_FILES, is_imagenet))
def params_file(request: pytest.FixtureRequest) -> Path:
    return request.param


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shrunk pipeline run to the end once per session (shared by the xdist workers):
    tests that only read its outputs take it; tests that change it take `shared_copy`."""
    return _shared_run(tmp_path_factory)


@pytest.fixture
def shared_copy(shared_run: Path, tmp_path: Path) -> Path:
    """A copy of `shared_run` of the test's own (project, DVC cache and MLflow store)."""
    from helpers.shared import copy_project

    return copy_project(shared_run, tmp_path / "repo")


# --- scheduling ---------------------------------------------------------------------------------
# `make test` runs `pytest -n 2 --dist loadgroup --no-loadscope-reorder`: xdist hands the work
# units below to two workers in this order, the next unit to whichever worker runs dry. No list
# of long files is kept: the order follows from the tests' own `slow` marks and fixtures.


def _module_fixtures(item: pytest.Item) -> list[str]:
    """The module- or class-scoped fixtures the test uses: built once per worker that runs one
    of its tests, and often changed by them, so its tests must share a worker."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    return [
        name
        for name, defs in info.name2fixturedefs.items()
        if defs and defs[-1].scope in ("module", "class")
    ]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that share a module-scoped fixture form one unit (an `xdist_group`); every other
    test is a unit of its own. Units run heaviest first, a unit's weight being its count of
    slow tests, so that the long units start at once and the short ones fill the gaps at the
    end; within a weight, collection order (a module's tests stay in their order)."""
    units: dict[pytest.Item, str] = {}
    for item in items:
        if _module_fixtures(item):
            group = item.path.stem
            item.add_marker(pytest.mark.xdist_group(group))
            units[item] = group
        else:
            units[item] = item.nodeid
    weight = Counter(units[item] for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -weight[units[item]])
