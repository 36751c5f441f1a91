"""The pictures behind embedding rows, for evaluation and reports (not a stage).

An embed folder's manifest names the download folder its rows came from (`download_dir`), and its
metadata gives each row's key and download shard, so any index built by this pipeline can show the
images it retrieves, and `knnd evaluate` can compare samples with a database's real pictures.
Images are decoded exactly as the pack stage decodes training images (`pipeline.shards.load_image`).
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from pipeline.embeddings import read_metadata
from pipeline.files import StageError, read_json
from pipeline.shards import image_bytes, iter_tar_samples, load_image


class DatabaseImages:
    """Rows of an embed folder -> uint8 [size, size, 3] pictures, read from its download shards."""

    def __init__(self, embed_dir: Path):
        self.embed_dir = Path(embed_dir)
        manifest = read_json(self.embed_dir / "manifest.json", "Rebuild it with `knnd run embed --force`.")
        download_dir = manifest.get("download_dir")
        if not download_dir:
            raise StageError(f"{self.embed_dir / 'manifest.json'} does not name its download folder (written by an older "
                             f"version): rebuild it with `knnd run embed --force`")
        download = read_json(Path(download_dir) / "manifest.json", "Rebuild it with `knnd run download --force`.")
        self.tars = {int(s["shard"]): Path(download_dir) / s["tar"] for s in download["shards"]}
        meta = read_metadata(self.embed_dir, manifest, ["key", "shard", "caption"])
        self.keys, self.shards, self.captions = meta["key"], meta["shard"], meta["caption"]

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, rows, size: int) -> dict[int, np.ndarray]:
        """{row: image} for the rows that still decode; each download tar is read once."""
        wanted = collections.defaultdict(dict)  # shard -> {key: row}
        for row in np.unique(np.asarray(rows, dtype=np.int64)):
            wanted[int(self.shards[row])][str(self.keys[row])] = int(row)
        images = {}
        for shard, by_key in sorted(wanted.items()):
            tar = self.tars.get(shard)
            if tar is None:
                raise StageError(f"the embeddings in {self.embed_dir} name download shard {shard}, which its download "
                                 f"manifest lacks: re-run `knnd run embed --force`")
            for key, parts in iter_tar_samples(tar):
                row = by_key.get(key)
                data = image_bytes(parts) if row is not None else None
                if data is None:
                    continue
                try:
                    images[row] = load_image(data, size)
                except Exception:  # noqa: BLE001 - an image that no longer decodes is left out
                    continue
        return images
