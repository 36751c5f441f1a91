"""The demo CLIP's modality gap at each temperature: `python tools/measure_modality_gap.py learn 100`.

Trains the demo encoder on a finished demo's stickers for 185 steps per setting ("learn": open_clip's
learnable temperature; a number: the logit scale fixed there) and prints held-out recall and the
median cosines that say how far a caption's embedding sits from its image's: caption-image pairs,
each image's nearest other image, each caption's nearest image.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.clip import encode_images, encode_texts, load_clip, preprocess_images  # noqa: E402
from model.clip_demo import ClipTrainConfig, train_demo_clip  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.demo import ENCODER_CONFIG, downloaded_pairs  # noqa: E402


def main(settings, demo="work/demo", out_root="work/gap", steps=185, n=1500):
    images, captions = downloaded_pairs(load_config(f"{demo}/stages.yaml"))
    for name in settings:
        out = Path(out_root) / f"enc_{name}"
        start = time.time()
        scale = None if name == "learn" else float(name)
        metrics = train_demo_clip(images, captions, out, ENCODER_CONFIG, max_steps=steps, minutes=1e6,
                                  train=ClipTrainConfig(logit_scale=scale))
        bundle = load_clip(str(out / "encoder_config.json"), str(out / "encoder.pt"))
        im = np.concatenate([encode_images(bundle, preprocess_images(bundle, images[i:i + 250])) for i in range(0, n, 250)])
        tx = encode_texts(bundle, captions[:n])
        nearest = im @ im.T
        np.fill_diagonal(nearest, -1)
        print(json.dumps({"setting": name, "recall@1": round(metrics["recall@1"], 3), "recall@10": round(metrics["recall@10"], 3),
                          "caption_image_cos": round(float(np.median((im * tx).sum(1))), 3),
                          "image_nearest_image_cos": round(float(np.median(nearest.max(1))), 3),
                          "caption_nearest_image_cos": round(float(np.median((tx @ im.T).max(1))), 3),
                          "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["learn", "100"])
