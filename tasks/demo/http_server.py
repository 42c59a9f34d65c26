"""A loopback HTTP server for tests and benchmarks: good images and every kind of bad one.

    with LoopbackServer(latency_s=(0.02, 0.2)) as server:
        url = server.route("/a.jpg", Reply(body=image_bytes(640, 480)))
        server.route("/flaky.jpg", Reply(body=..., fail_first=1))      # 500, then the image
        server.route("/busy.jpg", Reply(body=..., fail_first=1, fail_status=429,
                                        fail_headers={"Retry-After": "2"}))  # throttled, then the image
        server.route("/loop", redirect("/loop"))                        # redirect loop
        server.route("/slow.jpg", Reply(body=..., delay_s=5))           # stalls before headers
        ...
        server.hits["/a.jpg"]                                           # requests seen per path

The server runs aiohttp's web server on its own event loop in a daemon thread, bound
to 127.0.0.1 on a free port, and keeps connections alive like a real image host.
``python -m tasks.demo.http_server DIR --latency 0.02 0.2`` serves a directory of files in a
separate process (what a benchmark wants, so the server does not share the client's GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import random
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from PIL import Image


@dataclass
class Reply:
    """What the server answers on one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before sending headers (a stalled server)
    stall_body_s: float = 0.0  # send headers and half the body, then sleep
    chunked: bool = False  # no Content-Length: the client must cap the size while streaming
    fail_first: int = 0  # the first N requests on this path get fail_status instead
    fail_status: int = 500
    fail_headers: dict[str, str] = field(default_factory=dict)  # sent with those, e.g. Retry-After


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status=status, content_type="text/html", headers={"Location": location})


def image_bytes(width: int, height: int, fmt: str = "JPEG", mode: str = "RGB", **save_kw) -> bytes:
    """A colour gradient (compresses like a photo, not a flat fill) encoded as ``fmt``."""
    ramp = Image.linear_gradient("L").resize((width, height))
    flipped = ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    img = Image.merge("RGB", (ramp, *flipped))
    if mode != img.mode:
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, fmt, **save_kw)
    return out.getvalue()


def closed_port() -> int:
    """A loopback port with nothing listening (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    def __init__(
        self,
        routes: dict[str, Reply] | None = None,
        *,
        latency_s: tuple[float, float] = (0.0, 0.0),
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.routes: dict[str, Reply] = dict(routes or {})
        self.latency_s = latency_s
        self.hits: collections.Counter[str] = collections.Counter()
        self._random = random.Random(seed)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(1024)
        self.port: int = self._sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def route(self, path: str, reply: Reply) -> str:
        """Serve ``reply`` on ``path``; returns its URL."""
        self.routes[path] = reply
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base_url + path

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        low, high = self.latency_s
        if high > 0:
            await asyncio.sleep(self._random.uniform(low, high))
        reply = self.routes.get(path)
        if reply is None:
            return web.Response(status=404, text="not found")
        if self.hits[path] <= reply.fail_first:
            return web.Response(status=reply.fail_status, text="failing on purpose", headers=reply.fail_headers)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if not (reply.chunked or reply.stall_body_s):
            return web.Response(body=reply.body, status=reply.status, content_type=reply.content_type, headers=reply.headers)
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": reply.content_type, **reply.headers})
        if reply.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(reply.body)
        await response.prepare(request)
        half = len(reply.body) // 2
        await response.write(reply.body[:half])
        if reply.stall_body_s:
            await asyncio.sleep(reply.stall_body_s)
        for start in range(half, len(reply.body), 64 * 1024):
            await response.write(reply.body[start : start + 64 * 1024])
        await response.write_eof()
        return response

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    def start(self) -> LoopbackServer:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="loopback-http", daemon=True)
        self._thread.start()
        started.wait(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a directory of files on loopback with injected latency.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, nargs=2, default=(0.0, 0.0), metavar=("LOW_S", "HIGH_S"))
    args = parser.parse_args()
    types = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
    routes = {
        "/" + str(p.relative_to(args.root)): Reply(body=p.read_bytes(), content_type=types.get(p.suffix.lower(), "application/octet-stream"))
        for p in sorted(args.root.rglob("*"))
        if p.is_file()
    }
    server = LoopbackServer(routes, latency_s=tuple(args.latency), port=args.port).start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
