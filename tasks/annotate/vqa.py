"""VQA stage: question-answer pairs from the ShareGPT4V short caption -> ``annotations/vqa/{shard}.parquet``.

METHOD.md sec. 7 (and sec. 5, the VQA decoder task): Phi-3.5-mini-instruct,
served by vLLM, answers the paper's prompt with 3-5 short pairs per image.
Every image with a caption gets a row: its valid pairs, the raw model output
(kept so a parser change never needs the model again) and an error code when it
has no pairs (``no_short_caption``, ``request_failed``, ``unparseable``,
``no_valid_pairs``). Backends and the shard-failure rule are in
``tasks/annotate/vqa_backends.py``; the prompt and parser in ``tasks/annotate/vqa_parse.py``.

With a managed server (``vqa.openai.server``) the servers live as long as
``VqaStage.serving()``: the flow wraps the whole stage in it, so they start once,
serve every shard, and are stopped even when the stage fails. With
``vqa.openai.server.placement: ray`` they are Ray actors' servers on the cluster's
nodes (``tasks/annotate/vqa_servers.py``); a dead one's requests go to the others.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

from storage import StageRecords, read_table, write_table
from storage.tables import CAPTIONERS
from tasks.config import VqaConfig
from tasks.stage import ShardOutcome, Stage
from tasks.annotate.vqa_backends import Completion, ManagedServers, OpenAIBackend, TransformersBackend
from tasks.annotate.vqa_servers import RayServers
from tasks.annotate.vqa_parse import build_messages, parse_qa


class VqaStage(Stage):
    name = "vqa"
    task_name = "generate_qa"
    throughput_count = "images"
    upstream = ("captions",)

    def output_files(self, shard: str) -> dict[str, str]:
        return {"table": self.layout.annotation("vqa", shard)}

    def __init__(self, config):
        super().__init__(config)
        self.servers: ManagedServers | RayServers | None = None
        self._backend = None
        self._lock = threading.Lock()

    @property
    def section(self) -> VqaConfig:
        return self.config.vqa

    @property
    def managed(self) -> bool:
        return self.section.backend == "openai" and self.section.openai.server is not None

    @contextlib.contextmanager
    def serving(self) -> Iterator[VqaStage]:
        """Run the stage inside this: it starts (and always stops) the managed server(s), if configured."""
        if not self.managed:
            yield self
            return
        server = self.section.openai.server
        servers = (RayServers(server, self.section.model, self.config.ray) if server.placement == "ray"
                   else ManagedServers(server, self.section.model))
        with servers:
            self.servers = servers
            try:
                yield self
            finally:
                self.servers = None
                self._backend = None

    @property
    def backend(self) -> OpenAIBackend | TransformersBackend:
        with self._lock:
            if self._backend is None:
                cfg = self.section
                if cfg.backend == "transformers":
                    self._backend = TransformersBackend(cfg)
                elif self.managed:
                    if self.servers is None:
                        raise RuntimeError("vqa.openai.server is set: run the stage inside `VqaStage.serving()` "
                                           "(the vqa flow does), which starts and stops the server")
                    self._backend = OpenAIBackend(cfg, self.servers.base_urls, self.servers.dead)
                else:
                    self._backend = OpenAIBackend(cfg, cfg.openai.base_urls)
            return self._backend

    def list_shards(self) -> list[str]:
        return [r.shard for r in StageRecords(self.layout, "captions").all() if r.done]

    def process(self, shard: str) -> ShardOutcome:
        cfg = self.section
        captions = read_table(self.layout.annotation("captions", shard), columns=["key", "short"]).to_pylist()
        which = CAPTIONERS.index(cfg.captioner)
        counts: Counter = Counter(images=len(captions))
        failures: Counter = Counter()
        rows: dict[str, dict] = {}
        todo: list[tuple[str, str]] = []
        for r in captions:
            short = r["short"] or []
            caption = (short[which] if which < len(short) else None) or ""
            if caption.strip():
                todo.append((r["key"], caption))
            else:
                failures["no_short_caption"] += 1
                rows[r["key"]] = {"key": r["key"], "qa": [], "raw_output": None, "error": "no_short_caption"}

        completions: list[Completion] = self.backend.complete([build_messages(c) for _, c in todo]) if todo else []
        for (key, _), done in zip(todo, completions, strict=True):
            counts["generated_tokens"] += done.completion_tokens
            counts["truncated"] += done.finish_reason == "length"
            if done.error:
                failures[done.error] += 1
                rows[key] = {"key": key, "qa": [], "raw_output": None, "error": f"{done.error}: {done.detail}"}
                continue
            parsed = parse_qa(done.text, max_pairs=cfg.max_pairs, max_question_chars=cfg.max_question_chars,
                              max_answer_chars=cfg.max_answer_chars)
            counts["dropped_pairs"] += sum(parsed.dropped.values())
            if parsed.error:
                failures[parsed.error] += 1
            else:
                counts["answered"] += 1
                counts["pairs"] += len(parsed.pairs)
            rows[key] = {"key": key, "qa": parsed.pairs, "raw_output": done.text, "error": parsed.error}
        write_table(self.layout.annotation("vqa", shard), [rows[r["key"]] for r in captions], "vqa")
        return ShardOutcome(counts, failures)

    def summary_extra(self) -> dict:
        cfg = self.section
        if cfg.backend == "transformers":
            return {"model": cfg.model, "backend": "transformers (in-process)"}
        if not self.managed:
            servers = cfg.openai.base_urls
        else:
            servers = "managed on ray" if cfg.openai.server.placement == "ray" else "managed"
        extra = {"model": cfg.model, "backend": "openai", "servers": servers}
        if isinstance(self.servers, RayServers):  # where each server ran and what it answered this run
            stats = self._backend.stats if isinstance(self._backend, OpenAIBackend) else {}
            extra["server_nodes"] = [{"url": s["url"], "node_id": s["node_id"], "host": s["host"],
                                      "answered": stats.get(s["url"].rstrip("/"), {}).get("answered", 0)}
                                     for s in self.servers.servers]
        return extra
