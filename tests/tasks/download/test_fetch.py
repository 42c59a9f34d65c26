"""The download stage's fetch layer against a real loopback server: every bad input of issue 2."""

from __future__ import annotations

import asyncio
import hashlib
import io
import pickle
import socket
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
from PIL import Image
from yarl import URL

from tasks.config import DownloadConfig
from tasks.download import fetch
from tasks.download.fetch import fetch_image, fetch_many, fetch_shard, open_session
from tasks.demo.http_server import LoopbackServer, Reply, closed_port, image_bytes, redirect

# Tests reach 127.0.0.1, so the private-address switch is on except where it is the subject.
CFG = DownloadConfig(timeout_s=0.5, retries=2, backoff_s=0.01, allow_private_addresses=True, max_bytes=200_000)

JPEG_640x480 = image_bytes(640, 480)


@pytest.fixture(scope="module")
def server():
    with LoopbackServer() as s:
        yield s


def check_url_allowed(url: str, allow_private: bool) -> str | None:
    """The fetch path's address rule as one blocking check (it resolves the host), to test the rule alone.

    The fetch path applies it without blocking, through ``GuardedResolver``, on the very
    addresses it connects to.
    """
    problem = fetch._static_url_problem(url, allow_private)
    if problem is not None or allow_private:
        return problem
    parsed = URL(url)
    try:
        infos = socket.getaddrinfo(parsed.raw_host, parsed.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return "dns_error"
    if not all(fetch._address_allowed(info[4][0]) for info in infos):
        return "private_address"
    return None


def fetch_one(url: str, cfg: DownloadConfig = CFG) -> fetch.FetchResult:
    async def run():
        async with open_session(cfg) as session:
            return await fetch_image(session, url, cfg)

    return asyncio.run(run())


def decoded(result: fetch.FetchResult) -> Image.Image:
    img = Image.open(io.BytesIO(result.jpeg))
    img.load()
    return img


# ------------------------------------------------------------------------ good images


def test_ok_image_is_resized_keeping_aspect_and_hashed(server):
    result = fetch_one(server.route("/ok.jpg", Reply(body=JPEG_640x480)))
    assert (result.status, result.error, result.http_status, result.attempts) == ("ok", None, 200, 1)
    assert (result.orig_width, result.orig_height) == (640, 480)
    assert (result.width, result.height) == (341, 256)
    img = decoded(result)
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (341, 256))
    assert result.sha256 == hashlib.sha256(result.jpeg).hexdigest()
    assert result.bytes_downloaded == len(JPEG_640x480)


def test_redirect_is_followed(server):
    server.route("/target.png", Reply(body=image_bytes(300, 900, "PNG"), content_type="image/png"))
    result = fetch_one(server.route("/moved", redirect("/target.png", status=301)))
    assert result.status == "ok"
    assert (result.width, result.height) == (256, 768)


# ------------------------------------------------------------------------- bad inputs


def test_404_fails_without_retry(server):
    result = fetch_one(server.url("/does-not-exist"))
    assert (result.status, result.error, result.http_status, result.attempts) == ("failed", "http_404", 404, 1)


def test_403_is_not_retried_but_429_is(server):
    forbidden = fetch_one(server.route("/forbidden", Reply(status=403, content_type="text/plain")))
    assert (forbidden.error, forbidden.attempts) == ("http_403", 1)
    throttled = fetch_one(server.route("/throttled.jpg", Reply(body=JPEG_640x480, fail_first=1, fail_status=429)))
    assert (throttled.status, throttled.attempts) == ("ok", 2)


def test_500_then_success_is_retried(server):
    result = fetch_one(server.route("/flaky.jpg", Reply(body=JPEG_640x480, fail_first=1)))
    assert (result.status, result.attempts, result.http_status) == ("ok", 2, 200)
    assert server.hits["/flaky.jpg"] == 2


def test_500_forever_gives_up_after_retries(server):
    result = fetch_one(server.route("/broken", Reply(fail_first=10**9)))
    assert (result.status, result.error, result.http_status) == ("failed", "http_500", 500)
    assert result.attempts == CFG.retries + 1


def test_connection_refused(server):
    result = fetch_one(f"http://127.0.0.1:{closed_port()}/x.jpg")
    assert (result.status, result.error, result.attempts) == ("failed", "connection_error", CFG.retries + 1)


def test_server_stalling_past_the_timeout(server):
    cfg = DownloadConfig(timeout_s=0.3, retries=0, allow_private_addresses=True)
    start = time.perf_counter()
    before_headers = fetch_one(server.route("/stall", Reply(body=JPEG_640x480, delay_s=5)), cfg)
    mid_body = fetch_one(server.route("/stall-body", Reply(body=JPEG_640x480, stall_body_s=5)), cfg)
    assert (before_headers.error, mid_body.error) == ("timeout", "timeout")
    assert time.perf_counter() - start < 2


def test_redirect_loop(server):
    result = fetch_one(server.route("/loop", redirect("/loop")))
    assert (result.status, result.error) == ("failed", "too_many_redirects")
    assert server.hits["/loop"] == CFG.max_redirects + 1


def test_html_served_as_jpeg(server):
    result = fetch_one(server.route("/page.jpg", Reply(body=b"<!doctype html><html><body>hi</body></html>")))
    assert (result.status, result.error, result.http_status) == ("failed", "not_an_image", 200)


def test_truncated_jpeg(server):
    result = fetch_one(server.route("/truncated.jpg", Reply(body=JPEG_640x480[: len(JPEG_640x480) // 2])))
    assert (result.status, result.error) == ("failed", "decode_error")


def test_one_pixel_image(server):
    result = fetch_one(server.route("/pixel.gif", Reply(body=image_bytes(1, 1, "GIF"), content_type="image/gif")))
    assert (result.status, result.error) == ("failed", "image_too_small")


def test_image_over_the_size_cap(server):
    big = image_bytes(1500, 1500, quality=100)
    assert len(big) > CFG.max_bytes
    declared = fetch_one(server.route("/big.jpg", Reply(body=big)))
    assert (declared.error, declared.bytes_downloaded) == ("too_large", 0)  # refused on Content-Length
    endless = big * 30  # no Content-Length, and far more than one read
    streamed = fetch_one(server.route("/big-chunked.jpg", Reply(body=endless, chunked=True)))
    assert streamed.error == "too_large"
    assert CFG.max_bytes < streamed.bytes_downloaded < len(endless) // 2  # stopped while streaming


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "data:image/png;base64,AAAA", "gopher://x/"])
def test_non_http_schemes_are_refused(url):
    result = fetch_one(url)
    assert (result.status, result.error, result.attempts) == ("failed", "bad_scheme", 0)
    assert check_url_allowed(url, True) == "bad_scheme"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/a.jpg",
        "http://192.168.0.10/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.jpg",
        "http://[::ffff:10.0.0.1]/a.jpg",
        "http://100.64.0.1/a.jpg",
        "http://0.0.0.0/a.jpg",
    ],
)
def test_private_and_link_local_addresses_are_refused_without_connecting(url):
    cfg = DownloadConfig(timeout_s=0.5)
    start = time.perf_counter()
    result = fetch_one(url, cfg)
    assert (result.status, result.error, result.attempts) == ("failed", "private_address", 0)
    assert time.perf_counter() - start < 0.2
    assert check_url_allowed(url, False) == "private_address"


def test_loopback_is_refused_with_the_switch_off(server):
    cfg = DownloadConfig(timeout_s=0.5)
    url = server.route("/secret.jpg", Reply(body=JPEG_640x480))
    by_name = f"http://localhost:{server.port}/secret.jpg"  # refused by the resolver, not the URL
    results = asyncio.run(fetch_many([url, by_name], cfg))
    assert [(r.error, r.attempts) for r in results] == [("private_address", 0), ("private_address", 1)]
    assert server.hits["/secret.jpg"] == 0
    assert check_url_allowed(by_name, False) == "private_address"
    assert check_url_allowed(url, True) is None


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1"])
def test_legacy_loopback_spellings_are_refused(server, host):
    url = f"http://{host}:{server.port}/secret-legacy.jpg"
    server.route("/secret-legacy.jpg", Reply(body=JPEG_640x480))
    result = fetch_one(url, DownloadConfig(timeout_s=0.5))
    assert result.error in ("bad_url", "private_address")
    assert server.hits["/secret-legacy.jpg"] == 0


def test_redirect_to_a_private_address_is_refused(server, monkeypatch):
    # Let only this server's loopback address through, so the rule applies to the hop.
    monkeypatch.setattr(fetch, "_address_allowed", lambda address: address == "127.0.0.1")
    cfg = DownloadConfig(timeout_s=0.5)
    hop = fetch_one(server.route("/to-metadata", redirect("http://169.254.169.254/latest/meta-data/")), cfg)
    assert (hop.error, hop.attempts) == ("private_address", 1)
    scheme = fetch_one(server.route("/to-file", redirect("file:///etc/passwd")), cfg)
    assert scheme.error == "bad_scheme"


def test_public_addresses_pass_the_rule():
    assert check_url_allowed("https://93.184.215.14/a.jpg", False) is None
    assert check_url_allowed("http://[2606:4700::1111]/a.jpg", False) is None
    assert check_url_allowed("http:///no-host", False) == "bad_url"


# ------------------------------------------------------------------------------ batch


def test_mixed_batch_accounts_for_every_url(server):
    routes = {
        "/b-ok.jpg": Reply(body=JPEG_640x480),
        "/b-flaky.jpg": Reply(body=JPEG_640x480, fail_first=1),
        "/b-stall": Reply(body=JPEG_640x480, delay_s=5),
        "/b-loop": redirect("/b-loop"),
        "/b-html.jpg": Reply(body=b"<html></html>"),
        "/b-truncated.jpg": Reply(body=JPEG_640x480[:2000]),
        "/b-pixel.png": Reply(body=image_bytes(1, 1, "PNG")),
        "/b-big.jpg": Reply(body=b"\xff" * (CFG.max_bytes + 1), chunked=True),
    }
    urls = [server.route(path, reply) for path, reply in routes.items()] + [
        server.url("/b-missing"),
        f"http://127.0.0.1:{closed_port()}/refused.jpg",
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "not a url at all",
    ]
    urls = urls + urls[:1]  # a duplicate URL is fetched twice; deduplication is the reader's job
    cfg = DownloadConfig(timeout_s=0.5, retries=1, backoff_s=0.01, allow_private_addresses=True, max_bytes=CFG.max_bytes, concurrency=4)
    seen: list[int] = []
    results = asyncio.run(fetch_many(urls, cfg, on_result=lambda i, r: seen.append(i)))
    assert [r.url for r in results] == urls
    assert sorted(seen) == list(range(len(urls)))
    errors = [r.error for r in results]
    assert errors == [
        None, None, "timeout", "too_many_redirects", "not_an_image", "decode_error", "image_too_small", "too_large",
        "http_404", "connection_error", "bad_scheme", "bad_scheme", "bad_scheme", None,
    ]
    assert all((r.status == "ok") == (r.error is None) for r in results)


def test_fetch_shard_runs_in_a_process_pool(server):
    cfg = CFG
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    url = server.route("/pool.jpg", Reply(body=JPEG_640x480))
    with ProcessPoolExecutor(max_workers=1) as pool:
        results = pool.submit(fetch_shard, [url, server.url("/pool-missing")], cfg).result(timeout=30)
    assert [r.status for r in results] == ["ok", "failed"]
    assert results[0].sha256 == hashlib.sha256(results[0].jpeg).hexdigest()


# ------------------------------------------------------------------------- issue 13


def _http_date(seconds_from_now: float) -> str:
    from email.utils import formatdate

    return formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(("status", "retry_after"), [(429, "1"), (503, "date")])
def test_retry_after_is_honoured_in_seconds_or_as_an_http_date(server, status, retry_after):
    header = _http_date(2) if retry_after == "date" else retry_after  # a date has 1 s resolution: ~1-2 s
    path = f"/retry-after-{status}.jpg"
    url = server.route(path, Reply(body=JPEG_640x480, fail_first=1, fail_status=status,
                                   fail_headers={"Retry-After": header}))
    start = time.perf_counter()
    result = fetch_one(url)  # backoff_s is 0.01: only the header can make it wait
    assert 0.9 < time.perf_counter() - start < 5
    assert (result.status, result.attempts, result.retry_after) == ("ok", 2, 1)


def test_retry_after_is_capped_by_config(server):
    url = server.route("/retry-after-long.jpg", Reply(body=JPEG_640x480, fail_first=1, fail_status=429,
                                                      fail_headers={"Retry-After": "3600"}))
    cfg = DownloadConfig(timeout_s=0.5, retries=2, backoff_s=0.01, allow_private_addresses=True, max_retry_after_s=0.5)
    start = time.perf_counter()
    result = fetch_one(url, cfg)
    assert 0.4 < time.perf_counter() - start < 3
    assert (result.status, result.attempts, result.retry_after) == ("ok", 2, 1)


def test_oversized_response_header_is_a_bad_response_without_an_invented_status(server):
    url = server.route("/big-header.jpg", Reply(body=JPEG_640x480, headers={"X-Padding": "x" * 20_000}))
    result = fetch_one(url)
    assert (result.status, result.error, result.http_status, result.attempts) == ("failed", "bad_response", None, 1)


def test_url_with_a_raw_space_is_fetched_quoted(server):
    server.route("/with space.jpg", Reply(body=JPEG_640x480))
    result = fetch_one(server.url("/with space.jpg"))
    assert (result.status, result.url) == ("ok", server.url("/with space.jpg"))
    assert server.hits["/with space.jpg"] == 1
