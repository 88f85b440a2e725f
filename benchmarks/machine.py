"""What every benchmark reports about the machine it ran on: CPU, threads, versions, load, matmul peak.

The MFU denominator is *measured*, not taken from a spec sheet: the median rate of a 2048x2048 fp32 GEMM with
the benchmark's thread count, in the same run and under the same background load as the timed steps.

    >>> peak = matmul_peak_flops(threads=1, size=256, repeats=3)
    >>> peak > 0
    True
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from importlib import metadata


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or the platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector-ISA flags that decide fp32 GEMM speed (avx2, avx512f, amx...)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = [x for x in flags if x in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}]
                    return " ".join(keep)
    except OSError:
        pass
    return ""


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int) -> dict[str, str]:
    """The header every benchmark section starts with."""
    return {
        "cpu": cpu_model(),
        "isa": cpu_flags(),
        "cores": str(os.cpu_count()),
        "threads": str(threads),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "trl": package_version("trl"),
        "peft": package_version("peft"),
    }


def matmul_peak_flops(*, threads: int, size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Median GEMM rate (FLOP/s) of a ``size`` x ``size`` matmul in ``dtype`` on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(getattr(torch, dtype))
    b = torch.randn(size, size, generator=g).to(getattr(torch, dtype))
    out = torch.empty(size, size, dtype=getattr(torch, dtype))
    for _ in range(2):
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * size**3 / (time.perf_counter() - t))
    return statistics.median(rates)


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class LoadMeter:
    """How many cores *other* processes kept busy while this process worked: machine-wide busy CPU time minus
    this process's own CPU time, over the wall time between :meth:`start` and :meth:`stop`."""

    wall0: float = 0.0
    busy0: float | None = None
    own0: float = 0.0

    @staticmethod
    def _own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def start(self) -> LoadMeter:
        self.wall0, self.busy0, self.own0 = time.perf_counter(), _busy_cpu_seconds(), self._own()
        return self

    def stop(self) -> dict[str, float | None]:
        wall = max(time.perf_counter() - self.wall0, 1e-9)
        busy1, own = _busy_cpu_seconds(), self._own() - self.own0
        others = None if self.busy0 is None or busy1 is None else max(busy1 - self.busy0 - own, 0.0) / wall
        return {"own_cores": own / wall, "other_cores": others, "loadavg_1m": os.getloadavg()[0]}


def busy_cores(seconds: float = 2.0) -> float | None:
    """Cores the whole machine keeps busy over the next ``seconds`` (None where /proc/stat is unavailable)."""
    busy0 = _busy_cpu_seconds()
    time.sleep(seconds)
    busy1 = _busy_cpu_seconds()
    return None if busy0 is None or busy1 is None else (busy1 - busy0) / seconds


def wait_until_quiet(*, max_wait_s: float, threshold: float = 0.3, poll_s: float = 10.0) -> float | None:
    """Wait (up to ``max_wait_s``) until other processes use fewer than ``threshold`` cores; return the last
    reading. A benchmark cannot stop other work on a shared machine, but it can choose its moment."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = busy_cores()
        if load is None or load < threshold or time.monotonic() >= deadline:
            return load
        time.sleep(poll_s)


def rss_mib() -> float:
    """Current resident set size (MiB) from /proc/self/status (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RESULT_TAG = "BENCH_RESULT "


def run_worker(script: str, spec: dict, timeout: float, *, wait_quiet: float = 0) -> dict:
    """Run ``script --worker SPEC`` in a fresh process (after waiting up to ``wait_quiet`` s for a quiet
    machine) with the thread count pinned and every hub offline; return the JSON it printed after
    ``RESULT_TAG``."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if wait_quiet:
        load = wait_until_quiet(max_wait_s=wait_quiet)
        if load is not None and load >= 0.3:
            print(f"  (still {load:.2f} busy cores after waiting {wait_quiet:.0f} s; running anyway)", flush=True)
    threads = str(spec["threads"])
    repo = Path(script).resolve().parents[1]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=str(repo),
    )
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=repo,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG) and proc.returncode == 0:
            return json.loads(line[len(RESULT_TAG) :])
    raise SystemExit(f"benchmark worker {spec['side']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
