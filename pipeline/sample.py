"""sample stage and `knnd sample`: prompts -> CLIP text embedding -> k neighbours -> guided denoising (sample.scheduler) -> PNGs.

For a prompt t: f_txt(t) from the CLIP that embedded the index's images, its k nearest images in
the index, and the condition y = (f_txt(t), d_1 .. d_k) built from their stored image embeddings;
then the denoiser's EMA weights sample with classifier-free guidance. Any index directory built
by this pipeline will do (`--index`): that is database swapping. Outputs in the output folder:
`<prompt-slug>_<i>.png`, `grid.png` (a row per prompt) and `samples.jsonl` (a line per image:
prompt, seed, neighbours used, guidance, steps, index, checkpoint).

Image i of a prompt starts from noise seeded by `seed + i`, so `--seed S+i` regenerates it alone.
`--no-knn` conditions on f_txt(t) alone (neighbour slots masked). `--init-image REF --strength s`
edits REF as in the paper: f_img(REF) replaces the first neighbour and the reverse process starts
from REF noised to ~s * T.

`knnd run sample` writes into <workdir>/sample/ (resumable per prompt); `knnd sample` writes into
--out, by default a new <workdir>/sample_cli/<YYYYmmdd-HHMMSS>/ per call, and needs no manifest of its own.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.generation import Sampler, dimension_mismatch, generate, request_from_config
from pipeline.grids import write_grid, write_records
from pipeline.runner import StageRun, UsageError, read_json, stage_dir


def check(cfg) -> None:
    """Before anything is written: the index exists and its dimension fits the trained model."""
    train = read_json(stage_dir(cfg, "train") / "manifest.json", "Rebuild it with `knnd run train --force`.")
    index_dir = Path(cfg.sample.index or stage_dir(cfg, "index"))
    infos_path = index_dir / "index_infos.json"
    if not infos_path.exists():
        raise UsageError(f"sample.index {index_dir} is not an index directory (no index_infos.json): "
                         f"build one with `knnd run index`")
    d, model = read_json(infos_path)["d"], train["model_config"]
    if model.get("manipulation"):
        raise UsageError("the trained model is a local-manipulation one (train.mode=manipulate): the sample stage "
                         "generates from text; edit images with `knnd edit IMAGE \"edit text\"` instead")
    if d != model["clip_dim"]:
        raise UsageError(dimension_mismatch(stage_dir(cfg, "train") / train["checkpoint"], model["clip_dim"], index_dir, d))
    if cfg.sample.k > model["k"]:
        raise UsageError(f"sample.k ({cfg.sample.k}) exceeds the {model['k']} neighbours the model was trained with: "
                         f"lower sample.k")


def run(stage: StageRun) -> dict:
    conf = stage.conf
    request = request_from_config(conf)
    request.validate()
    train_dir = stage.input_dirs["train"]
    checkpoint = train_dir / stage.inputs["train"]["checkpoint"]
    index_dir = Path(conf.index) if conf.index else stage.input_dirs["index"]
    stage.plan(len(request.prompts))
    done = {p for p in range(len(request.prompts)) if stage.shard_done(p)}
    if len(done) < len(request.prompts):
        sampler = Sampler(checkpoint, index_dir, stage.device())
        progress = stage.progress(len(request.prompts), unit="images")

        def finished(p, records):
            stage.mark_done(p, {"records": records})  # the prompt's PNGs are in place
            progress.update(1, len(records))

        generate(sampler, request, stage.dir, done=finished, skip=done)
    stats = stage.done_stats()
    records = [r for p in range(len(request.prompts)) for r in stats[p]["records"]]
    write_records(stage.dir, records)
    grid = write_grid(stage.dir, records, request.prompts, request.images_per_prompt)
    print(f"sample: grid: {grid}")
    return {
        "items": len(records),
        "counts": {"prompts": len(request.prompts), "images": len(records)},
        "grid": "grid.png",
        "samples": "samples.jsonl",
        "images": [r["image"] for r in records],
        "request": asdict(request),
        "index_dir": str(index_dir.resolve()),
        "checkpoint": str(checkpoint.resolve()),
    }

