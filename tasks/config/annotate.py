"""The model stages' sections: OWLv2 boxes and VQA generation (its backends and managed servers)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from storage.tables import CAPTIONERS
from tasks.config.base import Section
from tasks.config.ray import ActorPoolConfig


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


class RayServerPlacementConfig(Section):
    """Where ``placement: ray`` puts the servers: Ray actors pinned to the cluster's nodes, one per server."""

    num_gpus_per_server: float = Field(
        default=1.0, ge=0,
        description="GPUs each server's actor reserves; the server sees them as CUDA_VISIBLE_DEVICES (and {gpus}). "
        "0: a CPU server (tests, the CPU build of vLLM).",
    )
    num_cpus_per_server: float = Field(default=1.0, gt=0, description="CPUs each server's actor reserves.")
    servers_per_node: int | None = Field(
        default=None, ge=1,
        description="Servers on each chosen node; None: the node's GPUs // num_gpus_per_server (one per GPU).",
    )
    node_resource: str | None = Field(
        default=None,
        description="Only nodes that have this Ray resource (a custom `--resources='{\"vllm\": 1}'` of `ray start`, "
        "or e.g. `accelerator_type:H200`); None: every alive node with enough GPUs.",
    )

    @model_validator(mode="after")
    def _count_needs_gpus_or_a_number(self) -> RayServerPlacementConfig:
        if self.num_gpus_per_server == 0 and self.servers_per_node is None:
            raise ValueError("num_gpus_per_server: 0 (CPU servers) needs servers_per_node (how many per node)")
        return self


class ManagedServerConfig(Section):
    """An OpenAI-compatible server the vqa stage starts and stops itself (e.g. ``vllm serve``)."""

    command: str = Field(
        description="Command line; {model}, {host}, {port}, {index} (server number) and, with placement: ray, "
        "{gpus} (the actor's GPU ids) are filled in.",
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
    log_dir: str | None = Field(
        default=None, description="Directory for server logs, on the node that runs the server (default: its temp dir)."
    )
    placement: Literal["local", "ray"] = Field(
        default="local",
        description="local: num_servers processes on the flow's machine; ray: one Ray actor per server on the "
        "cluster's nodes (`ray` says which and how many), each binding its node's address.",
    )
    ray: RayServerPlacementConfig = RayServerPlacementConfig()

    @model_validator(mode="after")
    def _placement_fields(self) -> ManagedServerConfig:
        if self.placement == "ray":
            wrong = {"num_servers": "the servers per node come from vqa.openai.server.ray (servers_per_node, "
                                    "num_gpus_per_server)",
                     "host": "each server binds its node's address"}
            for name, why in wrong.items():
                # Set to something else than its default: a dumped config (model_dump, e.g. the train
                # loop's config on the Ray workers) carries the defaults and must validate again.
                if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"{name} is for placement: local; with placement: ray {why}")
            if "CUDA_VISIBLE_DEVICES" in self.env:
                raise ValueError("env.CUDA_VISIBLE_DEVICES: with placement: ray each server sees the GPUs Ray "
                                 "assigned to its actor (use {gpus} in the command if it needs them)")
        return self


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
    reprobe_s: float = Field(
        default=10.0, gt=0,
        description="A server that refused or dropped a connection and then failed GET /health is marked down: "
        "no requests go to it (they are sent to the others) until a /health probe, this often, answers again.",
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
                "servers do the GPU work (run more of them: vqa.openai.server.num_servers, base_urls, or "
                "vqa.openai.server.placement: ray for servers on every GPU node of the Ray cluster)"
            )
        return self
