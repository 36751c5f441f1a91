"""Synthetic embed-stage output, so dedup, index and neighbours run at 100k-1M rows without images.

    python tools/make_synthetic_embeddings.py --n 1000000 --workdir work/bench1m [--d 512]
        [--clusters C] [--shard-size S] [--text] [--duplicates 0.02] [--duplicate-noise 0.1] [--seed 0]
    knnd run dedup index neighbours --set workdir=work/bench1m

Writes <workdir>/embed/ exactly as the embed stage lays it out (pipeline.synthetic.write_embed_output):
float16 shards, metadata (key, row, phash, ...) and the manifest. The vectors imitate CLIP image
embeddings more than isotropic clusters would: pipeline.synthetic.clustered_unit_vectors is drawn in a
low-dimensional space (`--intrinsic-dim`, real CLIP embeddings have a fast-decaying spectrum) and
rotated into d dimensions, so each item has graded near neighbours instead of a cluster of ties.
A fraction `--duplicates` are near-copies (cosine ~0.99) of another item, for dedup to find.
With `--text`, caption-like embeddings are written too: the item's vector pushed off the image
distribution along one shared direction (CLIP's modality gap), cosine ~0.5 to their own image.

Rows are generated one shard at a time (clusters are local to a shard), so 1M x 512 needs a few
hundred MB rather than the 2 GB of the whole float32 matrix.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.synthetic import clustered_unit_vectors, write_embed_output  # noqa: E402

CLUSTER_SIZE = 50  # default items per cluster: more than k = 10 neighbours each
ISOTROPIC_NOISE = 0.1  # full-dimensional noise on top of the low-dimensional structure
DUPLICATE_NOISE = 0.1  # near-copies: cosine about 1 / sqrt(1 + 0.1^2) ~ 0.995 to their original
TEXT_GAP = 1.5  # text-like queries: weight of the shared modality-gap direction
TEXT_NOISE = 0.5  # and of their own noise; cosine to their image ~ 1 / sqrt(1 + 1.5^2 + 0.5^2) ~ 0.53


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class SyntheticEmbeddings:
    """Lazy float32 [n, d] matrix: `vectors[a:b]` generates those rows (deterministic per seed).

    Rows are made in blocks of `block_rows`; every block has its own clusters. `text` is the
    matching lazy matrix of caption-like vectors.
    """

    def __init__(self, n: int, d: int = 512, clusters: int | None = None, intrinsic_dim: int = 64,
                 spread: float = 0.5, duplicates: float = 0.02, seed: int = 0, block_rows: int = 10000,
                 duplicate_noise: float = DUPLICATE_NOISE):
        if n < 1 or d < 2 or block_rows < 1:
            raise ValueError(f"need n >= 1, d >= 2 and block_rows >= 1, got n={n}, d={d}, block_rows={block_rows}")
        self.n, self.d, self.block_rows, self.seed = n, d, block_rows, seed
        self.clusters = clusters or max(1, n // CLUSTER_SIZE)
        self.intrinsic_dim = min(intrinsic_dim, d)
        self.spread, self.duplicates, self.duplicate_noise = spread, duplicates, duplicate_noise
        rng = np.random.default_rng([seed, 1])
        # A random orthonormal d x r basis: the low-dimensional structure, rotated into d dimensions.
        self.basis = np.linalg.qr(rng.standard_normal((d, self.intrinsic_dim)))[0].astype(np.float32)
        self.gap = _unit(rng.standard_normal((1, d)).astype(np.float32))[0]
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.d

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self._rows(rows, self.block)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # write_embed_output hashes the whole matrix for the manifest's input_hash, which makes
        # every row at once (2 GB at 1M x 512) until it hashes shard by shard.
        return self[0:self.n].astype(dtype or np.float32, copy=False)

    @property
    def text(self) -> "_TextView":
        return _TextView(self)

    def _rows(self, rows: slice, make_block) -> np.ndarray:
        start, stop, step = rows.indices(self.n)
        if step != 1:
            raise ValueError("only contiguous row slices are supported")
        parts = []
        for b in range(start // self.block_rows, (max(stop, start + 1) - 1) // self.block_rows + 1):
            block = make_block(b)
            lo = b * self.block_rows
            parts.append(block[max(start - lo, 0):min(stop - lo, len(block))])
        return np.concatenate(parts) if parts else np.zeros((0, self.d), np.float32)

    def block(self, b: int) -> np.ndarray:
        """Rows [b * block_rows, (b + 1) * block_rows) as float32 unit vectors."""
        if self._cache is not None and self._cache[0] == b:
            return self._cache[1]
        rows = min(self.block_rows, self.n - b * self.block_rows)
        clusters = max(1, round(self.clusters * rows / self.n))
        low = clustered_unit_vectors(rows, self.intrinsic_dim, clusters, spread=self.spread, seed=self.seed * 1_000_003 + b)
        rng = np.random.default_rng([self.seed, 2, b])
        x = low @ self.basis.T + rng.standard_normal((rows, self.d), dtype=np.float32) * (ISOTROPIC_NOISE / np.sqrt(self.d))
        n_dup = int(rows * self.duplicates)
        if n_dup and rows > 1:
            copies = rng.choice(np.arange(1, rows), size=n_dup, replace=False)
            originals = (rng.integers(0, rows - 1, size=n_dup) + copies + 1) % rows  # any other row
            originals = np.where(np.isin(originals, copies), 0, originals)  # copy a row that is no copy
            noise = rng.standard_normal((n_dup, self.d), dtype=np.float32) * (self.duplicate_noise / np.sqrt(self.d))
            x[copies] = _unit(x[originals]) + noise
        x = _unit(x).astype(np.float32)
        self._cache = (b, x)
        return x

    def text_block(self, b: int) -> np.ndarray:
        """Caption-like vectors of block b: off the image distribution along the shared gap direction."""
        x = self.block(b)
        rng = np.random.default_rng([self.seed, 3, b])
        noise = rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(self.d)
        return _unit(x + TEXT_GAP * self.gap + TEXT_NOISE * noise).astype(np.float32)


class _TextView:
    def __init__(self, source: SyntheticEmbeddings):
        self.source = source
        self.shape = source.shape

    def __len__(self) -> int:
        return self.source.n

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.source._rows(rows, self.source.text_block)


def make_synthetic_embeddings(workdir: Path, n: int, d: int = 512, clusters: int | None = None,
                              shard_size: int = 10000, text: bool = False, duplicates: float = 0.02,
                              intrinsic_dim: int = 64, spread: float = 0.5, seed: int = 0,
                              duplicate_noise: float = DUPLICATE_NOISE) -> dict:
    """Write <workdir>/embed/ for n synthetic rows; returns the embed manifest."""
    vectors = SyntheticEmbeddings(n, d, clusters, intrinsic_dim, spread, duplicates, seed, block_rows=shard_size,
                                  duplicate_noise=duplicate_noise)
    return write_embed_output(Path(workdir), vectors, shard_size, text=vectors.text if text else None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, required=True, help="rows (images) to write")
    p.add_argument("--workdir", type=Path, required=True, help="pipeline workdir: writes <workdir>/embed/")
    p.add_argument("--d", type=int, default=512, help="embedding dimension (ViT-B-32: 512)")
    p.add_argument("--clusters", type=int, default=None, help=f"clusters in all (default n / {CLUSTER_SIZE})")
    p.add_argument("--shard-size", type=int, default=10000, help="rows per embedding shard")
    p.add_argument("--text", action="store_true", help="also write caption-like text_emb/ (text-query recall)")
    p.add_argument("--duplicates", type=float, default=0.02, help="fraction of rows that are near-copies of another")
    p.add_argument("--intrinsic-dim", type=int, default=64, help="dimension of the structure before rotation into d")
    p.add_argument("--spread", type=float, default=0.5, help="within-cluster noise relative to the centre")
    p.add_argument("--duplicate-noise", type=float, default=DUPLICATE_NOISE,
                   help="noise of a near-copy: cosine ~1 / sqrt(1 + noise^2) to its original (0.45: ~0.91, near "
                        "dedup's 0.9 threshold)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 1 or args.d < 2 or args.shard_size < 1 or not 0 <= args.duplicates < 1:
        p.error("need --n >= 1, --d >= 2, --shard-size >= 1 and 0 <= --duplicates < 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if (args.workdir / "embed").exists():
        print(f"{args.workdir / 'embed'} exists: delete it or pick another --workdir", file=sys.stderr)
        return 2
    start = time.time()
    manifest = make_synthetic_embeddings(args.workdir, args.n, args.d, args.clusters, args.shard_size, args.text,
                                         args.duplicates, args.intrinsic_dim, args.spread, args.seed,
                                         args.duplicate_noise)
    print(f"wrote {manifest['rows']} x {manifest['dim']} embeddings in {len(manifest['shards'])} shards "
          f"to {args.workdir / 'embed'} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
