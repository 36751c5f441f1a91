"""faiss-gpu as the stages run it: the index build (GPU k-means, cells assigned on the GPU while
adding), exact search, GPU search, the neighbours stage's cell assignment and the k-means refinement."""
from __future__ import annotations

import time

import numpy as np

from tools.gpu_checks.common import Context, expect


def faiss_gpu_build(ctx: Context) -> dict:
    """The index stage's build where faiss sees a GPU (train_index/add_batches with use_gpu None resolve to
    True; passed explicitly here): IVF64,Flat (k-means assigned through a GPU flat index) and
    OPQ8_64,IVF1100,PQ8 (the two-level k-means above 1,024 cells, OPQ in front), built on the GPU and on
    the CPU, recall@10 of each against numpy's brute force on 40,000 clustered vectors; exact_search on
    the GPU (knn_ground_truth with ngpu) and the IVF,Flat searched on the GPU (index_for_search) too."""
    from pipeline import faiss_build, faiss_search
    from pipeline.synthetic import clustered_unit_vectors

    x = clustered_unit_vectors(41_000, 64, n_clusters=400, seed=0)
    queries, db = x[:1000], x[1000:]
    true = np.argsort(-(queries @ db.T), axis=1)[:, :10]
    recall = {"exact_search gpu": faiss_search.recall_at_k(faiss_search.exact_search(db, queries, 10, use_gpu=True)[1],
                                                           true, 10)}
    seconds, indexes = {}, {}
    for factory, nprobe in (("IVF64,Flat", 64), ("OPQ8_64,IVF1100,PQ8", 32)):
        for where, gpu in (("gpu", True), ("cpu", False)):
            start = time.perf_counter()
            index = faiss_build.train_index(factory, 64, db[:30_000], use_gpu=gpu)
            blocks = ((np.arange(s, min(s + 10_000, len(db))), db[s:s + 10_000]) for s in range(0, len(db), 10_000))
            expect(faiss_build.add_batches(index, blocks, use_gpu=gpu) == len(db), f"{factory}: every vector added")
            seconds[f"{factory} {where}"] = round(time.perf_counter() - start, 2)
            faiss_search.set_nprobe(index, nprobe)
            recall[f"{factory} {where}"] = faiss_search.recall_at_k(faiss_search.search(index, queries, 10)[1], true, 10)
            indexes[f"{factory} {where}"] = index
        gap = recall[f"{factory} gpu"] - recall[f"{factory} cpu"]
        expect(abs(gap) <= 0.05, f"{factory}: GPU- and CPU-built recall@10 within 0.05, got {recall}")
    on_gpu = faiss_search.index_for_search(indexes["IVF64,Flat gpu"], use_gpu=True)
    expect(faiss_build.on_gpu(on_gpu), "index_for_search to put the IVF,Flat on the GPU")
    recall["IVF64,Flat searched on gpu"] = faiss_search.recall_at_k(faiss_search.search(on_gpu, queries, 10)[1], true, 10)
    expect(recall["exact_search gpu"] >= 0.999, f"exact_search on the GPU to match numpy, got {recall}")
    expect(min(recall["IVF64,Flat gpu"], recall["IVF64,Flat searched on gpu"]) >= 0.99,
           f"IVF64,Flat probing every cell to be exact, got {recall}")
    return {"recall_at_10": {k: round(v, 4) for k, v in recall.items()}, "build_seconds": seconds}


def faiss_gpu_assign(ctx: Context) -> dict:
    """neighbours.gpus_per_actor: an OPQ+IVF+PQ index searched with its queries' cells found on the GPU
    (faiss_search.exact_coarse(use_gpu=True)) against the same search with a CPU copy of the centroids:
    the same rows, and queries/s of each assignment."""
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
    result = {"gpus": faiss.get_num_gpus(), "queries_per_s": times,  # same rows expected: a flat quantizer
              "same_rows_gpu_cpu": float((found["gpu"] == found["cpu"]).mean()),
              "same_rows_gpu_search": float((found["gpu"] == found["index.search"]).mean())}
    expect(result["same_rows_gpu_cpu"] >= 0.99, f"the GPU's cells to give the CPU's rows, got {result}")
    return result


def faiss_gpu_refine(ctx: Context) -> dict:
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
    expect(abs(result["gpu"]["objective"] - result["cpu"]["objective"]) <= 1e-3,
           f"GPU and CPU k-means objectives within 1e-3, got {result}")
    return result
