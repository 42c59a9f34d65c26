"""Boxes stage: OWLv2 boxes for each image's phrases -> ``annotations/boxes/{shard}.parquet``.

METHOD.md sec. 7: the phrases of an image are OWLv2's text queries (<= 16 tokens
each); keep the best box per phrase with score >= 0.1 and flag images with any
box above 0.3 (the OWLv2 paper's filter). Boxes feed the REF and GRD decoder
tasks (sec. 5) in pixel coordinates of the image stored in ``images/{shard}.tar``.

Three things differ from a plain ``processor(...)`` + ``post_process_object_detection``:
- *Preprocessing* runs in background threads (decode, resize keeping the ratio so
  the long side is the model's input size) on uint8, and the model's device pads
  to the square and normalises. OWLv2's processor pads to a square first and
  resizes after; resizing first and padding with the same zeros is the same
  geometry (checked against the processor in tests) without a float image on
  the CPU per sample, and the reference processor's scipy resize is far too slow
  to feed a GPU.
- *Padded queries*: a batch holds the same number of queries per image, so
  images with fewer phrases get dummy queries whose ids are all 0; OWLv2 treats a
  query whose first id is 0 as padding (its logits are set to the dtype minimum),
  and the results only ever read the real ones.
- *Best box per phrase*: ``post_process_object_detection`` gives each predicted box
  only its top-scoring query, so a phrase whose best box is another phrase's
  best box would lose it ("a dog" vs "a brown dog"); here each query takes the
  arg-max over all boxes instead.
Coordinates: OWLv2 predicts boxes relative to the padded square, so they scale by
max(w, h) and are clipped to the real w x h.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from storage import StageRecords, iter_shard, read_table, write_table
from tasks.config import BoxesConfig
from tasks.devices import resolve_device, resolve_dtype
from tasks.stage import ShardOutcome, Stage

log = logging.getLogger(__name__)


@dataclass
class DecodedImage:
    key: str
    width: int  # of the stored image: boxes are in its pixels
    height: int
    pixels: torch.Tensor  # (3, h, w) uint8, long side = the model's input size
    queries: list[str] = field(default_factory=list)


@dataclass
class Batch:
    images: list[DecodedImage]
    pixels_BCSS: torch.Tensor  # uint8, zero-padded to the square at the bottom/right


def decode_image(key: str, jpg: bytes, queries: list[str], size: int) -> DecodedImage:
    """JPEG bytes -> RGB resized so the long side is ``size`` (PIL releases the GIL here)."""
    with Image.open(io.BytesIO(jpg)) as img:
        img = img.convert("RGB")
        width, height = img.size
        scale = size / max(width, height)
        resized = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)
    return DecodedImage(key, width, height, pixels, queries)


def collate(images: list[DecodedImage], size: int, pin: bool) -> Batch:
    pixels = torch.zeros((len(images), 3, size, size), dtype=torch.uint8, pin_memory=pin)
    for i, im in enumerate(images):
        _, h, w = im.pixels.shape
        pixels[i, :, :h, :w] = im.pixels
    return Batch(images, pixels)


class BatchLoader:
    """Decode and batch images in background threads while the model works on earlier batches.

    ``samples`` yields ``(key, jpg_bytes, queries)``; decode failures are counted in
    ``failures["decode_error"]`` and skipped. Batches keep the input order.
    """

    _DONE = object()

    def __init__(self, samples: Iterable[tuple[str, bytes, list[str]]], *, size: int, batch_size: int,
                 threads: int, prefetch: int, pin_memory: bool = False):
        self.samples = samples
        self.size = size
        self.batch_size = batch_size
        self.threads = threads
        self.pin_memory = pin_memory
        self.failures: Counter = Counter()
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="boxes-loader", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="boxes-decode") as pool:
                pending: deque[Future] = deque()
                ready: list[DecodedImage] = []

                def drain_one() -> bool:
                    try:
                        ready.append(pending.popleft().result())
                    except Exception as e:  # a bad JPEG is data, not a bug
                        log.debug("decode failed: %s", e)
                        self.failures["decode_error"] += 1
                    if len(ready) == self.batch_size:
                        batch = collate(ready[:], self.size, self.pin_memory)
                        ready.clear()
                        return self._put(batch)
                    return True

                for key, jpg, queries in self.samples:
                    if self._stop.is_set():
                        return
                    pending.append(pool.submit(decode_image, key, jpg, queries, self.size))
                    if len(pending) >= 2 * max(self.threads, self.batch_size) and not drain_one():
                        return
                while pending:
                    if not drain_one():
                        return
                if ready:
                    self._put(collate(ready, self.size, self.pin_memory))
            self._put(self._DONE)
        except BaseException as e:  # reading the tar failed: hand it to the consumer
            self._put(e)

    def __iter__(self) -> Iterator[Batch]:
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            self._thread.join()


class OwlDetector:
    """OWLv2 from a Hugging Face id or directory; boxes per query for batches of images."""

    def __init__(self, cfg: BoxesConfig):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.processor = Owlv2Processor.from_pretrained(cfg.model)
        self.model = Owlv2ForObjectDetection.from_pretrained(cfg.model, dtype=self.dtype).to(self.device).eval()
        ip = self.processor.image_processor
        self.size = int(ip.size["height"])
        if ip.size["width"] != self.size:
            raise ValueError(f"{cfg.model}: expected a square input size, got {ip.size}")
        self.mean = torch.tensor(ip.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, device=self.device).view(1, 3, 1, 1)
        self.query_tokens = min(cfg.max_query_tokens, self.model.config.text_config.max_position_embeddings)

    def normalize(self, pixels_BCSS: torch.Tensor) -> torch.Tensor:
        x = pixels_BCSS.to(self.device, non_blocking=True).float() / 255.0
        return ((x - self.mean) / self.std).to(self.dtype)

    def tokenize_queries(self, queries: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries per image -> ids and mask (B*Q, T) and which slots are real (B, Q)."""
        num_queries = max(len(q) for q in queries)
        flat = [text for q in queries for text in q + [""] * (num_queries - len(q))]
        enc = self.processor.tokenizer(flat, padding="max_length", truncation=True, max_length=self.query_tokens,
                                       return_tensors="pt")
        valid_BQ = torch.tensor([[i < len(q) for i in range(num_queries)] for q in queries])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        pad = ~valid_BQ.flatten()
        ids[pad] = 0  # first id 0: OWLv2's own marker of a padded query
        mask[pad] = 0
        mask[pad, 0] = 1  # keep one attended position so attention never sees an all-masked row
        return ids, mask, valid_BQ

    @torch.inference_mode()
    def predict(self, batch: Batch) -> tuple[list[list[float]], list[list[list[float]]]]:
        """Score and box (x0, y0, x1, y1 in stored-image pixels) of each query's best box, real queries only."""
        ids, mask, valid_BQ = self.tokenize_queries([im.queries for im in batch.images])
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         pixel_values=self.normalize(batch.pixels_BCSS))
        probs_BPQ = out.logits.float().sigmoid()
        scores_BQ, best_BQ = probs_BPQ.max(dim=1)  # best box of each query over all P boxes
        boxes_BQ4 = torch.gather(out.pred_boxes.float(), 1, best_BQ.unsqueeze(-1).expand(-1, -1, 4))
        cx, cy, w, h = boxes_BQ4.unbind(-1)
        corners_BQ4 = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        sizes = torch.tensor([[im.width, im.height] for im in batch.images], dtype=torch.float32)
        side_B = sizes.max(dim=1).values.to(self.device)
        corners_BQ4 = corners_BQ4 * side_B.view(-1, 1, 1)  # relative to the padded square -> pixels
        limits_B14 = sizes.repeat(1, 2).to(self.device).unsqueeze(1)  # (w, h, w, h)
        corners_BQ4 = torch.minimum(corners_BQ4.clamp(min=0), limits_B14)
        scores, corners = scores_BQ.cpu().tolist(), corners_BQ4.cpu().tolist()
        n = [len(im.queries) for im in batch.images]
        assert all(valid_BQ[b, : n[b]].all() for b in range(len(n)))
        return [s[: n[b]] for b, s in enumerate(scores)], [c[: n[b]] for b, c in enumerate(corners)]

    def detect(self, batch: Batch) -> list[list[dict]]:
        """Boxes to keep per image: each phrase's best box if it scores >= the threshold.

        A box that lies wholly in the padding (zero area once clipped) is dropped.
        """
        results = []
        for im, scores, corners in zip(batch.images, *self.predict(batch)):
            results.append([
                {"phrase": phrase, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "score": score}
                for phrase, score, (x0, y0, x1, y1) in zip(im.queries, scores, corners)
                if score >= self.cfg.score_threshold and x1 > x0 and y1 > y0
            ])
        return results


def image_queries(phrases: list[dict], max_queries: int) -> list[str]:
    """An image's phrases as OWLv2 queries: distinct texts in table order, at most ``max_queries``."""
    seen, out = set(), []
    for p in phrases:
        text = " ".join(p["text"].split())
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out[:max_queries]


def detect_shard(detector: OwlDetector, tar_url: str, phrases_by_key: dict[str, list[str]],
                 cfg: BoxesConfig) -> tuple[list[dict], Counter, Counter]:
    """Rows of the boxes table for one images tar, with counts and failures by reason."""
    counts: Counter = Counter()
    failures: Counter = Counter()

    def samples():
        for sample in iter_shard(tar_url, decode_json=False):
            counts["images"] += 1
            queries = phrases_by_key.get(sample["__key__"])
            if not queries:
                failures["no_phrases"] += 1
            elif "jpg" not in sample:
                failures["decode_error"] += 1
            else:
                yield sample["__key__"], sample["jpg"], queries

    loader = BatchLoader(samples(), size=detector.size, batch_size=cfg.batch_size, threads=cfg.loader_threads,
                         prefetch=cfg.prefetch_batches, pin_memory=detector.device.type == "cuda")
    rows = []
    for batch in loader:
        for im, boxes in zip(batch.images, detector.detect(batch)):
            confident = any(b["score"] > cfg.confident_score for b in boxes)
            rows.append({"key": im.key, "width": im.width, "height": im.height, "boxes": boxes,
                         "has_confident_box": confident})
            counts["with_boxes"] += bool(boxes)
            counts["boxes"] += len(boxes)
            counts["confident"] += confident
    failures.update(loader.failures)
    return rows, counts, failures


class BoxesStage(Stage):
    name = "boxes"
    task_name = "detect_boxes"
    throughput_count = "images"
    upstream = ("download", "phrases")
    reads = {"download": ("tar",)}  # the images; their keys come with the phrases

    def output_files(self, shard: str) -> dict[str, str]:
        return {"table": self.layout.annotation("boxes", shard)}

    def __init__(self, config):
        super().__init__(config)
        self._detector: OwlDetector | None = None
        self._lock = threading.Lock()

    @property
    def section(self) -> BoxesConfig:
        return self.config.boxes

    @property
    def detector(self) -> OwlDetector:
        """Loaded once per stage object; shards in flight share it."""
        with self._lock:
            if self._detector is None:
                self._detector = OwlDetector(self.section)
                log.info("boxes: %s on %s (%s)", self.section.model, self._detector.device, self._detector.dtype)
            return self._detector

    def list_shards(self) -> list[str]:
        return [r.shard for r in StageRecords(self.layout, "phrases").all() if r.done]

    def process(self, shard: str) -> ShardOutcome:
        table = read_table(self.layout.annotation("phrases", shard)).to_pylist()
        phrases_by_key = {r["key"]: image_queries(r["phrases"] or [], self.section.max_queries) for r in table}
        rows, counts, failures = detect_shard(self.detector, self.layout.images_tar(shard), phrases_by_key,
                                              self.section)
        write_table(self.layout.annotation("boxes", shard), rows, "boxes")
        return ShardOutcome(counts, failures)

    def summary_extra(self) -> dict:
        d = self._detector
        return {"model": self.section.model, **({"device": str(d.device), "dtype": str(d.dtype)} if d else {})}
