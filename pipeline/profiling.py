"""What each exit costs in milliseconds per image on the device that serves, in two regimes.

FLOPs predict time poorly: an early block of a multi-scale network works at full resolution on
few channels, at a lower FLOP rate than later blocks, and fixed per-call costs weigh more when
images come one at a time. So the profile stage measures every exit's cumulative cost the way
evaluate and predict run early exit:

- `batch-N`: throughput, an `ExitQueue` running full batches of `evaluate.batch_size` at every
  exit;
- `batch-1`: latency, one image at a time.

Exit k's cost is timed by sending every image out at exit k (no image meets a threshold before
it), so it holds what an image leaving there pays in a mixed run: its blocks and heads, each
exit's confidence check, and the gathers between blocks. A mixed run then costs the exit
fractions times these costs, which is what calibration budgets against.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from pipeline.boosting import BoostNet
from pipeline.config import ConfigError
from pipeline.devices import describe_device
from pipeline.evaluation import EarlyExitRun, Source, early_exit
from pipeline.latency import early_exit_one_at_a_time

BATCH_1, BATCH_N = "batch-1", "batch-N"
REGIMES = (BATCH_1, BATCH_N)
PARAM_KEYS = {BATCH_1: "batch_1", BATCH_N: "batch_n"}  # calibrate.budgets_ms.<key>
COLUMNS = {BATCH_1: "ms_batch_1", BATCH_N: "ms_batch_n"}  # JSON columns, plottable by DVC


class StaleProfile(ConfigError):
    """The profile was measured on another device, CPU or thread count than this run's."""


def apply_threads(threads: int | None) -> None:
    """`evaluate.threads`: the torch thread count every timed run uses (None: torch's own)."""
    if threads is not None:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else what Python knows of the processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Machine:
    """Where a time was measured: it holds only there."""

    device: str  # cpu, or cuda and the GPU's name
    cpu: str
    threads: int  # torch threads

    @classmethod
    def current(cls, device: torch.device) -> Machine:
        return cls(describe_device(device), cpu_model(), torch.get_num_threads())

    def differences(self, other: Machine) -> list[str]:
        return [
            f"{name} {getattr(self, name)} vs {getattr(other, name)}"
            for name in ("device", "cpu", "threads")
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass(frozen=True)
class ExitProfile:
    """Per exit: counted FLOPs and measured ms per image in each regime (exit_costs.json)."""

    flops: list[int]
    ms: dict[str, list[float]]  # regime -> cumulative ms per image of leaving at each exit
    batch_size: int  # N of batch-N
    machine: Machine

    def to_json(self) -> dict[str, Any]:
        exits = [
            {"exit": k + 1, "flops": f, **{COLUMNS[r]: self.ms[r][k] for r in REGIMES}}
            for k, f in enumerate(self.flops)
        ]
        return {"exits": exits, "batch_size": self.batch_size, **asdict(self.machine)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExitProfile:
        exits = data["exits"]
        return cls(
            [row["flops"] for row in exits],
            {r: [row[COLUMNS[r]] for row in exits] for r in REGIMES},
            data["batch_size"],
            Machine(data["device"], data["cpu"], data["threads"]),
        )

    def check_serves(self, machine: Machine, batch_size: int, source: Path) -> None:
        """Refuse, in one line, times measured elsewhere: they would not hold here."""
        differences = self.machine.differences(machine)
        if batch_size != self.batch_size:
            differences.append(f"batch size {self.batch_size} vs {batch_size}")
        if differences:
            raise StaleProfile(
                f"{source}: measured on another setup ({'; '.join(differences)}); "
                "re-profile here with `dvc repro -f -s profile`"
            )


def forced_exit(exit_index: int, n_exits: int) -> list[float]:
    """Thresholds that send every image out at `exit_index` (0-based): none before it passes."""
    return [float("inf")] * exit_index + [float("-inf")] * (n_exits - exit_index)


Timer = Callable[[list[float]], EarlyExitRun]


def measure(
    net: BoostNet,
    batched: Source,
    single: Source,
    device: torch.device,
    flops: list[int],
    repeats: int,
    warmup: int,
) -> ExitProfile:
    """Each exit's ms per image in both regimes: `warmup` untimed rounds, then `repeats` rounds
    that time every exit in turn (interleaved, so load drift hits all alike); medians."""
    n = net.n_exits
    timers: dict[str, tuple[Timer, int]] = {
        BATCH_N: (lambda t: early_exit(net, batched, t, device), len(batched.split)),
        BATCH_1: (lambda t: early_exit_one_at_a_time(net, single, t, device), len(single.split)),
    }
    times: dict[str, list[list[float]]] = {r: [[] for _ in range(n)] for r in REGIMES}
    for round_index in range(warmup + repeats):
        for k in range(n):
            for regime, (timer, images) in timers.items():
                seconds = timer(forced_exit(k, n)).seconds
                if round_index >= warmup:
                    times[regime][k].append(1000.0 * seconds / images)
    # A later exit runs every block an earlier one does, so it cannot cost less: a median below
    # an earlier exit's is noise, raised to it (calibration needs costs that never fall).
    ms = {r: list(accumulate((statistics.median(t) for t in times[r]), max)) for r in REGIMES}
    return ExitProfile(flops, ms, batched.batch_size, Machine.current(device))
