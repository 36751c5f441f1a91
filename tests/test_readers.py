"""pipeline/embeddings.py and pipeline/retrieval.py: rows across shards, metadata order, exact search
against brute force, and the errors a broken folder gets."""
import json

import faiss
import numpy as np
import pytest

from pipeline.embeddings import Embeddings, read_metadata
from pipeline.retrieval import Retriever
from pipeline.runner import StageError, UsageError
from pipeline.synthetic import clustered_unit_vectors, write_embed_output


@pytest.fixture
def embed(tmp_path):
    vectors = clustered_unit_vectors(25, 8, 3, seed=1)
    manifest = write_embed_output(tmp_path, vectors, shard_size=10, captions=[f"cap {i}" for i in range(25)])
    return tmp_path / "embed", vectors.astype(np.float16), manifest


def test_rows_gather_across_shards_in_any_order(embed):
    folder, vectors, _ = embed
    emb = Embeddings(folder)
    assert emb.shape == (25, 8) and len(emb) == 25 and emb.dtype == np.float16
    rows = np.array([24, 0, 9, 10, 19, 20, 9])  # shard edges, repeats, out of order
    assert np.array_equal(emb[rows], vectors[rows])
    assert np.array_equal(emb[3:12], vectors[3:12])
    assert np.array_equal(emb[np.array([[1, 11], [21, 2]])], vectors[np.array([[1, 11], [21, 2]])])
    blocks = list(emb.blocks())
    assert [len(r) for r, _ in blocks] == [10, 10, 5]
    assert np.array_equal(np.concatenate([r for r, _ in blocks]), np.arange(25))
    assert np.array_equal(np.concatenate([v for _, v in blocks]), vectors.astype(np.float32))


def test_metadata_comes_in_row_order(embed):
    folder, _, manifest = embed
    meta = read_metadata(folder, manifest, ["key", "caption"])
    assert list(meta["caption"]) == [f"cap {i}" for i in range(25)]
    assert list(meta["key"]) == [f"{i:09d}" for i in range(25)]


def test_broken_embed_folders_name_the_file_and_the_fix(embed):
    folder, _, manifest = embed
    with pytest.raises(StageError, match=r"has no text embeddings \(set embed.text"):
        Embeddings(folder, kind="text")
    np.save(folder / "img_emb" / "img_emb_00001.npy", np.zeros((10, 4), np.float16))  # wrong width
    with pytest.raises(StageError, match=r"img_emb_00001.npy holds float16 \(10, 4\), the embed manifest says "
                                         r"float16 \(10, 8\): rebuild it with `knnd run embed --force`"):
        Embeddings(folder)
    (folder / "img_emb" / "img_emb_00002.npy").write_bytes(b"not an array")
    (folder / "img_emb" / "img_emb_00001.npy").unlink()
    with pytest.raises(StageError, match=r"img_emb_00001.npy is missing or corrupt"):
        Embeddings(folder)


def write_flat_index(folder, embed_dir, vectors, rows=None):
    folder.mkdir()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.asarray(vectors, np.float32))
    faiss.write_index(index, str(folder / "image.index"))
    (folder / "index_infos.json").write_text(json.dumps({"embed_dir": str(embed_dir), "d": vectors.shape[1]}))
    if rows is not None:
        np.save(folder / "rows.npy", rows)


def test_retriever_search_equals_brute_force(embed, tmp_path):
    folder, vectors, _ = embed
    write_flat_index(tmp_path / "index", folder, vectors)
    retriever = Retriever(tmp_path / "index")
    queries = clustered_unit_vectors(4, 8, 3, seed=9)
    sims, rows = retriever.search(queries, 5)
    exact = queries @ vectors.astype(np.float32).T
    assert np.array_equal(rows, np.argsort(-exact, axis=1, kind="stable")[:, :5])
    assert np.allclose(sims, np.take_along_axis(exact, rows, axis=1), atol=1e-5)
    assert np.array_equal(retriever.index_rows(), np.arange(25))  # no rows.npy: every row
    assert retriever.describe(rows[0][:2]) == [(f"{r:09d}", f"cap {r}") for r in rows[0][:2]]
    with pytest.raises(UsageError, match="the query gives 4-dimensional embeddings but the index .* holds 8-dimensional"):
        retriever.search(queries[:, :4], 5)


def test_retriever_errors_name_the_fix(embed, tmp_path):
    folder, vectors, _ = embed
    with pytest.raises(UsageError, match=r"is not an index directory \(no index_infos.json\): build one with `knnd run index`"):
        Retriever(tmp_path / "nowhere")
    write_flat_index(tmp_path / "index", folder, vectors, rows=np.arange(3, 28))
    assert np.array_equal(Retriever(tmp_path / "index").index_rows(), np.arange(3, 28))
    (tmp_path / "index" / "image.index").write_bytes(b"garbage")
    with pytest.raises(StageError, match=r"image.index cannot be read .*rebuild it with `knnd run index --force`"):
        Retriever(tmp_path / "index")
