"""evaluate's parts that scale: memorisation through the training index, and sampling that resumes
from saved batches only for the same condition."""
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.embeddings import read_holdout
from pipeline.runner import run_stage
from pipeline.synthetic import clustered_unit_vectors, write_embed_output


@pytest.mark.parametrize("factory", ["Flat", "IVF8,PQ4x8"])
def test_memorisation_against_the_whole_training_index_is_brute_forces_through_a_flat_index(tmp_path, factory):
    """Each query's highest cosine to any indexed training image: the index's candidates re-scored
    exactly from the stored vectors. Through a Flat index that is brute force over every indexed
    vector; through a compressed IVF-PQ it never exceeds brute force and equals it wherever the true
    nearest is among the candidates (the approximate top-1 itself is not trusted)."""
    from pipeline.evaluate_memorisation import index_memorisation, nearest_cosine, training_index
    from pipeline.retrieval import Retriever

    x = clustered_unit_vectors(2000, 16, 40, spread=1.0, seed=3)
    write_embed_output(tmp_path, x, shard_size=500)
    cfg = load_config(None, [f"workdir={tmp_path}", "dedup.cosine_threshold=0.999", "dedup.manhattan_threshold=0",
                             "dedup.holdout=0.05", f"index.factory={factory}", "index.nprobe=8"])
    run_stage("dedup", cfg)
    run_stage("index", cfg)
    retriever = training_index(cfg, Retriever(tmp_path / "index").infos)
    indexed = np.load(tmp_path / "index" / "rows.npy")
    queries = x[read_holdout(tmp_path / "dedup")]  # held-out images: not in the index
    truth = (queries @ x[indexed].T).max(axis=1)
    found = nearest_cosine(retriever, queries)
    exact = np.abs(found - truth) < 2e-3  # float16 storage
    assert (found <= truth + 2e-3).all() and exact.mean() >= (1.0 if factory == "Flat" else 0.9)
    result = index_memorisation(retriever, queries, np.arange(len(queries)), None, None, 200)
    assert result["images"] == len(indexed) and result["generated"]["value"] == pytest.approx(found.mean(), abs=1e-5)
    assert nearest_cosine(retriever, np.zeros((0, 16), np.float32)).shape == (0,)
    assert isinstance(Retriever(tmp_path / "index"), Retriever)
    other = load_config(None, [f"workdir={tmp_path}", "evaluate.encoder=ViT-B-32"])  # another encoder's space: none
    assert training_index(other, retriever.infos) is None


def test_saved_sampling_batches_are_reused_only_for_the_same_condition(tmp_path, monkeypatch):
    """evaluate's sampling resumes from saved batches only when everything they depend on is unchanged:
    other conditions (text and neighbours), other noise seeds, another checkpoint (rewritten), or another device draw every
    batch anew; a batch cut short on disk is drawn again; the result always equals a fresh draw's."""
    import os
    import types

    from model import diffusion
    from pipeline import evaluate_sampling

    checkpoint = tmp_path / "step.pt"
    checkpoint.write_bytes(b"weights")

    def sampler(scale, device="cpu"):
        def conditions(prompts, k, **kw):
            n = len(prompts)
            return (np.full((n, 1, 4), scale, np.float32), np.ones((n, 1), bool), np.zeros((n, 0), np.int64),
                    np.zeros((n, 0), np.float32))
        return types.SimpleNamespace(checkpoint=checkpoint, model=None, device=device, check_k=lambda k: None,
                                     conditions=conditions)

    calls = []

    def fake_sample(model, emb, generator, **kw):  # each image from its own seed and its condition
        calls.append(len(generator))
        return np.stack([np.full((2, 2, 3), (g.initial_seed() + int(emb[i, 0, 0])) % 251, np.uint8)
                         for i, g in enumerate(generator)])

    monkeypatch.setattr(diffusion, "sample", fake_sample)
    conf = types.SimpleNamespace(images_per_prompt=2, seed=0, batch_size=2, steps=2, guidance=1.0, scheduler="ddim",
                                 neighbour_guidance=None)
    setup = types.SimpleNamespace(no_knn=True, k=0, neighbours_only=False, where=None, out=tmp_path / "ev")
    prompts = ["a", "b", "c"]
    draw = lambda s, p=prompts: evaluate_sampling.generate(s, p, setup, conf)["images"]  # noqa: E731
    first = draw(sampler(1))
    assert len(calls) == 3
    calls.clear()
    assert np.array_equal(draw(sampler(1)), first) and calls == []  # the same condition: all saved
    for changed in (lambda: sampler(5), lambda: sampler(1, "cuda")):  # other neighbours/text; another device
        calls.clear()
        draw(changed())
        assert len(calls) == 3
    calls.clear()
    assert np.array_equal(draw(sampler(1)), first) and len(calls) == 3  # back again: drawn again, same images
    calls.clear()
    draw(sampler(1), ["a", "b"])  # fewer prompts: other noise seeds (equal conditions and seeds would be equal images)
    assert len(calls) == 2
    draw(sampler(1))
    os.utime(checkpoint, ns=(1, 1))  # the checkpoint rewritten
    calls.clear()
    draw(sampler(1))
    assert len(calls) == 3
    (setup.out / evaluate_sampling.PARTIAL / "b000001.npy").write_bytes(b"\x93NUMPY cut")  # cut short on disk
    calls.clear()
    assert np.array_equal(draw(sampler(1)), first) and calls == [2]
