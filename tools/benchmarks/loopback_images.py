"""JPEGs served over 127.0.0.1: the download section's URLs and the corpus the other sections embed."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def picture(seed: int, width: int = 320, height: int = 240) -> bytes:
    """A JPEG that compresses like a photo more than noise does: gradients, shapes, mild grain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = a * (x / width)[..., None] + b * (y / height)[..., None] * 0.5
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        img[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 160)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class LoopbackImages:
    """HTTP server on 127.0.0.1 serving /img/{i}.jpg (a pool of distinct JPEGs, i modulo the pool)."""

    def __init__(self, pool: int):
        from pipeline.loopback import LoopbackServer

        self.pool = [picture(i) for i in range(pool)]
        self.server = LoopbackServer(self.route)
        self.base = self.server.base

    def route(self, path: str):
        try:
            return 200, "image/jpeg", self.pool[int(path.split("/")[-1].split(".")[0]) % len(self.pool)], 0
        except ValueError:
            return 404, "text/plain", b"", 0

    def url_list(self, path: Path, n: int) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"url": [f"{self.base}/img/{i}.jpg" for i in range(n)],
                                 "caption": [f"picture number {i}" for i in range(n)]}), path)
        return path

    def close(self) -> None:
        self.server.close()
