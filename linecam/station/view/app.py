"""``linecam view``: the live page of the line, served by its own process (Starlette + uvicorn).

Routes (all read-only but the question box, which asks the VLM and changes nothing):

- ``/``: the page (``page.html``: plain HTML + JS, no build step);
- ``/events``: server-sent events: a ``state`` item first, then counts, NG cards, status;
- ``/snapshot/{defect_event_id}``: the annotated JPEG, from the ``…/snapshot`` topic, the
  record database, or the file a defect message named (only such files are served);
- ``/api/history``: events and the NG rate per hour from the record database (``--db``);
- ``/api/ask``: POST ``{defect_event_id, question, conversation_id?}`` -> the VLM's answer.

Optional HTTP basic auth (``--user`` + ``--password-file``) covers every route.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from linecam.errors import LinecamError
from linecam.station.view.live import LiveState

logger = logging.getLogger(__name__)


class BasicAuth:
    """HTTP basic auth on every request (pure ASGI: server-sent events stream through)."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app, self.user, self.password = app, user, password

    def _ok(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        # bytes: compare_digest refuses non-ASCII str
        return secrets.compare_digest(user.encode(), self.user.encode()) & \
            secrets.compare_digest(pw.encode(), self.password.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            if not self._ok(headers.get("authorization")):
                await Response("authentication required", 401,
                               {"WWW-Authenticate": 'Basic realm="linecam"'})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ViewApp:
    """The routes around one :class:`LiveState`, an optional record store and an optional asker."""

    def __init__(self, state: LiveState, store: Any | None = None, asker: Any | None = None,
                 title: str = "linecam") -> None:
        self.state, self.store, self.asker, self.title = state, store, asker, title

    # -- data ------------------------------------------------------------------------------
    def defect(self, defect_event_id: str) -> dict[str, Any] | None:
        d = self.state.live_defect(defect_event_id)
        if d is not None:
            return d
        if self.store is not None:
            ev = self.store.get(defect_event_id)
            if ev is not None and ev.type == "defect":
                return ev.payload
        return None

    def snapshot_bytes(self, defect_event_id: str) -> bytes | None:
        jpeg = self.state.snapshots.get(defect_event_id)
        if jpeg is None and self.store is not None:
            jpeg = self.store.snapshot(defect_event_id)
        if jpeg is None:
            path = self.state.snapshot_paths.get(defect_event_id)
            if path is None:
                d = self.defect(defect_event_id)
                path = d.get("snapshot") if d else None
            if path:
                try:
                    jpeg = Path(path).read_bytes()
                except OSError:
                    jpeg = None
        return jpeg

    # -- routes ----------------------------------------------------------------------------
    async def page(self, request: Request) -> HTMLResponse:
        html = resources.files("linecam.station.view").joinpath("page.html").read_text(encoding="utf-8")
        cfg = {"history": self.store is not None, "ask": self.asker is not None, "title": self.title}
        return HTMLResponse(html.replace("/*CONFIG*/{}", json.dumps(cfg)))

    async def events(self, request: Request) -> EventSourceResponse:
        q = self.state.listen(asyncio.get_running_loop())

        async def stream() -> Any:
            try:
                yield {"event": "item", "data": json.dumps(self.state.snapshot_state())}
                while True:
                    try:
                        item = await asyncio.wait_for(q.get(), timeout=5.0)
                    except asyncio.TimeoutError:  # rates decay while nothing arrives
                        item = {"kind": "rates", "rates": {k: round(self.state.rate(k), 2)
                                                           for k in list(self.state.counts)}}
                    yield {"event": "item", "data": json.dumps(item)}
            finally:
                self.state.unlisten(q)

        return EventSourceResponse(stream(), ping=15)

    async def snapshot(self, request: Request) -> Response:
        jpeg = await run_in_threadpool(self.snapshot_bytes, request.path_params["defect_event_id"])
        if jpeg is None:
            return Response("no snapshot for this defect", 404)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def history(self, request: Request) -> JSONResponse:
        if self.store is None:
            return JSONResponse({"error": "no record database: start linecam view with --db"}, 404)
        from linecam.station.history import flat, ng_rate_per_hour, parse_since

        try:
            since = parse_since(request.query_params.get("since", "8h"))
        except LinecamError as e:
            return JSONResponse({"error": str(e)}, 400)
        camera = request.query_params.get("camera") or None

        def load() -> dict[str, Any]:
            rates = ng_rate_per_hour(self.store, since, camera)
            evs = self.store.query(since=since, camera=camera, types=["verdict"], ng_only=True, limit=200,
                                   newest_first=True)
            return {"rates": [{"hour": r.hour, "camera": r.camera, "verdicts": r.verdicts, "ng": r.ng,
                               "ng_rate": round(r.ng_rate, 4)} for r in rates],
                    "ng": [flat(e) for e in evs]}

        return JSONResponse(await run_in_threadpool(load))

    async def ask(self, request: Request) -> JSONResponse:
        if self.asker is None:
            return JSONResponse({"error": "no VLM bundle: start linecam view with --vlm-bundle"}, 404)
        try:
            body = await request.json()
            defect_id, question = str(body["defect_event_id"]), str(body["question"]).strip()
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send JSON {defect_event_id, question, conversation_id?}"}, 400)
        if not question:
            return JSONResponse({"error": "empty question"}, 400)
        defect = self.defect(defect_id)
        if defect is None:
            return JSONResponse({"error": f"unknown defect {defect_id}"}, 404)
        try:
            answer = await run_in_threadpool(self.asker.ask, defect, self.snapshot_bytes(defect_id), question,
                                             body.get("conversation_id"))
        except LinecamError as e:
            return JSONResponse({"error": str(e)}, 409)
        return JSONResponse(answer)

    def starlette(self, user: str | None = None, password: str | None = None) -> Starlette:
        middleware = [Middleware(BasicAuth, user=user, password=password)] if user else []
        return Starlette(routes=[
            Route("/", self.page),
            Route("/events", self.events),
            Route("/snapshot/{defect_event_id}", self.snapshot),
            Route("/api/history", self.history),
            Route("/api/ask", self.ask, methods=["POST"]),
        ], middleware=middleware)


def serve(app: Starlette, bind: str, port: int, on_started: Callable[[], None] | None = None) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=bind, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run()
    except OSError as e:
        raise LinecamError(f"cannot serve on {bind}:{port} ({e.strerror or e}): pick another --port / --bind") from None
    if not server.started:
        raise LinecamError(f"cannot serve on {bind}:{port}: is the port taken? pick another --port")
