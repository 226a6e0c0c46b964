"""Where a command's CPU goes, by kind of process: run it, read every process's CPU time from
/proc once a second, and print CPU-seconds per kind (Ray's actors and daemons, the pipeline's
stages, DVC, MLflow servers, ...) and how busy the machine's cores were.

Linux only; every process on the machine counts, so run it on an otherwise idle one. Processes
that live under a second are missed, and up to a second of each process's last CPU time; the
machine-wide busy figure has everything. For `make test`'s tests:
    python benchmarks/suite_cpu.py -- .venv/bin/python -m pytest -n 2 --dist loadfile
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
# The first of these found in a command line names its kind; Ray's processes name themselves.
KINDS = [
    "dashboard",
    "log_monitor",
    "monitor.py",
    "gcs_server",
    "raylet",
    "runtime_env",
    "mlflow server",
    "uvicorn",
    "chrom",
    "dvc queue",
    "dvc exp",
    "dvc repro",
    "boostpipe tune",
    "pipeline study",
    "exec(eval(sys.stdin",  # pytest-xdist's workers
    "pytest",
]


def kind(command: str) -> str:
    if command.startswith("ray::"):
        return command.split()[0].split(".")[0]
    if stage := re.search(r"-m (stages\.\w+)", command):
        return stage.group(1)
    return next((k for k in KINDS if k in command), " ".join(command.split()[:2])[:60])


def machine_busy() -> int:
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait


def sample(seen: dict[str, tuple[float, str]]) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        key = f"{pid}:{stat[19]}"  # pid and start time: one process
        command = raw.replace(b"\0", b" ").decode(errors="ignore").strip()
        cpu = (int(stat[11]) + int(stat[12])) / HZ
        seen[key] = (cpu, command or seen.get(key, (0.0, ""))[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="+", help="the command to run (after --)")
    parser.add_argument("--top", type=int, default=25, help="kinds to print")
    args = parser.parse_args()
    seen: dict[str, tuple[float, str]] = {}
    sample(seen)
    before = {key: cpu for key, (cpu, _) in seen.items()}
    start, busy = time.monotonic(), machine_busy()
    process = subprocess.Popen(args.command)
    while process.poll() is None:
        sample(seen)
        time.sleep(1.0)
    wall, busy = time.monotonic() - start, (machine_busy() - busy) / HZ
    per_kind: Counter[str] = Counter()
    for key, (cpu, command) in seen.items():
        per_kind[kind(command)] += cpu - before.get(key, 0.0)
    sampled = sum(per_kind.values())
    for name, cpu in per_kind.most_common(args.top):
        print(f"{cpu:8.1f} CPU-s {100 * cpu / sampled:5.1f} %  {name}")
    print(f"{sampled:8.1f} CPU-s sampled; the machine: {busy:.0f} CPU-s busy in {wall:.0f} s")
    print(f"cores busy: {busy / wall / os.cpu_count():.0%}; exit code {process.returncode}")


if __name__ == "__main__":
    main()
