"""A loopback OpenAI-compatible server for the VQA client's tests and benchmark.

Implements ``POST /v1/chat/completions``, ``GET /health`` and ``GET /v1/models``.
What it answers depends on a marker in the prompt (the caption carries it):

    [[500]]        always HTTP 500              [[flaky]]      503 once, then an answer
    [[429]]        429 (Retry-After: 0) once    [[400]]        HTTP 400 (a bad prompt)
    [[stall]]      sleeps ``stall_s``: the client times out
    [[malformed]]  content that is not JSON     [[truncated]]  JSON cut off mid-way (finish_reason length)
    [[qa-text]]    Q:/A: lines, no JSON          [[fenced]]     JSON in a code fence, with chatter
    [[no-qmark]]   questions without "?"        [[bad-body]]   HTTP 200 with a non-JSON body
    (none)         valid {"qa": [...]} JSON from ``answer_fn(caption)`` (default: three pairs
                   taken from the caption's words; the demo passes its scene-rules stand-in)

``fail_all`` answers every chat request with that status instead, ``latency_s`` is
added to every answer, ``die_after`` exits the process after that many chat
requests (a server crashing mid-stage; use it in a separate process only). Records every request body and the peak
number of requests in flight.

    with OpenAIServer(latency_s=0.05) as server:
        server.base_url                      # http://127.0.0.1:PORT/v1
    python -m tasks.demo.openai_server --port 8000 --latency 0.05   # a separate process
    python -m tasks.demo.openai_server --port 8000 --answers scene  # the demo's scene-rules stand-in
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import socket
import threading
from collections.abc import Callable

from aiohttp import web

MARKER = re.compile(r"\[\[([a-z0-9-]+)\]\]")


def answer_json(caption: str) -> dict:
    words = [w for w in re.sub(r"\[\[.*?\]\]", "", caption).replace('"', "").split() if w.isalpha()] or ["thing"]
    return {"qa": [
        {"question": "What is in the image?", "answer": " ".join(words[:3])},
        {"question": f"Is there a {words[-1]}?", "answer": "yes"},
        {"question": "How many words describe it?", "answer": str(len(words))},
    ]}


class OpenAIServer:
    def __init__(self, *, latency_s: float = 0.0, stall_s: float = 30.0, completion_tokens: int = 60,
                 fail_all: int | None = None, die_after: int | None = None, host: str = "127.0.0.1", port: int = 0,
                 answer_fn: Callable[[str], dict] = answer_json):
        self.answer_fn = answer_fn  # caption -> {"qa": [...]}; the demo's scene-rules stand-in plugs in here
        self.latency_s = latency_s
        self.stall_s = stall_s
        self.completion_tokens = completion_tokens
        self.fail_all = fail_all
        self.die_after = die_after
        self.host = host
        self.port = port
        self.requests: list[dict] = []
        self.seen: collections.Counter = collections.Counter()  # chat requests per prompt
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "loopback", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.die_after is not None and len(self.requests) > self.die_after:
            os._exit(3)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(body)
        finally:
            self.in_flight -= 1

    async def _answer(self, body: dict) -> web.StreamResponse:
        prompt = body["messages"][-1]["content"]
        self.seen[prompt] += 1
        first = self.seen[prompt] == 1
        marker = (MARKER.search(prompt) or [None, None])[1]
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.fail_all:
            return web.json_response({"error": {"message": "failing on purpose"}}, status=self.fail_all)
        if marker == "500":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if marker == "400":
            return web.json_response({"error": {"message": "prompt too long"}}, status=400)
        if marker == "flaky" and first:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if marker == "429" and first:
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0"})
        if marker == "stall":
            await asyncio.sleep(self.stall_s)
        if marker == "bad-body":
            return web.Response(text="<html>proxy error</html>", content_type="text/html")
        caption = prompt.split('"')[1] if prompt.count('"') >= 2 else prompt
        qa = self.answer_fn(caption)
        content, finish = json.dumps(qa), "stop"
        if marker == "malformed":
            content = "{qa: [{question: What is it?, answer: a shape}"
        elif marker == "truncated":
            content, finish = content[: content.index("How many") - 5], "length"
        elif marker == "qa-text":
            content = "\n".join(f"Q{i + 1}: {p['question']}\nA{i + 1}: {p['answer']}" for i, p in enumerate(qa["qa"]))
        elif marker == "fenced":
            content = f"Sure! Here are the pairs:\n```json\n{content}\n```\nHope this helps."
        elif marker == "no-qmark":
            content = json.dumps({"qa": [{"question": "Describe it", "answer": "a shape"}]})
        return web.json_response({
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": self.completion_tokens,
                      "total_tokens": len(prompt.split()) + self.completion_tokens},
        })

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, backlog=1024).start()

    def __enter__(self) -> OpenAIServer:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="openai-server", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0, help="Seconds added to every answer.")
    parser.add_argument("--tokens", type=int, default=60, help="completion_tokens reported per answer.")
    parser.add_argument("--fail-all", type=int, default=None, help="Answer every chat request with this status.")
    parser.add_argument("--die-after", type=int, default=None, help="Exit after this many chat requests.")
    parser.add_argument("--startup-delay", type=float, default=0.0, help="Sleep before listening (a slow start).")
    parser.add_argument("--answers", choices=("words", "scene"), default="words",
                        help="words: three pairs from the caption's words; scene: the demo's scene-rules stand-in "
                        "(tasks/demo/vqa_standin.py), as `goldiclip demo` serves it (e.g. as a vqa server command "
                        "placed by Ray).")
    args = parser.parse_args()
    answer_fn = answer_json
    if args.answers == "scene":
        from tasks.demo.vqa_standin import scene_answers as answer_fn
    if args.startup_delay:
        import time

        time.sleep(args.startup_delay)
    server = OpenAIServer(latency_s=args.latency, completion_tokens=args.tokens, fail_all=args.fail_all,
                          die_after=args.die_after, host=args.host, port=args.port, answer_fn=answer_fn)
    print(f"serving on {server.host}:{server.port}", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
