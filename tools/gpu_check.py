"""The GPU paths in one short run (for a machine with CUDA; nothing is downloaded):

1. fp16 CLIP embedding: a randomly initialised ViT-B-32 through `model.clip` (fp16 weights on
   cuda) against the same weights in fp32 on the CPU: cosine agreement and images/s.
2. bf16 training: the trainer's own loop (`model.trainer.train_loop`) on cuda with bf16 autocast,
   on a pack folder (the demo's), for `--steps` steps or `--seconds`, whichever ends first; the
   EMA weights of chosen steps are written as slim checkpoints (model_config + ema) that
   `knnd sample`/`knnd evaluate --checkpoint` load on any machine.
3. Sampling on cuda (bf16 autocast) from the trained model.
4. faiss-gpu cell assignment (neighbours.gpus_per_actor): an OPQ+IVF+PQ index searched with its
   queries' cells found on the GPU (`faiss_search.exact_coarse(use_gpu=True)`) against the same
   search with a CPU copy of the centroids: the same rows, and queries/s of each assignment.

    python tools/gpu_check.py --pack work/demo/pack --out OUT [--steps 17000] [--seconds 300]

Writes OUT/gpu_check.json, OUT/metrics.jsonl and OUT/step_XXXXXXX.pt files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def clip_fp16(report: dict) -> None:
    from model.clip import encode_images, encode_texts, load_clip

    torch.manual_seed(0)
    gpu = load_clip("ViT-B-32", None, "cuda")
    cpu = load_clip("ViT-B-32", None, "cpu")
    cpu.model.load_state_dict({k: v.float().cpu() for k, v in gpu.model.state_dict().items()})
    images = torch.rand(16, 3, 224, 224)
    a, b = encode_images(gpu, images), encode_images(cpu, images)
    texts = ["a red heart", "a green apple", "a rocket", "a smiling face"]
    ta, tb = encode_texts(gpu, texts), encode_texts(cpu, texts)
    batch = torch.rand(256, 3, 224, 224)
    encode_images(gpu, batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(8):
        encode_images(gpu, batch)
    torch.cuda.synchronize()
    report["clip_fp16"] = {"dtype": str(gpu.model.visual.conv1.weight.dtype),  # a converted layer (norms stay fp32)
                           "image_cosine_fp16_vs_fp32_min": float((a * b).sum(1).min()),
                           "text_cosine_fp16_vs_fp32_min": float((ta * tb).sum(1).min()),
                           "images_per_s_batch_256": round(8 * 256 / (time.perf_counter() - start), 1)}
    print(json.dumps(report["clip_fp16"]), flush=True)


def train_bf16(pack: Path, work: Path, out: Path, steps: int, seconds: float, keep: list[int], report: dict) -> Path:
    from model.trainer import TrainParams, train_loop
    from pipeline.train import model_config

    manifest = json.loads((pack / "manifest.json").read_text())
    config = model_config("demo", manifest["image_size"], manifest["d"], manifest["k"])
    params = TrainParams(steps=steps, batch_size=32, lr=1e-3, weight_decay=0.0, warmup_steps=20, lr_schedule="constant",
                         query_drop_prob=0.5, checkpoint_every=min(keep), use_gpu=True, max_seconds=seconds)
    shards = [str((pack / s["tar"]).resolve()) for s in manifest["shards"] if s["samples"]]
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    result = train_loop({"params": dataclasses.asdict(params), "model": config.to_dict(), "shard_paths": shards,
                         "out_dir": str(work)})
    seconds_spent = time.perf_counter() - start
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    report["train_bf16"] = {"steps": result["step"], "seconds": round(seconds_spent, 1), "final_loss": result["loss"],
                            "median_samples_per_s": float(np.median([m["samples_per_s"] for m in lines])),
                            "batch": 32, "recipe": "demo: 16 px, lr 1e-3 constant, warm-up 20, query_drop_prob 0.5"}
    print(json.dumps(report["train_bf16"]), flush=True)
    shutil.copy(work / "metrics.jsonl", out / "metrics.jsonl")
    last = None
    for path in sorted((work / "checkpoints").glob("step_*.pt")):
        step = int(path.stem.split("_")[1])
        if step in keep or step == result["step"]:
            state = torch.load(path, map_location="cpu", weights_only=True)
            torch.save({"model_config": state["model_config"], "ema": state["ema"], "step": step,
                        "train_params": state["train_params"]}, out / path.name)
            last = out / path.name
    return last


def sample_cuda(checkpoint: Path, report: dict) -> None:
    from model.checkpoint import load_model
    from model.diffusion import sample

    model = load_model(checkpoint, device="cuda")
    emb = torch.randn(8, model.config.k + 1, model.config.clip_dim)
    start = time.perf_counter()
    images = sample(model, emb, steps=25, guidance=3.0, generator=torch.Generator().manual_seed(0))
    report["sample_cuda"] = {"images": int(len(images)), "shape": list(images.shape),
                             "seconds": round(time.perf_counter() - start, 2), "pixel_std": float(images.std())}
    print(json.dumps(report["sample_cuda"]), flush=True)


def faiss_gpu_assign(report: dict) -> None:
    import faiss

    from pipeline import faiss_build, faiss_search

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss_build.train_index("OPQ16_64,IVF4096,PQ16", 64, x[:150_000], use_gpu=False)
    faiss_build.add_batches(index, [(np.arange(len(x)), x)], use_gpu=False)
    faiss.extract_index_ivf(index).nprobe = 16
    gpu, cpu = faiss_search.exact_coarse(index, use_gpu=True), faiss_build.centroid_index(faiss.extract_index_ivf(index))
    queries, times, found = x[:50_000], {}, {}
    faiss_search.bulk_search(index, queries[:1000], 10, gpu)  # warm-up: CUDA and cuBLAS start-up
    for name, coarse in (("gpu", gpu), ("cpu", cpu), ("index.search", None)):
        start = time.perf_counter()
        found[name] = (faiss_search.bulk_search(index, queries, 10, coarse) if coarse is not None
                       else faiss_search.search(index, queries, 10))[1]
        times[name] = round(len(queries) / (time.perf_counter() - start), 1)
    report["faiss_gpu_assign"] = {"gpus": faiss.get_num_gpus(), "queries_per_s": times,  # same rows expected: a flat quantizer
                                  "same_rows_gpu_cpu": float((found["gpu"] == found["cpu"]).mean()),
                                  "same_rows_gpu_search": float((found["gpu"] == found["index.search"]).mean())}
    print(json.dumps(report["faiss_gpu_assign"]), flush=True)


def faiss_gpu_refine(report: dict) -> None:
    """The IVF training's full k-means iterations assigned on the GPUs against the CPU's brute force
    (in full: isotropic 64-dimensional data leaves nothing to project): close k-means objectives
    (float rounding may move a few points), and the GPU's time."""
    import faiss

    from pipeline import coarse_train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * 4096, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start_centroids = coarse_train.coarse_centroids(x, 4096, faiss.METRIC_INNER_PRODUCT, gpu=True, refine_iterations=0)
    result = {}
    for name, gpu in (("gpu", True), ("cpu", False)):
        start = time.perf_counter()
        c = coarse_train.refine(x, start_centroids, 3, faiss.METRIC_INNER_PRODUCT, gpu=gpu)
        result[name] = {"seconds": round(time.perf_counter() - start, 2),
                        "objective": float(faiss.knn(x, c, 1, metric=faiss.METRIC_INNER_PRODUCT)[0].mean())}
    report["faiss_gpu_refine"] = result
    print(json.dumps(result), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=17000)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--keep", default="200,2000,6000", help="steps whose EMA weights are written")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    sections = [("clip_fp16", lambda: clip_fp16(report))]
    last = {}
    sections.append(("train_bf16", lambda: last.setdefault("ckpt", train_bf16(
        args.pack, Path("/tmp/knnd_gpu_train"), args.out, args.steps, args.seconds,
        [int(s) for s in args.keep.split(",")], report))))
    sections.append(("sample_cuda", lambda: sample_cuda(last["ckpt"], report)))
    sections.append(("faiss_gpu_assign", lambda: faiss_gpu_assign(report)))
    sections.append(("faiss_gpu_refine", lambda: faiss_gpu_refine(report)))
    for name, run in sections:
        try:
            run()
        except Exception as e:  # noqa: BLE001 - report every section, whatever fails
            report[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} failed: {e}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
