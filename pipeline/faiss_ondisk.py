"""Index files: ``save_index`` and ``load_index`` (memory-mapped), and one IVF index built from parts: partial indexes, each over some of the vectors, merged into
faiss on-disk inverted lists (the recipe of faiss's ``demos/demo_ondisk_ivf.py``, which autofaiss
follows for large builds).

1. train the index once (``faiss_build.train_index``) and write it empty;
2. each part reads that trained index, adds its vectors with their rows as ids, and is written
   whole (``write_partial``): parts are independent, so they run in parallel (Ray tasks);
3. ``merge_partials`` concatenates the parts' inverted lists, cell by cell and in the order given,
   into ``<index>.ivfdata`` through faiss's ``OnDiskInvertedLists``: the lists are written through
   a memory map and never held in RAM together. Concatenating in row order gives the same lists as
   one ``add_with_ids`` of all the vectors, so searches return the same ids and distances.

The result is ``image.index`` (quantizer, codebooks, list offsets) beside ``image.ivfdata`` (codes
and ids). ``load_index`` opens such a pair memory-mapped, read-only, looking for the
``.ivfdata`` beside the index file (``IO_FLAG_ONDISK_SAME_DIR``), so the folder can be moved.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from pipeline.faiss_build import add_batches, make_index, on_gpu
from pipeline.files import atomic_path

IVFDATA_SUFFIX = ".ivfdata"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` atomically; GPU indexes go to CPU first.

    ``atomic_path``: a temporary name beside it, fsync, rename; missing parent folders are created.
    """
    if on_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    with atomic_path(path, fsync=True) as tmp:
        faiss.write_index(index, os.fspath(tmp))


def load_index(path: str | os.PathLike, mmap: bool = True) -> faiss.Index:
    """Read an index; with ``mmap`` its codes stay in the page cache instead of being copied to RAM.

    faiss >= 1.10's IO_FLAG_MMAP_IFC maps Flat/PQ codes, HNSW graphs and IVF lists; older faiss only
    maps IVF lists (IO_FLAG_MMAP) and reads the rest. Index types the mapping reader rejects are read
    plainly. An index with a ``.ivfdata`` beside it (lists on disk, ``faiss_ondisk``) is read with
    its lists from that file, wherever the folder was moved. A mapped index is read-only: adding to it aborts the process, so pass mmap=False to modify.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no faiss index at {path}")
    if os.path.exists(os.path.splitext(path)[0] + ".ivfdata"):
        # Lists on disk (faiss_ondisk): mapped whatever the flags; the mmap flags do not apply to
        # them (IO_FLAG_MMAP crashes the search, IO_FLAG_MMAP_IFC refuses SAME_DIR).
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_READ_ONLY if mmap else 0)
        return faiss.read_index(path, flags)
    if not mmap:
        return faiss.read_index(path)
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
    try:
        return faiss.read_index(path, flag | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return faiss.read_index(path)


def ivfdata_path(index_path: str | os.PathLike) -> Path:
    """Where the on-disk inverted lists of ``index_path`` live: the same name, ``.ivfdata``."""
    return Path(index_path).with_suffix(IVFDATA_SUFFIX)


def supports_parts(factory: str, d: int) -> bool:
    """True for factories with inverted lists that faiss can hold on disk (IVF, not IVFPQR)."""
    index = make_index(factory, d)  # kept referenced: the extracted IVF does not own its C++ object
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQR)


def write_partial(
    trained_path: str | os.PathLike, batches: Iterable[tuple[np.ndarray, np.ndarray]], out_path: str | os.PathLike,
    assigner: faiss.Index | None = None,
) -> int:
    """Add (rows, vectors) blocks to a copy of the trained index at ``trained_path`` and write it to
    ``out_path`` (atomically); returns how many vectors it holds. Assignment runs on the CPU: parts
    are CPU tasks; with ``assigner`` (a ``cell_assign.exact_assigner``, chosen once for every part),
    through it instead of the index's quantizer."""
    index = faiss.read_index(os.fspath(trained_path))
    if index.ntotal:
        raise ValueError(f"{trained_path} already holds {index.ntotal} vectors: pass the empty trained index")
    added = add_batches(index, batches, use_gpu=False, assigner=assigner)
    save_index(index, out_path)
    return added


def merge_partials(
    trained_path: str | os.PathLike, part_paths: list[str | os.PathLike], index_path: str | os.PathLike
) -> faiss.Index:
    """The trained index filled with every part's vectors, its lists in ``ivfdata_path(index_path)``.

    Parts are concatenated in the order given (give them in row order). The lists are merged into
    a temporary file renamed into place at the end; the caller writes the index itself (it is tuned
    first) with ``save_index(index, index_path)``. The ``.ivfdata`` is named by its absolute path
    inside the index; ``load_index`` looks beside the index instead, wherever it is.
    """
    index = faiss.read_index(os.fspath(trained_path))
    final = ivfdata_path(index_path).resolve()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        merge_ondisk(index, [os.fspath(p) for p in part_paths], os.fspath(tmp))
        os.replace(tmp, final)  # the lists stay mapped across the rename
    finally:
        tmp.unlink(missing_ok=True)
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = os.fspath(final)
    return index


def is_on_disk(index: faiss.Index) -> bool:
    """True when the index's inverted lists are faiss ``OnDiskInvertedLists`` (a ``.ivfdata`` file)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
