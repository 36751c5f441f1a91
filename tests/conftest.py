"""Shared fixtures: a loopback image server with every kind of bad URL, and small configs."""
from __future__ import annotations

import functools
import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.files import atomic_path
from pipeline.loopback import LoopbackServer
from pipeline.stages import TABLE, Stage

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

STALL_SECONDS = 4.0  # longer than the download timeout the tests use (1 s)


def png_bytes(seed: int, size: int = 48) -> bytes:
    """A distinct small image: a coloured square on a coloured background."""
    rng = np.random.default_rng(seed)
    arr = np.empty((size, size, 3), np.uint8)
    arr[:] = rng.integers(0, 256, 3)
    a, b = sorted(rng.integers(0, size, 2))
    arr[a:b + 4, a:b + 4] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def decompression_bomb(side: int = 40000) -> bytes:
    """A tiny PNG declaring side x side pixels (past OpenCV's 2^30-pixel guard) of zeros."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * (side // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# path -> (status, content type, body, delay seconds); filled per server
BAD_KINDS = {
    "/missing.png": "http_404",
    "/error.png": "http_500",
    "/stall.png": "timeout",
    "/page.png": "not_an_image",      # HTML served as image/png
    "/truncated.png": "not_an_image",
    "/empty.png": "not_an_image",     # zero bytes
    "/bomb.png": "too_large",
}


class ImageServer:
    """Serves /good/<i>.png and the bad kinds above on 127.0.0.1; counts requests."""

    def __init__(self, n_good: int, delay: float = 0.0):
        self.good = {f"/good/{i}.png": png_bytes(i) for i in range(n_good)}
        self.delay = delay
        self.routes = {
            "/missing.png": (404, "text/plain", b"not found", 0),
            "/error.png": (500, "text/plain", b"boom", 0),
            "/stall.png": (200, "image/png", png_bytes(999), STALL_SECONDS),
            "/page.png": (200, "image/png", b"<html><body>not an image</body></html>", 0),
            "/truncated.png": (200, "image/png", png_bytes(998)[:60], 0),
            "/empty.png": (200, "image/png", b"", 0),
            "/bomb.png": (200, "image/png", decompression_bomb(), 0),
        }
        self.server = LoopbackServer(self.route)
        self.base = self.server.base

    def route(self, path: str):
        if path in self.good:
            return 200, "image/png", self.good[path], self.delay
        return self.routes.get(path, (404, "text/plain", b"", 0))

    @property
    def requests(self) -> int:
        return self.server.requests

    def close(self):
        self.server.close()


@pytest.fixture
def image_server():
    servers = []

    def make(n_good: int = 20, delay: float = 0.0) -> ImageServer:
        s = ImageServer(n_good, delay)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests (stages call ensure_ray, which reuses it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield


def jpg_bytes(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed, size))).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_fake_download(workdir, shards: list[list[tuple[str, bytes | None, str]]]):
    """A download stage output as img2dataset writes it: tars of (key, image bytes or None, caption).

    An image of None writes a sample whose image bytes are garbage (undecodable)."""
    import json
    import tarfile

    out = workdir / "download"
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard, samples in enumerate(shards):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for key, data, caption in samples:
                for ext, payload in (("jpg", data if data is not None else b"\xff\xd8garbage"),
                                     ("txt", caption.encode()),
                                     ("json", json.dumps({"key": key, "url": f"http://x/{key}.jpg", "caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        entries.append({"shard": shard, "tar": f"{shard:05d}.tar", "parquet": f"{shard:05d}.parquet",
                        "count": len(samples), "successes": len(samples)})
    manifest = {"stage": "download", "config_hash": "test", "input_hash": "test", "shards": entries,
                "counts": {"images": sum(len(s) for s in shards)}, "items": sum(len(s) for s in shards)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


TINY_CLIP = os.path.join(os.path.dirname(__file__), "..", "model", "configs", "tiny_clip.json")


def run_and_kill(stage: str, sets: list[str], marker_glob, at_least: int, timeout: float = 180) -> int:
    """Run `knnd run STAGE` in a subprocess, SIGKILL its whole process group once `at_least`
    files match `marker_glob` (a Path's glob, e.g. folder.glob('*.json') as a callable), and
    return how many matched at the kill: a real kill, not a mock."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipeline.cli", "run", stage] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while len(marker_glob()) < at_least and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(marker_glob())


def markers(folder):
    """A callable listing a stage's completion markers (for run_and_kill)."""
    return lambda: list(folder.glob("*.json")) if folder.exists() else []


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: they gain nothing from threads, and on a shared 2-core machine
    OpenMP spin-waiting made each forward ~100x slower. Restores the setting for other modules."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- planted faiss data
# (tests/faiss_data.py: vectors with cluster structure, their exact answers, and indexes over them;
# built once per test module that asks)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from faiss_data import planted_data

    return planted_data(tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def ivf_flat(data):
    from faiss_data import ivf_flat_index

    return ivf_flat_index(data)


@pytest.fixture(scope="module")
def ivf_pq(data):
    from faiss_data import ivf_pq_index

    return ivf_pq_index(data)


def load_tool(name: str):
    """A module of tools/ (not an installed package), e.g. load_tool("chromium")."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def spy(monkeypatch):
    """Records what model.diffusion.sample is called with, and calls it (test_sample, test_edit)."""
    import model.diffusion

    calls, real = [], model.diffusion.sample

    def wrapper(denoiser, emb, **kwargs):
        calls.append({"emb": emb.clone(), **kwargs})
        return real(denoiser, emb, **kwargs)

    monkeypatch.setattr(model.diffusion, "sample", wrapper)
    return calls


@pytest.fixture
def fake_stages(monkeypatch):
    """Two trivial stages standing in for download and embed, counting their runs (test_runner, test_rebuild)."""
    calls = {"download": 0, "embed": 0}

    def make(name, upstream):
        def run(stage):
            calls[name] += 1
            stage.plan(2)
            for shard in range(2):
                if not stage.shard_done(shard):
                    with atomic_path(stage.dir / f"{shard}.txt") as tmp:
                        tmp.write_text(f"{name} {shard} {stage.conf.image_size if name == 'download' else 0}")
                    stage.mark_done(shard, {"items": 1})
            return {"items": 2, "counts": {"items": 2}}

        monkeypatch.setitem(TABLE, name, Stage(run, upstream, "items"))

    make("download", ())
    make("embed", ("download",))
    return calls
