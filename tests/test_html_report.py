"""The HTML report: structure and escaping (always), and a real headless-Chromium render (when installed)."""
from __future__ import annotations

import subprocess
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from conftest import load_tool
from pipeline.html_report import write_report

NASTY_PROMPT = "<b>x & y</b>"
METRIC_NAMES = ["FID", "CLIP score", "precision@5", "recall <&> coverage"]
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_report(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def image(size: int = 32) -> np.ndarray:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    prompts = []
    for i, text in enumerate([NASTY_PROMPT, "red heart", "a rocket over the sea"]):
        prompts.append({
            "prompt": text,
            "samples": [image(), image()],
            "real": image(64),
            "neighbours": [{"image": image(16), "caption": f"caption {i}-{j} <i>", "similarity": 0.9 - j / 7}
                           for j in range(2)],
        })
    steps = np.arange(50) * 20
    loss = 2.0 * np.exp(-steps / 300.0) + 0.05 + rng.uniform(0, 0.05, 50)
    return {
        "title": "Demo <report>",
        "summary": [("checkpoint", "work/train/last.pt"), ("index", "faiss flat (1,234 vectors)"),
                    ("step", "1000"), ("encoder", "demo_clip")],
        "metrics": [
            {"name": METRIC_NAMES[0], "value": 41.2, "low": 38.0, "high": 44.9, "reference": "real vs real: 3.1",
             "note": "n=300"},
            {"name": METRIC_NAMES[1], "value": 0.2712, "low": None, "high": None, "reference": None, "note": None},
            {"name": METRIC_NAMES[2], "value": None, "low": None, "high": None, "reference": None,
             "note": "not computed"},
            {"name": METRIC_NAMES[3], "value": 0.5, "low": 0.4, "high": 0.6, "reference": "chance 0.1",
             "note": "a & b"},
        ],
        "loss": [(int(s), float(v)) for s, v in zip(steps, loss)],
        "prompts": prompts,
        "notes": ["Samples are 32 px; neighbours come from the index <as is>."],
    }


class Collector(HTMLParser):
    """Counts elements by (tag, class) and gathers every src/href value and the text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.counts: Counter = Counter()
        self.links: list[str] = []
        self.text: list[str] = []
        self.loss_paths = 0
        self._in_loss = 0
        self.metric_rows = 0
        self._in_metrics = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for cls in (a.get("class") or "").split():
            self.counts[(tag, cls)] += 1
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "svg" and "loss" in (a.get("class") or "").split():
            self._in_loss += 1
        if tag == "path" and self._in_loss and a.get("d"):
            self.loss_paths += 1
        if tag == "table" and "metrics" in (a.get("class") or "").split():
            self._in_metrics += 1
        if tag == "tr" and self._in_metrics:
            self.metric_rows += 1

    def handle_endtag(self, tag):
        if tag == "svg" and self._in_loss:
            self._in_loss -= 1
        if tag == "table" and self._in_metrics:
            self._in_metrics -= 1

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> Collector:
    c = Collector()
    c.feed(html)
    c.close()
    return c


def test_report_structure_and_escaping(tmp_path):
    out = write_report(tmp_path / "sub" / "report.html", make_report())
    assert out == tmp_path / "sub" / "report.html" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind
    html = out.read_text(encoding="utf-8")
    c = parse(html)

    assert c.counts[("img", "sample")] == 6
    assert c.counts[("img", "real")] == 3
    assert c.counts[("img", "neighbour")] == 6
    assert c.counts[("table", "metrics")] == 1
    assert c.metric_rows == 1 + 4  # header + one per metric
    assert c.counts[("svg", "loss")] == 1 and c.loss_paths >= 1
    assert '<svg class="loss"' in html
    assert "<script" not in html.lower()

    text = "".join(c.text)
    for name in METRIC_NAMES:
        assert name in text
    assert "real held-out" in text
    assert "sim 0.900" in text and "sim 0.757" in text  # similarity with 3 decimals
    assert NASTY_PROMPT in text  # shown as text ...
    assert "<b>x & y</b>" not in html and "&lt;b&gt;x &amp; y&lt;/b&gt;" in html  # ... because escaped
    assert c.counts[("b", "")] == 0 and "<report>" not in html and "<i>" not in html

    assert c.links, "expected inline image sources"
    for link in c.links:
        assert not link.lower().startswith(("http://", "https://", "//")), link
        assert link.startswith("data:image/png;base64,"), link[:40]
    assert "http://" not in html and "https://" not in html


def test_a_paired_baselines_samples_sit_beside_the_prompts_own(tmp_path):
    """An entry's `others` (the same noise under another condition) render as their own labelled group."""
    report = make_report()
    twin = np.zeros((8, 8, 3), np.uint8)
    report["prompts"][0]["others"] = [("text embedding alone, same noise (no_knn/)", [twin, twin + 255])]
    html = write_report(tmp_path / "report.html", report).read_text(encoding="utf-8")
    c = parse(html)
    assert c.counts[("img", "other")] == 2 and c.counts[("img", "sample")] == 6
    assert "text embedding alone, same noise (no_knn/) (2)" in "".join(c.text)


def test_report_without_loss_or_images(tmp_path):
    report = {"title": "empty", "summary": [], "metrics": [], "loss": [],
              "prompts": [{"prompt": "p", "samples": [], "real": None,
                           "neighbours": [{"image": None, "caption": "c", "similarity": 0.5}]}]}
    html = write_report(tmp_path / "r.html", report).read_text(encoding="utf-8")
    c = parse(html)
    assert "no metrics.jsonl" in "".join(c.text)
    assert c.counts[("svg", "loss")] == 0 and c.counts[("img", "real")] == 0
    assert "sim 0.500" in "".join(c.text)


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("old", encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr("pipeline.files.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_report(target, make_report())
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # the temp file was removed
    assert target.read_text(encoding="utf-8") == "old"  # and the old report is untouched


def run_browser(browser: str, profile, *extra: str) -> subprocess.CompletedProcess:
    cmd = [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_report_renders_in_headless_chromium(tmp_path):
    browser = load_tool("chromium").find_chromium()
    if browser is None:
        pytest.skip("no Chromium: install Debian's chromium package (apt-get install -y chromium)")
    page = write_report(tmp_path / "report.html", make_report())
    url = page.resolve().as_uri()

    dom = run_browser(browser, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    c = parse(dom.stdout)
    assert c.counts[("img", "sample")] == 6
    assert c.counts[("img", "real")] == 3
    assert c.counts[("img", "neighbour")] == 6
    assert c.metric_rows == 1 + 4
    assert c.counts[("svg", "loss")] == 1 and c.loss_paths >= 1

    shot = tmp_path / "report.png"
    res = run_browser(browser, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,1600", url)
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 0
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.width >= 600 and rgb.height >= 600
        colours = rgb.getcolors(maxcolors=1 << 24)
    assert colours is not None and len(colours) > 50, "screenshot is (nearly) one flat colour"
