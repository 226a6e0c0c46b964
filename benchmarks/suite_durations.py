"""Where `make test`'s time goes: seconds per test file (set-up, call and tear-down summed over
its tests) from the durations tests/conftest.py keeps in pytest's cache, one column per run.

Run from the project root after `make test` (copy the cache file aside to compare two runs):
    python benchmarks/suite_durations.py .pytest_cache/v/boostpipe/durations
    python benchmarks/suite_durations.py before.json after.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def per_file(path: Path) -> Counter:
    seconds: Counter = Counter()
    for test, value in json.loads(path.read_text()).items():
        seconds[test.split("::")[0]] += value
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="durations files, oldest first")
    runs = [per_file(path) for path in parser.parse_args().runs]
    files = sorted(set().union(*runs), key=lambda f: -max(run.get(f, 0.0) for run in runs))
    for name in files:
        print(f"{name:40s}" + "".join(f"{run.get(name, 0.0):9.0f}" for run in runs))
    print(f"{'all files':40s}" + "".join(f"{sum(run.values()):9.0f}" for run in runs))


if __name__ == "__main__":
    main()
