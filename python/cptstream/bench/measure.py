"""Run one benchmark job in a child process and measure its wall time and peak memory.

Peak memory is measured two ways, because neither alone is right for a process tree:

- `max_rss`: `ru_maxrss` from `os.wait4` on the child. Linux folds in the usage of the child's
  own waited-for children, but as a maximum over single processes, not a sum, so for a pool of
  four workers it is the largest of the five, not their total.
- `tree_rss`: the largest sum of RSS over the child and all its descendants, sampled from /proc
  every 20 ms. It counts concurrent workers together but can miss a peak shorter than the interval.

A job may also run under a hard memory limit: a memory cgroup (a real limit on resident memory
and page cache, which the kernel enforces by reclaiming cache and then killing the process) when
this process can create one, or `RLIMIT_AS`, which limits virtual address space instead. Address
space is always far larger than RSS for a multithreaded process (each thread reserves stack and a
malloc arena), so an `RLIMIT_AS` limit has to be set well above the RSS that it is meant to bound.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = ["JobError", "Measurement", "cgroup_root", "median_of", "run_job"]

SAMPLE_SECONDS = 0.02


class JobError(RuntimeError):
    """A benchmark job exited with an error; the message contains the end of its stderr."""


@dataclass(slots=True)
class Measurement:
    """One run of one job."""

    seconds: float
    """Wall time of the child process, start to exit, interpreter start-up and imports included."""
    max_rss: int
    """Bytes: `ru_maxrss` of the child, the largest single process of its tree."""
    tree_rss: int
    """Bytes: largest sampled sum of RSS over the child's process tree."""
    peak_vms: int
    """Bytes: largest sampled virtual size of the child process itself."""
    returncode: int
    result: dict[str, Any] = field(default_factory=dict)
    """Contents of the job's result file: its own timings and counts."""

    @property
    def peak_rss(self) -> int:
        """Bytes: the larger of the two peak RSS figures."""
        return max(self.max_rss, self.tree_rss)


def cgroup_root() -> tuple[str, Path] | None:
    """Return `("v2" | "v1", directory)` under which this process can create a memory cgroup, or None."""
    unified = Path("/sys/fs/cgroup")
    controllers = unified / "cgroup.controllers"
    if controllers.is_file() and "memory" in controllers.read_text().split() and os.access(unified, os.W_OK):
        return "v2", unified
    legacy = unified / "memory"
    if (legacy / "memory.limit_in_bytes").is_file() and os.access(legacy, os.W_OK):
        return "v1", legacy
    return None


class _MemoryCgroup:
    """A memory cgroup with a hard limit, created for one job and removed after it."""

    def __init__(self, limit_bytes: int) -> None:
        root = cgroup_root()
        if root is None:
            raise PermissionError("cannot create a memory cgroup here (no writable cgroup v1 or v2 memory controller)")
        self.version, base = root
        self.path = base / f"cptstream-bench-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        if self.version == "v2":
            (self.path / "memory.max").write_text(str(limit_bytes))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(limit_bytes))

    def peak_bytes(self) -> int:
        name = "memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes"
        peak = self.path / name
        return int(peak.read_text()) if peak.exists() else 0

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        # The kernel refuses rmdir while a process remains; the job has been waited for by now.
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _sample_tree(pid: int, stop: threading.Event, peaks: dict[str, int]) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            processes = [root, *root.children(recursive=True)]
            peaks["vms"] = max(peaks["vms"], root.memory_info().vms)
        except psutil.NoSuchProcess:
            return
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peaks["rss"] = max(peaks["rss"], total)
        stop.wait(SAMPLE_SECONDS)


def run_job(
    job: str,
    spec: dict[str, Any],
    work_dir: Path,
    *,
    env: dict[str, str] | None = None,
    cgroup_limit: int | None = None,
    address_space_limit: int | None = None,
    cpus: set[int] | None = None,
    timeout: float | None = None,
) -> Measurement:
    """Run `python -m cptstream.bench.jobs JOB` with `spec` and measure it.

    Args:
        job: job name, see `cptstream.bench.jobs.JOBS`.
        spec: the job's arguments, passed as JSON.
        work_dir: directory for the spec, result, stdout and stderr files of this run.
        env: extra environment variables for the child.
        cgroup_limit: bytes; run the job in a memory cgroup with this hard limit.
        address_space_limit: bytes; run the job under `RLIMIT_AS` with this limit.
        cpus: CPU ids the job may run on (its affinity, inherited by its threads and workers).
        timeout: seconds before the job is killed.

    Returns:
        The measurement. `returncode` is non-zero only when a memory limit was given, because a job
        killed by its limit is a result then, not an error. The cgroup's peak and OOM kills go into
        `result`.

    Raises:
        JobError: the job failed without a memory limit.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    spec_path = work_dir / f"{job}-{run_id}.spec.json"
    result_path = work_dir / f"{job}-{run_id}.result.json"
    spec_path.write_text(json.dumps(spec))
    cgroup = _MemoryCgroup(cgroup_limit) if cgroup_limit else None

    # The limits and the affinity are applied by small programs that exec the job in turn, so the
    # pid stays the job's and nothing runs between fork and exec in this (threaded) process.
    argv = [sys.executable, "-m", "cptstream.bench.jobs", job, str(spec_path), str(result_path)]
    if cpus:
        argv = ["taskset", "--cpu-list", ",".join(str(cpu) for cpu in sorted(cpus)), *argv]
    if address_space_limit:
        argv = ["prlimit", f"--as={address_space_limit}", "--", *argv]
    if cgroup is not None:
        argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup.path / "cgroup.procs"), *argv]
    child_env = {**os.environ, **(env or {})}
    stderr_path = work_dir / f"{job}-{run_id}.stderr"
    peaks = {"rss": 0, "vms": 0}
    stop = threading.Event()
    try:
        with open(work_dir / f"{job}-{run_id}.stdout", "wb") as stdout, open(stderr_path, "wb") as stderr:
            started = time.perf_counter()
            process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=child_env)
            sampler = threading.Thread(target=_sample_tree, args=(process.pid, stop, peaks), daemon=True)
            sampler.start()
            deadline = None if timeout is None else started + timeout
            status, usage = _wait(process, deadline)
            seconds = time.perf_counter() - started
            stop.set()
            sampler.join()
        returncode = os.waitstatus_to_exitcode(status)
        result = json.loads(result_path.read_text()) if result_path.exists() and returncode == 0 else {}
        if cgroup is not None:
            result["cgroup_peak_bytes"] = cgroup.peak_bytes()
            result["cgroup_oom_kills"] = cgroup.oom_kills()
    finally:
        stop.set()
        if cgroup is not None:
            cgroup.remove()

    limited = cgroup_limit is not None or address_space_limit is not None
    if returncode != 0 and not limited:
        tail = stderr_path.read_text(errors="replace")[-4000:]
        raise JobError(f"benchmark job {job!r} exited with status {returncode}; its stderr ends with:\n{tail}")
    if returncode != 0:
        result["stderr_tail"] = stderr_path.read_text(errors="replace")[-2000:]
    # ru_maxrss is in KiB on Linux.
    return Measurement(
        seconds=seconds,
        max_rss=usage.ru_maxrss * 1024,
        tree_rss=peaks["rss"],
        peak_vms=peaks["vms"],
        returncode=returncode,
        result=result,
    )


def _wait(process: subprocess.Popen, deadline: float | None) -> tuple[int, resource.struct_rusage]:
    """Reap the child with `os.wait4`, whose rusage covers exactly this child and its descendants."""
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG if deadline is not None else 0)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        if deadline is not None and time.perf_counter() > deadline:
            process.kill()
            deadline = None
        time.sleep(0.05)


def median_of(measurements: list[Measurement], key: str) -> float:
    """Median of one figure over repeated runs: an attribute of `Measurement` or a key of its `result`."""
    values = [getattr(m, key) if hasattr(m, key) else m.result[key] for m in measurements]
    return float(statistics.median(values))
