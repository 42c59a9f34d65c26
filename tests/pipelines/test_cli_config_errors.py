"""Issue #13 item 4: every bad config is one clear line and exit code 2, before Prefect starts, writing nothing.

Each case runs the real ``goldiclip`` command in a subprocess with its own dataset root
and its own ``PREFECT_HOME``; neither may exist afterwards. The cases run a few at a time.
"""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GOLDICLIP = Path(sys.executable).parent / "goldiclip"
GOOD_LIST = "a photo\thttp://img.example/1.jpg\n"
DREAMLIP_HEADER = "Image Path,raw_caption,shortIB_captions,longIB_captions,shortSV_captions,longSV_captions," \
                  "shortLLA_captions,longLLA_captions\n"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Case:
    """``files`` are written in the case's directory ({dir} in any text is that directory); ``config`` is
    dumped as YAML to ``config.yaml`` unless ``raw_config`` (bytes) is given."""

    args: list[str]
    expect: str
    config: dict | None = None
    raw_config: bytes | None = None
    files: dict[str, bytes] | None = None
    env: dict[str, str] | None = None


def _cfg(**sections) -> dict:
    return {"dataset": {"root": "{dir}/root"}, **sections}


def _list_source(path: str, fmt: str = "cc3m") -> dict:
    return {"sources": [{"name": "a", "format": fmt, "paths": [path]}]}


DOWNLOAD = ["download", "--config", "{dir}/config.yaml"]
CAPTIONS = ["captions", "--config", "{dir}/config.yaml"]
CLOSED_S3 = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_ACCESS_KEY_ID": "test",
             "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}

CASES: dict[str, Case] = {
    "missing_file": Case(["download", "--config", "{dir}/nope.yaml"], "config file not found: {dir}/nope.yaml"),
    "config_is_a_directory": Case(["download", "--config", "{dir}"], "config file {dir} is a directory"),
    "binary_config": Case(DOWNLOAD, "config file {dir}/config.yaml is not UTF-8 text (byte 0x89 at offset 0)",
                          raw_config=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    "bad_yaml": Case(DOWNLOAD, "is not valid YAML: line 3, column", raw_config=b"dataset:\n  root: x\n bad: [1\n"),
    "not_a_mapping": Case(DOWNLOAD, "must hold a mapping at the top level", raw_config=b"- dataset\n"),
    "empty_config": Case(DOWNLOAD, "dataset: Field required", raw_config=b""),
    "unknown_key": Case(DOWNLOAD, "download.shard_sise: unknown key", config=_cfg(download={"shard_sise": 10})),
    "wrong_type": Case(DOWNLOAD, "download.shard_size: Input should be a valid integer",
                       config=_cfg(download={"shard_size": "many"})),
    "sources_not_a_list": Case(DOWNLOAD, "sources: Input should be a valid list", config=_cfg(sources="urls.tsv")),
    "zero_size": Case(DOWNLOAD, "shards.shard_size: Input should be greater than or equal to 1 (got 0)",
                      config=_cfg(shards={"shard_size": 0})),
    "negative_size": Case(DOWNLOAD, "download.max_bytes: Input should be greater than or equal to 1024 (got -5)",
                          config=_cfg(download={"max_bytes": -5})),
    "negative_timeout": Case(DOWNLOAD, "download.timeout_s: Input should be greater than 0",
                             config=_cfg(download={"timeout_s": -1})),
    "empty_root": Case(DOWNLOAD, "dataset.root: String should have at least 1 character",
                       config={"dataset": {"root": ""}}),
    "empty_paths": Case(DOWNLOAD, "sources.0.paths: List should have at least 1 item",
                        config=_cfg(sources=[{"name": "a", "format": "cc3m", "paths": []}])),
    "empty_fields": Case(DOWNLOAD, "phrases.fields: List should have at least 1 item", config=_cfg(phrases={"fields": []})),
    "no_sources": Case(DOWNLOAD, "sources: empty; the download stage needs at least one URL list", config=_cfg()),
    "no_sources_whole_dag": Case(["run", "--config", "{dir}/config.yaml"], "sources: empty", config=_cfg()),
    "no_dreamlip_csvs": Case(CAPTIONS, "captions.dreamlip_csvs: empty", config=_cfg(**_list_source("{dir}/l.tsv")),
                             files={"l.tsv": GOOD_LIST.encode()}),
    "url_list_missing": Case(DOWNLOAD, "sources.0.paths.0: {dir}/lists/cc3m.tsv does not exist",
                             config=_cfg(**_list_source("{dir}/lists/cc3m.tsv"))),
    "url_list_is_a_directory": Case(DOWNLOAD, "sources.0.paths.0: {dir} is a directory, not a CC3M TSV",
                                    config=_cfg(**_list_source("{dir}"))),
    "url_list_empty": Case(DOWNLOAD, "sources.0.paths.0: {dir}/l.tsv is empty",
                           config=_cfg(**_list_source("{dir}/l.tsv")), files={"l.tsv": b""}),
    "url_list_not_gzip": Case(DOWNLOAD, "sources.0.paths.0: {dir}/l.tsv.gz cannot be read as a CC3M TSV: Not a gzipped",
                              config=_cfg(**_list_source("{dir}/l.tsv.gz")), files={"l.tsv.gz": GOOD_LIST.encode()}),
    "url_list_binary": Case(DOWNLOAD, "sources.0.paths.0: {dir}/l.tsv holds no URL in its first rows",
                            config=_cfg(**_list_source("{dir}/l.tsv")), files={"l.tsv": bytes(range(256)) * 64}),
    "url_list_wrong_format": Case(DOWNLOAD, "cannot be read as a YFCC15M list: no URL column among ['id', 'title']",
                                  config=_cfg(**_list_source("{dir}/y.csv", "yfcc15m")),
                                  files={"y.csv": b"id,title\n1,a cat\n"}),
    "dreamlip_csv_not_dreamlip": Case(CAPTIONS, "captions.dreamlip_csvs.0: {dir}/d.csv cannot be read as a DreamLIP CSV",
                                      config=_cfg(captions={"dreamlip_csvs": ["{dir}/d.csv"]}),
                                      files={"d.csv": b"url,caption\nhttp://img.example/1.jpg,a cat\n"}),
    "root_is_a_file": Case(DOWNLOAD, "dataset.root: {dir}/l.tsv is a file, not a directory",
                           config={"dataset": {"root": "{dir}/l.tsv"}, **_list_source("{dir}/l.tsv")},
                           files={"l.tsv": GOOD_LIST.encode()}),
    "unreachable_s3_root": Case(DOWNLOAD, "dataset.root: s3://goldiclip-test/open30m cannot be reached",
                                config={"dataset": {"root": "s3://goldiclip-test/open30m"}, **_list_source("{dir}/l.tsv")},
                                files={"l.tsv": GOOD_LIST.encode()}, env=CLOSED_S3),
    "unknown_stage": Case(["run", "--config", "{dir}/config.yaml", "--stages", "download,boxs"],
                          "--stages: unknown stage(s) ['boxs']", config=_cfg()),
    "bad_override": Case([*DOWNLOAD, "--set", "download.shard_size"], "must look like key.path=value", config=_cfg()),
    "config_and_preset": Case([*DOWNLOAD, "--preset", "demo"], "give exactly one of --config FILE or --preset NAME"),
}
if os.geteuid() != 0:  # root reads any file whatever its mode
    CASES["url_list_unreadable"] = Case(DOWNLOAD, "sources.0.paths.0: {dir}/l.tsv cannot be read",
                                        config=_cfg(**_list_source("{dir}/l.tsv")), files={"l.tsv": GOOD_LIST.encode()})


def _fill(value, directory: str):
    if isinstance(value, str):
        return value.replace("{dir}", directory)
    if isinstance(value, list):
        return [_fill(v, directory) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, directory) for k, v in value.items()}
    return value


def _run_case(name: str, case: Case, base: Path) -> dict:
    directory = base / name
    directory.mkdir()
    d = str(directory)
    for file, data in (case.files or {}).items():
        (directory / file).write_bytes(data)
    if name == "url_list_unreadable":
        (directory / "l.tsv").chmod(0)
    if case.raw_config is not None:
        (directory / "config.yaml").write_bytes(case.raw_config)
    elif case.config is not None:
        (directory / "config.yaml").write_text(yaml.safe_dump(_fill(case.config, d)))
    prefect_home = base / f"{name}-prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), **(case.env or {})}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([str(GOLDICLIP), *_fill(case.args, d)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "dir": d,
            "written": [p for p in (directory / "root", prefect_home) if p.exists()]}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case, run four at a time (each is a short Python start-up)."""
    base = tmp_path_factory.mktemp("cli-config-errors")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_case, name, case, base) for name, case in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_config_is_one_clear_line_and_exit_2(outcomes, name):
    out = outcomes[name]
    stderr = out["stderr"].strip()
    assert out["returncode"] == 2, out
    assert "Traceback" not in out["stderr"] + out["stdout"]
    assert stderr and "\n" not in stderr, stderr
    assert _fill(CASES[name].expect, out["dir"]) in stderr
    assert out["written"] == []  # no dataset root, and Prefect never started


def test_the_gzip_case_is_a_real_list_when_compressed(tmp_path):
    """The "not gzip" case fails on the compression, not the content: gzipped, the same list passes."""
    from tasks.preflight import check_list

    path = tmp_path / "l.tsv.gz"
    path.write_bytes(gzip.compress(GOOD_LIST.encode()))
    check_list("sources.0.paths.0", str(path), "cc3m")
