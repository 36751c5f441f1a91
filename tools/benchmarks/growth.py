"""growth: dedup, index and neighbours at growing N, each in a fresh process, time and peak memory."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from .common import ROOT, Bench, Row, clock, config
from .synthetic import synthetic

RAY_STAGES = {"download", "embed", "dedup", "neighbours", "pack"}
SCRIPT = ROOT / "tools" / "bench.py"  # its --run-stage flag runs child_stage


def tree_pids(root: int) -> list[int]:
    """A process and all its descendants (Ray's raylet and workers included)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [c for c, p in parent.items() if p == pid]
    return tree


def process_rss(pid: int) -> tuple[int, int]:
    """(resident bytes, anonymous resident bytes) of one process; (0, 0) once it is gone. The difference
    is file-backed pages: memory-mapped files (a neighbour actor's index) live in the shared page cache."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return 0, 0


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants."""
    return sum(process_rss(pid)[0] for pid in tree_pids(root))


class PeakRss:
    """Samples the tree's summed RSS every `every` seconds in a thread: .peak after stop(), and the
    largest single process's peak RSS and peak anonymous RSS (.process_peak, .process_anon_peak)."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every = pid, every
        self.peak = self.process_peak = self.process_anon_peak = 0
        self._sample()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self):
        per_process = [process_rss(pid) for pid in tree_pids(self.pid)]
        self.peak = max(self.peak, sum(rss for rss, _ in per_process))
        self.process_peak = max([self.process_peak, *(rss for rss, _ in per_process)])
        self.process_anon_peak = max([self.process_anon_peak, *(anon for _, anon in per_process)])

    def _run(self):
        while not self.stop_event.wait(self.every):
            self._sample()

    def stop(self) -> int:
        self.stop_event.set()
        self.thread.join()
        self._sample()
        return self.peak


def child_stage(name: str, workdir: str, sets: list[str] = ()) -> int:
    """--run-stage (with --set overrides): one stage in this fresh process; prints a BENCH_RESULT json line."""
    import resource

    from pipeline.runner import ensure_ray, run_stage

    cfg = config(Path(workdir), *sets)
    ray_seconds = 0.0
    if name in RAY_STAGES:
        ray_seconds, _ = clock(lambda: ensure_ray(cfg))
    baseline = tree_rss(os.getpid())
    peak = PeakRss(os.getpid())
    seconds, _ = clock(lambda: run_stage(name, cfg, force=True))
    result = {"seconds": seconds, "ray_seconds": ray_seconds, "baseline_rss": baseline, "peak_rss": peak.stop(),
              "self_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "process_peak_rss": peak.process_peak, "process_peak_anon_rss": peak.process_anon_peak}
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(b: Bench, name: str, wd: Path) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--run-stage", name, "--workdir", str(wd)]
    if b.args.threads:
        cmd += ["--threads", str(b.args.threads)]
    with open(b.log_path, "ab") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        log.write(proc.stdout)
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name} on {wd} failed (exit {proc.returncode}); see {b.log_path}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def section_growth(b: Bench) -> None:
    sizes = b.sizes.growth_n
    results: dict[str, dict[int, dict]] = {}
    for n in sizes:
        wd = synthetic(b, n, text=False, name=f"growth_{n}")
        for name in ("dedup", "index", "neighbours"):
            r = run_child(b, name, wd)
            results.setdefault(name, {})[n] = r
            stage_mb = (r["peak_rss"] - r["baseline_rss"]) / 1e6
            stage_manifest = json.loads((wd / name / "manifest.json").read_text())
            factory = stage_manifest.get("factory") if name == "index" else None
            if name == "dedup":  # the largest process of a partitioned dedup is one partition task
                factory = (f"{stage_manifest['partitions']} partitions, largest task peak RSS "
                           f"{stage_manifest['task_peak_rss_mb']:,.0f} MB")
            b.add(Row("growth", f"{name} N={n:,}", "s", r["seconds"],
                      note=f"peak RSS {r['peak_rss'] / 1e6:,.0f} MB (+{stage_mb:,.0f} MB during the stage; "
                           f"the knnd process alone {r['self_maxrss'] / 1e6:,.0f} MB; the largest process "
                           f"{r['process_peak_rss'] / 1e6:,.0f} MB, of it anonymous "
                           f"{r['process_peak_anon_rss'] / 1e6:,.0f} MB, the rest mapped files)"
                           + (f"; {factory}" if factory else ""),
                      includes="run_stage in a fresh process (Ray start excluded); RSS summed over the process "
                               "and its descendants (Ray workers), sampled every 0.25 s; per process: VmRSS and "
                               "RssAnon from /proc (mapped index pages are shared page cache, counted in each "
                               "process's VmRSS)",
                      ours_reps=[r]))
        shutil.rmtree(wd, ignore_errors=True)  # 1M rows: ~3 GB of embeddings and index
    if len(sizes) < 2:
        return
    small, big = sizes[0], sizes[-1]
    for name, by_n in results.items():
        t_exp = math.log(by_n[big]["seconds"] / by_n[small]["seconds"]) / math.log(big / small)
        m_small = max(by_n[small]["peak_rss"] - by_n[small]["baseline_rss"], 1)
        m_big = max(by_n[big]["peak_rss"] - by_n[big]["baseline_rss"], 1)
        b.add(Row("growth", f"{name} cost exponent, N {small:,} -> {big:,}", "", t_exp,
                  target_text="~1 (linear)",
                  note=f"time x{by_n[big]['seconds'] / by_n[small]['seconds']:.1f}, stage memory x{m_big / m_small:.1f} "
                       f"for N x{big / small:.0f}; memory exponent {math.log(m_big / m_small) / math.log(big / small):.2f}",
                  includes="log(time ratio) / log(N ratio): 1 = linear, 2 = quadratic"))
