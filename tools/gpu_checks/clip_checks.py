"""CLIP on cuda: model.clip's fp16 ViT-B-32 (agreement with fp32, images/s) and the embed stage's
encoder class (pipeline.embed_encoder.ClipEncoder) on a tiny config, as its actors run it."""
from __future__ import annotations

import time

import numpy as np
import torch

from tools.gpu_checks.common import ROOT, Context, cosines, expect, importable_ray


def clip_fp16(ctx: Context) -> dict:
    """A randomly initialised ViT-B-32 through model.clip, fp16 weights on cuda, against the same
    weights in fp32 on the CPU: cosine agreement of image and text embeddings, and images/s."""
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
    result = {"dtype": str(gpu.model.visual.conv1.weight.dtype),  # a converted layer (norms stay fp32)
              "image_cosine_fp16_vs_fp32_min": float(cosines(a, b).min()),
              "text_cosine_fp16_vs_fp32_min": float(cosines(ta, tb).min()),
              "images_per_s_batch_256": round(8 * 256 / (time.perf_counter() - start), 1)}
    expect(result["dtype"] == "torch.float16", f"fp16 weights on cuda, got {result['dtype']}")
    expect(min(result["image_cosine_fp16_vs_fp32_min"], result["text_cosine_fp16_vs_fp32_min"]) > 0.99,
           f"fp16 and fp32 embeddings within cosine 0.99: {result}")
    return result


def embed_encoder(ctx: Context) -> dict:
    """ClipEncoder, the class each embed actor (num_gpus=1) runs, built as the stage builds it (load=False,
    then load(): random init from seed 0) on model/configs/tiny_clip.json: fp16 on cuda against fp32 on
    the CPU, on uint8 pixel batches (40 images at batch 16: a partial last batch) and their captions."""
    from pipeline.embed_encoder import ClipEncoder

    config = str(ROOT / "model" / "configs" / "tiny_clip.json")
    gpu, cpu = (ClipEncoder(config, None, device, 16, text=True, load=False) for device in ("cuda", "cpu"))
    with importable_ray() as ray_module:
        gpu.load()
        cpu.load()
    size, dim = gpu.info()["image_size"], gpu.bundle.embed_dim
    rng = np.random.default_rng(0)
    chunk = {"pixels": rng.integers(0, 256, (40, size, size, 3), dtype=np.uint8),
             "caption": [f"a photo of thing {i}" for i in range(39)] + [None]}
    start = time.perf_counter()
    a = gpu(chunk)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    b = cpu(chunk)
    result = {"weights": str(gpu.bundle.model.visual.conv1.weight.dtype), "shape": list(a["img"].shape),
              "image_cosine_min": float(cosines(a["img"], b["img"]).min()),
              "text_cosine_min": float(cosines(a["text"], b["text"]).min()),
              "first_call_seconds": round(seconds, 3), "ray": ray_module}
    expect(a["img"].shape == (40, dim) and a["img"].dtype == np.float16 and a["text"].shape == (40, dim),
           f"float16 [40, {dim}] image and text embeddings, got {a['img'].dtype} {a['img'].shape}, {a['text'].shape}")
    expect(gpu.bundle.device.type == "cuda" and result["weights"] == "torch.float16", f"fp16 weights on cuda: {result}")
    expect(min(result["image_cosine_min"], result["text_cosine_min"]) > 0.99,
           f"cuda fp16 and CPU fp32 embeddings within cosine 0.99 (same seed-0 weights): {result}")
    return result
