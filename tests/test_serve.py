"""pipeline/serve.py: `knnd serve` on two tiny indexes and a tiny trained model. The API against the
library (search == Retriever.search, sample == the PNG bytes `knnd sample` writes), bad input (4xx
naming the field, no stack trace), the queue (one job at a time, in order, bounded), loopback
binding, and one real headless Chromium that types a prompt and waits for thumbnails and samples."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.request

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import load_tool
from model.clip import encode_texts
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.generation import Sampler, load_index_clip
from pipeline.retrieval import Retriever
from pipeline.runner import run_stage
from pipeline.serve import build_app, make_server
from pipeline.serve_service import Service, make_service
from serve_data import build_database
from test_train_stage import write_pack


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared cores


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Workdir a: a self-contained index + a tiny model (k = 3) trained 2 steps; b: an index of
    other pictures without thumbnails.npy. One service over both, with a test client."""
    root = tmp_path_factory.mktemp("serve")
    config = build_database(root / "a", "a", 24, seed=0, self_contained=True)
    write_pack(root / "a")
    run_stage("train", load_config(config))
    build_database(root / "b", "b", 20, seed=1, self_contained=False)
    indexes = [str(root / "a" / "index"), str(root / "b" / "index")]
    service = make_service(load_config(config), indexes)
    with TestClient(build_app(service), base_url="http://127.0.0.1") as client:
        yield {"root": root, "config": str(config), "indexes": indexes, "service": service, "client": client}


def decode(url: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    return base64.b64decode(url[len(prefix):])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# --------------------------------------------------------------------------- API against the library


@pytest.mark.parametrize("which", [0, 1])
def test_search_matches_the_retriever_and_shows_the_index_pictures(work, which):
    retriever = Retriever(work["indexes"][which], queries="text")  # loaded afresh: the library's own answer
    clip = load_index_clip(retriever.infos, retriever.dir, "cpu")
    got = work["client"].get("/api/search", params={"prompt": "red heart", "index": which, "k": 5})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["index"] == work["indexes"][which] and body["k"] == 5 and len(body["neighbours"]) == 5
    sims, rows = retriever.search(encode_texts(clip, ["red heart"]), 5)
    assert [h["row"] for h in body["neighbours"]] == rows[0].tolist()
    np.testing.assert_allclose([h["similarity"] for h in body["neighbours"]], sims[0], rtol=0, atol=1e-6)
    assert [(h["key"], h["caption"]) for h in body["neighbours"]] == retriever.describe(rows[0])
    assert [h["rank"] for h in body["neighbours"]] == [1, 2, 3, 4, 5]
    assert (retriever.dir / "thumbnails.npy").exists() == (which == 0)
    pictures = retriever.thumbnails(rows[0], 64)  # a: thumbnails.npy; b: decoded from the download
    for hit in body["neighbours"]:
        assert np.array_equal(pixels(decode(hit["thumbnail"])), pictures[hit["row"]])
    by_name = work["client"].get("/api/search", params={"prompt": "red heart", "index": work["indexes"][which], "k": 5})
    assert by_name.json() == body


def test_sample_gives_the_png_bytes_knnd_sample_writes(work, tmp_path):
    out = tmp_path / "cli"
    assert main(["sample", "red heart", "-k", "3", "--steps", "2", "--seed", "3", "--guidance", "3",
                 "--out", str(out), "-c", work["config"], "--index", work["indexes"][0]]) == 0
    got = work["client"].post("/api/sample", json={"prompt": "red heart", "index": 0, "k": 3, "steps": 2, "seed": 3,
                                                   "guidance": 3, "images": 2, "wait": True})
    assert got.status_code == 200, got.text
    job = got.json()
    assert job["status"] == "done" and job["error"] is None and job["ahead"] == 0
    assert job["step"] == job["steps"] == 2  # progress reached the last denoising step
    assert job["seeds"] == [3, 4]
    for i in range(2):
        expected = (out / f"red-heart_{i}.png").read_bytes()
        assert decode(job["images"][i]) == expected
        png = work["client"].get(job["image_urls"][i])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content == expected
    record = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert [n["key"] for n in job["neighbours"]] == record["neighbour_keys"]
    assert job["request"] == {"prompt": "red heart", "index": work["indexes"][0], "k": 3, "guidance": 3.0,
                              "neighbour_guidance": None, "steps": 2, "seed": 3, "images": 2, "no_knn": False,
                              "neighbours_only": False}


def test_neighbour_guidance_gives_the_pngs_knnd_sample_writes_with_it(work, tmp_path):
    """The API's neighbour_guidance is `knnd sample --neighbour-guidance`: the same PNG bytes, and it
    changes them (a model given neighbours draws differently when what they add is scaled)."""
    out = tmp_path / "cli"
    assert main(["sample", "red heart", "-k", "3", "--steps", "2", "--seed", "3", "--guidance", "3",
                 "--neighbour-guidance", "8", "--out", str(out), "-c", work["config"], "--index", work["indexes"][0]]) == 0
    body = {"prompt": "red heart", "index": 0, "k": 3, "steps": 2, "seed": 3, "guidance": 3, "images": 1, "wait": True}
    job = work["client"].post("/api/sample", json=body | {"neighbour_guidance": 8}).json()
    assert job["status"] == "done" and job["request"]["neighbour_guidance"] == 8.0
    assert decode(job["images"][0]) == (out / "red-heart_0.png").read_bytes()
    plain = work["client"].post("/api/sample", json=body).json()
    assert decode(plain["images"][0]) != decode(job["images"][0])


def test_progress_is_reported_per_denoising_step_without_changing_the_images(work):
    from pipeline.generation import SampleRequest

    sampler = work["service"].databases[0].sampler
    request = SampleRequest(prompts=["red heart"], k=3, guidance=3.0, steps=3, seed=5, images_per_prompt=1)
    calls = []
    with_progress, _ = sampler("red heart", request, lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert np.array_equal(with_progress, sampler("red heart", request)[0])


def test_sample_polls_from_queued_to_done_with_defaults_and_no_knn(work):
    got = work["client"].post("/api/sample", json={"prompt": "rocket", "index": 1, "no_knn": True})
    assert got.status_code == 202, got.text
    job = got.json()
    assert job["status"] in ("queued", "running") and job["request"]["k"] == 0 and job["request"]["steps"] == 2
    deadline = time.time() + 120
    while job["status"] not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.05)
        job = work["client"].get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "done", job
    assert len(job["images"]) == 2 and job["neighbours"] == []  # the config's images_per_prompt; no kNN


def test_info_lists_indexes_limits_and_defaults(work):
    info = work["client"].get("/api/info").json()
    assert [ix["name"] for ix in info["indexes"]] == work["indexes"]
    assert [ix["sample_k_max"] for ix in info["indexes"]] == [3, 3]
    assert info["model"]["k"] == 3 and info["model"]["resolution"] == 16
    assert info["defaults"] == {"k": 3, "guidance": 3.0, "steps": 2, "seed": 3, "images": 2, "scheduler": "sde-dpmsolver++",
                                "neighbour_guidance": None}
    assert info["limits"]["neighbour_guidance"] == [0, 30.0]
    assert info["queue"]["max_waiting"] == 16


def test_the_page_is_served_with_nothing_from_the_network(work):
    page = work["client"].get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for needle in ('id="prompt"', 'id="index"', 'id="index2"', 'id="side"', 'id="k"', 'id="guidance"', 'id="neighbour_guidance"',
                   'id="steps"', 'id="seed"', 'id="no_knn"', "/api/search", "/api/sample", "/api/jobs/"):
        assert needle in page.text, needle
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    assert work["client"].get("/docs").status_code == 404  # FastAPI's docs pages load assets from a CDN: off


# --------------------------------------------------------------------------- bad input


SEARCH_ERRORS = [
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": "   "}, "prompt", "prompt is empty"),
    ({}, "prompt", "prompt is empty"),
    ({"prompt": "x", "k": 0}, "k", "k must be from 1 to 100"),
    ({"prompt": "x", "k": 101}, "k", "lower k"),
    ({"prompt": "x", "k": "ten"}, "k", "k must be an integer"),
    ({"prompt": "x", "index": "nope"}, "index", "--index DIR"),
    ({"prompt": "x", "index": 2}, "index", "0 to 1"),
    ({"prompt": "x", "top": 3}, "top", "unknown field"),
]

SAMPLE_ERRORS = [
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": "x", "k": 4}, "k", "trained with 3 neighbours"),
    ({"prompt": "x", "k": 0}, "k", "raise k"),
    ({"prompt": "x", "steps": 0}, "steps", "steps must be from 1 to 250"),
    ({"prompt": "x", "steps": 251}, "steps", "lower steps"),
    ({"prompt": "x", "steps": 2.5}, "steps", "must be an integer"),
    ({"prompt": "x", "guidance": -1}, "guidance", "guidance must be from 0.0 to 30.0"),
    ({"prompt": "x", "guidance": "lots"}, "guidance", "must be a number"),
    ({"prompt": "x", "neighbour_guidance": -1}, "neighbour_guidance", "neighbour_guidance must be from 0.0 to 30.0"),
    ({"prompt": "x", "neighbour_guidance": "lots"}, "neighbour_guidance", "must be a number"),
    ({"prompt": "x", "neighbour_guidance": 6, "no_knn": True}, None, "--neighbour-guidance (sample.neighbour_guidance) scales what the neighbours add"),
    ({"prompt": "x", "seed": -1}, "seed", "raise seed"),
    ({"prompt": "x", "images": 9}, "images", "lower images"),
    ({"prompt": "x", "index": "elsewhere"}, "index", "is not one this server was started with"),
    ({"prompt": "x", "no_knn": "maybe"}, "no_knn", "true or false"),
    ({"prompt": "x", "no_knn": True, "neighbours_only": True}, "neighbours_only", "exclude each other"),
    ({"prompt": "x", "step": 3}, "step", "did you mean 'steps'"),
]


def assert_clear_error(response, status: int, field: str | None, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "field"} and body["field"] == field and fragment in body["error"], body
    assert "Traceback" not in response.text and 'File "' not in response.text


@pytest.mark.parametrize("params,field,fragment", SEARCH_ERRORS)
def test_bad_search_is_a_400_naming_the_field(work, params, field, fragment):
    assert_clear_error(work["client"].get("/api/search", params=params), 400, field, fragment)


@pytest.mark.parametrize("body,field,fragment", SAMPLE_ERRORS)
def test_bad_sample_is_a_400_naming_the_field(work, body, field, fragment):
    assert_clear_error(work["client"].post("/api/sample", json=body), 400, field, fragment)


def test_other_bad_requests_are_clear_json(work):
    client = work["client"]
    assert_clear_error(client.post("/api/sample", data={"prompt": "x"}), 415, None, "Content-Type: application/json")
    assert_clear_error(client.post("/api/sample", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}),
                       415, None, "Content-Type: application/json")
    assert_clear_error(client.post("/api/sample", content=b"{not json", headers={"Content-Type": "application/json"}),
                       400, None, "JSON object")
    assert_clear_error(client.post("/api/sample", json=["red heart"]), 400, None, "JSON object")
    assert_clear_error(client.get("/api/jobs/999999"), 404, "id", "no job")
    assert_clear_error(client.get("/api/jobs/abc"), 404, "id", "no job")
    done = client.post("/api/sample", json={"prompt": "red heart", "steps": 1, "images": 1, "wait": True}).json()
    assert_clear_error(client.get(f"/api/jobs/{done['id']}/7.png"), 404, "image", "ask for one of its images")
    assert_clear_error(client.get("/api/jobs/\u00b2"), 404, "id", "no job")  # a digit to isdigit(), not to int()
    assert_clear_error(client.get("/nowhere"), 404, None, "/api/search")
    other_host = TestClient(client.app, base_url="http://attacker.example")  # DNS rebinding: refused
    assert other_host.get("/api/info").status_code == 400


def test_a_job_that_fails_says_why_without_a_trace(work, monkeypatch):
    def broken(self, prompt, request, progress=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Sampler, "__call__", broken)
    job = work["client"].post("/api/sample", json={"prompt": "x", "wait": True}).json()
    assert job["status"] == "failed" and "RuntimeError: out of memory" in job["error"] and "Traceback" not in job["error"]


def test_search_only_without_a_model(work, tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", "device=cpu"])  # no checkpoint in this workdir
    service = make_service(cfg, [work["indexes"][1]])
    with TestClient(build_app(service), base_url="http://127.0.0.1") as client:
        assert client.get("/api/info").json()["model"] is None
        assert client.get("/api/search", params={"prompt": "x", "k": 2}).status_code == 200
        assert_clear_error(client.post("/api/sample", json={"prompt": "x"}), 409, None, "--checkpoint")


# --------------------------------------------------------------------------- the queue


@pytest.fixture
def gated_sampler(monkeypatch):
    """Sampler.__call__ waits for a gate per call and records how many calls overlap."""
    state = {"running": 0, "most": 0, "order": [], "gate": threading.Semaphore(0), "lock": threading.Lock()}

    def fake(self, prompt, request, progress=None):
        with state["lock"]:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        state["gate"].acquire(timeout=30)
        if progress:
            progress(request.steps, request.steps)
        with state["lock"]:
            state["running"] -= 1
            state["order"].append(prompt)
        return np.zeros((1, 16, 16, 3), np.uint8), [{"seed": request.seed}]

    monkeypatch.setattr(Sampler, "__call__", fake)
    return state


def test_jobs_queue_one_at_a_time_in_order_and_say_where_they_stand(work, gated_sampler):
    service = Service(work["service"].databases, work["service"].defaults, max_waiting=2)
    with TestClient(build_app(service), base_url="http://127.0.0.1") as client:
        first = client.post("/api/sample", json={"prompt": "p0"}).json()
        deadline = time.time() + 30
        while client.get(f"/api/jobs/{first['id']}").json()["status"] != "running" and time.time() < deadline:
            time.sleep(0.01)
        jobs = [client.post("/api/sample", json={"prompt": f"p{i}"}) for i in (1, 2)]
        assert [j.status_code for j in jobs] == [202, 202]
        assert [(j.json()["status"], j.json()["ahead"]) for j in jobs] == [("queued", 1), ("queued", 2)]
        assert_clear_error(client.post("/api/sample", json={"prompt": "p3"}), 429, None, "at most 2")
        assert client.get("/api/info").json()["queue"] == {"running": 1, "waiting": 2, "max_waiting": 2}
        for _ in range(3):
            gated_sampler["gate"].release()
        ids = [first["id"]] + [j.json()["id"] for j in jobs]
        while any(client.get(f"/api/jobs/{i}").json()["status"] != "done" for i in ids) and time.time() < deadline:
            time.sleep(0.01)
        assert [client.get(f"/api/jobs/{i}").json()["status"] for i in ids] == ["done"] * 3
    assert gated_sampler["most"] == 1 and gated_sampler["order"] == ["p0", "p1", "p2"]


# --------------------------------------------------------------------------- the command and the socket


def test_knnd_serve_binds_loopback_by_default_and_warns_otherwise(work, monkeypatch, capsys):
    import uvicorn

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.append((self.config.host, self.config.port)))
    assert main(["serve", "-c", work["config"], "--index", work["indexes"][0], "--index", work["indexes"][1]]) == 0
    assert seen == [("127.0.0.1", 8000)] and "warning" not in capsys.readouterr().err
    assert main(["serve", "-c", work["config"], "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert seen[-1] == ("0.0.0.0", 8123) and "warning: --host 0.0.0.0" in capsys.readouterr().err
    assert main(["serve", "-c", work["config"], "--index", str(work["root"] / "nowhere")]) == 2
    assert "not an index directory" in capsys.readouterr().err
    assert main(["serve", "-c", work["config"], "--checkpoint", str(work["root"] / "none.pt")]) == 2


@pytest.fixture
def live_server(work):
    """The real uvicorn server on 127.0.0.1, an OS-chosen port, in a thread; stopped afterwards."""
    service = Service(work["service"].databases, work["service"].defaults)
    server = make_server(build_app(service), port=0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield server
    server.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


def test_the_server_listens_on_127_0_0_1_only(live_server):
    host, port = live_server.servers[0].sockets[0].getsockname()[:2]
    assert host == "127.0.0.1" and port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=10) as answer:
        assert answer.status == 200 and json.load(answer)["indexes"]


# --------------------------------------------------------------------------- a real browser


def test_the_page_in_headless_chromium_types_a_prompt_and_shows_neighbours_and_samples(live_server, work, tmp_path):
    chromium = load_tool("chromium")
    browser = chromium.find_chromium()
    if browser is None:
        pytest.skip("no Chromium: install Debian's chromium package (apt-get install -y chromium)")
    port = live_server.servers[0].sockets[0].getsockname()[1]
    shot = tmp_path / "serve.png"
    with chromium.Chromium(browser, tmp_path / "profile", timeout=120) as page:  # generous: the cores are shared
        try:
            page.open(f"http://127.0.0.1:{port}/")
            page.wait_for("document.body.dataset.state === 'idle'")
            page.click("#prompt")  # autofocus is not to be relied on in a headless window
            page.press_enter()  # an empty prompt: the server's message on the page, the field marked
            page.wait_for(chromium.PAGE_SETTLED)
            assert "prompt is empty" in page.evaluate("document.querySelector('#error').textContent")
            assert page.evaluate("!document.querySelector('#error').hidden && "
                                 "document.querySelector('#prompt').classList.contains('invalid')")

            page.type("#prompt", "red heart")
            page.evaluate("document.querySelector('#side').click()")  # side by side: both indexes
            page.click("#go")
            page.wait_for("document.body.dataset.state !== 'error'")  # the click has started a new run
            page.wait_for(chromium.PAGE_SETTLED)
            assert page.evaluate("document.body.dataset.state") == "done", page.evaluate("document.body.innerText")
            counts = page.evaluate("""(() => {
                const shown = selector => [...document.querySelectorAll(selector)]
                    .filter(img => img.complete && img.naturalWidth > 0).length;
                return {neighbours: shown('img.neighbour'), samples: shown('img.sample'),
                        columns: document.querySelectorAll('.column').length,
                        error: document.querySelector('#error').hidden,
                        sims: [...document.querySelectorAll('.sim')].map(s => s.textContent)};
            })()""")
        finally:
            page.screenshot(shot)  # also when a wait failed: what the page showed then
    assert counts["columns"] == 2 and counts["error"] is True
    assert counts["neighbours"] == 2 * 3 and counts["samples"] == 2 * 2, counts  # k = 3, images = 2, per index
    assert all(s.startswith("sim ") for s in counts["sims"]) and len(counts["sims"]) == 6
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.width >= 600 and rgb.height >= 400
        assert len(rgb.getcolors(maxcolors=1 << 24)) > 50, "screenshot is (nearly) one flat colour"


@pytest.mark.parametrize("which", [0, 1], ids=["self-contained", "embed-backed"])
def test_where_filters_search_and_sampling_and_names_bad_filters(work, which):
    """The metadata filter of `knnd search/sample --where` through the API: every neighbour satisfies it,
    on both kinds of index; a bad column, too strict a filter or a second statement is a 400 on `where`."""
    client, index = work["client"], work["indexes"][which]
    where = "caption like '%1%'"
    body = client.get("/api/search", params={"prompt": "red heart", "index": index, "k": 3, "where": where}).json()
    assert len(body["neighbours"]) == 3 and all("1" in h["caption"] for h in body["neighbours"])
    unfiltered = client.get("/api/search", params={"prompt": "red heart", "index": index, "k": 3}).json()
    assert [h["row"] for h in body["neighbours"]] != [h["row"] for h in unfiltered["neighbours"]] or \
        all("1" in h["caption"] for h in unfiltered["neighbours"])
    if which == 0:
        job = client.post("/api/sample", json={"prompt": "red heart", "index": index, "k": 3, "steps": 1,
                                               "images": 1, "where": where, "wait": True}).json()
        assert job["status"] == "done" and len(job["neighbours"]) == 3
        assert all("1" in n["caption"] for n in job["neighbours"])
    for bad, words in [("captoin like '%1%'", "Known columns"), ("caption = 'a item 1'", "fewer than k=3"),
                       ("true); SELECT 1 WHERE (true", "not one boolean expression")]:
        assert_clear_error(client.get("/api/search", params={"prompt": "x", "index": index, "k": 3, "where": bad}),
                           400, "where", words)
