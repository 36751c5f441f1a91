"""What `knnd serve` does, in plain Python: the loaded indexes (and model), the checking of every
request field, search, and sampling jobs turned into JSON. pipeline.serve puts it on the web.

Bad input raises BadInput: an HTTP status and a message that names the field and the fix.
"""
from __future__ import annotations

import base64
import difflib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.files import StageError, UsageError
from pipeline.generation import SampleRequest, Sampler, load_index_clip, resolve_checkpoint
from pipeline.retrieval import Retriever
from pipeline.runner import resolve_device, stage_dir
from pipeline.search import nearest
from pipeline.serve_jobs import Job, JobQueue, QueueFull

MAX_SEARCH_K, MAX_STEPS, MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_PROMPT = 100, 250, 30.0, 8, 2**32 - 1, 1000
THUMBNAIL_SIZE = 64  # decoded size for index folders without thumbnails.npy
THUMBNAIL_CACHE = 20_000  # data URLs kept per index
SEARCH_FIELDS = {"prompt", "index", "k", "where"}
SAMPLE_FIELDS = {"prompt", "index", "k", "guidance", "neighbour_guidance", "steps", "seed", "images", "no_knn",
                 "neighbours_only", "where", "wait"}


class BadInput(Exception):
    """A request the server refuses: HTTP `status`, a message naming the field and the fix."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


@dataclass
class Database:
    """One index folder the server was started with: its retriever, its CLIP, and a sampler when
    there is a model."""
    name: str
    retriever: Retriever
    clip: object
    sampler: Sampler | None = None
    thumbs: dict = field(default_factory=dict)  # row -> PNG data URL, or None (no picture)


def load_databases(index_dirs: list[Path], checkpoint: Path | None, device: str,
                   allow_other_clip: bool = False) -> list[Database]:
    """Each index with its CLIP; with a checkpoint, a Sampler per index (model, index and CLIP checked together)."""
    databases = []
    for index_dir in index_dirs:
        name = str(index_dir)
        if any(db.name == name for db in databases):
            raise UsageError(f"--index {name} is given twice: give each index folder once")
        if checkpoint is not None:
            sampler = Sampler(checkpoint, Path(index_dir), device, allow_other_clip)
            databases.append(Database(name, sampler.retriever, sampler.clip, sampler))
            continue
        retriever = Retriever(index_dir, queries="text")
        clip = load_index_clip(retriever.infos, retriever.dir, device)
        retriever.check_dim(clip.embed_dim, f"the CLIP model {clip.name}")
        databases.append(Database(name, retriever, clip))
    return databases


def index_size(db: Database) -> int:
    return int(db.retriever.infos.get("n") or db.retriever.index.ntotal)


def sample_k_max(db: Database) -> int:
    """The largest k a sampling request may ask of this index: the model's k, at most the index's size."""
    return max(1, min(db.sampler.config.k, index_size(db)))


# --------------------------------------------------------------------------- request fields


def check_fields(values: dict, known: set[str]) -> None:
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise BadInput(name, f"unknown field {name!r}: {hint}the fields are {', '.join(sorted(known))}")


def text_field(values: dict, name: str) -> str:
    raw = values.get(name)
    if not isinstance(raw, str) or not raw.strip():
        raise BadInput(name, f"{name} is empty: type what to search for, e.g. \"red heart\"")
    if len(raw) > MAX_PROMPT:
        raise BadInput(name, f"{name} is {len(raw)} characters long: shorten it to at most {MAX_PROMPT}")
    return raw.strip()


def number_field(values: dict, name: str, default, low, high, kind=int, why: str = ""):
    """An int or float within [low, high] (JSON numbers, or text from a query string)."""
    raw = values.get(name, default)
    what = "an integer" if kind is int else "a number"
    try:
        if isinstance(raw, bool) or raw is None or (kind is int and isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        value = kind(raw)
        if kind is float and not np.isfinite(value):
            raise ValueError
    except (TypeError, ValueError):
        raise BadInput(name, f"{name} must be {what} from {low} to {high}{why}, got {raw!r}") from None
    if not low <= value <= high:
        fix = f"lower {name}" if value > high else f"raise {name}"
        raise BadInput(name, f"{name} must be from {low} to {high}{why}, got {value}: {fix}")
    return value


def where_field(values: dict, db, k: int) -> str | None:
    """The metadata filter (pipeline.filters), checked against the index now: unknown columns, bad
    syntax, or fewer than k images satisfying it are a 400 naming the field."""
    raw = values.get("where")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str) or len(raw) > MAX_PROMPT:
        raise BadInput("where", f"where must be a SQL filter of at most {MAX_PROMPT} characters, "
                                f"e.g. \"colourfulness >= q(0.8)\"")
    try:
        db.retriever.allowed(raw, at_least=k)
    except UsageError as e:
        raise BadInput("where", str(e)) from None
    return raw


def bool_field(values: dict, name: str) -> bool:
    raw = values.get(name, False)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "1", "on", "yes", "false", "0", "off", "no", ""):
        return raw.lower() in ("true", "1", "on", "yes")
    raise BadInput(name, f"{name} must be true or false, got {raw!r}")


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of a uint8 [H, W, 3] image, encoded as `knnd sample` writes its files."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------- the service


class Service:
    """What the API does, in plain Python: the web layer (build_app) only parses and answers."""

    def __init__(self, databases: list[Database], defaults: dict, max_waiting: int = 16):
        self.databases, self.defaults = databases, defaults
        self.sampling = databases[0].sampler is not None
        self.queue = JobQueue(max_waiting)

    def close(self) -> None:
        self.queue.close()

    def info(self) -> dict:
        """{indexes: [{name, position, images, sample_k_max}], model, limits, defaults, queue}."""
        model = None
        if self.sampling:
            sampler = self.databases[0].sampler
            model = {"checkpoint": str(sampler.checkpoint), "k": sampler.config.k, "resolution": sampler.config.resolution}
        indexes = [{"name": db.name, "position": i, "images": index_size(db),
                    "sample_k_max": sample_k_max(db) if self.sampling else None}
                   for i, db in enumerate(self.databases)]
        limits = {"search_k": [1, MAX_SEARCH_K], "steps": [1, MAX_STEPS], "guidance": [0, MAX_GUIDANCE],
                  "neighbour_guidance": [0, MAX_GUIDANCE],
                  "seed": [0, MAX_SEED], "images": [1, MAX_IMAGES]}
        return {"indexes": indexes, "model": model, "limits": limits, "defaults": self.defaults,
                "queue": self.queue.counts()}

    def database(self, values: dict) -> Database:
        raw = values.get("index", 0)
        names = ", ".join(repr(db.name) for db in self.databases)
        for i, db in enumerate(self.databases):
            if raw == db.name or (not isinstance(raw, bool) and str(raw) == str(i)):
                return db
        raise BadInput("index", f"index {raw!r} is not one this server was started with: choose one of {names} "
                                f"(or its position, 0 to {len(self.databases) - 1}), or restart `knnd serve` with "
                                f"--index DIR for another")

    def search(self, values: dict) -> dict:
        """The nearest images of a prompt: {prompt, index, k, neighbours: [{rank, row, key, caption, similarity, thumbnail}]}."""
        check_fields(values, SEARCH_FIELDS)
        prompt, db = text_field(values, "prompt"), self.database(values)
        k = number_field(values, "k", self.defaults["k"], 1, MAX_SEARCH_K)
        where = where_field(values, db, k)
        hits = nearest(db.retriever, db.clip, prompt, k, where)
        thumbs = self.thumbnails(db, [h["row"] for h in hits])
        for hit in hits:
            hit["thumbnail"] = thumbs[hit["row"]]
        return {"prompt": prompt, "index": db.name, "k": k, "neighbours": hits}

    def thumbnails(self, db: Database, rows: list[int]) -> dict[int, str | None]:
        """PNG data URLs of the rows' pictures (the index's thumbnails.npy, else the download shards)."""
        missing = [r for r in rows if r not in db.thumbs]
        if missing:
            try:
                images = db.retriever.thumbnails(missing, THUMBNAIL_SIZE)
            except (StageError, UsageError, KeyError, OSError) as e:  # no pictures behind this index: captions only
                print(f"knnd serve: no thumbnails for {db.name}: {e}", file=sys.stderr)
                images = {}
            if len(db.thumbs) > THUMBNAIL_CACHE:
                db.thumbs.clear()
            db.thumbs.update({r: data_url(png_bytes(images[r])) if r in images else None for r in missing})
        return {r: db.thumbs.get(r) for r in rows}

    def sample_request(self, values: dict) -> tuple[Database, SampleRequest]:
        """The fields of /api/sample checked one by one, then the shared rules (SampleRequest.validate, check_k)."""
        check_fields(values, SAMPLE_FIELDS)
        if not self.sampling:
            raise BadInput(None, "this server has no model, so it can search but not sample: restart `knnd serve` with "
                                 "--checkpoint FILE (or after `knnd run train`)", status=409)
        prompt, db = text_field(values, "prompt"), self.database(values)
        k_max, d = sample_k_max(db), self.defaults
        request = SampleRequest(
            prompts=[prompt],
            k=number_field(values, "k", min(d["k"], k_max), 1, k_max,
                           why=f" (the model was trained with {db.sampler.config.k} neighbours; the index holds "
                               f"{index_size(db)} images)"),
            guidance=number_field(values, "guidance", d["guidance"], 0.0, MAX_GUIDANCE, kind=float),
            steps=number_field(values, "steps", d["steps"], 1, MAX_STEPS),
            seed=number_field(values, "seed", d["seed"], 0, MAX_SEED),
            images_per_prompt=number_field(values, "images", d["images"], 1, MAX_IMAGES),
            no_knn=bool_field(values, "no_knn"), neighbours_only=bool_field(values, "neighbours_only"),
            scheduler=d["scheduler"])
        if values.get("neighbour_guidance", d["neighbour_guidance"]) is not None:  # null: the same as guidance
            request.neighbour_guidance = number_field(values, "neighbour_guidance", d["neighbour_guidance"], 0.0,
                                                      MAX_GUIDANCE, kind=float)
        request.where = where_field(values, db, 0 if request.no_knn else request.k)
        if request.no_knn and request.neighbours_only:
            raise BadInput("neighbours_only", "no_knn and neighbours_only exclude each other (the first drops the "
                                              "neighbours, the second the text): set one of them to false")
        try:
            request.validate()
            db.sampler.check_k(0 if request.no_knn else request.k)
        except UsageError as e:
            raise BadInput(None, str(e)) from None
        return db, request

    def submit(self, values: dict) -> Job:
        """Queue a sampling job (BadInput with 429 when the queue is full)."""
        db, request = self.sample_request(values)
        prompt = request.prompts[0]

        def work(progress) -> dict:
            images, records = db.sampler(prompt, request, progress)
            return {"pngs": [png_bytes(image) for image in images], "records": records}

        describe = {"prompt": prompt, "index": db.name, "k": 0 if request.no_knn else request.k,
                    "guidance": request.guidance, "neighbour_guidance": request.neighbour_guidance,
                    "steps": request.steps, "seed": request.seed,
                    "images": request.images_per_prompt, "no_knn": request.no_knn,
                    "neighbours_only": request.neighbours_only}
        try:
            return self.queue.submit(work, request.steps, describe)
        except QueueFull as e:
            raise BadInput(None, str(e), status=429) from None

    def job(self, job_id: str) -> Job:
        job = self.queue.get(int(job_id)) if str(job_id).isascii() and str(job_id).isdigit() else None
        if job is None:
            raise BadInput("id", f"no job {job_id!r}: jobs are numbered by /api/sample, and only the last "
                                 f"{self.queue.keep} finished ones are kept", status=404)
        return job

    def job_json(self, job: Job) -> dict:
        """{id, status, ahead, step, steps, request, error, and when done: images, seeds, neighbours, seconds}."""
        out = {"id": job.id, "status": job.status, "ahead": self.queue.ahead(job), "step": job.step,
               "steps": job.steps, "request": job.describe, "error": job.error}
        if job.status == "done":
            records = job.result["records"]
            first = records[0] if records else {}
            out |= {"images": [data_url(png) for png in job.result["pngs"]],
                    "image_urls": [f"/api/jobs/{job.id}/{i}.png" for i in range(len(job.result["pngs"]))],
                    "seeds": [r["seed"] for r in records],
                    "neighbours": [{"key": key, "caption": caption, "similarity": sim} for key, caption, sim in
                                   zip(first.get("neighbour_keys", []), first.get("neighbour_captions", []),
                                       first.get("similarities", []))],
                    "seconds": round(job.finished - job.started, 3)}
        return out

    def job_png(self, job_id: str, i: str) -> bytes:
        job = self.job(job_id)
        pngs = job.result["pngs"] if job.status == "done" else []
        if not (str(i).isascii() and str(i).isdigit()) or int(i) >= len(pngs):
            state = f"has {len(pngs)} images (0 to {len(pngs) - 1})" if job.status == "done" else f"is {job.status}"
            raise BadInput("image", f"job {job.id} {state}: ask for one of its images once it is done", status=404)
        return pngs[int(i)]


def make_service(cfg, index_dirs: list[str] | None = None, checkpoint: str | None = None,
                 allow_other_clip: bool = False) -> Service:
    """The service for a config: the given indexes (default: sample.index, else the workdir's) and the
    given or latest checkpoint (none found: search only, said on stderr)."""
    dirs = [Path(d) for d in index_dirs] if index_dirs else [Path(cfg.sample.index or stage_dir(cfg, "index"))]
    try:
        found = resolve_checkpoint(cfg, checkpoint)
    except UsageError as e:
        if checkpoint is not None:
            raise
        print(f"knnd serve: {e}; serving search only", file=sys.stderr)
        found = None
    databases = load_databases(dirs, found, resolve_device(cfg), allow_other_clip)
    conf = cfg.sample
    defaults = {"k": max(1, conf.k), "guidance": min(conf.guidance, MAX_GUIDANCE), "steps": min(conf.steps, MAX_STEPS),
                "seed": conf.seed, "images": min(conf.images_per_prompt, MAX_IMAGES), "scheduler": conf.scheduler,
                "neighbour_guidance": None if conf.neighbour_guidance is None else min(conf.neighbour_guidance, MAX_GUIDANCE)}
    if found is not None:
        defaults["k"] = min(defaults["k"], sample_k_max(databases[0]))
    return Service(databases, defaults)
