"""`knnd demo`: the whole pipeline on the OpenMoji stickers, offline, on CPU.

Renders the stickers, serves them from a loopback HTTP server for the real download path,
trains (once, cached) a small CLIP on the (sticker, caption) pairs because no CLIP weights can
be downloaded here, then runs the stages with the demo's config. The resolved config is
written to <workdir>/stages.yaml so every other command can be pointed at the demo:
`knnd status -c work/demo/stages.yaml`.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import yaml

from pipeline.config import Config, to_dict, with_overrides
from pipeline.demo_data import prepare_demo_source, render_stickers, serve_directory, write_url_list
from pipeline.runner import read_json, run_stage, stage_dir, stage_status

ENCODER_CONFIG = Path(__file__).resolve().parent.parent / "model" / "configs" / "demo_clip.json"
ENCODER_MINUTES = 4.0
TRAIN_MINUTES = 6.0
VQ_MINUTES = 2.0  # --backbone discrete: the VQ autoencoder's share of TRAIN_MINUTES
# Classifier-free guidance for sampling and evaluate, with ancestral (ddpm) sampling, 25 steps: on the
# 60-minute model acc@5 0.719 / 0.733 / 0.775 at 1.5 / 2 / 3 (FD 0.015 / 0.016 / 0.019, floor 0.020);
# on the 6-minute one 0.602 / 0.591 / 0.575 at 2 / 3 / 5 (README, "Guidance"). With DDIM the best
# scale fell as the model trained (0.570 at 3 after 60 minutes); ancestral sampling removed that. With
# the default DPM-Solver++ SDE, on a 994-step demo model: 0.518 / 0.527 / 0.500 at 2 / 3 / 5.
GUIDANCE = 3.0
PROMPTS = ["red heart", "smiling face", "green apple", "rocket"]
MAIN_STAGES = ["dedup", "index", "neighbours", "pack", "train", "sample", "evaluate"]
SWAP_STAGES = ["download", "embed", "dedup", "index"]


def in_swap_subset(hexcode: str) -> bool:
    """The second database's subset: the U+1F300-U+1F5FF block (nature, food, animals, objects)."""
    return hexcode.split("-")[0][:3] in ("1F3", "1F4", "1F5")


def demo_config(workdir: Path, url_list: Path, encoder: Path, overrides: list[str] = (),
                backbone: str = "continuous") -> Config:
    """The demo's settings on top of the defaults, then the user's `--set` overrides (validated)."""
    cfg = Config(workdir=str(workdir))
    d = cfg.download
    d.url_list, d.image_size, d.encode_format, d.shard_size = str(url_list), 64, "png", 1000
    d.threads, d.timeout = 16, 10.0
    d.extra_columns = ["colourfulness"]  # a score to filter by (README, "Databases"): --where "colourfulness >= q(0.8)"
    e = cfg.embed
    e.model, e.pretrained = str(encoder / "encoder_config.json"), str(encoder / "encoder.pt")
    e.batch_size, e.text = 256, True
    # The demo's small CLIP packs stickers tightly (97 % have a partner above cosine 0.9, keycap
    # digits sit at 0.997); the paper's 0.9 is calibrated for ViT-B/32. See README, Deduplication.
    cfg.dedup.cosine_threshold = 0.995
    # ~6 % of the kept stickers (~130) are held out of the index and training: evaluate's prompts.
    cfg.dedup.holdout = 0.06
    # The CPU recipe (README, "The demo model"): 16 px, cross-attention at 8 and 4 px, a constant
    # 1e-3 after 20 warm-up steps, min-SNR-5 loss weights (at 1,500 steps acc@5 0.682 against 0.400
    # with plain MSE: docs/ablation.md, section 6), and the query slot masked for 90 % of the samples
    # so the model learns to draw from its neighbours (measured: README, "Neighbours that matter").
    cfg.pack.image_size = 16
    t = cfg.train
    t.model, t.steps, t.minutes, t.batch_size, t.checkpoint_every = "demo", 100_000, TRAIN_MINUTES, 32, 250
    t.warmup_steps, t.lr, t.lr_schedule, t.query_drop_prob = 20, 0.001, "constant", 0.9
    t.loss_weighting = "min_snr"
    s = cfg.sample
    s.prompts, s.steps, s.images_per_prompt, s.guidance = list(PROMPTS), 25, 4, GUIDANCE
    v = cfg.evaluate
    v.steps, v.guidance, v.images_per_prompt = 25, GUIDANCE, 2
    v.compare_index = [str(workdir / "swap" / "index")]
    if backbone == "discrete":
        discrete_settings(cfg)
    return with_overrides(cfg, overrides)


def discrete_settings(cfg: Config) -> None:
    """--backbone discrete: the 16 px stickers as 8 x 8 tokens of 256 codes (a 2-level VQ of 32
    channels, VQ_MINUTES of training), then the demo transformer (4 blocks of width 128, ~1.7 M
    parameters) for the rest of TRAIN_MINUTES; N = 100 steps in training, 25 respaced ones in sampling."""
    p = cfg.pack
    p.tokens, p.vq_downsample, p.vq_codes, p.vq_channels, p.vq_embed_dim = True, 2, 256, 32, 8
    p.vq_steps, p.vq_minutes, p.vq_batch_size, p.vq_lr = 100_000, VQ_MINUTES, 32, 1e-3
    cfg.train.backbone, cfg.train.minutes = "discrete", TRAIN_MINUTES - VQ_MINUTES


def run_demo(workdir: Path, minutes: float | None = None, limit: int | None = None, set_args: list[str] = (),
             encoder_minutes: float = ENCODER_MINUTES, force: bool = False, backbone: str = "continuous",
             steps: int | None = None, encoder_steps: int | None = None,
             encoder_logit_scale: float | None = None) -> int:
    """The whole demo. Budgets are minutes by default; `steps` / `encoder_steps` replace the diffusion
    model's / the encoder's clock with a step count, so runs on different hosts train alike.
    `encoder_logit_scale` fixes the demo CLIP's temperature (None: learnt)."""
    start = time.time()
    workdir = workdir.resolve()
    print(f"demo: rendering OpenMoji stickers into {workdir / 'demo_source'}")
    stickers, records = prepare_demo_source(workdir, size=72, limit=limit)
    # The second database: another subset in another style, OpenMoji's black line art (README, "Neighbours that matter").
    swap_records = [dict(r, file=f"line/{r['file']}")
                    for r in render_stickers(stickers / "line", 72, limit, style="line", keep=in_swap_subset)]
    print(f"demo: {len(records)} stickers")
    url_list = workdir / "demo_source" / "urls.parquet"
    budget = [f"train.minutes={minutes}"] if minutes is not None else []
    budget += [f"train.steps={steps}", "train.minutes=null"] if steps is not None else []
    extra = list(set_args) + budget
    cfg = demo_config(workdir, url_list, workdir / "encoder", extra, backbone)
    swap_list = workdir / "swap" / "demo_source" / "urls_line.parquet"  # named by style: an older demo's swap is stale
    swap_cfg = demo_config(workdir / "swap", swap_list, workdir / "encoder", extra, backbone)
    swap_cfg.embed.model, swap_cfg.embed.pretrained = cfg.embed.model, cfg.embed.pretrained
    swap_cfg.dedup.holdout = 0.0  # the whole line-art set is the swapped database
    _write_config(cfg, workdir)
    with_server(stickers, workdir, [(cfg, records, url_list), (swap_cfg, swap_records, swap_list)])

    train_encoder(cfg, workdir, encoder_minutes, encoder_steps, encoder_logit_scale)
    print(f"demo: database swapping: a second index over {len(swap_records)} stickers of U+1F300-U+1F5FF in line art")
    for name in SWAP_STAGES[1:]:  # before the main stages: evaluate compares samples with both databases
        run_stage(name, swap_cfg, force=force)
    for name in ["embed"] + MAIN_STAGES:
        run_stage(name, cfg, force=force)
    swapped = sample_swapped(cfg, workdir / "swap" / "index", workdir / "sample_swap")
    report(cfg, workdir, start, swapped)
    return 0


def with_server(stickers: Path, workdir: Path, jobs) -> None:
    """Download each (cfg, records, url list) not yet done, from one loopback server.

    The server reuses its last port, so the URL lists, and with them the download stages,
    stay up to date across demo runs."""
    todo = [job for job in jobs if stage_status(job[0], "download")[0] != "done"]
    if not todo:
        for cfg, _, _ in jobs:
            run_stage("download", cfg)
        return
    port_file = workdir / "demo_source" / "port"
    port = int(port_file.read_text()) if port_file.exists() else 0
    with serve_directory(stickers, port=port) as base_url:
        port_file.write_text(base_url.rsplit(":", 1)[1])
        print(f"demo: serving the stickers at {base_url} for the download stage")
        for cfg, records, url_list in jobs:
            url_list.parent.mkdir(parents=True, exist_ok=True)
            write_url_list(records, base_url, url_list, stickers)
            run_stage("download", cfg)


def sample_swapped(cfg, index_dir: Path, out: Path) -> Path:
    """The same prompts and seeds, the same model, neighbours from the second index."""
    from pipeline.generation import request_from_config, sample_into

    return sample_into(cfg, request_from_config(cfg.sample), index=str(index_dir), out=str(out)) / "grid.png"


def _write_config(cfg, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "stages.yaml").write_text("# written by `knnd demo`: the demo's resolved config\n"
                                         + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def downloaded_pairs(cfg) -> tuple[list, list[str]]:
    """(image, caption) pairs from the download stage's shards: what the encoder trains on."""
    from PIL import Image

    from pipeline.shards import iter_tar_samples

    manifest = read_json(stage_dir(cfg, "download") / "manifest.json")
    images, captions = [], []
    for shard in manifest["shards"]:
        for _, parts in iter_tar_samples(stage_dir(cfg, "download") / shard["tar"]):
            data = parts.get("png") or parts.get("jpg")
            if data is None or "txt" not in parts:
                continue
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            captions.append(parts["txt"].decode("utf-8"))
    return images, captions


def train_encoder(cfg, workdir: Path, minutes: float = ENCODER_MINUTES, steps: int | None = None,
                  logit_scale: float | None = None) -> dict:
    """Train the demo CLIP once (cached in <workdir>/encoder/) on the downloaded pairs, for `minutes`
    or, given `steps`, for that many steps whatever the clock says; `logit_scale` fixes its
    temperature (None: learnt, open_clip's default). A cached encoder trained with another
    logit scale is refused rather than reused: it would embed a different space."""
    from model.clip_demo import ClipTrainConfig, train_demo_clip

    out = workdir / "encoder"
    if (out / "encoder.json").exists() and (out / "encoder.pt").exists():
        metrics = json.loads((out / "encoder.json").read_text())
        cached_scale = metrics.get("cache_key", {}).get("train", {}).get("logit_scale")
        if cached_scale != logit_scale:
            raise ValueError(f"{out} holds a demo CLIP trained with logit scale {_scale_name(cached_scale)}, not "
                             f"{_scale_name(logit_scale)}: use another --workdir, or delete that folder and run with --force")
        print(f"demo: reusing the demo encoder in {out} ({metrics.get('steps')} steps; delete that folder "
              "and run with --force to train another)")
    else:
        images, captions = downloaded_pairs(cfg)
        budget = f"{steps} steps" if steps is not None else f"{minutes:g} minutes"
        print(f"demo: training the demo CLIP encoder on {len(images)} (sticker, caption) pairs "
              f"for {budget} (cached afterwards)")
        metrics = train_demo_clip(images, captions, out, ENCODER_CONFIG, minutes=None if steps is not None else minutes,
                                  max_steps=steps, train=ClipTrainConfig(logit_scale=logit_scale))
    r1, r10 = metrics.get("recall@1"), metrics.get("recall@10")
    print(f"demo: encoder text->image recall@1 {r1:.3f}, @10 {r10:.3f} on {metrics.get('n_holdout')} held-out captions")
    return metrics


def _scale_name(scale: float | None) -> str:
    return "learnt" if scale is None else f"{scale:g}"


def dedup_examples(cfg, n: int = 8) -> list[str]:
    """A few removed stickers next to the one kept for their group."""
    import pyarrow.parquet as pq

    from pipeline.embeddings import read_metadata

    keep = pq.read_table(stage_dir(cfg, "dedup") / "keep.parquet").to_pandas()
    embed_manifest = read_json(stage_dir(cfg, "embed") / "manifest.json")
    captions = read_metadata(stage_dir(cfg, "embed"), embed_manifest, ["caption"])["caption"]
    removed = keep[~keep["keep"] & (keep["reason"] != "holdout")]
    step = max(1, len(removed) // n)
    return [f"{captions[r.row]!r} duplicates {captions[int(r.duplicate_of)]!r} ({r.reason}, {r.similarity:.3f})"
            for r in removed.iloc[::step].head(n).itertuples()]


def report(cfg, workdir: Path, start: float, swapped: Path) -> None:
    from pipeline.report import print_table

    print_table(cfg, ["download", "embed"] + MAIN_STAGES)
    dedup = read_json(stage_dir(cfg, "dedup") / "manifest.json")
    print(f"\ndedup removed {dedup['counts']['removed']} of {dedup['counts']['images']} stickers "
          f"({dedup['removed_by_reason']}), for example:")
    for line in dedup_examples(cfg):
        print(f"  {line}")
    print(f"\ndemo: done in {(time.time() - start) / 60:.1f} minutes")
    evaluation = read_json(stage_dir(cfg, "evaluate") / "manifest.json")
    print(f"  evaluation:          {evaluation['summary']}")
    tokens = read_json(stage_dir(cfg, "pack") / "manifest.json").get("tokens")
    if tokens:  # --backbone discrete
        q = tokens["quality"]
        print(f"  VQ tokens:           {tokens['grid'][0]} x {tokens['grid'][1]} of {tokens['codes']} codes, PSNR {q['psnr']:.2f} dB, "
              f"perplexity {q['perplexity']:.1f}, {q['dead']} dead codes, FD(reconstructions, originals) {q['fd_clip']}")
    print(f"  report:              {stage_dir(cfg, 'evaluate') / 'report.html'}  (metrics.json beside it)")
    print(f"  samples:             {stage_dir(cfg, 'sample') / 'grid.png'}")
    print(f"  swapped database:    {swapped}")
    print(f"  config:              {workdir / 'stages.yaml'}  (knnd status -c {workdir / 'stages.yaml'})")
    print(f"  try:                 knnd search \"red heart\" -c {workdir / 'stages.yaml'}")
