"""Held-out evaluation data (dedup's holdout, evaluate's prompt set) and `knnd evaluate`'s usage errors.
The metrics are tested against hand computations in test_metrics.py; the whole stage runs in
test_pipeline_smoke.py."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.dedup_group import holdout_mask
from pipeline.embeddings import read_holdout
from pipeline.evaluate import prompt_set
from pipeline.runner import UsageError, run_stage
from pipeline.synthetic import clustered_unit_vectors, write_embed_output


def test_holdout_is_a_fraction_of_the_representatives_chosen_by_key():
    keys = [f"key{i}" for i in range(200)]
    representative = np.ones(200, bool)
    representative[::4] = False  # 150 representatives
    mask = holdout_mask(keys, representative, 0.1, 1000)
    assert 8 <= mask.sum() <= 24 and not (mask & ~representative).any()  # about 10 % of 150
    order = np.random.default_rng(0).permutation(200)  # the same data in another row order
    shuffled = holdout_mask([keys[i] for i in order], representative[order], 0.1, 1000)
    assert {keys[i] for i in order[shuffled]} == {keys[i] for i in np.nonzero(mask)[0]}
    assert holdout_mask(keys, representative, 0.1, 4).sum() == 4
    assert holdout_mask(keys, representative, 0.0, 1000).sum() == 0
    assert set(np.nonzero(holdout_mask(keys, representative, 0.2, 1000))[0]) >= set(np.nonzero(mask)[0])
    more = keys + [f"key{i}" for i in range(200, 2000)]  # the data grows: nothing held out returns to training
    grown = holdout_mask(more, np.concatenate([representative, np.ones(1800, bool)]), 0.1, 1000)
    assert {more[i] for i in np.nonzero(grown)[0]} >= {keys[i] for i in np.nonzero(mask)[0]}
    assert 0.08 < grown.sum() / 1950 < 0.12


def test_holdout_seed_draws_another_fold_and_seed_zero_is_the_unsalted_draw():
    import hashlib
    keys = [f"key{i}" for i in range(4000)]
    representative = np.ones(4000, bool)
    plain = np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") for k in keys])
    by_hand = plain < int(0.1 * 2 ** 64)  # the draw before holdout_seed existed: dedup outputs stay as they were
    assert np.array_equal(holdout_mask(keys, representative, 0.1, 10_000, seed=0), by_hand)
    folds = [holdout_mask(keys, representative, 0.1, 10_000, seed=s) for s in (1, 2)]
    for fold in folds:
        assert 0.08 < fold.mean() < 0.12
        assert (fold & by_hand).sum() < 0.2 * fold.sum()  # independent draws share ~10 % of their items
    salted = np.array([int.from_bytes(hashlib.blake2b(f"holdout-seed 2:{k}".encode(), digest_size=8).digest(), "big")
                       for k in keys])
    assert np.array_equal(folds[1], salted < int(0.1 * 2 ** 64))
    assert not np.array_equal(folds[0], folds[1])


def test_held_out_images_leave_the_index_and_give_the_prompts(tmp_path):
    x = clustered_unit_vectors(300, 16, 30, seed=0)
    captions = [f"caption {i % 280}" for i in range(300)]  # a few repeated captions
    write_embed_output(tmp_path, x, shard_size=100, captions=captions)
    cfg = load_config(None, [f"workdir={tmp_path}", "dedup.cosine_threshold=0.999", "dedup.manhattan_threshold=0",
                             "dedup.holdout=0.1", "evaluate.max_prompts=20"])
    manifest = run_stage("dedup", cfg)
    keep = pq.read_table(tmp_path / "dedup" / "keep.parquet").to_pandas()
    held = read_holdout(tmp_path / "dedup")
    representatives = keep["duplicate_of"].isna().sum()
    assert manifest["counts"]["holdout"] == len(held) and 0.05 * representatives < len(held) < 0.15 * representatives
    assert (keep.loc[held, "reason"] == "holdout").all() and not keep.loc[held, "keep"].any()
    run_stage("index", cfg)
    indexed = np.load(tmp_path / "index" / "rows.npy")
    assert not set(held) & set(indexed) and set(indexed) == set(np.nonzero(keep["keep"])[0])
    prompts, rows = prompt_set(cfg)
    assert len(prompts) == 20 == len(set(prompts)) and set(rows) <= set(held)
    assert prompts == [captions[r] for r in rows] and list(rows) == sorted(rows)
    again, again_rows = prompt_set(cfg)  # seeded: the same sample every time
    assert again == prompts and np.array_equal(again_rows, rows)


def test_no_held_out_images_is_a_usage_error_naming_the_fix(tmp_path):
    write_embed_output(tmp_path, clustered_unit_vectors(50, 16, 5, seed=0), shard_size=50)
    cfg = load_config(None, [f"workdir={tmp_path}", "dedup.holdout=0"])
    run_stage("dedup", cfg)
    with pytest.raises(UsageError, match="Raise dedup.holdout.*or set evaluate.prompts"):
        prompt_set(cfg)


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("red heart\n\nrocket\nred heart\n")
    assert prompt_set(load_config(None, [f"evaluate.prompts={path}"])) == (["red heart", "rocket"], None)
    path.write_text("only one\n")
    with pytest.raises(UsageError, match="at least 2"):
        prompt_set(load_config(None, [f"evaluate.prompts={path}"]))
    with pytest.raises(UsageError, match="does not exist"):
        prompt_set(load_config(None, [f"evaluate.prompts={tmp_path / 'nope.txt'}"]))


def test_evaluate_command_usage_errors(tmp_path, capsys):
    assert main(["evaluate", "--set", f"workdir={tmp_path}"]) == 2
    assert "run `knnd run train` first" in capsys.readouterr().err
    (tmp_path / "ck.pt").write_bytes(b"")
    assert main(["evaluate", "--set", f"workdir={tmp_path}", "--checkpoint", str(tmp_path / "ck.pt"),
                 "--index", str(tmp_path / "nowhere")]) == 2
    assert "is not an index folder" in capsys.readouterr().err


def test_evaluate_guidance_and_steps_flags_are_typed_and_validated(tmp_path, capsys):
    """--guidance reaches evaluate.guidance as a number (1e-05 is not the string "1e-05"); a value the
    config refuses, or one that is not finite, stops the command with its name, before any work."""
    from pipeline.config import ConfigError, with_values

    cfg = with_values(load_config(None, []), {"evaluate.guidance": 1e-05, "evaluate.steps": 7})
    assert cfg.evaluate.guidance == 1e-05 and cfg.evaluate.steps == 7
    with pytest.raises(ConfigError, match="evaluate.guidance"):
        with_values(cfg, {"evaluate.guidance": -1.0})
    assert main(["evaluate", "--set", f"workdir={tmp_path}", "--guidance", "nan"]) == 2
    assert "evaluate.guidance must be a finite number, got nan: give a number of at least 0.0" in capsys.readouterr().err
    assert main(["evaluate", "--set", f"workdir={tmp_path}", "--guidance", "inf"]) == 2
    assert "evaluate.guidance must be a finite number, got inf" in capsys.readouterr().err
    assert main(["evaluate", "--set", f"workdir={tmp_path}", "--steps", "0"]) == 2
    assert "evaluate.steps" in capsys.readouterr().err


def test_evaluate_flag_conflicts_are_usage_errors(tmp_path, capsys):
    (tmp_path / "ck.pt").write_bytes(b"")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index_infos.json").write_text("{}")
    assert main(["evaluate", "--set", f"workdir={tmp_path}", "--set", "evaluate.compare_index=[]",
                 "--checkpoint", str(tmp_path / "ck.pt"), "--index", str(tmp_path / "index"),
                 "--no-knn", "--where", "score > 0.5"]) == 2
    assert "--no-knn and --where exclude each other" in capsys.readouterr().err
    assert main(["evaluate", "--set", f"workdir={tmp_path}", "--set", "evaluate.compare_index=[]",
                 "--checkpoint", str(tmp_path / "ck.pt"), "--index", str(tmp_path / "index"),
                 "--no-knn", "--baseline"]) == 2
    assert "with --no-knn or -k 0 there are no neighbours to compare: drop --baseline" in capsys.readouterr().err
    assert main(["evaluate", "--set", f"workdir={tmp_path}", "--set", "evaluate.compare_index=[]",
                 "--set", "evaluate.neighbour_guidance=6", "--checkpoint", str(tmp_path / "ck.pt"),
                 "--index", str(tmp_path / "index"), "--neighbours-only"]) == 2
    assert "it excludes --no-knn (which drops the neighbours) and evaluate.neighbour_guidance" in capsys.readouterr().err


# --------------------------------------------------------------------------- paired comparison (knnd compare)


def _evaluation(generated, prompt_of, text, real, seed=0):
    """(metrics.json-like result, Graded) of a hand-made evaluation, its unpaired figures computed directly."""
    from pipeline.evaluate import per_image_metrics, set_metrics
    from pipeline.evaluate_compare import Graded

    result = {"prompts": len(text), "images": len(generated), "images_per_prompt": 2, "seed": seed, "encoder": "enc",
              "checkpoint": "c.pt", "step": 10, "index": "/i", "k": 4, "no_knn": False, "steps": 25, "guidance": 3.0,
              "scheduler": "ddpm",
              "generated": per_image_metrics(generated, text, prompt_of, real, 100),
              "to_real": set_metrics(generated, prompt_of, real, 100), "databases": {}}
    return result, Graded(generated, prompt_of, text, real)


def test_compare_is_the_image_by_image_difference_with_verdicts_and_overlap():
    from model import metrics
    from pipeline.evaluate_compare import compare

    rng = np.random.default_rng(0)
    text = np.eye(12, 16, dtype=np.float32)  # 12 orthogonal prompts
    prompt_of = np.repeat(np.arange(12), 2)
    good = text[prompt_of] + 0.05 * rng.standard_normal((24, 16)).astype(np.float32)  # each image near its prompt
    bad = rng.standard_normal((24, 16)).astype(np.float32)  # unrelated to the prompts
    real = text[np.arange(12)] + 0.05 * rng.standard_normal((12, 16)).astype(np.float32)
    a_result, a = _evaluation(good, prompt_of, text, real)
    b_result, b = _evaluation(bad, prompt_of, text, real)
    out = compare(a_result, a, b_result, b, n_boot=200)
    rows = {row["name"]: row for row in out["rows"]}
    assert list(rows) == ["prompt accuracy @1", "prompt accuracy @5", "CLIP score", "FD to held-out images",
                          "KID to held-out images", "precision (k=3) to held-out images", "recall (k=3) to held-out images"]
    acc_a = metrics.prompt_accuracy(good, text, prompt_of, ks=(5,))[5].mean()
    acc_b = metrics.prompt_accuracy(bad, text, prompt_of, ks=(5,))[5].mean()
    assert acc_a == 1.0 and rows["prompt accuracy @5"]["difference"]["value"] == pytest.approx(acc_a - acc_b, abs=1e-6)
    fd = metrics.frechet_distance(good, real) - metrics.frechet_distance(bad, real)
    assert rows["FD to held-out images"]["difference"]["value"] == pytest.approx(fd, rel=1e-4)
    assert rows["prompt accuracy @5"]["verdict"] == "A better"  # higher is better, interval above 0
    assert rows["FD to held-out images"]["verdict"] == "A better"  # lower is better, interval below 0
    assert rows["prompt accuracy @5"]["unpaired_overlap"] is False
    (prec_a, rec_a), (prec_b, rec_b) = metrics.precision_recall(real, good), metrics.precision_recall(real, bad)
    assert rows["precision (k=3) to held-out images"]["difference"]["value"] == pytest.approx(prec_a - prec_b, abs=1e-6)
    assert rows["recall (k=3) to held-out images"]["difference"]["value"] == pytest.approx(rec_a - rec_b, abs=1e-6)
    assert prec_a - prec_b > 0 and rows["precision (k=3) to held-out images"]["verdict"] == "A better"  # higher is better
    swapped = {row["name"]: row for row in compare(b_result, b, a_result, a, n_boot=200)["rows"]}
    assert swapped["FD to held-out images"]["verdict"] == "B better"
    same = {row["name"]: row for row in compare(a_result, a, a_result, a, n_boot=200)["rows"]}
    assert same["CLIP score"]["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert same["CLIP score"]["verdict"] == "no difference these prompts can see" and same["CLIP score"]["unpaired_overlap"]


def test_compare_pairs_set_metrics_only_against_references_both_share():
    from pipeline.evaluate import interval
    from pipeline.evaluate_compare import compare

    rng = np.random.default_rng(2)
    text, prompt_of = np.eye(6, 8, dtype=np.float32), np.repeat(np.arange(6), 2)
    real = text + 0.1 * rng.standard_normal((6, 8)).astype(np.float32)
    db, other_db = rng.standard_normal((20, 8)).astype(np.float32), rng.standard_normal((20, 8)).astype(np.float32)
    a_result, a = _evaluation(text[prompt_of] + 0.1, prompt_of, text, real)
    b_result, b = _evaluation(text[prompt_of] - 0.1, prompt_of, text, real + 0.5)  # other held-out pictures
    a.databases, b.databases = {"/x/main": db, "/x/only_a": db}, {"/x/main": db, "/x/swap": other_db}
    for result, graded in ((a_result, a), (b_result, b)):
        result["databases"] = {name: {"fd": interval((1, 0, 2)), "kid": interval((1, 0, 2))} for name in graded.databases}
    out = compare(a_result, a, b_result, b, 100)
    assert [row["name"] for row in out["rows"]][3:] == ["FD to database x/main", "KID to database x/main"]
    assert out["skipped"] == ["held-out images (only one has them, or other pictures)",
                              "database x/only_a (only one was compared with it, or with other pictures of it)",
                              "database x/swap (only one was compared with it, or with other pictures of it)"]


def test_compare_refuses_evaluations_that_are_not_paired(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.evaluate_compare import FEATURES, compare, save_features
    from pipeline.runner import UsageError, write_json

    rng = np.random.default_rng(1)
    text, prompt_of = np.eye(6, 8, dtype=np.float32), np.repeat(np.arange(6), 2)
    real = text + 0.1 * rng.standard_normal((6, 8)).astype(np.float32)
    a_result, a = _evaluation(text[prompt_of] + 0.1, prompt_of, text, real)
    b_result, b = _evaluation(text[prompt_of] - 0.1, prompt_of, text, real, seed=3)
    with pytest.raises(UsageError, match=r"not paired \(seed 0 vs 3\): evaluate both with the same prompts, evaluate.seed"):
        compare(a_result, a, b_result, b, 100)
    c_result, c = _evaluation(text[prompt_of][::-1].copy(), prompt_of, text[::-1].copy(), real)
    with pytest.raises(UsageError, match=r"not paired \(the prompts themselves\)"):
        compare(a_result, a, c_result, c, 100)
    # the command: a folder without features.npz is named, with the command that writes it
    for name, (result, graded) in {"a": (a_result, a), "b": (b_result, b)}.items():
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / "metrics.json", result)
        save_features(tmp_path / name, graded)
    (tmp_path / "b" / FEATURES).unlink()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b'} has no features.npz" in err and f"--samples-from {tmp_path / 'b'}`" in err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    assert "is not an evaluation folder (no metrics.json)" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--bootstrap", "10"]) == 2
    assert "--bootstrap must be at least 50, got 10" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "c.json")]) == 0
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["a"]["folder"] == str((tmp_path / "a").resolve()) and len(written["rows"]) == 7


def _fold(rng, text, noise):
    """A fold's pair of hand-made evaluations: A near its prompts, B further off, one held-out image per prompt."""
    prompt_of = np.repeat(np.arange(len(text)), 2)
    real = text + 0.05 * rng.standard_normal(text.shape).astype(np.float32)
    near = text[prompt_of] + noise * rng.standard_normal((len(prompt_of), text.shape[1])).astype(np.float32)
    far = text[prompt_of] + 3 * noise * rng.standard_normal((len(prompt_of), text.shape[1])).astype(np.float32)
    return _evaluation(near, prompt_of, text, real), _evaluation(far, prompt_of, text, real)


def test_pooled_folds_rank_each_prompt_among_its_own_folds_and_pool_the_set_metrics(tmp_path):
    from model import metrics
    from pipeline.cli import main
    from pipeline.evaluate_compare import compare, save_features
    from pipeline.evaluate_pool import pool
    from pipeline.runner import UsageError, write_json

    rng = np.random.default_rng(4)
    text1 = np.eye(10, 16, dtype=np.float32)
    text2 = text1 + 0.02 * rng.standard_normal(text1.shape).astype(np.float32)  # the same stickers, held out again
    folds = [_fold(rng, text1, 0.3), _fold(rng, text2, 0.3)]
    for f, ((a_result, a), (b_result, b)) in enumerate(folds):
        for name, (result, graded) in (("a", (a_result, a)), ("b", (b_result, b))):
            (tmp_path / f"{name}{f}").mkdir()
            write_json(tmp_path / f"{name}{f}" / "metrics.json", result)
            save_features(tmp_path / f"{name}{f}", graded)
    pairs = [(tmp_path / "a0", tmp_path / "b0"), (tmp_path / "a1", tmp_path / "b1")]
    # one pair pooled is the plain comparison, unpaired intervals included
    single = compare(*pool(pairs[:1], 100), 100)
    plain = compare(*folds[0][0], *folds[0][1], 100)
    assert single["rows"] == plain["rows"]
    a_result, a, b_result, b = pool(pairs, 100)
    out = {row["name"]: row for row in compare(a_result, a, b_result, b, 100)["rows"]}
    assert a_result["prompts"] == 20 and a_result["images"] == 40 and a_result["folds"] == 2
    # each image ranks its prompt among its own fold's 10 only: the other fold's near-copies are no rivals
    by_fold = lambda side: np.concatenate([metrics.prompt_accuracy(fold[side][1].generated, fold[side][1].text,  # noqa: E731
                                                                   fold[side][1].prompt_of, ks=(1,))[1] for fold in folds])
    assert a_result["generated"]["prompt_accuracy@1"]["value"] == pytest.approx(by_fold(0).mean(), abs=1e-6)
    assert out["prompt accuracy @1"]["difference"]["value"] == pytest.approx(by_fold(0).mean() - by_fold(1).mean(), abs=1e-6)
    everyone = metrics.prompt_accuracy(a.generated, a.text, a.prompt_of, ks=(1,))[1].mean()  # ranked among all 20
    assert everyone < by_fold(0).mean()
    real = np.concatenate([folds[0][0][1].real, folds[1][0][1].real])
    fd = metrics.frechet_distance(a.generated, real) - metrics.frechet_distance(b.generated, real)
    assert out["FD to held-out images"]["difference"]["value"] == pytest.approx(fd, rel=1e-4)
    assert a_result["to_real"]["fd"]["value"] == pytest.approx(metrics.frechet_distance(a.generated, real), rel=1e-4)
    with pytest.raises(UsageError, match=r"a0 hold the same prompts: the same fold given twice"):
        pool([pairs[0], pairs[1], pairs[0]], 100)
    # the command, and folds evaluated differently
    assert main(["compare", str(pairs[0][0]), str(pairs[0][1]), "--pool", str(pairs[1][0]), str(pairs[1][1]),
                 "--bootstrap", "100"]) == 0
    written = json.loads((tmp_path / "a0" / "compare-b0-pooled2.json").read_text())
    assert written["folds"] == 2 and written["rows"] == json.loads(json.dumps(list(out.values())))
    other = json.loads((tmp_path / "a1" / "metrics.json").read_text()) | {"guidance": 1.5}
    write_json(tmp_path / "a1" / "metrics.json", other)
    write_json(tmp_path / "b1" / "metrics.json", json.loads((tmp_path / "b1" / "metrics.json").read_text()) | {"guidance": 1.5})
    with pytest.raises(UsageError, match=r"the folds were not evaluated alike \(guidance differ between them\)"):
        pool(pairs, 100)
    write_json(tmp_path / "a1" / "metrics.json", other | {"guidance": 3.0, "neighbour_guidance": 6.0})
    with pytest.raises(UsageError, match=r"\(neighbour_guidance differ between them\)"):
        pool(pairs, 100)


def test_an_evaluation_from_before_the_scheduler_key_was_drawn_with_ddim(tmp_path):
    """Regrading keeps the samples' own condition; keys older results lack take what they were then
    (ddim; no neighbour guidance), not the current config's."""
    from pipeline.evaluate_regrade import earlier_condition
    from pipeline.runner import write_json

    write_json(tmp_path / "metrics.json", {"k": 10, "no_knn": False, "steps": 25, "guidance": 3.0, "prompts": 5})
    assert earlier_condition(tmp_path) == {"scheduler": "ddim", "neighbour_guidance": None, "k": 10, "no_knn": False,
                                           "steps": 25, "guidance": 3.0}
    write_json(tmp_path / "metrics.json", {"k": 0, "scheduler": "ddpm"})
    assert earlier_condition(tmp_path) == {"scheduler": "ddpm", "neighbour_guidance": None, "k": 0}
    write_json(tmp_path / "metrics.json", {"k": 10, "scheduler": "ddpm", "neighbour_guidance": 6.0})
    assert earlier_condition(tmp_path)["neighbour_guidance"] == 6.0


def test_condition_text_names_the_neighbour_guidance_where_it_was_used():
    """The report's and the paired table's condition: a two-scale evaluation says its neighbour guidance
    (metrics.json from before the key have none; the text-alone baseline never has neighbours to guide)."""
    from pipeline.evaluate_compare import condition_text

    assert condition_text({"no_knn": False, "k": 10, "neighbour_guidance": 6.0}) == \
        "text embedding + 10 neighbours at neighbour guidance 6"
    assert condition_text({"no_knn": False, "k": 10}) == "text embedding + 10 neighbours"
    assert condition_text({"no_knn": True, "k": 0, "neighbour_guidance": 6.0}) == "text embedding alone (--no-knn)"
