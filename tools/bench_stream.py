"""Peak memory of a training worker reading a synthetic pack through `train.input: stream`, at two
pack sizes (flat in the pack's size is the target), and a killed run resumed bit for bit.

    python tools/bench_stream.py [--sizes 100000 1000000] [--steps 40] [--dir /tmp/bench_stream]
                                 [--out bench/stream_memory.json] [--keep]

For each size it writes a synthetic pack (32 px images, k = 10, d = 64, 10,000 samples a shard: ~7.2
KB a sample on disk, 7.2 GB at 1 M), then trains the tiny model `--steps` steps from it in a fresh
process (one worker, batch 32, shuffle buffer 5,000) and reads that process's peak RSS
(getrusage ru_maxrss). At the largest size a second run is SIGKILLed after its step-20 checkpoint,
resumed, and its final weights compared with the uninterrupted run's. `--memory` adds the in-memory
input (PackDataset) at the smallest size, for contrast. Packs are deleted at the end unless --keep.
Speed is not measured (the machine may be busy).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHARD = 10_000
RESOLUTION, K, D = 32, 10, 64
BATCH, BUFFER, CHECKPOINT_EVERY = 32, 5000, 10


def write_pack(directory: Path, n: int) -> list[int]:
    """A synthetic pack of n samples in shards of SHARD (random pixels, unit-ish float16 vectors);
    returns the shard sizes (also in sizes.json, which marks a finished pack)."""
    from model.data import write_pack_shard

    done = directory / "sizes.json"
    if done.exists():
        return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    sizes = [min(SHARD, n - start) for start in range(0, n, SHARD)]
    for shard, size in enumerate(sizes):
        rng = np.random.default_rng(shard)
        images = rng.integers(0, 256, (size, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
        emb = (rng.standard_normal((size, D)) / np.sqrt(D)).astype(np.float16)
        nbr = (rng.standard_normal((size, K, D)) / np.sqrt(D)).astype(np.float16)
        samples = ({"key": f"{shard * SHARD + i:09d}", "image": images[i], "emb": emb[i], "nbr": nbr[i]}
                   for i in range(size))
        write_pack_shard(directory / f"{shard:05d}.tar", samples)
    done.write_text(json.dumps(sizes))
    return sizes


def child(pack: Path, run: Path, steps: int, data_input: str) -> None:
    """Train in this process and print {step, peak_rss_bytes} as JSON (the parent reads it)."""
    import torch

    from model.trainer import TrainParams, train
    from pipeline.train import model_config

    torch.set_num_threads(1)
    sizes = json.loads((pack / "sizes.json").read_text())
    paths = [pack / f"{i:05d}.tar" for i in range(len(sizes))]
    params = TrainParams(steps=steps, batch_size=BATCH, lr=1e-3, warmup_steps=5, checkpoint_every=CHECKPOINT_EVERY,
                         log_every=1, seed=0, input=data_input, shuffle_buffer=BUFFER)
    result = train(params, model_config("tiny", RESOLUTION, D, K), paths, run, shard_sizes=sizes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    print(json.dumps({"step": result["step"], "peak_rss_bytes": peak}))


def run_child(pack: Path, run: Path, steps: int, data_input: str = "stream") -> dict:
    command = [sys.executable, __file__, "--child", str(pack), str(run), str(steps), data_input]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"training from {pack} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def killed_and_resumed(pack: Path, straight: Path, run: Path, steps: int) -> dict:
    """SIGKILL a run once its step-20 checkpoint exists, resume it, compare with the straight run."""
    import torch

    from model.checkpoint import latest_checkpoint

    command = [sys.executable, __file__, "--child", str(pack), str(run), str(steps), "stream"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = run / "checkpoints"
    while not (checkpoints / "step_0000020.pt").exists():
        if process.poll() is not None:
            raise SystemExit("the run to kill ended before its step-20 checkpoint")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = latest_checkpoint(checkpoints).name
    if killed_at == f"step_{steps:07d}.pt":
        raise SystemExit(f"the run finished before it was killed: raise --steps above {steps}")
    resumed = run_child(pack, run, steps)
    a, b = (torch.load(latest_checkpoint(r / "checkpoints"), weights_only=True) for r in (straight, run))
    identical = all(torch.equal(a[part][name], b[part][name]) for part in ("model", "ema") for name in a[part])
    return {"killed_with_latest_checkpoint": killed_at, "resumed_peak_rss_bytes": resumed["peak_rss_bytes"],
            "final_weights_bit_identical": identical, "data_position": [a["data_position"], b["data_position"]]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_stream"))
    parser.add_argument("--out", type=Path, default=Path("bench/stream_memory.json"))
    parser.add_argument("--memory", action="store_true", help="also the in-memory input at the smallest size")
    parser.add_argument("--keep", action="store_true", help="keep the packs")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        pack, run, steps, data_input = args.child
        return child(Path(pack), Path(run), int(steps), data_input)

    report = {"resolution": RESOLUTION, "k": K, "d": D, "batch": BATCH, "shuffle_buffer": BUFFER,
              "steps": args.steps, "shard_size": SHARD, "runs": []}
    for n in sorted(args.sizes):
        pack = args.dir / f"pack_{n}"
        started = time.monotonic()
        sizes = write_pack(pack, n)
        disk = sum(f.stat().st_size for f in pack.glob("*.tar"))
        print(f"pack of {n:,} samples: {len(sizes)} shards, {disk / 2**30:.2f} GiB "
              f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
        shutil.rmtree(args.dir / f"train_{n}", ignore_errors=True)
        result = run_child(pack, args.dir / f"train_{n}", args.steps)
        row = {"samples": n, "input": "stream", "pack_bytes": disk, **result}
        print(json.dumps(row), file=sys.stderr)
        report["runs"].append(row)
        if args.memory and n == min(args.sizes):
            shutil.rmtree(args.dir / f"train_{n}_memory", ignore_errors=True)
            row = {"samples": n, "input": "memory", "pack_bytes": disk,
                   **run_child(pack, args.dir / f"train_{n}_memory", args.steps, "memory")}
            print(json.dumps(row), file=sys.stderr)
            report["runs"].append(row)
    largest = max(args.sizes)
    shutil.rmtree(args.dir / "killed", ignore_errors=True)
    report["resume"] = killed_and_resumed(args.dir / f"pack_{largest}", args.dir / f"train_{largest}",
                                          args.dir / "killed", args.steps)
    stream = [r for r in report["runs"] if r["input"] == "stream"]
    report["peak_rss_ratio_largest_to_smallest"] = stream[-1]["peak_rss_bytes"] / stream[0]["peak_rss_bytes"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
