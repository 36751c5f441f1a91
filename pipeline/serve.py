"""`knnd serve`: a local web page and JSON API to search index folders and sample from them.

    GET  /                  the page (pipeline/serve_page.html: plain HTML/JS, nothing from the network)
    GET  /api/info          the indexes, the model, the limits and defaults of every field
    GET  /api/search?prompt=...&index=...&k=...  the k nearest images, with thumbnails (PNG data URLs)
    POST /api/sample {"prompt": ..., "index", "k", "guidance", "neighbour_guidance", "steps", "seed", "images",
                      "no_knn", "neighbours_only", "where", "wait"}  queue a sampling job: 202 and where it stands in the queue
                                                  ("wait": true answers 200 once it is done)
    GET  /api/jobs/{id}     its state, denoising progress, and once done its images (PNG data URLs)
    GET  /api/jobs/{id}/{i}.png  image i of a finished job

The web layer only parses and answers; pipeline.serve_service does the work, and sampling runs in
one worker thread, one job at a time (pipeline.serve_jobs). Errors are JSON {"error", "field"}
with a 4xx status, never a stack trace. The server binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import ipaddress
import sys
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pipeline.serve_service import BadInput, Service, bool_field, make_service

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
PAGE = Path(__file__).with_name("serve_page.html")
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'")  # the page may load nothing from the network
LOOPBACK_NAMES = ["127.0.0.1", "localhost"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(service: Service, allowed_hosts: list[str] | None = None):
    """The FastAPI app over a service. `allowed_hosts`: Host headers answered (default: 127.0.0.1 and
    localhost, so that a web page elsewhere cannot reach the API through DNS rebinding)."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="knnd serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_NAMES)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, e: BadInput):
        return JSONResponse({"error": e.message, "field": e.field}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"no such page {request.url.path}: the API is /api/info, /api/search, /api/sample, /api/jobs/ID" \
            if e.status_code == 404 else str(e.detail)
        return JSONResponse({"error": message, "field": None}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # the trace goes to the log, not to the user
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse({"error": f"internal error ({type(e).__name__}): the server log has the details",
                             "field": None}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": CSP})

    @app.get("/api/info")
    def info():
        return service.info()

    @app.get("/api/search")
    def search(request: Request):
        return service.search(dict(request.query_params))

    @app.post("/api/sample")
    async def sample(request: Request):
        values = await json_body(request)
        wait = bool_field(values, "wait")
        job = await run_in_threadpool(service.submit, values)
        if wait:
            await run_in_threadpool(job.done.wait)
        return JSONResponse(service.job_json(job), status_code=200 if job.done.is_set() else 202)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        return service.job_json(service.job(job_id))

    @app.get("/api/jobs/{job_id}/{i}.png")
    def job_png(job_id: str, i: str):
        return Response(service.job_png(job_id, i), media_type="image/png")

    return app


async def json_body(request) -> dict:
    """The request's JSON object. Only Content-Type application/json is read: a page elsewhere can send
    a form or text/plain to 127.0.0.1 without asking, but not JSON."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise BadInput(None, "send the body as JSON with Content-Type: application/json, e.g. curl -H "
                             "'Content-Type: application/json' -d '{\"prompt\": \"red heart\"}'", status=415)
    try:
        values = await request.json()
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise BadInput(None, 'the body must be a JSON object, e.g. {"prompt": "red heart", "steps": 20}, '
                             "sent with Content-Type: application/json")
    return values


def make_server(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info"):
    """A uvicorn server for the app (not started: `.run()` blocks; tests run it in a thread)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))


def serve_command(cfg, index_dirs: list[str] | None, checkpoint: str | None, host: str = DEFAULT_HOST,
                  port: int = DEFAULT_PORT, allow_other_clip: bool = False) -> int:
    """`knnd serve`: load the indexes (and model), then serve until Ctrl-C."""
    if not is_loopback(host):
        print(f"knnd serve: warning: --host {host} lets other machines reach this page and its API, which has no "
              f"authentication; the default, 127.0.0.1, keeps it on this machine", file=sys.stderr)
    service = make_service(cfg, index_dirs, checkpoint, allow_other_clip)
    model = f"sampling with {service.databases[0].sampler.checkpoint}" if service.sampling else "search only"
    url_host = f"[{host}]" if ":" in host else host
    print(f"knnd serve: {', '.join(db.name for db in service.databases)}; {model}; "
          f"open http://{url_host}:{port}/ (Ctrl-C to stop)", file=sys.stderr)
    # Host headers answered: the loopback names and the bound address; any name only on a wildcard bind
    allowed = ["*"] if host in ("0.0.0.0", "::", "") else LOOPBACK_NAMES + [host, f"[{host}]"]
    server = make_server(build_app(service, allowed), host, port)
    try:
        server.run()
    finally:
        service.close()
    return 0
