"""CPU seconds each process on this machine spent during a benchmark, from /proc.

On a small machine Ferry's processes share cores with the engine, so "where did the CPU
go" explains a throughput ratio better than any one timing. `CpuSplit` snapshots every
process's user + system time when it starts and when it stops, and groups the difference
by role (the label of the first matching pattern of its command line). It also reports
the machine's idle time and, on a virtual machine, its steal time (CPU the host gave to
someone else while this machine had work: a figure that moves from run to run with the
host's load, not Ferry's).

    with CpuSplit() as cpu:
        ...
    print(cpu.report())
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from types import TracebackType

_TICKS = os.sysconf("SC_CLK_TCK")
# (label, substring of the command line); the first match names the process.
ROLES = [
    # `vllm serve` (bench/vs_vllm_serve.py): its front end, before its engine core.
    ("vllm serve API server", "VLLM::APIServer"),
    ("vllm serve API server", "vllm.entrypoints.openai.api_server"),
    ("vLLM engine core", "EngineCore"),
    ("vLLM engine core", "VLLM::"),
    ("Ferry worker (Celery + runner loop)", "ferry worker"),
    ("Ferry worker (Celery + runner loop)", "cli.main worker"),
    ("Ferry worker (Celery + runner loop)", "celery"),
    ("Ferry API", "ferry api"),
    ("Ferry API", "cli.main api"),
    ("Ferry serve (API)", "cli.main serve"),
    # Workers `ferry serve` starts: `cli.main --log-level LEVEL worker`.
    ("Ferry worker (Celery + runner loop)", " worker"),
    ("PostgreSQL", "postgres"),
    ("Redis", "redis-server"),
    ("benchmark client (this process)", "bench/"),
]


def _snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds so far) for every process still readable."""
    seen: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (
                (entry / "cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
                .strip()
            )
        except OSError:
            continue
        # Fields after the parenthesised command name; utime and stime are 14th and 15th.
        fields = stat.rpartition(")")[2].split()
        seconds = (int(fields[11]) + int(fields[12])) / _TICKS
        seen[int(entry.name)] = (cmdline or stat.split("(", 1)[1].split(")", 1)[0], seconds)
    return seen


def _machine() -> tuple[float, float]:
    """(idle, steal) CPU seconds of the whole machine so far (/proc/stat's first line)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    idle, steal = int(fields[3]) + int(fields[4]), int(fields[7]) if len(fields) > 7 else 0
    return idle / _TICKS, steal / _TICKS


def role(cmdline: str) -> str:
    for label, pattern in ROLES:
        if pattern in cmdline:
            return label
    return "other"


class CpuSplit:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> CpuSplit:
        self._before = _snapshot()
        self._machine_before = _machine()
        self._started = os.times().elapsed
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.wall = os.times().elapsed - self._started
        after = _snapshot()
        idle, steal = _machine()
        self.idle = idle - self._machine_before[0]
        self.steal = steal - self._machine_before[1]
        totals: dict[str, float] = defaultdict(float)
        for pid, (cmdline, seconds) in after.items():
            # A process that started during the run counts from zero. One that ended
            # during it is not seen (its time is lost): snapshot while processes live.
            _, before = self._before.get(pid, ("", 0.0))
            totals[role(cmdline)] += max(0.0, seconds - before)
        self.seconds = dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def add(self, label: str, seconds: float) -> None:
        """Count CPU the snapshots could not see (a child process that ended inside the
        run, measured by the caller with `resource.getrusage(RUSAGE_CHILDREN)`)."""
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds
        self.seconds = dict(sorted(self.seconds.items(), key=lambda kv: -kv[1]))

    def report(self, prefix: str = "") -> str:
        cores = os.cpu_count() or 1
        lines = [
            f"{prefix}CPU seconds by process over {self.wall:.2f} s wall "
            f"({cores} cores = {cores * self.wall:.2f} CPU-seconds available):"
        ]
        for label, seconds in self.seconds.items():
            if seconds >= 0.01:
                lines.append(f"{prefix}  {label:<38} {seconds:7.2f}")
        lines.append(f"{prefix}  {'(machine idle)':<38} {self.idle:7.2f}")
        lines.append(f"{prefix}  {'(VM steal: taken by the host)':<38} {self.steal:7.2f}")
        return "\n".join(lines)
