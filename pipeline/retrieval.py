"""Search an index directory built by this pipeline: the one retrieval path for neighbours,
`knnd search` and sampling (any index directory: that is database swapping).

An index directory holds `image.index` and `index_infos.json`; the infos name the embed
folder whose float16 embeddings back it (exact re-ranking, neighbour vectors) and whose
metadata gives keys and captions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import faiss_build, faiss_search
from pipeline.embeddings import Embeddings, read_metadata
from pipeline.runner import StageError, UsageError, read_json


class Retriever:
    """A loaded (memory-mapped) index plus the embeddings and metadata behind it."""

    def __init__(self, index_dir: str | Path, queries: str = "image"):
        """`queries`: "image" (database items, as neighbours sends) or "text" (prompts): IVF/HNSW indexes
        search each with the nprobe/efSearch the index stage tuned for it."""
        self.dir = Path(index_dir)
        infos_path = self.dir / "index_infos.json"
        if not infos_path.exists():
            raise UsageError(f"{self.dir} is not an index directory (no index_infos.json): "
                             f"build one with `knnd run index` or pass --index DIR")
        self.infos = read_json(infos_path, "Rebuild it with `knnd run index --force`.")
        try:
            self.index = faiss_build.load_index(self.dir / "image.index", mmap=True)
        except RuntimeError as e:
            raise StageError(f"{self.dir / 'image.index'} cannot be read ({str(e).splitlines()[0][:200]}): "
                             f"rebuild it with `knnd run index --force`") from None
        nprobe = self.infos.get("nprobe_text") if queries == "text" else None
        nprobe = nprobe or self.infos.get("nprobe")
        if self.infos.get("search_param") and nprobe:
            faiss_search.set_search_param(self.index, self.infos["search_param"], int(nprobe))
        self.embeddings = Embeddings(Path(self.infos["embed_dir"]))
        self.dim = int(self.infos["d"])
        self._meta: dict | None = None

    def check_dim(self, dim: int, what: str) -> None:
        if dim != self.dim:
            raise UsageError(f"{what} gives {dim}-dimensional embeddings but the index {self.dir} holds "
                             f"{self.dim}-dimensional ones: use an index built with the same CLIP model")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims descending, rows) of the k nearest indexed images; exact re-ranking when the index asks for it."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.check_dim(queries.shape[1], "the query")
        if self.infos.get("refine"):
            return faiss_search.refine_search(self.index, self.embeddings, queries, k, self.infos.get("refine_k_factor", 4))
        return faiss_search.search(self.index, queries, k)

    def index_rows(self) -> np.ndarray:
        """The embed rows this index holds (rows.npy; every row for indexes built before it existed)."""
        path = self.dir / "rows.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
        return np.arange(len(self.embeddings), dtype=np.int64)

    def metadata(self) -> dict:
        if self._meta is None:
            self._meta = read_metadata(self.embeddings.dir, self.embeddings.manifest, ["key", "caption", "phash"])
        return self._meta

    def describe(self, rows: np.ndarray) -> list[tuple[str, str]]:
        meta = self.metadata()
        return [(str(meta["key"][r]), str(meta["caption"][r])) for r in rows]
