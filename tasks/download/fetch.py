"""HTTP fetch of the download stage (DESIGN.md "download"); image work is ``images.py``.

One process downloads a shard's URLs with one aiohttp session and a bounded number of
concurrent requests, and hands decoding, resizing and JPEG re-encoding to a pool of
``download.decode_threads`` threads (Pillow releases the GIL there), so the event loop
keeps fetching while images are processed. ``fetch_shard`` is the synchronous entry
point a worker process calls. Every function takes the stage's ``DownloadConfig`` whole.

Safety rules, each with a stable reason code in ``FetchResult.error`` (the README lists
every reason the stage records):
- only ``http``/``https`` URLs are fetched (``bad_scheme``); a raw space in a URL is
  quoted, as a browser does (the URL is recorded as listed);
- unless ``allow_private_addresses``, no request goes to a loopback, private,
  link-local (cloud metadata endpoints), shared, reserved, multicast or unspecified
  address (``private_address``): IP literals are refused before any I/O and host
  names by the session's resolver, so the address checked is the address connected
  to; redirects are followed by hand and every hop is checked again
  (``too_many_redirects`` past ``max_redirects``);
- bodies are capped while streaming (``too_large``); a response aiohttp cannot parse
  (an oversized header, a broken status line) is ``bad_response`` with no HTTP status,
  since none was received; decoding refuses truncated files and images with too many
  pixels (``images.py``).

Transient failures (timeouts, connection errors, 408, 429, 5xx) are retried with
exponential backoff and jitter; a 429 or 503 with ``Retry-After`` (seconds or an HTTP
date) waits what it asks, at most ``max_retry_after_s``, and is counted in
``FetchResult.retry_after``. Other failures are final at once.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import ipaddress
import logging
import random
import socket
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from yarl import URL

from tasks.config import DownloadConfig
from tasks.download.images import ImageRejected, process_image

log = logging.getLogger(__name__)

_ALLOWED_SCHEMES = ("http", "https")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 256 * 2**10
@dataclass(frozen=True)
class FetchResult:
    url: str
    status: Literal["ok", "failed"]
    error: str | None = None
    http_status: int | None = None
    orig_width: int | None = None
    orig_height: int | None = None
    width: int | None = None
    height: int | None = None
    jpeg: bytes | None = None
    sha256: str | None = None
    bytes_downloaded: int = 0
    attempts: int = 0  # requests made (0: refused before any I/O)
    retry_after: int = 0  # retries that waited for a Retry-After header


# ---------------------------------------------------------------------------- URL policy


def _address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 scope id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global alone lets multicast through; the rest are spelled out for clarity.
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    )


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None


def _static_url_problem(url: str | URL, allow_private: bool) -> str | None:
    """The checks that need no DNS: scheme, host, and IP-literal hosts.

    Parsed with yarl, the parser aiohttp itself uses, so the host checked here is the
    host aiohttp connects to.
    """
    try:
        parsed = url if isinstance(url, URL) else URL(url)
    except ValueError:
        return "bad_url"
    if parsed.scheme not in _ALLOWED_SCHEMES:
        return "bad_scheme"
    host = parsed.raw_host
    if not host:
        return "bad_url"
    literal = _ip_literal(host)
    if literal is not None and not allow_private and not _address_allowed(literal):
        return "private_address"
    return None


class BlockedAddressError(OSError):
    """A host name resolved to an address the private-address rule forbids."""


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses hosts resolving to any non-public address.

    Checking inside the resolver (not before the request) means the addresses checked
    are the ones aiohttp connects to, so DNS rebinding cannot slip past the check.
    """

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        hosts = await self._inner.resolve(host, port, family)
        if not all(_address_allowed(h["host"]) for h in hosts):
            raise BlockedAddressError(f"{host} resolves to a non-public address")
        return hosts

    async def close(self) -> None:
        await self._inner.close()


def open_session(cfg: DownloadConfig) -> aiohttp.ClientSession:
    """The session ``fetch_image`` expects: pooled, DNS-cached, private-address guarded."""
    connector = aiohttp.TCPConnector(
        limit=cfg.concurrency,
        ttl_dns_cache=300,
        resolver=None if cfg.allow_private_addresses else GuardedResolver(),
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.8"},
        timeout=aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=cfg.timeout_s, sock_read=cfg.timeout_s),
        trust_env=False,  # a proxy from the environment would bypass the address rule
        cookie_jar=aiohttp.DummyCookieJar(),
    )


# ----------------------------------------------------------------------------- download


class _Failure(Exception):
    def __init__(self, reason: str, *, http_status: int | None = None, transient: bool = False, size: int = 0,
                 retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status
        self.transient = transient
        self.size = size
        self.retry_after_s = retry_after_s


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP date); None if absent or unreadable."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read as such
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _classify(exc: BaseException) -> _Failure:
    """Map a client exception to a reason code and whether a retry may help."""
    # Timeouts subclass OSError and ClientError, so they go first.
    if isinstance(exc, TimeoutError):
        return _Failure("timeout", transient=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, BlockedAddressError):
            return _Failure("private_address")
        if isinstance(exc, aiohttp.ClientSSLError):
            return _Failure("ssl_error")
        if isinstance(exc.os_error, socket.gaierror):
            # Mostly dead domains (NXDOMAIN), common in old URL lists: not worth retrying.
            return _Failure("dns_error")
        return _Failure("connection_error", transient=True)
    if isinstance(exc, (aiohttp.InvalidURL, ValueError)):
        return _Failure("bad_url")
    if isinstance(exc, aiohttp.ClientResponseError):
        # We never raise_for_status, so this is aiohttp's parser refusing the response
        # (an oversized header, a broken status line): its status is the parser's
        # invented 400, not one the server sent.
        return _Failure("bad_response")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return _Failure("connection_error", transient=True)
    log.warning("unexpected error while fetching: %r", exc)
    return _Failure("unexpected_error")


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise _Failure("too_large", http_status=resp.status, size=0)
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(_READ_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise _Failure("too_large", http_status=resp.status, size=size)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _download(session: aiohttp.ClientSession, url: str, cfg: DownloadConfig) -> tuple[bytes, int]:
    """One attempt: follow redirects by hand, checking each hop; return (body, status)."""
    target = url
    for _ in range(cfg.max_redirects + 1):
        problem = _static_url_problem(target, cfg.allow_private_addresses)
        if problem is not None:
            raise _Failure(problem)
        try:
            async with session.get(target, allow_redirects=False) as resp:
                if resp.status in _REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise _Failure("bad_redirect", http_status=resp.status)
                    target = resp.url.join(URL(location))
                    continue
                if not 200 <= resp.status < 300:
                    retry = resp.status in (408, 429) or resp.status >= 500
                    wait = retry_after_seconds(resp.headers.get("Retry-After")) if resp.status in (429, 503) else None
                    raise _Failure(f"http_{resp.status}", http_status=resp.status, transient=retry,
                                   retry_after_s=wait)
                return await _read_capped(resp, cfg.max_bytes), resp.status
        except _Failure:
            raise
        except Exception as exc:  # whatever a hostile server provokes fails this URL only
            raise _classify(exc) from exc
    raise _Failure("too_many_redirects")


def _backoff_delay(cfg: DownloadConfig, attempt: int) -> float:
    return cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)


async def fetch_image(
    session: aiohttp.ClientSession, url: str, cfg: DownloadConfig, *, executor: Executor | None = None
) -> FetchResult:
    """Download, verify, resize and re-encode one image; never raises for a bad URL or image.

    ``session`` should come from ``open_session(cfg)``: its resolver enforces the
    private-address rule for host names. Image work runs on ``executor`` (the loop's
    default executor when None).
    """
    problem = _static_url_problem(url, cfg.allow_private_addresses)
    if problem is not None:
        return FetchResult(url=url, status="failed", error=problem)
    attempts = retry_after = 0
    while True:
        attempts += 1
        try:
            data, http_status = await _download(session, url, cfg)
            break
        except _Failure as failure:
            if failure.transient and attempts <= cfg.retries:
                if failure.retry_after_s is None:
                    await asyncio.sleep(_backoff_delay(cfg, attempts))
                else:
                    retry_after += 1
                    await asyncio.sleep(min(failure.retry_after_s, cfg.max_retry_after_s))
                continue
            return FetchResult(
                url=url,
                status="failed",
                error=failure.reason,
                http_status=failure.http_status,
                bytes_downloaded=failure.size,
                attempts=attempts,
                retry_after=retry_after,
            )
    failed = dict(url=url, status="failed", http_status=http_status, bytes_downloaded=len(data), attempts=attempts,
                  retry_after=retry_after)
    try:
        image = await asyncio.get_running_loop().run_in_executor(executor, process_image, data, cfg)
    except ImageRejected as rejected:
        return FetchResult(error=rejected.reason, **failed)
    return FetchResult(
        url=url,
        status="ok",
        http_status=http_status,
        orig_width=image.orig_width,
        orig_height=image.orig_height,
        width=image.width,
        height=image.height,
        jpeg=image.jpeg,
        sha256=image.sha256,
        bytes_downloaded=len(data),
        attempts=attempts,
        retry_after=retry_after,
    )


async def fetch_many(
    urls: list[str],
    cfg: DownloadConfig,
    *,
    executor: Executor | None = None,
    on_result: Callable[[int, FetchResult], None] | None = None,
) -> list[FetchResult]:
    """Fetch every URL with at most ``cfg.concurrency`` requests in flight; results in input order.

    ``on_result(index, result)`` is called on the event loop as each URL finishes
    (for progress reporting). Without ``executor`` a thread pool of
    ``cfg.decode_threads`` threads does the image work (each holds at most one decoded
    image, which is what bounds a download process's memory: ``images.py``).
    """
    results: list[FetchResult | None] = [None] * len(urls)
    pending = iter(range(len(urls)))
    own_executor = None
    if executor is None:
        own_executor = executor = ThreadPoolExecutor(
            max_workers=cfg.decode_threads, thread_name_prefix="process_image"
        )

    async def worker(session: aiohttp.ClientSession) -> None:
        # A fixed set of workers pulling the next index bounds concurrency like a
        # semaphore would, without one pending task per URL of the shard.
        for i in pending:
            result = await fetch_image(session, urls[i], cfg, executor=executor)
            results[i] = result
            if on_result is not None:
                on_result(i, result)

    try:
        async with open_session(cfg) as session:
            await asyncio.gather(*(worker(session) for _ in range(min(cfg.concurrency, len(urls)))))
    finally:
        if own_executor is not None:
            own_executor.shutdown(wait=True)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def fetch_shard(urls: list[str], cfg: DownloadConfig) -> list[FetchResult]:
    """Synchronous ``fetch_many`` on a fresh event loop: what a process-pool worker calls."""
    return asyncio.run(fetch_many(list(urls), cfg))
