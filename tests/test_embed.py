"""embed stage: oracle equality with a direct open_clip encode, bad samples, corrupt tars, kill-resume."""
from __future__ import annotations

import io
import os
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import TINY_CLIP, jpg_bytes, markers, run_and_kill, write_fake_download
from model.clip import encode_images, load_clip
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import StageError, run_stage

TINY = os.path.abspath(TINY_CLIP)


def embed_args(workdir: Path, *extra: str) -> list[str]:
    return [f"workdir={workdir}", f"embed.model={TINY}", "embed.pretrained=null", "embed.batch_size=5", *extra]


def samples(shard: int, n: int, bad: set[int] = frozenset()):
    return [(f"{shard:05d}{i:04d}", None if i in bad else jpg_bytes(shard * 1000 + i), f"caption {shard} {i}") for i in range(n)]


def read_embed(workdir: Path):
    out = workdir / "embed"
    emb = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    meta = pq.read_table(sorted((out / "metadata").glob("*.parquet"))).to_pandas()
    return emb, meta


def test_embeddings_equal_direct_open_clip_encode(tmp_path, ray_local):
    write_fake_download(tmp_path, [samples(0, 7), samples(1, 6)])
    torch.manual_seed(0)
    # random init is seeded inside the actor process differently, so save the weights and load them in both
    bundle = load_clip(TINY, None)
    ckpt = tmp_path / "tiny.pt"
    torch.save(bundle.model.state_dict(), ckpt)
    m = run_stage("embed", load_config(None, embed_args(tmp_path, f"embed.pretrained={ckpt}", "embed.text=true")))
    emb, meta = read_embed(tmp_path)
    assert emb.dtype == np.float16 and emb.shape == (13, bundle.embed_dim)
    assert m["rows"] == 13 and m["dim"] == bundle.embed_dim and m["counts"]["failed"] == 0
    assert list(meta["row"]) == list(range(13))
    assert list(meta["key"]) == [k for s in (samples(0, 7), samples(1, 6)) for k, _, _ in s]
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    bundle = load_clip(TINY, str(ckpt))
    images = [Image.open(io.BytesIO(jpg_bytes(int(k[:5]) * 1000 + int(k[5:])))).convert("RGB") for k in meta["key"]]
    direct = encode_images(bundle, torch.stack([bundle.preprocess(im) for im in images]))
    np.testing.assert_allclose(emb.astype(np.float32), direct, atol=2e-3)
    assert list(meta["phash"]) == [str(imagehash.phash(im)) for im in images]
    assert list(meta["caption"]) == [c for s in (samples(0, 7), samples(1, 6)) for _, _, c in s]
    assert list(meta["width"]) == [40] * 13
    text = np.concatenate([np.load(tmp_path / "embed" / s["text_emb"]) for s in m["shards"]])
    from model.clip import encode_texts

    np.testing.assert_allclose(text.astype(np.float32), encode_texts(bundle, list(meta["caption"])), atol=2e-3)


def test_undecodable_sample_counted_and_skipped(tmp_path, ray_local, monkeypatch):
    import ray

    fetched, real_get = [], ray.get

    def get(refs, *args, **kwargs):  # everything the driver fetches
        out = real_get(refs, *args, **kwargs)
        fetched.extend(out if isinstance(out, list) else [out])
        return out

    monkeypatch.setattr(ray, "get", get)
    write_fake_download(tmp_path, [samples(0, 6, bad={2, 4}), samples(1, 3)])
    m = run_stage("embed", load_config(None, embed_args(tmp_path)))
    monkeypatch.undo()
    # the driver got the encoders' results (embeddings + metadata), never a chunk of pixels
    assert sum(isinstance(v, dict) and "img" in v for v in fetched) == 2  # one chunk a shard (4 and 3 decoded)
    assert not any(isinstance(v, dict) and "pixels" in v for v in fetched)
    assert not any(isinstance(x, np.ndarray) and x.dtype == np.uint8 for v in fetched if isinstance(v, dict) for x in v.values())
    emb, meta = read_embed(tmp_path)
    assert m["failures"] == {"undecodable": 2} and m["counts"]["images"] == 7
    assert len(emb) == len(meta) == 7
    assert "000000002" not in set(meta["key"]) and "000000003" in set(meta["key"])
    assert [s["row_offset"] for s in m["shards"]] == [0, 4]


def test_corrupt_tar_stops_with_its_name(tmp_path, ray_local, capsys):
    out = write_fake_download(tmp_path, [samples(0, 4), samples(1, 4), samples(2, 4)])
    data = (out / "00001.tar").read_bytes()
    (out / "00001.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    with pytest.raises(StageError, match=r"00001\.tar is corrupt or truncated.*re-run `knnd run download`"):
        run_stage("embed", load_config(None, embed_args(tmp_path)))
    assert (tmp_path / "embed" / "img_emb" / "img_emb_00000.npy").exists()  # what was done is kept
    assert main(["run", "embed"] + [a for s in embed_args(tmp_path) for a in ("--set", s)]) == 1
    assert "00001.tar is corrupt" in capsys.readouterr().err


def test_killed_and_rerun_gives_identical_files(tmp_path, ray_local):
    shards = [samples(s, 24) for s in range(30)]
    for w in ("killed", "clean"):
        write_fake_download(tmp_path / w, shards)
    args = embed_args(tmp_path / "killed", "ray.num_cpus=2")
    done = run_and_kill("embed", args, markers(tmp_path / "killed" / "embed" / "_run" / "done"), at_least=3)
    assert 3 <= done < 30, f"kill landed after {done} of 30 shards"
    assert not (tmp_path / "killed" / "embed" / "manifest.json").exists()
    run_stage("embed", load_config(None, args))
    run_stage("embed", load_config(None, embed_args(tmp_path / "clean")))
    killed, clean = tmp_path / "killed" / "embed", tmp_path / "clean" / "embed"
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file() and "_run" not in p.parts and p.name != "manifest.json")
    assert len(files) == 60
    assert files == sorted(p.relative_to(killed) for p in killed.rglob("*") if p.is_file() and "_run" not in p.parts and p.name != "manifest.json")
    for f in files:
        if f.suffix == ".parquet":
            assert pq.read_table(killed / f).equals(pq.read_table(clean / f)), f
        else:
            assert np.array_equal(np.load(killed / f), np.load(clean / f)), f


def _torchvision_val_transforms():
    from open_clip.transform import image_transform
    from torchvision import transforms as T

    from pipeline.embed import split_transform

    for size, mode, interp in [(64, "shortest", "bicubic"), (224, "shortest", "bilinear"), ((48, 40), "squash", "bicubic")]:
        yield split_transform(image_transform(size, is_train=False, resize_mode=mode, interpolation=interp))[0]
    yield T.Compose([T.Resize(32, max_size=40), T.CenterCrop(36)])  # max_size cap, then a crop larger than the image


def test_pil_transform_is_pixel_identical_to_torchvision():
    """Decode workers replay open_clip's PIL steps without torch; the pixels must not change."""
    from model.imageops import PilTransform

    rng = np.random.default_rng(0)
    sizes = [(256, 256), (300, 200), (200, 301), (17, 90), (64, 64), (65, 63), (31, 500), (1, 1)]
    for tv in _torchvision_val_transforms():
        ours = PilTransform.from_torchvision(tv)
        assert ours is not None, tv
        for w, h in sizes:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            expected, got = np.asarray(tv(image)), np.asarray(ours(image))
            assert got.shape == expected.shape and np.array_equal(got, expected), (tv, (w, h))


def test_pil_transform_declines_steps_it_cannot_replay():
    from open_clip.transform import image_transform

    from model.imageops import PilTransform
    from pipeline.embed import split_transform

    longest = split_transform(image_transform(64, is_train=False, resize_mode="longest"))[0]  # ResizeKeepRatio
    assert PilTransform.from_torchvision(longest) is None


def test_decode_workers_import_no_torch(tmp_path):
    """Decode workers start in well under a second because decoding needs Pillow only."""
    import subprocess
    import sys

    write_fake_download(tmp_path, [[(f"{i:04d}", jpg_bytes(i), f"caption {i}") for i in range(3)]])
    script = f"""
import sys
from PIL import Image
from model.imageops import PilTransform
from pipeline.embed import decode_chunks
chunks = list(decode_chunks({str(tmp_path / "download" / "00000.tar")!r},
                            PilTransform([("resize", [32], None, Image.BICUBIC), ("center_crop", (32, 32))]), 8, 2, 3))
assert [len(c["key"]) for c in chunks] == [2, 1], chunks
assert chunks[0]["pixels"].shape == (2, 32, 32, 3)
print(sorted(m for m in ("torch", "torchvision", "open_clip") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_auto_decode_workers_leave_the_encoder_a_cpu_and_fit_the_object_store(monkeypatch):
    import ray

    from pipeline.embed import decode_worker_count

    shard = 10_000 * 224 * 224 * 3  # a decoded 10k-image shard at 224 px: 1.5 GB
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 15.0, "object_store_memory": shard})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "object_store_memory": 100 * shard})
    assert decode_worker_count("auto", shard) == 15  # CPUs bound it
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "object_store_memory": 10 * shard})
    assert decode_worker_count("auto", shard) == 4  # 5 shards in half the store: 4 workers + 1 being encoded
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "object_store_memory": shard})
    assert decode_worker_count("auto", shard) == 1
    assert decode_worker_count(3, shard) == 3


def test_auto_decode_workers_count_the_local_store_not_what_a_previous_stage_still_holds(monkeypatch):
    """Straight after another stage, Ray has not yet freed its objects and actors (and this stage's first shard
    is already decoding): on the local Ray the pipeline owns, the store's total sizes the workers, not what is
    free this instant (which gave one worker). On a joined cluster (ray.address), what is free now."""
    import ray

    from pipeline.embed import decode_worker_count

    shard = 10_000 * 224 * 224 * 3
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "object_store_memory": 10 * shard})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0, "object_store_memory": 3 * shard})
    assert decode_worker_count("auto", shard) == 4  # 10 shards' store: 5 in half, 4 workers + 1 being encoded
    assert decode_worker_count("auto", shard, shared=True) == 1  # 3 free: 1.5 in half, never fewer than one
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0, "object_store_memory": 8 * shard})
    assert decode_worker_count("auto", shard, shared=True) == 3  # 4 in half: 3 workers + 1; CPUs still the total's


def test_two_encoders_write_the_same_files_as_one(tmp_path, ray_local):
    """embed.encoders=2: chunks are dealt to two CPU encoder actors (in a Ray with 3 CPUs, in a
    subprocess); every embedding and metadata file equals the one-encoder run's, bit for bit."""
    import json
    import subprocess
    import sys

    shards = [samples(s, 12) for s in range(4)]  # 3 chunks of <= 5 each
    for w in ("one", "two"):
        write_fake_download(tmp_path / w, shards)
    one = run_stage("embed", load_config(None, embed_args(tmp_path / "one", "embed.text=true")))
    args = embed_args(tmp_path / "two", "embed.text=true", "ray.num_cpus=3", "embed.encoders=2")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "embed", *[a for s in args for a in ("--set", s)]],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    two = json.loads((tmp_path / "two" / "embed" / "manifest.json").read_text())
    assert one["timing"]["encoders"] == 1 and one["timing"]["chunks_per_encoder"] == [12]
    assert two["timing"]["encoders"] == 2 and sum(two["timing"]["chunks_per_encoder"]) == 12
    assert min(two["timing"]["chunks_per_encoder"]) > 0, two["timing"]  # both encoders did work
    # one node here: every shard's decode task and every chunk's encoder ran on it
    assert list(one["nodes"].values()) == [4 + 12] and list(two["nodes"].values()) == [4 + 12]
    a, b = tmp_path / "one" / "embed", tmp_path / "two" / "embed"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "_run" not in p.parts and p.name != "manifest.json")
    assert len(files) == 12 and files == sorted(p.relative_to(b) for p in b.rglob("*")
                                                  if p.is_file() and "_run" not in p.parts and p.name != "manifest.json")
    for f in files:
        if f.suffix == ".parquet":
            assert pq.read_table(a / f).equals(pq.read_table(b / f)), f
        else:
            assert np.array_equal(np.load(a / f), np.load(b / f)), f


def test_encoders_that_leave_no_cpu_for_decoding_are_refused(tmp_path, ray_local, capsys):
    write_fake_download(tmp_path, [samples(0, 3)])
    assert main(["run", "embed"] + [a for s in embed_args(tmp_path, "embed.encoders=2") for a in ("--set", s)]) == 2
    assert ("embed.encoders=2 takes 2 of Ray's 2 CPUs (one per encoder) and leaves none for decoding: "
            "lower embed.encoders or give Ray more CPUs (ray.num_cpus)") in capsys.readouterr().err


def test_auto_encoders_one_per_gpu_and_one_on_cpu(monkeypatch):
    import ray

    from pipeline.embed_encoder import encoder_count
    from pipeline.runner import UsageError

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0, "GPU": 4.0})
    assert encoder_count("auto", "cuda") == 4 and encoder_count("auto", "cpu") == 1
    assert encoder_count(2, "cuda") == 2 and encoder_count(3, "cpu") == 3
    with pytest.raises(UsageError, match=r"embed\.encoders=5 needs 5 GPUs on cuda \(one per encoder\), but Ray offers 4: "
                                         r"lower embed\.encoders, or set device=cpu"):
        encoder_count(5, "cuda")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0, "GPU": 8.0})
    assert encoder_count("auto", "cuda") == 2  # a CPU is left for decoding
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})  # torch sees a GPU, Ray does not
    with pytest.raises(UsageError, match=r"embed\.encoders=auto needs 1 GPU on cuda \(one per encoder\), but Ray offers 0"):
        encoder_count("auto", "cuda")


def test_config_transform_equals_the_loaded_models(tmp_path):
    """Decoding starts with the transform read from the model's config (meta device, no weights); it must
    be the loaded model's, for a random init, a checkpoint file, and a tag's own mean/std."""
    from open_clip import OPENAI_DATASET_MEAN, get_pretrained_cfg

    from model.clip import clip_preprocess

    torch.manual_seed(0)
    bundle = load_clip(TINY, None)
    ckpt = tmp_path / "tiny.pt"
    torch.save(bundle.model.state_dict(), ckpt)
    for pretrained in (None, str(ckpt)):
        preprocess, dim, name, size = clip_preprocess(TINY, pretrained)
        assert (repr(preprocess), dim, name, size) == (repr(bundle.preprocess), bundle.embed_dim, bundle.name, bundle.image_size)
    siglip = get_pretrained_cfg("ViT-B-16-SigLIP", "webli")  # a tag whose mean differs from the default's
    preprocess = clip_preprocess("ViT-B-16-SigLIP", "webli")[0]
    assert tuple(preprocess.transforms[-1].mean) == tuple(siglip["mean"]) != tuple(OPENAI_DATASET_MEAN)


def test_an_encoder_whose_model_differs_from_the_decoders_transform_refuses_to_encode():
    from pipeline.embed_encoder import ClipEncoder

    enc = ClipEncoder(TINY, None, "cpu", 4, load=False)
    decoders = enc.describe()
    enc.described = decoders | {"pil_transform": "another transform"}
    with pytest.raises(StageError, match=r"differs from the one read from its config 'another transform'.*which the decode workers used"):
        enc.load()
    with pytest.raises(StageError, match=r"the encoder did not load embed\.model=.*differs"):
        enc.encode({"pixels": np.zeros((1, 32, 32, 3), np.uint8), "failed": {}, "key": ["a"]})
    enc = ClipEncoder(TINY, None, "cpu", 4, load=False)
    enc.described = decoders
    assert enc.load() > 0 and enc.encode({"pixels": np.zeros((1, 32, 32, 3), np.uint8), "failed": {}, "key": ["a"],
                                          "node": "n1"})["meta"] == {"key": ["a"]}


def test_loading_an_encoder_in_process_leaves_grad_mode_and_the_rng_alone():
    """An encoder loaded in the test process once switched autograd off for every later test (training
    then failed with "does not require grad") and reseeded torch's global generator."""
    import torch

    from pipeline.embed_encoder import ClipEncoder

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    enc = ClipEncoder(TINY, None, "cpu", 4, load=False)
    enc.described = enc.describe()
    enc.load()
    assert torch.is_grad_enabled()
    assert torch.equal(torch.random.get_rng_state(), before)
