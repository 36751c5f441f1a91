"""Configuration: one dataclass per stage plus globals, defaults in code.

`stages.yaml` and `--set key.sub=value` only override these defaults. Every override is
checked up front (unknown key, wrong type, impossible value) and a mistake raises
`ConfigError` naming the key and the fix, before any stage writes anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config_parse import ConfigError, build, parse_override, set_nested
from pipeline.sizes import parse_bytes

__all__ = ["Config", "ConfigError", "load_config", "with_overrides", "check_config", "section", "output_fingerprint",
           "legacy_fingerprint", "fingerprint_hash", "to_dict", "opt"]


_UNSET = object()
KMEANS_REFINE = 5  # index.kmeans_refine's default, also the default of the library functions (coarse_train)


def opt(default, help: str, *, choices=None, min=None, max=None, runtime: bool = False, before=_UNSET):
    """A config field with its one-line help, its allowed values, and whether it changes output.

    `runtime=True` marks knobs (threads, batch sizes, worker counts) that change speed but
    not the stage's output, so changing them does not make a finished stage "changed".
    `before`: for a key added after stages were built with other behaviour, the value that gives
    that behaviour (sample.scheduler: ddim): an output whose fingerprint lacks the key was made with
    it, so it is up to date only while the key holds that value (without `before`: its default).
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "runtime": runtime}
    if before is not _UNSET:
        meta["before"] = before
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class RayConfig:
    address: str | None = opt(None, 'null: start a local Ray; "auto" or ray://host:port: join a cluster', runtime=True)
    num_cpus: int | None = opt(None, "CPUs for a local Ray (null: those this process may use: its affinity, capped by a "
                               "cgroup CPU quota)", min=1, runtime=True)


@dataclass
class DownloadConfig:
    url_list: str | None = opt(None, "URL list file or folder (parquet, csv, tsv or txt)")
    input_format: str = opt("auto", "auto (from the file suffix), parquet, csv, tsv or txt",
                            choices=["auto", "parquet", "csv", "tsv", "txt"])
    url_col: str = opt("url", "column holding the image URL")
    caption_col: str | None = opt("caption", "column holding the caption (null: none); kept as metadata only")
    extra_columns: list[str] = opt([], "more URL-list columns carried into the embed and index metadata (e.g. punsafe, "
                                   "pwatermark, aesthetic), for --where filters")
    image_size: int = opt(256, "images are resized to this size (pixels)", min=8, max=8192)
    resize_mode: str = opt("border", "img2dataset resize mode", choices=["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"])
    encode_format: str = opt("jpg", "image format inside the shards", choices=["jpg", "png", "webp"])
    encode_quality: int | None = opt(None, "jpg/webp quality 0-100 or png compression 0-9 (null: 95 for jpg/webp, 9 for png)",
                                     min=0, max=100)
    shard_size: int = opt(10000, "images per shard", min=1)
    processes: int = opt(1, "download processes per node", min=1, runtime=True)
    threads: int = opt(32, "download threads per process", min=1, runtime=True)
    timeout: float = opt(10.0, "seconds before a URL download is abandoned", min=0.1)
    retries: int = opt(0, "retries per failed URL", min=0)
    min_image_size: int = opt(0, "drop images whose smaller side is below this (pixels)", min=0)
    max_image_area: float | None = opt(None, "drop images with more pixels than this (null: no limit)", min=1)


@dataclass
class EmbedConfig:
    model: str = opt("ViT-B-32", "open_clip model name, or a path to a model-config JSON")
    pretrained: str | None = opt("openai", "open_clip pretrained tag, a checkpoint path, or null (random init)")
    batch_size: int = opt(256, "images per model call", min=1, runtime=True)
    phash_size: int = opt(8, "perceptual hash side: the hash has phash_size^2 bits", min=2, max=32)
    text: bool = opt(False, "also embed captions into embed/text_emb/ (text-like queries for index recall)")
    decode_workers: str | int = opt("auto", '"auto" (every CPU but the encoder\'s) or a number of CPU tasks decoding '
                                    "shards ahead of the model", runtime=True)
    encoders: str | int = opt("auto", '"auto" (one encoder actor per GPU Ray offers, one on CPU) or a number of '
                              "encoder actors; each takes a CPU (and a GPU on cuda)", runtime=True)


@dataclass
class DedupConfig:
    cosine_threshold: float = opt(0.9, "duplicates: CLIP cosine similarity above this", min=-1.0, max=1.0)
    manhattan_threshold: int = opt(2, "duplicates: pHash bits differing at most this (among CLIP candidates only; see README)", min=0)
    candidates: int = opt(16, "nearest neighbours examined per item for duplicates", min=1)
    batch_size: int = opt(16384, "queries per search batch", min=1, runtime=True)
    partition_size: int = opt(10_000, "images per partition (a coarse k-means cuts n images into n / partition_size); "
                              "one Ray task finds a partition's duplicates, holding only it", min=100)
    nprobe: int = opt(4, "each image is also compared with the partitions of its nprobe next-nearest centroids, "
                      "so duplicates across a partition boundary are found", min=0)
    holdout: float = opt(0.01, "fraction of the kept images held out of the index and training (`knnd evaluate`'s prompts)",
                         min=0.0, max=0.5)
    holdout_max: int = opt(5000, "at most this many held-out images", min=0)
    holdout_seed: int = opt(0, "salts the hold-out draw's hash: another seed holds out other images (cross-validation "
                            "folds); 0 hashes the key alone", min=0)


@dataclass
class IndexConfig:
    self_contained: bool = opt(True, "copy the indexed vectors (float16), keys, captions, urls and thumbnails into the "
                               "index folder, so it can be moved without the embed folder (n x d x 2 bytes more)")
    thumbnail_size: int = opt(32, "thumbnails kept in a self-contained index, pixels (0: none)", min=0, max=256)
    where: str | None = opt(None, "index only the kept images whose metadata satisfies this SQL filter, e.g. "
                            '"punsafe < 0.1 and aesthetic >= q(0.9)" (DuckDB; q(p): the column\'s p-quantile)')
    factory: str = opt("auto", '"auto" or a faiss index factory string such as "OPQ256_512,IVF65536,PQ256"')
    memory_budget: str = opt("4GB", "the index must fit in this much memory (auto factory)")
    cell_size: int = opt(128, "auto factory: vectors per IVF cell (nlist = n / cell_size), the same at any n; at hundreds "
                         "of millions raise it (the centroids and the training sample grow as n / cell_size)", min=39)
    hnsw_quantizer_above: int = opt(300_000, "auto factory: above this many vectors the IVF coarse quantizer is an HNSW "
                                    "graph over the centroids (IVF{nlist}_HNSW32)", min=0)
    kmeans_refine: int = opt(KMEANS_REFINE, "IVF over 1024 cells: full k-means iterations after the two-level k-means, whose "
                             "groups' borders cost recall per probed cell (README, Performance); 0 to skip", min=0,
                             before=0)  # indexes built before it had none: they count as changed (knnd run index --force)
    nprobe: str | int = opt("auto", '"auto" (tuned to target_recall) or a fixed number of IVF cells to search')
    target_recall: float = opt(0.95, "recall@10 against exact search that nprobe: auto aims for", min=0.0, max=1.0)
    refine: bool = opt(False, "re-rank candidates exactly from the stored float16 embeddings")
    eval_queries: int = opt(1000, "held-out queries used to measure recall", min=10)
    add_batch_size: int = opt(65536, "vectors added per batch", min=1, runtime=True)
    parallel_min_vectors: int = opt(1_000_000, "from this many vectors on, an IVF index is built by Ray tasks (one per "
                                    "embed shard) into partial indexes merged into on-disk lists (image.ivfdata); "
                                    "below it, in one process. Same neighbours either way", min=0, runtime=True)
    seed: int = opt(0, "seed for training samples and held-out queries")


@dataclass
class NeighboursConfig:
    k: int = opt(10, "neighbours per image (paper: 10)", min=1)
    candidates: int = opt(32, "candidates fetched per image before removing self and near-duplicates", min=1)
    where: str | None = opt(None, "neighbours only among images whose metadata satisfies this SQL filter (see index.where)")
    batch_size: int = opt(8192, "queries per search batch", min=1, runtime=True)
    actors: str | int = opt("auto", '"auto" (one per CPU, as memory allows) or a number of Ray actors holding the index',
                            runtime=True)
    ray_min_rows: int = opt(1_000_000, "from this many embed rows on (and always for an IVF index, on a joined "
                            "cluster or with gpus_per_actor) the shards go to Ray actors; below it, to one thread per "
                            "CPU in this process, with no actor to start. Same neighbours either way", min=0, runtime=True)
    gpus_per_actor: float = opt(0.0, "share of a GPU each actor takes to assign its queries to IVF cells by brute force "
                                "(faiss-gpu; 0.25: four actors per GPU, as many actors as the GPUs hold); 0: on the CPU",
                                min=0.0, max=1.0, runtime=True)


@dataclass
class PackConfig:
    image_size: int = opt(32, "training resolution (pixels)", min=8, max=1024)
    shard_size: int = opt(10000, "most samples per pack shard (an embed shard is split, never merged)", min=1)
    manipulation: bool = opt(False, "also store, per image, its first neighbour's image ECC-aligned to it and "
                             "`boxes` random boxes with the CLIP embeddings of their crops (train.mode=manipulate)")
    boxes: int = opt(4, "boxes M per image (pack.manipulation): each training step uses one of them at random", min=1)
    box_min: float = opt(0.25, "smallest box side, as a fraction of the image side (pack.manipulation)", min=0.01, max=1.0)
    box_max: float = opt(0.5, "largest box side, as a fraction of the image side (pack.manipulation)", min=0.01, max=1.0)
    tokens: bool = opt(False, "also train a VQ autoencoder on the pack images and store their token grids "
                       "(pack/vq/), which train.backbone=discrete needs")
    vq_downsample: int = opt(2, "VQ: image side / token grid side (16 px and 2: 8 x 8 tokens)", choices=[1, 2, 4, 8])
    vq_codes: int = opt(256, "VQ: codebook size", min=2, max=32767)
    vq_channels: int = opt(64, "VQ: channels of every encoder/decoder level (a multiple of 16)", min=16)
    vq_embed_dim: int = opt(8, "VQ: codebook vector size", min=1)
    vq_steps: int = opt(2000, "VQ: training steps", min=1)
    vq_minutes: float | None = opt(None, "VQ: stop training after this many minutes (null: no limit)", min=0.0)
    vq_batch_size: int = opt(64, "VQ: images per training step", min=1)
    vq_lr: float = opt(1e-3, "VQ: learning rate (Adam)", min=0.0)


@dataclass
class TrainConfig:
    model: str = opt("demo", "model size preset: tiny, demo or paper", choices=["tiny", "demo", "paper"])
    init_from: str | None = opt(None, "start a fresh run from this checkpoint's EMA weights (e.g. a text-to-image model "
                                "fine-tuned for train.mode=manipulate, as the paper does; null: random init)")
    mode: str = opt("generate", "generate (text-to-image) or manipulate (mask-free local manipulation, `knnd edit`; "
                    "needs pack.manipulation)", choices=["generate", "manipulate"])
    backbone: str = opt("continuous", "continuous (U-Net over pixels) or discrete (transformer over the VQ tokens "
                        "of pack.tokens, VQ-Diffusion loss)", choices=["continuous", "discrete"])
    aux_weight: float = opt(1.0, "discrete backbone: xi, the weight of L_x0 beside L_vlb", min=0.0)
    steps: int = opt(2000, "optimizer steps", min=1)
    minutes: float | None = opt(None, "stop after this many minutes even before `steps` (null: no limit)", min=0.0)
    batch_size: int = opt(32, "samples per step, over all workers", min=1)
    lr: float = opt(2e-4, "peak learning rate (AdamW)", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = opt(100, "linear warm-up steps before lr_schedule", min=0)
    lr_schedule: str = opt("cosine", "after warm-up: cosine (decay to lr/10 at `steps`) or constant", choices=["cosine", "constant"])
    cond_drop_prob: float = opt(0.1, "probability of dropping the condition (classifier-free guidance)", min=0.0, max=1.0)
    query_drop_prob: float = opt(0.0, "probability of masking the query slot alone, so the neighbours carry the condition",
                                 min=0.0, max=1.0)
    query_noise: float = opt(0.0, "query <- normalise(query + this * a random unit vector) in training (cosine ~1/sqrt(1+x^2))",
                             min=0.0)
    loss_weighting: str = opt("none", "none (plain MSE) or min_snr (min-SNR-gamma weights, gamma 5)", choices=["none", "min_snr"])
    prediction_type: str = opt("epsilon", "what the U-Net predicts: epsilon or v_prediction", choices=["epsilon", "v_prediction"])
    beta_schedule: str = opt("squaredcos_cap_v2", "noise schedule: squaredcos_cap_v2 (cosine) or linear",
                             choices=["squaredcos_cap_v2", "linear"])
    attention_resolutions: list[int] | None = opt(None, "U-Net levels (grid sizes) with cross-attention (null: the preset's)")
    space_to_depth: int = opt(1, "fold s x s pixel blocks into channels before the U-Net (2: a 32 px image costs "
                              "what a 16 px one does)", choices=[1, 2, 4])
    k: int | None = opt(None, "neighbours the model is conditioned on (null: all the pack holds; fewer: the nearest k)", min=0)
    conditioning: str = opt("self_attention", "how the k + 1 embeddings reach the U-Net: self_attention (paper's best), "
                            "cross_attention (one token) or concat (one token)",
                            choices=["self_attention", "cross_attention", "concat"])
    grad_clip: float = opt(1.0, "gradient norm clip", min=0.0)
    ema_decay: float = opt(0.999, "EMA decay of the weights used for sampling", min=0.0, max=1.0)
    input: str = opt("auto", "how workers read the pack: memory (each loads all of it), stream (each reads its own shards "
                     "through a shuffle buffer: memory flat in pack size) or auto (stream when the pack's arrays pass "
                     "1 GiB, memory for the discrete backbone; a resumed run keeps its checkpoint's)",
                     choices=["auto", "memory", "stream"])
    shuffle_buffer: int = opt(5000, "samples held in the stream input's shuffle buffer (per worker)", min=1)
    checkpoint_every: int = opt(500, "save a checkpoint every N steps (and at the end)", min=1, runtime=True)
    num_workers: int = opt(1, "Ray Train workers (DDP)", min=1, runtime=True)
    use_gpu: bool = opt(False, "train on GPUs (one per worker)", runtime=True)
    seed: int = opt(0, "seed for initialisation, data order and noise")


# diffusers schedulers the sampler steps with (model.diffusion.make_scheduler), with the report's words for them
SCHEDULER_WORDS = {"sde-dpmsolver++": "DPM-Solver++ (2M SDE)", "ddpm": "ancestral (DDPM)", "ddim": "DDIM"}
SCHEDULERS = list(SCHEDULER_WORDS)
DEFAULT_SCHEDULER = "sde-dpmsolver++"  # sample.scheduler's and evaluate.scheduler's default, and a SampleRequest's
SCHEDULER_BEFORE = "ddim"  # what samples and evaluations from before the scheduler key were drawn with


@dataclass
class SampleConfig:
    prompts: list[str] = opt(["red heart", "smiling face", "green apple", "rocket"], "prompts to sample")
    k: int = opt(10, "neighbours retrieved per prompt", min=0)
    guidance: float = opt(8.0, "classifier-free guidance scale (paper: 8)", min=0.0)
    neighbour_guidance: float | None = opt(None, "guidance scale of what the neighbours add to the text (a third model "
                                           "pass; above guidance: more of the database's look, less of the prompt; "
                                           "null: the same as guidance)", min=0.0)
    steps: int = opt(100, "denoising steps", min=1)
    scheduler: str = opt(DEFAULT_SCHEDULER, "sampler: sde-dpmsolver++ (DPM-Solver++ 2M SDE; on the demo model, 25 steps, "
                         "FD to held-out images 0.116 -> 0.106 and acc@5 +0.033 against ddpm, paired), ddpm (ancestral: "
                         "fresh noise at every step) or ddim (deterministic, eta 0)", choices=SCHEDULERS, before=SCHEDULER_BEFORE)
    seed: int = opt(0, "seed of the initial noise")
    images_per_prompt: int = opt(4, "samples per prompt", min=1)
    index: str | None = opt(None, "index directory to retrieve from (null: this workdir's)")


@dataclass
class EvaluateConfig:
    prompts: str | None = opt(None, "a file of prompts, one per line (null: captions of the images dedup held out)")
    max_prompts: int = opt(200, "at most this many prompts (a seeded sample of them)", min=2)
    images_per_prompt: int = opt(1, "samples per prompt (image j of a prompt uses seed + j)", min=1)
    k: int = opt(10, "neighbours per prompt; 0 conditions on the text alone (--no-knn)", min=0)
    steps: int = opt(25, "denoising steps", min=1)
    scheduler: str = opt(DEFAULT_SCHEDULER, "sampler: sde-dpmsolver++, ddpm (ancestral) or ddim (deterministic), as "
                         "sample.scheduler", choices=SCHEDULERS, before=SCHEDULER_BEFORE)
    guidance: float = opt(3.0, "classifier-free guidance scale", min=0.0)
    neighbour_guidance: float | None = opt(None, "guidance scale of what the neighbours add to the text, as "
                                           "sample.neighbour_guidance", min=0.0)
    seed: int = opt(0, "seed of the prompt sample and of the initial noise")
    encoder: str | None = opt(None, "evaluation CLIP: open_clip name or model-config JSON (null: the embed stage's CLIP)")
    encoder_pretrained: str | None = opt(None, "its pretrained tag or checkpoint (with evaluate.encoder)")
    train_images: int = opt(5000, "training images embedded for the real-vs-real floor and memorisation", min=10)
    database_images: int = opt(1000, "images of each compared database (FD/KID to the database)", min=10)
    compare_index: list[str] = opt([], "more index folders whose databases the samples are compared with (FD/KID)")
    no_knn_baseline: bool = opt(True, "also sample the same prompts and noise from the text alone (k = 0, into "
                                "evaluate/no_knn/) and report neighbours - text alone, paired image by image",
                                before=False)
    report_prompts: int = opt(48, "prompts shown in report.html", min=1)
    bootstrap: int = opt(500, "bootstrap resamples over prompts for the 95 % intervals", min=50)
    batch_size: int = opt(64, "images per sampling batch", min=1, runtime=True)


@dataclass
class Config:
    workdir: str = opt("work/run1", "each stage writes under <workdir>/<stage>/")
    device: str = opt("auto", "auto: cuda when available, else cpu", choices=["auto", "cpu", "cuda"], runtime=True)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    download: DownloadConfig = dataclasses.field(default_factory=DownloadConfig)
    embed: EmbedConfig = dataclasses.field(default_factory=EmbedConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    neighbours: NeighboursConfig = dataclasses.field(default_factory=NeighboursConfig)
    pack: PackConfig = dataclasses.field(default_factory=PackConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `--set key.sub=value` overrides; validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist: pass an existing file with -c, or omit -c to use the defaults")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML ({e}); fix the syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must be a mapping of sections (download:, embed:, ...), not {type(data).__name__}")
    return _with_overrides(data, overrides)


def with_overrides(cfg: Config, overrides: list[str] = ()) -> Config:
    """`cfg` (built in code, e.g. by the demo) with `--set key.sub=value` overrides on top, validated
    like a loaded config."""
    return _with_overrides(to_dict(cfg), overrides)


def with_values(cfg: Config, values: dict) -> Config:
    """`cfg` with {"section.key": value} set as typed values (no text round trip), validated like `--set`."""
    data = to_dict(cfg)
    for key, value in values.items():
        set_nested(data, key.split("."), value, key)
    return _with_overrides(data, [])


def _with_overrides(data: dict, overrides: list[str]) -> Config:
    for item in overrides:
        key, value = parse_override(item)
        set_nested(data, key.split("."), value, key)
    cfg = build(Config, data, "")
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Values that are each fine alone but impossible together, or malformed strings."""
    try:
        parse_bytes(cfg.index.memory_budget)
    except ValueError:
        raise ConfigError(f'index.memory_budget must be a size such as "4GB" or "512MB", got {cfg.index.memory_budget!r}') from None
    if cfg.download.encode_format == "png" and (cfg.download.encode_quality or 0) > 9:
        raise ConfigError(f"download.encode_quality is a png compression level 0-9 when encode_format is png, "
                          f"got {cfg.download.encode_quality}: set it to 9 or null")
    if isinstance(cfg.index.nprobe, str) and cfg.index.nprobe != "auto":
        raise ConfigError(f'index.nprobe must be "auto" or a positive integer, got {cfg.index.nprobe!r}')
    if isinstance(cfg.index.nprobe, int) and cfg.index.nprobe < 1:
        raise ConfigError(f"index.nprobe must be at least 1, got {cfg.index.nprobe}")
    for key, value in (("embed.decode_workers", cfg.embed.decode_workers), ("embed.encoders", cfg.embed.encoders),
                       ("neighbours.actors", cfg.neighbours.actors)):
        if isinstance(value, str) and value != "auto":
            raise ConfigError(f'{key} must be "auto" or a positive integer, got {value!r}')
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if cfg.neighbours.candidates < cfg.neighbours.k + 1:
        raise ConfigError(f"neighbours.candidates ({cfg.neighbours.candidates}) must exceed neighbours.k ({cfg.neighbours.k}): "
                          f"set neighbours.candidates to at least {cfg.neighbours.k + 1} (self is among the candidates)")
    if cfg.pack.box_min > cfg.pack.box_max:
        raise ConfigError(f"pack.box_min ({cfg.pack.box_min}) exceeds pack.box_max ({cfg.pack.box_max}): "
                          f"set pack.box_min <= pack.box_max")
    if cfg.train.batch_size % cfg.train.num_workers:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by train.num_workers ({cfg.train.num_workers})")
    if not cfg.sample.prompts:
        raise ConfigError("sample.prompts is empty: give at least one prompt")


# --------------------------------------------------------------------------- identity


def section(cfg: Config, name: str):
    return getattr(cfg, name)


def output_fingerprint(obj) -> dict:
    """The config keys that change a stage's output (runtime knobs left out)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("runtime"):
            continue
        value = getattr(obj, f.name)
        out[f.name] = output_fingerprint(value) if dataclasses.is_dataclass(value) else value
    return out


def legacy_fingerprint(cls) -> dict:
    """What a key missing from an older output's fingerprint stood for: the section's defaults, with
    each key's `before` value where it has one (see `opt`)."""
    out = output_fingerprint(cls())
    for f in dataclasses.fields(cls):
        if "before" in f.metadata and f.name in out:
            out[f.name] = f.metadata["before"]
    return out


def fingerprint_hash(obj) -> str:
    return hashlib.sha256(json.dumps(output_fingerprint(obj), sort_keys=True).encode()).hexdigest()[:16]


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
