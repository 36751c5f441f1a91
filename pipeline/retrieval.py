"""Search an index directory built by this pipeline: the one retrieval path for neighbours,
`knnd search` and sampling (any index directory: that is database swapping).

An index directory holds `image.index`, `index_infos.json`, and (pipeline.index_files) the
vectors, metadata and thumbnails of the images it holds, so it can be moved on its own. An index
built without them reads vectors (exact re-ranking, neighbour vectors), keys and captions from
the embed folder its infos name.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import faiss
import numpy as np

from pipeline import faiss_build, faiss_ondisk, faiss_search
from pipeline.cell_assign import cells_by_row
from pipeline.embeddings import Embeddings, read_metadata
from pipeline.files import StageError, UsageError, read_json
from pipeline.index_files import METADATA, THUMBNAILS, VECTORS, IndexVectors


class Retriever:
    """A loaded (memory-mapped) index plus the embeddings and metadata behind it."""

    def __init__(self, index_dir: str | Path, queries: str = "image", gpu_assign: bool = False):
        """`queries`: "image" (database items, as neighbours sends) or "text" (prompts): IVF/HNSW indexes
        search each with the nprobe/efSearch the index stage tuned for it. `gpu_assign`: bulk searches
        assign their queries to IVF cells on this process's GPU (neighbours.gpus_per_actor)."""
        self.dir, self.gpu_assign = Path(index_dir), gpu_assign
        infos_path = self.dir / "index_infos.json"
        if not infos_path.exists():
            raise UsageError(f"{self.dir} is not an index directory (no index_infos.json): "
                             f"build one with `knnd run index` or pass --index DIR")
        self.infos = read_json(infos_path, "Rebuild it with `knnd run index --force`.")
        try:
            self.index = faiss_ondisk.load_index(self.dir / "image.index", mmap=True)
        except RuntimeError as e:
            lists = " (its inverted lists, image.ivfdata, must sit beside it: copy the whole folder)" \
                if ".ivfdata" in str(e) else ""
            raise StageError(f"{self.dir / 'image.index'} cannot be read ({str(e).splitlines()[0][:200]}){lists}: "
                             f"rebuild it with `knnd run index --force`") from None
        nprobe = self.infos.get("nprobe_text") if queries == "text" else None
        nprobe = nprobe or self.infos.get("nprobe")
        if self.infos.get("search_param") and nprobe:
            faiss_search.set_search_param(self.index, self.infos["search_param"], int(nprobe))
        self.self_contained = (self.dir / VECTORS).exists()
        if self.self_contained and not (self.dir / "rows.npy").exists():
            raise StageError(f"{self.dir} has {VECTORS} but no rows.npy (copied in part?): copy the whole index folder, "
                             f"or rebuild it with `knnd run index --force`")
        if self.self_contained:
            self.embeddings = IndexVectors(self.dir, self.index_rows())
        else:
            self.embeddings = Embeddings(Path(self.infos["embed_dir"]))
        self.dim = int(self.infos["d"])
        self._meta: dict | None = None
        self._allowed: dict[str, np.ndarray] = {}
        self._selectors: dict[str, tuple] = {}  # where -> (faiss selector, the bitmap it reads)

    def check_dim(self, dim: int, what: str) -> None:
        if dim != self.dim:
            raise UsageError(f"{what} gives {dim}-dimensional embeddings but the index {self.dir} holds "
                             f"{self.dim}-dimensional ones: use an index built with the same CLIP model")

    def search(self, queries: np.ndarray, k: int, where: str | None = None, bulk: bool = False,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sims descending, rows) of the k nearest indexed images; exact re-ranking when the index asks for it.
        `where` (a metadata filter, pipeline.filters): the k nearest that satisfy it (filtered inside faiss).
        `bulk`: a large batch (the neighbours stage): IVF,Flat indexes score it list by list (same results).
        `rows`: with `bulk`, the queries' own embed rows when they are indexed images: an IVF,Flat searched
        at nprobe 1 then searches the list each is stored in (the cell its add assigned: its nearest where
        that was brute force) without assigning them; rows outside the index are assigned as usual."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.check_dim(queries.shape[1], "the query")
        if where is None:
            return self._search(queries, k, bulk, cells=self._stored_cells(queries, rows) if bulk else None)
        allowed = self.allowed(where, at_least=k)
        n = int(self.infos.get("n") or len(self.index_rows()))
        if not faiss_build.on_gpu(self.index):
            return self._filtered_search(queries, k, where, allowed.sum() / max(n, 1))
        fetch = 4 * k  # faiss-gpu takes no selector: over-fetch and keep those that satisfy it
        while True:
            sims, rows = self._search(queries, min(fetch, n))
            ok = (rows >= 0) & allowed[np.maximum(rows, 0)]
            if (ok.sum(axis=1) >= k).all() or fetch >= n:
                break
            fetch *= 4
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # satisfying first, nearest first
        sims, rows = np.take_along_axis(sims, order, axis=1), np.take_along_axis(rows, order, axis=1)
        taken = np.take_along_axis(ok, order, axis=1)
        return np.where(taken, sims, -np.inf).astype(sims.dtype), np.where(taken, rows, -1)

    def prepare_bulk(self) -> None:
        """Build the bulk searches' cell assigner now (on the GPU with `gpu_assign`), not at the first search."""
        self._bulk_coarse  # noqa: B018 - a cached property: built once

    @functools.cached_property
    def _bulk_coarse(self):
        """bulk_search's exact cell assignment (faiss_search.exact_coarse), built at the first bulk search."""
        return faiss_search.exact_coarse(self.index, self.gpu_assign)

    @functools.cached_property
    def _cells_by_row(self) -> np.ndarray | None:
        """cell_assign.cells_by_row for a CPU IVF,Flat searched at nprobe 1 (4 bytes per row), else None."""
        inner = faiss.downcast_index(self.index)
        if type(inner) is not faiss.IndexIVFFlat or inner.nprobe != 1 or self.infos.get("refine"):
            return None
        rows = self.index_rows()
        return cells_by_row(inner, int(rows.max()) + 1 if len(rows) else 0)

    def _stored_cells(self, queries: np.ndarray, rows: np.ndarray | None) -> np.ndarray | None:
        """[n, 1]: the cells `rows` are stored in; rows the index does not hold (index.where) get theirs
        from the bulk assigner. None where the index is not an IVF,Flat searched at nprobe 1."""
        table = None if rows is None else self._cells_by_row
        if table is None or len(rows) == 0:
            return None
        rows = np.asarray(rows)
        cells = np.full(len(rows), -1, np.int64)
        held = rows < len(table)
        cells[held] = table[rows[held]]
        missing = cells < 0
        if missing.any():
            coarse = self._bulk_coarse  # None for a flat quantizer, exact already
            coarse = coarse if coarse is not None else faiss.downcast_index(self.index).quantizer
            cells[missing] = coarse.search(queries[missing], 1)[1][:, 0]
        return cells[:, None]

    def _search(self, queries: np.ndarray, k: int, bulk: bool = False, params=None,
                cells: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`params`: faiss SearchParameters (a filter); `bulk` applies without them, `cells` (known) with `bulk`."""
        if self.infos.get("refine"):
            return faiss_search.refine_search(self.index, self.embeddings, queries, k,
                                              self.infos.get("refine_k_factor", 4), params=params,
                                              coarse=self._bulk_coarse if bulk and params is None else None)
        if bulk and params is None:
            return faiss_search.bulk_search(self.index, queries, k, None if cells is not None else self._bulk_coarse, cells)
        return faiss_search.search(self.index, queries, k, params=params)

    def _filtered_search(self, queries: np.ndarray, k: int, where: str,
                         fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """faiss skips the rows outside `where` while it searches (an IDSelectorBitmap). A fraction f of
        the rows satisfy it, so nprobe (efSearch for HNSW) is divided by f: the search scans as many
        satisfying vectors as the tuned value scans vectors unfiltered. Then it doubles while a query
        has fewer than k, up to every cell (an exhaustive scan); an HNSW still short at the largest
        efSearch is answered exactly over the satisfying rows, which are then few."""
        if where not in self._selectors:
            self._selectors[where] = faiss_search.row_selector(self._allowed[where])
        selector, _bits = self._selectors[where]
        name, value = faiss_search.search_param(self.index)
        high = faiss_build.innermost_index(self.index).nlist if name == "nprobe" else faiss_search.HNSW_MAX_EF
        if name is not None:
            value = min(high, math.ceil(value / max(fraction, 1 / high)))
        while True:
            sims, rows = self._search(queries, k, params=faiss_search.filtered_params(self.index, selector, value))
            if name is None or (rows >= 0).all() or (name == "nprobe" and value >= high):
                return sims, rows
            if value >= high:
                satisfying = np.flatnonzero(self._allowed[where])
                return faiss_search.exact_search(self.embeddings[satisfying], queries, k, ids=satisfying)
            value = min(2 * value, high)

    def allowed(self, where: str, at_least: int = 0) -> np.ndarray:
        """bool mask by embed row: the indexed images whose metadata satisfies `where` (cached); fewer
        than `at_least` of them is a UsageError saying how many."""
        if where not in self._allowed:
            from pipeline.filters import matching_rows, row_mask

            indexed = self.index_rows()
            if self.self_contained:
                rows = matching_rows([self.dir / METADATA], where, "--where")
            else:
                files = [self.embeddings.dir / s["metadata"] for s in self.embeddings.manifest["shards"]]
                rows = matching_rows(files, where, "--where")
            self._allowed[where] = row_mask(np.intersect1d(rows, indexed), int(indexed.max()) + 1 if len(indexed) else 0)
        satisfied = int(self._allowed[where].sum())
        if satisfied < at_least:
            raise UsageError(f"--where {where!r}: only {satisfied} images of the index {self.dir} satisfy it, "
                             f"fewer than k={at_least}: lower k or loosen the filter")
        return self._allowed[where]

    def index_rows(self) -> np.ndarray:
        """The embed rows this index holds (rows.npy; every row for indexes built before it existed)."""
        path = self.dir / "rows.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
        return np.arange(len(self.embeddings), dtype=np.int64)

    def metadata(self) -> dict:
        """{key, caption}: arrays indexed by position (self-contained index) or by embed row."""
        if self._meta is None:
            if self.self_contained:
                import pyarrow.parquet as pq

                table = pq.read_table(self.dir / METADATA, columns=["key", "caption"])
                self._meta = {name: table.column(name).to_numpy(zero_copy_only=False) for name in ("key", "caption")}
            else:
                self._meta = read_metadata(self.embeddings.dir, self.embeddings.manifest, ["key", "caption"])
        return self._meta

    def describe(self, rows: np.ndarray) -> list[tuple[str, str]]:
        meta = self.metadata()
        at = self.embeddings.positions(rows) if self.self_contained else np.asarray(rows, dtype=np.int64)
        return [(str(meta["key"][p]), str(meta["caption"][p])) for p in at]

    def thumbnails(self, rows, size: int = 64) -> dict[int, np.ndarray]:
        """{row: uint8 image} for display: the index's own thumbnails, else decoded from the download
        shards behind the embed folder (at `size`)."""
        rows = np.asarray(rows, dtype=np.int64)
        if (self.dir / THUMBNAILS).exists():
            thumbs = np.load(self.dir / THUMBNAILS, mmap_mode="r")
            return {int(r): np.asarray(thumbs[p]) for r, p in zip(rows, self.embeddings.positions(rows))}
        from pipeline.images import DatabaseImages

        return DatabaseImages(Path(self.infos["embed_dir"])).load(rows, size)
