"""Where VQA generations come from: OpenAI-compatible servers (vLLM) or in-process transformers.

Both backends take chats and return one ``Completion`` per chat, in order; a chat
that could not be answered is a ``Completion`` with an error, never an exception.

``OpenAIBackend`` talks to any ``/v1/chat/completions`` endpoint with aiohttp:
bounded concurrency per server, requests spread least-loaded (or round-robin)
over several servers, a per-request timeout, retries with jittered exponential
backoff on 429, 5xx, timeouts and connection errors (honouring Retry-After), and
the JSON schema requested the way the config says (OpenAI ``response_format`` or
vLLM's ``structured_outputs``).

A server that looks dead is taken out of the rotation: when a request to it fails
at the connection level (refused, reset, dropped mid-answer, connect timeout) and
its ``GET /health`` does not answer either, it is marked down, the request goes
at once to another server (without using up a retry while other servers are up),
and no request is sent to it until a ``/health`` probe every ``reprobe_s``
answers again. So a server or node that dies mid-stage costs only the requests
it had in flight, and those are answered by the others. The mark is kept per
backend, across shards.

Failing a whole shard instead of writing one full of failures: a request that
still fails after its retries because no working server answered (connection
error, timeout, 429/5xx) is a *transport* failure. When transport failures
exceed ``max_failed_fraction`` of the shard's requests, or of the requests
finished so far once at least ``ABORT_MIN_FINISHED`` have finished (so a dead
server costs seconds, not a shard's worth of retries), or a managed server
process has exited, ``complete`` raises ``VqaServerUnavailable`` (a
``ConnectionError``: the flow retries the shard, and a rerun redoes it). Per-chat
failures (a 400 for one prompt, a malformed response body) are only counted.

``ManagedServers`` starts the server command(s) itself, each in its own process
group with its log in a file, waits for ``GET /health`` to return 200, and stops
the whole group (SIGTERM, then SIGKILL) when the stage ends, fails or is
interrupted. ``tasks/annotate/vqa_servers.py`` does the same on a Ray cluster
(``vqa.openai.server.placement: ray``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tasks.config import ManagedServerConfig, VqaConfig
from tasks.annotate.vqa_parse import QA_SCHEMA

log = logging.getLogger(__name__)

ABORT_MIN_FINISHED = 16
CONNECT_TIMEOUT_S = 10.0  # a node that is gone does not refuse a connection, it never answers
HEALTH_TIMEOUT_S = 3.0


class VqaServerUnavailable(ConnectionError):
    """The VQA server(s) could not answer enough of a shard's requests; the shard is not written."""


@dataclass
class Completion:
    text: str | None
    error: str | None = None  # "request_failed" when no text came back
    detail: str = ""  # what went wrong, for the table's error column and the logs
    transport: bool = False  # failed because no working server answered
    completion_tokens: int = 0
    finish_reason: str | None = None


def structured_output_fields(mode: str) -> dict:
    if mode == "response_format":
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "qa_pairs", "schema": QA_SCHEMA, "strict": True}}}
    if mode == "structured_outputs":  # vLLM >= 0.12 (replaced guided_json)
        return {"structured_outputs": {"json": QA_SCHEMA}}
    return {}


class _Server:
    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.health_url = root + "/health"  # vLLM serves it at the root, next to /v1
        self.in_flight = 0


class OpenAIBackend:
    def __init__(self, cfg: VqaConfig, base_urls: list[str], server_dead: Callable[[], str | None] = lambda: None):
        self.cfg = cfg
        self.ocfg = cfg.openai
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.server_dead = server_dead
        self._rr = itertools.count()
        self._lock = threading.Lock()  # shards in parallel threads share the marks and the counts
        self.down: dict[str, float] = {}  # base URL -> when it was last found dead (monotonic)
        self.suspected: dict[str, int] = {}  # base URL -> /health probes running after a connection failure
        # Per base URL: sent, answered, connection_errors, marked_down, sent_while_down (for logs and tests).
        self.stats: dict[str, Counter] = {u: Counter() for u in self.base_urls}

    def _count(self, server: _Server, what: str) -> None:
        with self._lock:
            self.stats.setdefault(server.base_url, Counter())[what] += 1

    def is_down(self, server: _Server) -> bool:
        return server.base_url in self.down

    def is_avoided(self, server: _Server) -> bool:
        """Down, or its /health being probed after a connection failure: a refusing server answers at
        once, so without this it would look the least loaded and draw every request while the probe runs."""
        return server.base_url in self.down or server.base_url in self.suspected

    def request_body(self, messages: list[dict]) -> dict:
        return {"model": self.cfg.model, "messages": messages, "max_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature, **structured_output_fields(self.cfg.structured_output)}

    def complete(self, chats: list[list[dict]]) -> list[Completion]:
        return asyncio.run(self._complete_all(chats))

    def _pick(self, servers: list[_Server]) -> _Server:
        turn = next(self._rr)
        servers = [s for s in servers if not self.is_avoided(s)] or servers  # all down: try them anyway (fails fast)
        if self.ocfg.load_balance == "round_robin":
            return servers[turn % len(servers)]
        rotated = servers[turn % len(servers):] + servers[: turn % len(servers)]  # ties: rotate
        return min(rotated, key=lambda s: s.in_flight)

    async def _complete_all(self, chats: list[list[dict]]) -> list[Completion]:
        servers = [_Server(u) for u in self.base_urls]
        limit = asyncio.Semaphore(self.ocfg.concurrency * len(servers))
        headers = {"Authorization": f"Bearer {self.ocfg.api_key}"}
        connector = aiohttp.TCPConnector(limit=0)
        finished = transport_failed = 0
        abort: asyncio.Future = asyncio.get_running_loop().create_future()

        async def one(messages):
            nonlocal finished, transport_failed
            c = await self._request(session, servers, limit, self.request_body(messages))
            finished += 1
            transport_failed += c.transport
            if c.transport and not abort.done():
                reason = self._abort_reason(transport_failed, finished, len(chats), c)
                if reason:
                    abort.set_result(reason)
            return c

        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            tasks = [asyncio.create_task(one(m)) for m in chats]
            gathered = asyncio.gather(*tasks)
            reprobe = asyncio.create_task(self._reprobe(session, servers))
            try:
                await asyncio.wait([gathered, abort], return_when=asyncio.FIRST_COMPLETED)
            finally:
                reprobe.cancel()
            if abort.done():
                gathered.cancel()  # cancels every request; awaiting it retrieves the CancelledError
                with contextlib.suppress(asyncio.CancelledError):
                    await gathered
                raise VqaServerUnavailable(abort.result())
            return gathered.result()

    async def _alive(self, session, server: _Server) -> bool:
        """Does the server answer ``GET /health`` at all (any status below 500: a server without /health counts)?"""
        timeout = aiohttp.ClientTimeout(total=min(HEALTH_TIMEOUT_S, self.ocfg.timeout_s))
        try:
            async with session.get(server.health_url, timeout=timeout) as resp:
                return resp.status < 500
        except (asyncio.TimeoutError, aiohttp.ClientError):
            return False

    async def _suspect(self, session, server: _Server) -> bool:
        """After a connection-level failure: mark the server down unless /health shows it alive; True if down."""
        if self.is_down(server):
            return True
        self.suspected[server.base_url] = self.suspected.get(server.base_url, 0) + 1
        try:
            alive = await self._alive(session, server)
        finally:
            self.suspected[server.base_url] -= 1
            if not self.suspected[server.base_url]:
                del self.suspected[server.base_url]
        if alive:
            return False
        with self._lock:
            newly = server.base_url not in self.down
            self.down[server.base_url] = time.monotonic()
        if newly:
            self._count(server, "marked_down")
            log.warning("vqa server %s marked down (connection failed, /health not answering); its requests go "
                        "to the other servers, /health probed every %ss", server.base_url, self.ocfg.reprobe_s)
        return True

    async def _reprobe(self, session, servers: list[_Server]) -> None:
        """While the shard runs: probe each down server's /health every ``reprobe_s``; one that answers is back."""
        while True:
            await asyncio.sleep(min(1.0, self.ocfg.reprobe_s))
            for server in servers:
                since = self.down.get(server.base_url)
                if since is None or time.monotonic() - since < self.ocfg.reprobe_s:
                    continue
                if await self._alive(session, server):
                    with self._lock:
                        self.down.pop(server.base_url, None)
                    log.warning("vqa server %s answers /health again; sending requests to it", server.base_url)
                else:
                    with self._lock:
                        self.down[server.base_url] = time.monotonic()

    def _abort_reason(self, failed: int, finished: int, total: int, last: Completion) -> str | None:
        dead = self.server_dead()
        if dead:
            return f"vqa server gone: {dead}"
        frac = self.ocfg.max_failed_fraction
        if failed > frac * total or (finished >= min(total, ABORT_MIN_FINISHED) and failed > frac * finished):
            return (f"{failed} of {finished} finished requests ({total} in the shard) reached no working server "
                    f"at {self.base_urls} (last: {last.detail}); more than max_failed_fraction={frac}")
        return None

    async def _request(self, session, servers, limit, body) -> Completion:
        detail = ""
        attempts = self.ocfg.retries + 1
        moves = len(servers) - 1  # re-sends to another server after one is found dead: free, not a retry
        timeout = aiohttp.ClientTimeout(total=self.ocfg.timeout_s, sock_connect=min(CONNECT_TIMEOUT_S,
                                                                                    self.ocfg.timeout_s))
        attempt = 0
        while True:
            retry_after = None
            suspect = False
            async with limit:
                server = self._pick(servers)
                server.in_flight += 1
                self._count(server, "sent")
                if self.is_down(server):
                    self._count(server, "sent_while_down")  # only when every server is down
                try:
                    async with session.post(server.url, json=body, timeout=timeout) as resp:
                        if resp.status == 200:
                            payload = await resp.read()
                            self._count(server, "answered")
                            if self.is_down(server):  # every server was down and this one answered
                                with self._lock:
                                    self.down.pop(server.base_url, None)
                            return self._completion(payload)
                        text = (await resp.text(errors="replace"))[:200]
                        detail = f"HTTP {resp.status} from {server.url}: {text}"
                        if resp.status != 429 and resp.status < 500:
                            return Completion(None, "request_failed", detail)
                        retry_after = resp.headers.get("Retry-After")
                except aiohttp.ConnectionTimeoutError as e:  # before ServerTimeoutError, its base class
                    detail, suspect = f"connect timeout from {server.url}: {e}", True
                except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                    detail = f"timeout after {self.ocfg.timeout_s}s from {server.url}"
                except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        aiohttp.ClientPayloadError) as e:  # refused, reset, dropped mid-answer
                    detail, suspect = f"{type(e).__name__} from {server.url}: {e}", True
                except aiohttp.ClientError as e:
                    detail = f"{type(e).__name__} from {server.url}: {e}"
                finally:
                    server.in_flight -= 1
            if suspect:
                self._count(server, "connection_errors")
                if (await self._suspect(session, server) and moves > 0
                        and any(not self.is_down(s) for s in servers)):
                    moves -= 1
                    continue  # straight to a live server
            attempt += 1
            if attempt >= attempts:
                break
            await asyncio.sleep(self._delay(attempt - 1, retry_after))
        return Completion(None, "request_failed", f"{detail} (after {attempts} attempts)", transport=True)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        base = min(self.ocfg.max_backoff_s, self.ocfg.backoff_s * 2**attempt)
        with contextlib.suppress(TypeError, ValueError):
            base = max(base, min(self.ocfg.max_backoff_s, float(retry_after)))
        return base * random.uniform(0.5, 1.0)

    @staticmethod
    def _completion(payload: bytes) -> Completion:
        try:
            data = json.loads(payload)
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return Completion(None, "request_failed", f"malformed response body ({type(e).__name__}): {payload[:200]!r}")
        usage = data.get("usage") or {}
        return Completion(text or "", completion_tokens=int(usage.get("completion_tokens") or 0),
                          finish_reason=choice.get("finish_reason"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class ManagedServers:
    """Start ``cfg.num_servers`` copies of the server command, wait until healthy, stop them on exit."""

    def __init__(self, cfg: ManagedServerConfig, model: str):
        self.cfg = cfg
        self.model = model
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []

    @property
    def base_urls(self) -> list[str]:
        return [f"http://{self.cfg.host}:{p}/v1" for p in self.ports]

    def __enter__(self) -> ManagedServers:
        atexit.register(self.stop)
        try:
            self.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        log_dir = Path(self.cfg.log_dir or os.environ.get("TMPDIR", "/tmp"))
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for index in range(self.cfg.num_servers):
            port = self.cfg.base_port + index if self.cfg.base_port else free_port(self.cfg.host)
            fill = {"model": self.model, "host": self.cfg.host, "port": port, "index": index}
            argv = [arg.format(**fill) for arg in shlex.split(self.cfg.command)]  # split first: paths may hold spaces
            env = {**os.environ, **{k: v.format(**fill) for k, v in self.cfg.env.items()}}
            log_path = log_dir / f"goldiclip-vqa-server-{stamp}-{index}-port{port}.log"
            with open(log_path, "ab") as log_file:
                # Its own session (process group): stopping it also stops the workers it spawns.
                proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
            self.procs.append(proc)
            self.ports.append(port)
            self.logs.append(log_path)
            log.info("vqa server %d starting (pid %d) on port %d: %s; log: %s",
                        index, proc.pid, port, shlex.join(argv), log_path)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        pending = set(range(len(self.procs)))
        while pending:
            for i in sorted(pending):
                if self.procs[i].poll() is not None:
                    raise RuntimeError(
                        f"vqa server {i} exited with code {self.procs[i].returncode} while starting; "
                        f"log {self.logs[i]} ends with:\n{_tail(self.logs[i])}"
                    )
                try:
                    with urllib.request.urlopen(f"http://{self.cfg.host}:{self.ports[i]}/health", timeout=2) as r:
                        if r.status == 200:
                            pending.discard(i)
                            log.info("vqa server %d healthy at %s", i, self.base_urls[i])
                except (urllib.error.URLError, OSError):
                    pass
            if pending and time.monotonic() > deadline:
                raise RuntimeError(
                    f"vqa server(s) {sorted(pending)} not healthy after {self.cfg.startup_timeout_s}s "
                    f"(GET /health); logs: {[str(self.logs[i]) for i in sorted(pending)]}"
                )
            if pending:
                time.sleep(0.25)

    def dead(self) -> str | None:
        """A description of the first server process that has exited, if any."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                return f"server {i} (pid {proc.pid}) exited with code {proc.returncode}; log: {self.logs[i]}"
        return None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.stop_timeout_s
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("vqa server %d did not stop on SIGTERM within %ss; killing", i, self.cfg.stop_timeout_s)
            # Also reaps workers the server left in its group after its own exit.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self.procs:
            log.info("vqa server(s) stopped; logs: %s", [str(p) for p in self.logs])
        self.procs = []
        atexit.unregister(self.stop)


class TransformersBackend:
    """In-process generation (AutoModelForCausalLM + the model's chat template), greedy unless temperature > 0."""

    def __init__(self, cfg: VqaConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tasks.devices import resolve_device, resolve_dtype

        self.cfg = cfg
        self.device = resolve_device(cfg.transformers.device)
        dtype = resolve_dtype(cfg.transformers.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.tokenizer.padding_side = "left"  # generation continues from the right end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(self.device).eval()

    def complete(self, chats: list[list[dict]]) -> list[Completion]:
        import torch

        out: list[Completion] = []
        bs = self.cfg.transformers.batch_size
        sampling = {"do_sample": True, "temperature": self.cfg.temperature} if self.cfg.temperature > 0 else {
            "do_sample": False}
        for start in range(0, len(chats), bs):
            prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                       for c in chats[start : start + bs]]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                generated = self.model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens,
                                                pad_token_id=self.tokenizer.pad_token_id, **sampling)
            new_tokens = generated[:, enc["input_ids"].shape[1]:]
            for row in new_tokens:
                n = int((row != self.tokenizer.pad_token_id).sum())
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                out.append(Completion(text, completion_tokens=n,
                                      finish_reason="length" if n >= self.cfg.max_new_tokens else "stop"))
        return out
