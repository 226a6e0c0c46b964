"""Fixtures, the `slow` convention and the order `make test` hands tests to its two workers.
Tests compose the project's real params files and shrink them, never a hand-written config;
the scaffolding they share lives in tests/helpers (import it from there, not from here).

Slow tests: a test that runs a real pipeline, cluster, search or an ImageNet-sized model (a
minute or more on 2 CPU cores, or seconds that add up) carries pytest's `slow` mark where the
cost is: `@pytest.mark.slow` on the test, or `marks=pytest.mark.slow` on a costly case of a
parametrised test (`slow_cases`); never in a module-wide `pytestmark` (which may say what a
module needs, e.g. `needs_data`): each test's own lines say whether `make test-fast`
(`pytest -m "not slow"`) runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import PARAMS_FILES
from helpers.cases import is_imagenet, slow_cases
from helpers.shared import SharedRun, copy_project, shared_run_of

from pipeline.rayenv import prepare_ray

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
prepare_ray()  # before any test module imports ray
# `make test` runs two tests at once on 2 cores: torch with a thread per core in each would
# oversubscribe them, and OpenMP's spinning threads burn the other test's CPU. One thread per
# process: this one, and the commands and Ray workers its tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
# A shell starts a background job (`make test &`) with SIGINT ignored, and every process below it
# inherits that: the tests that press Ctrl-C on a command need it delivered, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=slow_cases(PARAMS_FILES, is_imagenet))
def params_file(request: pytest.FixtureRequest) -> Path:
    return request.param


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> SharedRun:
    """The shrunk pipeline run to the end once per session (both xdist workers share it), as
    two runs at once: tests that only read its outputs take it; tests that change them take
    `shared_copy` or copy it themselves (helpers.shared.copy_project)."""
    return shared_run_of(tmp_path_factory)


@pytest.fixture
def shared_copy(shared_run: SharedRun, tmp_path: Path) -> Path:
    """A copy of the shared run's local project of the test's own (DVC cache, MLflow store)."""
    return copy_project(shared_run.local, tmp_path / "repo")


# --- scheduling ---------------------------------------------------------------------------------
# `make test` runs `pytest -n 2 --dist loadfile` (whole files, the mode CI has passed with), while
# `--dist loadgroup --no-loadscope-reorder` is tried out: with it the two workers take the work
# units below in this order, the next unit to whichever worker runs dry. No list of
# long files is kept: the order follows from each test's time in the last run (pytest's cache),
# else from the tests' own `slow` marks, and the units from their fixtures. (xdist's own
# loadgroup renames tests `id@group`, which pytest 9 ignores: UnitScheduling reads the units the
# workers write instead.)

DURATIONS = "boostpipe/durations"  # pytest cache key: seconds per test id, from the last run
SLOW_SECONDS = 60.0  # a slow test never timed here: "a minute or more"
UNITS = "boostpipe_units"  # workerinput key: the file each worker writes its units to
_SECONDS: dict[str, float] = {}  # this process's reports: test id -> seconds


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that share a module-scoped fixture form one unit; every other test is a unit of
    its own. Units run longest first (a unit's time: its tests' times in the last run, or
    SLOW_SECONDS per slow test never timed), so that the long units start at once and the short
    ones fill the gaps at the end; a module's tests stay in their order."""
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    timed: dict[str, float] = cache.get(DURATIONS, {}) if cache else {}
    units = {
        item.nodeid: item.path.stem if _module_fixtures(item) else item.nodeid for item in items
    }
    cost: Counter[str] = Counter()
    for item in items:
        slow = SLOW_SECONDS if item.get_closest_marker("slow") else 0.0
        cost[units[item.nodeid]] += timed.get(item.nodeid, slow)
    items.sort(key=lambda item: -cost[units[item.nodeid]])
    workerinput = getattr(config, "workerinput", {})
    if UNITS in workerinput:  # for the controller's UnitScheduling
        path = Path(f"{workerinput[UNITS]}.{workerinput['workerid']}")
        path.write_text(json.dumps(units))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Where each xdist worker writes its units (the controller collects nothing itself): one
    folder per session, removed when it ends."""
    if not hasattr(node.config, "_boostpipe_units"):
        node.config._boostpipe_units = Path(tempfile.mkdtemp(prefix="boostpipe-units-"))
    node.workerinput[UNITS] = str(node.config._boostpipe_units / "units.json")


def pytest_unconfigure(config: pytest.Config) -> None:
    if hasattr(config, "_boostpipe_units"):
        shutil.rmtree(config._boostpipe_units, ignore_errors=True)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: whole units, in the workers' order."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if not hasattr(self, "_units"):
                (written, *_) = sorted(config._boostpipe_units.glob("units.json.*"))
                self._units = json.loads(written.read_text())
            return self._units.get(nodeid, nodeid)

    return UnitScheduling(config, log)


def _test_id(nodeid: str) -> str:
    """The id collection gives a test: xdist's loadgroup appends `@group` to it."""
    path, _, name = nodeid.rpartition("::")
    return f"{path}::{name.split('@')[0]}" if path else nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Each test's setup, call and teardown seconds, summed (in the process that reports)."""
    test = _test_id(report.nodeid)
    _SECONDS[test] = _SECONDS.get(test, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The times of this run into pytest's cache, for the next run's order (the controller
    only: under xdist it receives every worker's reports)."""
    config = session.config
    if getattr(config, "cache", None) is None or hasattr(config, "workerinput") or not _SECONDS:
        return
    config.cache.set(DURATIONS, {**config.cache.get(DURATIONS, {}), **_SECONDS})
