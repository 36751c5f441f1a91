"""The corpus workdir: real images downloaded once, then the stages downstream run on it as needed."""
from __future__ import annotations

from pathlib import Path

from .common import Bench, config, run_stage_quietly


def chain_overrides(b: Bench) -> list[str]:
    """Config of the corpus workdir: real download + embed, then the stages downstream of them.

    A random-init CLIP embeds every image alike (cosine > 0.99), so dedup is told to merge only exact
    copies (cosine above 1, identical pHash) and the chain keeps distinct pictures."""
    return [f"download.url_list={b.root / 'corpus_urls.parquet'}", f"download.shard_size={b.sizes.corpus_shard}",
            f"embed.model={b.args.embed_model}", "embed.pretrained=null",
            "dedup.cosine_threshold=1.0", "dedup.manhattan_threshold=0",
            "train.model=demo", "train.steps=2", "train.batch_size=8", "train.checkpoint_every=2", "train.warmup_steps=1",
            f"sample.steps={b.sizes.sample_steps}", "sample.prompts=[a red picture]",
            f"sample.images_per_prompt={b.sizes.sample_batch}"]


def corpus(b: Bench) -> Path:
    """<root>/corpus with the download stage done (untimed)."""
    def make():
        wd = b.root / "corpus"
        b.images().url_list(b.root / "corpus_urls.parquet", b.sizes.corpus_images)
        b.say(f"  (building the corpus: {b.sizes.corpus_images} images through the download stage)")
        run_stage_quietly(b, "download", config(wd, *chain_overrides(b)), force=False)
        return wd
    return b.once("corpus", make)


def chain(b: Bench, upto: str) -> Path:
    """The corpus workdir with every stage through `upto` done (untimed; up-to-date stages do nothing)."""
    from pipeline.stages import STAGES

    wd = corpus(b)
    cfg = config(wd, *chain_overrides(b))
    for name in STAGES[1:STAGES.index(upto) + 1]:
        if name not in b.chain_done:
            run_stage_quietly(b, name, cfg, force=False)
            b.chain_done.add(name)
    return wd


def iter_download_images(download_dir: Path):
    """(key, image bytes) in manifest shard order, as the embed stage reads them."""
    from pipeline.shards import IMAGE_EXTS, iter_tar_samples
    from pipeline.runner import read_json

    for shard in read_json(download_dir / "manifest.json")["shards"]:
        for key, parts in iter_tar_samples(download_dir / shard["tar"]):
            data = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if data is not None:
                yield key, data
