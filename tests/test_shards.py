"""pipeline/shards.py: our tar reader agrees with webdataset's on download and pack shards; images
decode under the pixel limit; reading shards and decoding images imports no torch."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import jpg_bytes, png_bytes, write_fake_download
from model.data import read_pack_shard, write_pack_shard
from pipeline.shards import corrupt_message, image_bytes, iter_tar_samples, load_image, open_image


def webdataset_samples(path: Path) -> list[tuple[str, dict]]:
    import webdataset as wds

    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]


def test_download_shard_reads_as_webdataset_reads_it(tmp_path):
    write_fake_download(tmp_path, [[(f"{i:04d}", jpg_bytes(i), f"caption {i}") for i in range(5)]
                                   + [("0005", None, "an undecodable one")]])
    tar = tmp_path / "download" / "00000.tar"
    ours = list(iter_tar_samples(tar))
    assert [key for key, _ in ours] == [f"{i:04d}" for i in range(6)]
    assert ours == webdataset_samples(tar)
    assert image_bytes(ours[0][1]) == jpg_bytes(0) and ours[0][1]["txt"] == b"caption 0"


def test_pack_shard_reads_as_webdataset_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    samples = [{"key": f"s{i}", "image": rng.integers(0, 256, (8, 8, 3)), "emb": rng.normal(size=4),
                "nbr": rng.normal(size=(2, 4))} for i in range(3)]
    path = tmp_path / "00000.tar"
    assert write_pack_shard(path, samples) == 3
    theirs = webdataset_samples(path)
    assert [key for key, _ in theirs] == ["s0", "s1", "s2"]
    assert [(key, sorted(parts)) for key, parts in iter_tar_samples(path)] == \
        [(key, sorted(parts)) for key, parts in theirs] == [(f"s{i}", ["emb.npy", "image.npy", "nbr.npy"]) for i in range(3)]
    shard = read_pack_shard(path)
    assert np.array_equal(shard["image"], np.stack([s["image"] for s in samples]).astype(np.uint8))
    assert np.array_equal(shard["nbr"], np.stack([s["nbr"] for s in samples]).astype(np.float16))


def test_a_failed_pack_write_leaves_no_file(tmp_path):
    bad = [{"key": "a.b", "image": np.zeros((4, 4, 3)), "emb": np.zeros(2), "nbr": np.zeros((1, 2))}]
    with pytest.raises(ValueError, match="pack key 'a.b'"):
        write_pack_shard(tmp_path / "00000.tar", bad)
    assert list(tmp_path.iterdir()) == []


def test_load_image_flattens_alpha_crops_and_resizes():
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 0, 30, 20))  # an opaque blue square in the centre
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    image = load_image(buf.getvalue(), 10)
    assert image.shape == (10, 10, 3) and image.dtype == np.uint8
    assert tuple(image[5, 5]) == (0, 0, 255)  # the centre crop is the blue square, alpha flattened


def test_the_pixel_limit_refuses_a_decompression_bomb(monkeypatch):
    import pipeline.shards as shards

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setattr(shards, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        with open_image(png_bytes(0, 40)) as im:  # 1,600 pixels, above twice the limit
            im.load()


def test_corrupt_message_names_the_shard_and_the_fix():
    message = corrupt_message("/w/download/00003.tar", "unexpected end of data")
    assert message.startswith("/w/download/00003.tar is corrupt or truncated (unexpected end of data)")
    assert "re-run `knnd run download`" in message


def test_reading_shards_and_decoding_images_imports_no_torch(tmp_path):
    """Pack and embed decode workers stay torch-free (no torch, open_clip or webdataset import)."""
    write_fake_download(tmp_path, [[("0000", jpg_bytes(0), "a")]])
    script = f"""
import sys
from pipeline.shards import image_bytes, iter_tar_samples, load_image
(key, parts), = iter_tar_samples({str(tmp_path / "download" / "00000.tar")!r})
assert load_image(image_bytes(parts), 16).shape == (16, 16, 3)
print(sorted(m for m in ("torch", "open_clip", "webdataset") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
