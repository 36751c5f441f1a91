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

from pipeline.config import load_config, to_dict
from pipeline.demo_data import prepare_demo_source, serve_directory, write_url_list
from pipeline.runner import read_json, run_stage, stage_dir, stage_status

ENCODER_CONFIG = Path(__file__).resolve().parent.parent / "model" / "configs" / "demo_clip.json"
ENCODER_MINUTES = 4.0
STAGES_NOW = ["download", "embed"]


def demo_overrides(workdir: Path, url_list: Path) -> list[str]:
    encoder = workdir / "encoder"
    return [
        f"workdir={workdir}",
        f"download.url_list={url_list}",
        "download.image_size=64", "download.encode_format=png", "download.shard_size=1000",
        "download.threads=16", "download.timeout=10",
        f"embed.model={encoder / 'encoder_config.json'}", f"embed.pretrained={encoder / 'encoder.pt'}",
        "embed.batch_size=256", "embed.text=true",
    ]


def run_demo(workdir: Path, minutes: float | None = None, limit: int | None = None, set_args: list[str] = (),
             encoder_minutes: float = ENCODER_MINUTES) -> int:
    start = time.time()
    workdir = workdir.resolve()
    print(f"demo: rendering OpenMoji stickers into {workdir / 'demo_source'}")
    stickers, records = prepare_demo_source(workdir, size=72, limit=limit)
    print(f"demo: {len(records)} stickers")
    url_list = workdir / "demo_source" / "urls.parquet"
    cfg = load_config(None, demo_overrides(workdir, url_list) + list(set_args))
    _write_config(cfg, workdir)

    if stage_status(cfg, "download")[0] != "done":
        port_file = workdir / "demo_source" / "port"
        port = int(port_file.read_text()) if port_file.exists() else 0
        with serve_directory(stickers, port=port) as base_url:
            port_file.write_text(base_url.rsplit(":", 1)[1])
            write_url_list(records, base_url, url_list)
            print(f"demo: serving the stickers at {base_url} for the download stage")
            run_stage("download", cfg)
    else:
        run_stage("download", cfg)

    train_encoder(cfg, workdir, encoder_minutes)
    for name in STAGES_NOW[1:]:
        run_stage(name, cfg)
    report(cfg, workdir, start)
    return 0


def _write_config(cfg, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "stages.yaml").write_text("# written by `knnd demo`: the demo's resolved config\n"
                                         + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def downloaded_pairs(cfg) -> tuple[list, list[str]]:
    """(image, caption) pairs from the download stage's shards: what the encoder trains on."""
    from PIL import Image

    from pipeline.embed import iter_tar_samples

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


def train_encoder(cfg, workdir: Path, minutes: float = ENCODER_MINUTES) -> dict:
    """Train the demo CLIP once (cached in <workdir>/encoder/) on the downloaded pairs."""
    from model.clip_demo import train_demo_clip

    out = workdir / "encoder"
    if (out / "encoder.json").exists() and (out / "encoder.pt").exists():
        metrics = json.loads((out / "encoder.json").read_text())
        print(f"demo: reusing the demo encoder in {out}")
    else:
        images, captions = downloaded_pairs(cfg)
        print(f"demo: training the demo CLIP encoder on {len(images)} (sticker, caption) pairs "
              f"for {minutes:g} minutes (cached afterwards)")
        metrics = train_demo_clip(images, captions, out, ENCODER_CONFIG, minutes=minutes)
    r1, r10 = metrics.get("recall@1"), metrics.get("recall@10")
    print(f"demo: encoder text->image recall@1 {r1:.3f}, @10 {r10:.3f} on {metrics.get('n_holdout')} held-out captions")
    return metrics


def report(cfg, workdir: Path, start: float) -> None:
    from pipeline.cli import print_table

    print_table(cfg, STAGES_NOW)
    print(f"\ndemo: done in {(time.time() - start) / 60:.1f} minutes; config in {workdir / 'stages.yaml'}")
    print(f"      see it with: knnd status -c {workdir / 'stages.yaml'}")
