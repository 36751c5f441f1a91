"""evaluate stage and `knnd evaluate`: how well a checkpoint draws what its prompts say.

For a set of prompts (the captions of the images dedup held out of the index and of training, or
`evaluate.prompts`), it samples `images_per_prompt` images per prompt with fixed seeds against an
index, embeds the samples, the held-out real images and the training images (all at the model's
resolution) with an evaluation CLIP (`evaluate.encoder`, by default the embed stage's), and reports,
each with a bootstrap 95 % interval over prompts:

- prompt accuracy @1/@5: every prompt ranked by similarity to each sample (chance 1/P, 5/P), next to
  the same accuracy of the real held-out images (the ceiling this encoder allows);
- CLIP score, 100 * max(cos(sample, prompt), 0);
- FD and KID to the real held-out images, with the real-vs-real floor (training vs held-out images);
- precision / recall (k = 3) in the same space;
- memorisation: each sample's highest cosine to a training image, next to the held-out images' own;
- FD / KID to the pictures of each compared database (the index sampled from, `compare_index`).

Writes `metrics.json`, `report.html` (prompts with their neighbours and samples, the metric table,
the loss curve), `grid.png` and one PNG per sample under `samples/`. Sampling resumes after a kill,
batch by batch (pipeline.evaluate_sampling).
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_SCHEDULER
from pipeline.evaluate_compare import Graded, compare, load_evaluation, print_comparison
from pipeline.evaluate_memorisation import index_memorisation, training_index
from pipeline.evaluate_outputs import print_metrics, summary_line, write_outputs
from pipeline.evaluate_regrade import earlier_condition, regrade_command, reuse_samples
from pipeline.evaluate_sampling import drop as drop_saved_batches, generate
from pipeline.runner import StageRun, UsageError, read_json, resolve_device, stage_dir


NO_KNN_BASELINE = "no_knn"  # the evaluate stage's folder for its text-alone baseline

@dataclass
class EvalSetup:
    """What one evaluation compares: a checkpoint, an index, a prompt set and where to write."""
    checkpoint: Path
    index_dir: Path
    out: Path
    k: int
    no_knn: bool = False
    neighbours_only: bool = False
    allow_other_clip: bool = False  # grade against an index of another CLIP (same dimension)
    where: str | None = None  # neighbours only among images whose metadata satisfies this filter
    samples_from: Path | None = None  # an earlier evaluation's folder: grade its samples.npz, sample nothing
    baseline: Path | None = None  # an evaluation of the same prompts and noise to compare with, paired (metrics["paired"])
    memo: dict | None = None  # shared by evaluations of one stage run: the reference pictures are embedded once
    keep_batches: bool = False  # leave the saved sampling batches for the caller to drop (after its own bookkeeping)


def _memo(setup: EvalSetup, key, make):
    """make(), or what an evaluation sharing setup.memo already made for `key`."""
    if setup.memo is None:
        return make()
    if key not in setup.memo:
        setup.memo[key] = make()
    return setup.memo[key]


# --------------------------------------------------------------------------- prompts and real images


def prompt_set(cfg) -> tuple[list[str], np.ndarray | None]:
    """(prompts, held-out rows or None). Held-out captions are de-duplicated (first row kept) and a
    seeded sample of at most evaluate.max_prompts is taken, in row order."""
    from pipeline.embeddings import read_holdout, read_metadata

    conf = cfg.evaluate
    rng = np.random.default_rng(conf.seed)
    if conf.prompts:
        path = Path(conf.prompts)
        if not path.is_file():
            raise UsageError(f"evaluate.prompts {path} does not exist: give a text file with one prompt per line")
        prompts = list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))
        if len(prompts) < 2:
            raise UsageError(f"evaluate.prompts {path} holds {len(prompts)} distinct prompt(s): prompt accuracy needs at least 2")
        pick = np.sort(rng.permutation(len(prompts))[:conf.max_prompts])
        return [prompts[i] for i in pick], None
    embed_dir = stage_dir(cfg, "embed")
    rows = read_holdout(stage_dir(cfg, "dedup"))
    captions = read_metadata(embed_dir, read_json(embed_dir / "manifest.json"), ["caption"])["caption"]
    first = {}
    for row in rows:
        caption = str(captions[row] or "").strip()
        if caption and caption not in first:
            first[caption] = row
    if len(first) < 2:
        raise UsageError(f"dedup held out {len(rows)} image(s) with {len(first)} distinct caption(s): evaluation needs at least 2. "
                         f"Raise dedup.holdout and run `knnd run dedup --force` (and the stages after it), "
                         f"or set evaluate.prompts to a file of prompts")
    chosen = np.sort(rng.permutation(len(first))[:conf.max_prompts])
    items = list(first.items())
    return [items[i][0] for i in chosen], np.array([items[i][1] for i in chosen], np.int64)


def training_images(cfg, limit: int, seed: int) -> np.ndarray:
    """A seeded sample of at most `limit` training images (uint8 [n, H, W, 3]) from the pack shards."""
    from model.data import read_pack_shard

    pack_dir = stage_dir(cfg, "pack")
    manifest = read_json(pack_dir / "manifest.json", "Rebuild it with `knnd run pack --force`.")
    shards = [s for s in manifest["shards"] if s["samples"]]
    rng = np.random.default_rng(seed)
    order, images = rng.permutation(len(shards)), []
    for i in order:  # whole shards in a seeded order until `limit` images: few shards read at scale
        data = read_pack_shard(pack_dir / shards[i]["tar"])
        take = rng.permutation(len(data["keys"]))[:limit - len(images)]
        images += [data["image"][j] for j in np.sort(take)]
        if len(images) >= limit:
            break
    return np.stack(images)


# --------------------------------------------------------------------------- sampling


# --------------------------------------------------------------------------- features and metrics


def load_encoder(conf, index_infos: dict, index_dir: Path, device: str):
    """The evaluation CLIP: evaluate.encoder, or the CLIP that embedded the index's images."""
    from model.clip import load_clip
    from pipeline.generation import load_index_clip

    if conf.encoder is None:
        return load_index_clip(index_infos, index_dir, device)
    try:
        return load_clip(conf.encoder, conf.encoder_pretrained, device)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        raise UsageError(f"evaluate.encoder {conf.encoder!r} (pretrained {conf.encoder_pretrained!r}) cannot be loaded ({e}): "
                         f"give an open_clip model name or model-config JSON and a local checkpoint") from None


def image_features(bundle, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 [n, H, W, 3] -> L2-normalised float32 [n, d], through the encoder's own preprocessing."""
    from PIL import Image

    from model.clip import encode_images, preprocess_images

    parts = [encode_images(bundle, preprocess_images(bundle, [Image.fromarray(im) for im in images[s:s + batch]]))
             for s in range(0, len(images), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, bundle.embed_dim), np.float32)


def text_features(bundle, prompts: list[str]) -> np.ndarray:
    from model.clip import encode_texts

    return encode_texts(bundle, prompts)


def interval(estimate_low_high) -> dict:
    value, low, high = (float(x) for x in estimate_low_high)
    return {"value": round(value, 6), "low": round(low, 6), "high": round(high, 6)}  # KID lives near 1e-5


def per_image_metrics(feats: np.ndarray, text: np.ndarray, prompt_of: np.ndarray, train: np.ndarray, n_boot: int) -> dict:
    """Prompt accuracy @1/@5, CLIP score and memorisation of one image set, with cluster-bootstrap intervals."""
    from model import bootstrap, metrics

    acc = metrics.prompt_accuracy(feats, text, prompt_of, ks=(1, 5))
    ci = lambda values: interval(bootstrap.bootstrap_ci(values, prompt_of, n_boot=n_boot))  # noqa: E731
    return {"prompt_accuracy@1": ci(acc[1]), "prompt_accuracy@5": ci(acc[5]),
            "clip_score": ci(metrics.clip_score(feats, text, prompt_of)),
            "memorisation": ci(metrics.memorisation(feats, train))}


def set_metrics(fake: np.ndarray, fake_groups: np.ndarray, real: np.ndarray, n_boot: int) -> dict:
    """FD, KID, precision and recall of `fake` against `real`, intervals over the fake set's prompts."""
    from model import bootstrap, metrics

    real_groups = np.arange(len(real))
    boot = bootstrap.set_replicates(n_boot)
    out = {"fd": interval(bootstrap.bootstrap_pair_ci(fake, real, fake_groups, real_groups, metrics.frechet_distance, boot)),
           "kid": interval(bootstrap.bootstrap_pair_ci(fake, real, fake_groups, real_groups,
                                                     metrics.kernel_inception_distance, boot))}
    value, low, high = bootstrap.bootstrap_pair_ci(fake, real, fake_groups, real_groups, metrics.samples_precision_recall, boot)
    # fractions: the centred interval is clipped to [0, 1]
    out["precision"] = interval((value[0], max(low[0], 0.0), min(high[0], 1.0)))
    out["recall"] = interval((value[1], max(low[1], 0.0), min(high[1], 1.0)))
    return out


def database_sample(index_dir: Path, size: int, limit: int, seed: int) -> tuple[np.ndarray, str]:
    """Up to `limit` pictures of the database behind an index folder, at the model's resolution."""
    from pipeline.images import DatabaseImages
    from pipeline.retrieval import Retriever

    retriever = Retriever(index_dir)
    indexed = np.asarray(retriever.index_rows())
    pick = np.sort(np.random.default_rng(seed).permutation(indexed)[:limit])
    images = DatabaseImages(Path(retriever.infos["embed_dir"])).load(pick, size)
    return np.stack([images[r] for r in pick if r in images]), str(Path(index_dir).resolve())


# --------------------------------------------------------------------------- the evaluation


def evaluate(cfg, setup: EvalSetup) -> dict:
    """Sample, embed, measure; write metrics.json, report.html, grid.png and samples/ into setup.out."""
    from model import bootstrap, metrics
    from model.checkpoint import checkpoint_step
    from pipeline.images import DatabaseImages
    from pipeline.generation import Sampler

    conf, device, start = cfg.evaluate, resolve_device(cfg), time.time()
    prompts, held_rows = prompt_set(cfg)
    sampler = Sampler(setup.checkpoint, setup.index_dir, device, setup.allow_other_clip)
    size = sampler.config.resolution
    encoder = load_encoder(conf, sampler.retriever.infos, setup.index_dir, device)  # a bad encoder fails before sampling
    print(f"evaluate: {len(prompts)} prompts x {conf.images_per_prompt} images, k={0 if setup.no_knn else setup.k}, "
          f"{conf.steps} steps, guidance {conf.guidance}, index {setup.index_dir}", file=sys.stderr)
    generated = reuse_samples(setup.samples_from, prompts) if setup.samples_from else generate(sampler, prompts, setup, conf)
    text = text_features(encoder, prompts)
    fake = image_features(encoder, generated["images"])
    train = _memo(setup, "train", lambda: image_features(encoder, training_images(cfg, conf.train_images, conf.seed)))
    result = {"prompts": len(prompts), "images": int(len(fake)), "train_images": int(len(train)),
              "chance@1": round(1 / len(prompts), 4),
              "chance@5": round(min(5, len(prompts)) / len(prompts), 4),
              "generated": per_image_metrics(fake, text, generated["prompt_of"], train, conf.bootstrap)}
    real_images = None  # {prompt: uint8 image} of the held-out images that still decode
    loaded = _memo(setup, "held", lambda: DatabaseImages(stage_dir(cfg, "embed")).load(held_rows, size)
                   if held_rows is not None else {})
    real_prompt_of = np.array([p for p, r in enumerate(held_rows) if r in loaded], np.int64) if loaded else None
    if real_prompt_of is not None and len(real_prompt_of) < 2:
        print(f"evaluate: only {len(real_prompt_of)} held-out image(s) decode: no real-image figures", file=sys.stderr)
        real_prompt_of = None
    if real_prompt_of is not None:
        real_images = {int(p): loaded[held_rows[p]] for p in real_prompt_of}
        real = _memo(setup, "real", lambda: image_features(encoder, np.stack(list(real_images.values()))))
        result["real"] = per_image_metrics(real, text, real_prompt_of, train, conf.bootstrap)
        result["ratio"] = {f"prompt_accuracy@{k}": round(result["generated"][f"prompt_accuracy@{k}"]["value"]
                                                         / max(result["real"][f"prompt_accuracy@{k}"]["value"], 1e-9), 4)
                           for k in (1, 5)}
        result["to_real"] = set_metrics(fake, generated["prompt_of"], real, conf.bootstrap)
        floor_rows = np.random.default_rng(conf.seed + 1).permutation(len(train))[:len(fake)]
        result["floor"] = {"fd": round(metrics.frechet_distance(train[floor_rows], real), 4),
                           "kid": round(metrics.kernel_inception_distance(train[floor_rows], real), 6),
                           "what": f"{len(floor_rows)} training images (as many as samples) vs the held-out real images"}
    if (whole := _memo(setup, "training_index", lambda: training_index(cfg, sampler.retriever.infos))) is not None:
        result["memorisation_index"] = index_memorisation(
            whole, fake, generated["prompt_of"], real if real_prompt_of is not None else None, real_prompt_of, conf.bootstrap)
    result["databases"], database_features = {}, {}
    databases = list(dict.fromkeys(Path(d).resolve() for d in [setup.index_dir, *conf.compare_index]))
    for index_dir in databases:
        def embed_database():  # called at once by _memo, so index_dir is this iteration's
            images, name = database_sample(index_dir, size, conf.database_images, conf.seed)
            return name, image_features(encoder, images)

        name, db = _memo(setup, ("database", index_dir), embed_database)
        database_features[name] = db
        result["databases"][name] = {"images": len(db), **{m: interval(bootstrap.bootstrap_pair_ci(
            fake, db, generated["prompt_of"], np.arange(len(db)), fn, bootstrap.set_replicates(conf.bootstrap)))
            for m, fn in (("fd", metrics.frechet_distance), ("kid", metrics.kernel_inception_distance))}}
    result |= {"checkpoint": str(setup.checkpoint.resolve()), "step": checkpoint_step(setup.checkpoint),
               "index": str(setup.index_dir.resolve()), "k": 0 if setup.no_knn else setup.k, "no_knn": setup.no_knn,
               "neighbours_only": setup.neighbours_only and not setup.no_knn,
               "where": None if setup.no_knn else setup.where,
               "steps": conf.steps, "scheduler": conf.scheduler, "guidance": conf.guidance,
               "neighbour_guidance": None if setup.no_knn or not setup.k else conf.neighbour_guidance, "seed": conf.seed,
               "images_per_prompt": conf.images_per_prompt, "encoder": encoder.name,
               "sampling_seconds": generated["seconds"], "seconds": round(time.time() - start, 1)}
    if setup.samples_from:  # the samples' own condition and sampling, not this call's
        result |= earlier_condition(setup.samples_from)
    graded = Graded(fake, generated["prompt_of"], text, real if real_prompt_of is not None else None, database_features)
    if setup.baseline:
        result["paired"] = {setup.baseline.name: compare(result, graded, *load_evaluation(setup.baseline), conf.bootstrap)}
    write_outputs(setup.out, result, prompts, generated, real_images, sampler, conf, graded, setup.baseline)
    if not setup.keep_batches:
        drop_saved_batches(setup.out)  # samples.npz holds them now
    return result


# --------------------------------------------------------------------------- entry points


def check(cfg) -> None:
    train = read_json(stage_dir(cfg, "train") / "manifest.json", "Rebuild it with `knnd run train --force`.")
    if cfg.evaluate.k > train["model_config"]["k"]:
        raise UsageError(f"evaluate.k ({cfg.evaluate.k}) exceeds the {train['model_config']['k']} neighbours the model was "
                         f"trained with: lower evaluate.k")
    check_compare_index(cfg)


def config_inputs(cfg) -> list[str]:
    """Inputs the config names: a prompt file, and the compared indexes (their index_infos.json)."""
    prompts = [cfg.evaluate.prompts] if cfg.evaluate.prompts else []
    return prompts + [str(Path(d) / "index_infos.json") for d in cfg.evaluate.compare_index]


def check_compare_index(cfg) -> None:
    for index_dir in cfg.evaluate.compare_index:
        if not (Path(index_dir) / "index_infos.json").exists():
            raise UsageError(f"evaluate.compare_index {index_dir} is not an index folder (no index_infos.json): "
                             f"give folders built by `knnd run index`")


def run(stage: StageRun) -> dict:
    cfg = stage.cfg
    train = stage.inputs["train"]
    k = stage.conf.k
    checkpoint, index_dir = stage.input_dirs["train"] / train["checkpoint"], stage.input_dirs["index"]
    baseline = stage.dir / NO_KNN_BASELINE if stage.conf.no_knn_baseline and k > 0 else None
    memo = {}  # the baseline and the main evaluation share the training, held-out and database pictures' features
    units = [EvalSetup(checkpoint=checkpoint, index_dir=index_dir, out=stage.dir, k=k, no_knn=k == 0, baseline=baseline,
                       memo=memo, keep_batches=True)]
    if baseline:  # the same prompts and noise from the text alone, first: the main one compares with it
        units.insert(0, EvalSetup(checkpoint=checkpoint, index_dir=index_dir, out=baseline, k=0, no_knn=True, memo=memo,
                                  keep_batches=True))
    stage.plan(len(units))  # the baseline, then the main evaluation; each resumes its sampling batch by batch
    for unit, setup in enumerate(units):
        if not stage.shard_done(unit):
            evaluate(cfg, setup)
            stage.mark_done(unit, {"folder": setup.out.name})
        drop_saved_batches(setup.out)  # only once the unit is recorded: a kill before then resumes from them
    result = read_json(stage.dir / "metrics.json", "Rebuild it with `knnd run evaluate --force`.")
    print_metrics(result)
    if baseline:
        print_comparison(result["paired"][NO_KNN_BASELINE], "with neighbours", "text alone")
    return {"items": result["images"], "counts": {"prompts": result["prompts"], "images": result["images"]},
            "metrics": "metrics.json", "report": "report.html", "summary": summary_line(result)}


def evaluate_command(cfg, checkpoint: str | None, index: str | None, out: str | None, k: int | None = None,
                     no_knn: bool = False, neighbours_only: bool = False, allow_other_clip: bool = False,
                     where_filter: str | None = None, guidance: float | None = None, steps: int | None = None,
                     samples_from: str | None = None, scheduler: str | None = None, baseline: bool = False) -> int:
    """`knnd evaluate`: any checkpoint against any index, on this workdir's held-out prompts; `guidance` and
    `steps` stand in for evaluate.guidance / evaluate.steps (validated like `--set`). `baseline` first samples
    the same prompts and noise from the text alone (into <out>/no_knn, as the stage does) and pairs with it."""
    from pipeline.config import with_values
    from pipeline.generation import resolve_checkpoint

    if samples_from:
        given = [flag for flag, value in (("-k", k), ("--no-knn", no_knn or None), ("--neighbours-only", neighbours_only or None),
                                          ("--where", where_filter), ("--guidance", guidance), ("--steps", steps),
                                          ("--scheduler", scheduler), ("--checkpoint", checkpoint), ("--index", index),
                                          ("--baseline", baseline or None))
                 if value is not None]
        return regrade_command(cfg, samples_from, out, allow_other_clip, given)
    cfg = with_values(cfg, {f"evaluate.{key}": value for key, value in
                            (("guidance", guidance), ("steps", steps), ("scheduler", scheduler)) if value is not None})
    path = resolve_checkpoint(cfg, checkpoint)
    index_dir = Path(index or cfg.sample.index or stage_dir(cfg, "index"))
    if not (index_dir / "index_infos.json").exists():
        raise UsageError(f"--index {index_dir} is not an index folder (no index_infos.json): build one with `knnd run index`")
    k = cfg.evaluate.k if k is None else k
    if k < 0:
        raise UsageError(f"-k must be at least 0, got {k}")
    check_compare_index(cfg)
    where = "-".join(index_dir.resolve().parts[-2:])  # e.g. demo-index, swap-index
    if neighbours_only and (no_knn or cfg.evaluate.neighbour_guidance is not None):
        raise UsageError("--neighbours-only drops the text: it excludes --no-knn (which drops the neighbours) and "
                         "evaluate.neighbour_guidance (which scales what the neighbours add to the text)")
    if no_knn and where_filter:
        raise UsageError("--no-knn and --where exclude each other: --where filters the neighbours, --no-knn has none")
    if baseline and (no_knn or k == 0):
        raise UsageError("--baseline compares the neighbours with the text alone; with --no-knn or -k 0 there are no "
                         "neighbours to compare: drop --baseline")
    name = f"{path.stem}-{where}-{'noknn' if no_knn else f'k{k}'}{'-neighbours-only' if neighbours_only else ''}"
    ng = None if no_knn or k == 0 else cfg.evaluate.neighbour_guidance  # a sweep over any of these keeps every result
    name += f"-g{cfg.evaluate.guidance:g}-s{cfg.evaluate.steps}" + ("" if ng is None else f"-ng{ng:g}")
    name += "" if cfg.evaluate.scheduler == DEFAULT_SCHEDULER else f"-{cfg.evaluate.scheduler}"  # the default adds nothing
    if where_filter:  # one folder per filter: a short digest of its text
        name += "-where-" + hashlib.blake2b(where_filter.encode(), digest_size=4).hexdigest()
    folder = Path(out) if out else stage_dir(cfg, "evaluate_cli") / name
    memo, paired_with = {}, folder / NO_KNN_BASELINE if baseline else None
    if paired_with:  # its batches stay until the main evaluation is done: a kill in it does not redraw the baseline
        evaluate(cfg, EvalSetup(checkpoint=path, index_dir=index_dir, out=paired_with, k=0, no_knn=True,
                                allow_other_clip=allow_other_clip, memo=memo, keep_batches=True))
    result = evaluate(cfg, EvalSetup(checkpoint=path, index_dir=index_dir, out=folder, k=k, no_knn=no_knn,
                                     neighbours_only=neighbours_only, allow_other_clip=allow_other_clip,
                                     where=where_filter, baseline=paired_with, memo=memo))
    if paired_with:
        drop_saved_batches(paired_with)
    print_metrics(result)
    if paired_with:
        print_comparison(result["paired"][NO_KNN_BASELINE], "with neighbours", "text alone")
    print(f"report: {folder / 'report.html'}")
    return 0
