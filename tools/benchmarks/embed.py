"""embed: the stage against an open_clip encode_image loop over the same, pre-decoded images."""
from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT, Bench, config, interleave, measured, median, run_stage_quietly
from .corpus import chain_overrides, corpus, iter_download_images


# What a user would write without us, run as its own process: imports, model, every JPEG decoded and
# preprocessed, encode, normalise, one .npy. The stage pays the same start-up (its encoder actor is a
# new process), so "end to end (start-up included)" compares like with like.
BARE_SCRIPT = """
import io, sys, tarfile, time
start = time.perf_counter()
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
sys.path.insert(0, sys.argv[1])
from model.clip import flatten_alpha, load_clip
tars, model, batch, out = sys.argv[2].split(","), sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
bundle = load_clip(model, None)
embeddings, pending = [], []
def encode():
    with torch.inference_mode():
        embeddings.append(F.normalize(bundle.model.encode_image(torch.stack(pending)), dim=-1).numpy())
    pending.clear()
for tar in tars:
    with tarfile.open(tar) as archive:
        for member in archive:
            if member.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp"):
                image = Image.open(io.BytesIO(archive.extractfile(member).read()))
                pending.append(bundle.preprocess(flatten_alpha(image)))
                if len(pending) == batch:
                    encode()
if pending:
    encode()
np.save(out, np.concatenate(embeddings).astype(np.float16))
print(time.perf_counter() - start)
"""


def bare_script(b: Bench, download_dir: Path, model: str, batch: int) -> float:
    """Seconds of BARE_SCRIPT in a fresh Python process, from its first line to its .npy written."""
    from pipeline.runner import read_json

    tars = ",".join(str(download_dir / s["tar"]) for s in read_json(download_dir / "manifest.json")["shards"])
    result = subprocess.run([sys.executable, "-c", BARE_SCRIPT, str(ROOT), tars, model, str(batch),
                             str(b.root / "bare_embed.npy")], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def section_embed(b: Bench) -> None:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from model.clip import flatten_alpha, load_clip

    wd = corpus(b)
    cfg = config(wd, *chain_overrides(b))
    batch = cfg.embed.batch_size
    torch.manual_seed(0)
    bundle = load_clip(cfg.embed.model, None)
    pixels = torch.stack([bundle.preprocess(flatten_alpha(Image.open(io.BytesIO(data))))
                          for _, data in iter_download_images(wd / "download")])
    n = len(pixels)
    workers = b.worker_threads()
    default_threads = torch.get_num_threads()

    timings = []

    def stage(i):
        seconds, manifest = run_stage_quietly(b, "embed", cfg)
        b.chain_done.difference_update({"dedup", "index", "neighbours", "pack", "train", "sample"})
        timings.append(manifest["timing"])
        return manifest["rows"] / seconds

    def bare(threads):
        def run(i):
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    bundle.model.encode_image(pixels[:2])  # warm-up
                    start = time.perf_counter()
                    for s in range(0, n, batch):
                        F.normalize(bundle.model.encode_image(pixels[s:s + batch]), dim=-1).numpy()
                    return n / (time.perf_counter() - start)
            finally:
                torch.set_num_threads(default_threads)
        return run

    def script(i):
        return n / bare_script(b, wd / "download", cfg.embed.model, batch)

    res = interleave(b.args.reps, {"stage": stage, "same": bare(workers["torch"]), "all": bare(default_threads),
                                   "script": script}, warm_up=("stage",))
    model = Path(cfg.embed.model).name if cfg.embed.model.endswith(".json") else cfg.embed.model
    size = bundle.image_size
    includes = ("ours: run_stage('embed') = Ray decode tasks (JPEG decode, PIL transforms, pHash) streaming to the "
                "ClipEncoder actor(s) (actor start + model init included; decoding starts once the model's config is "
                "read, while the weights load), npy/parquet writes, row numbering, manifest; "
                "reference: open_clip model.encode_image + normalize over pre-decoded, pre-normalised tensors")
    note = f"{model} random init, {size} px, batch {batch}, {n} images"
    b.add(measured("embed", f"images/s vs bare loop, same threads ({workers['torch']})", "img/s", res["stage"],
                   res["same"], target=0.9, target_text=">= 0.9", note=note, includes=includes))
    b.add(measured("embed", f"images/s vs bare loop, bench threads ({default_threads})", "img/s", res["stage"],
                   res["all"], target=0.9, target_text=">= 0.9", note="the encoder actor runs torch on "
                   f"{workers['torch']} thread(s) (Ray num_cpus=1)", includes=includes))
    b.add(measured("embed", f"images/s end to end vs a bare script, bench threads ({default_threads})", "img/s",
                   res["stage"], res["script"], target=0.9, target_text=">= 0.9", note=note,
                   includes="ours: as above; reference: a fresh Python process that imports torch and open_clip, "
                            "builds the model, reads the shards' JPEGs with tarfile and PIL, preprocesses, encodes "
                            "and normalises in batches of embed.batch_size and saves one .npy (tools/benchmarks/embed.py "
                            "BARE_SCRIPT): what a user would write without the stage, start-up included on both sides"))
    timings = timings[-len(res["stage"]):]  # the timed repetitions, not the warm-up
    start_s = median([t["encoder_start_s"] for t in timings])
    config_s = median([t.get("encoder_config_s") for t in timings])
    b.add(measured("embed", f"images/s after encoder start-up vs bare loop, same threads ({workers['torch']})", "img/s",
                   [t["images_per_s_after_start"] for t in timings], res["same"], target=0.9, target_text=">= 0.9",
                   note=f"encoder actor start-up (process, torch/open_clip import, model init) {start_s:.1f} s, "
                        f"a fixed cost per run excluded here (decoding began at {config_s or 0:.1f} s)", includes=includes))
