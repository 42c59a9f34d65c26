"""The training data loader: `train/*.tar` -> the batch `GoldiCLIP.forward` takes (model/goldiclip.py).

A webdataset pipeline in open_clip's order, one stream per (Ray worker, DataLoader process):

    shard list -> resampled shards (or shuffle + split_by_node + split_by_worker)
      -> tar to samples (errors counted, not fatal) -> shuffle buffer -> decode + per-sample
      transform (views, captions, decoder annotations) -> batch -> collate (tokenise)

Per sample (METHOD.md sec. 4, 5, 7):
- `images`: the L_ret view, a random resized crop (area in `retrieval_crop_scale`, no flip:
  captions say left and right) at the preset's image size; decoder boxes are mapped into it.
- `global_views` / `local_views`: DINO multi-crop (tasks/train/augment.py), only when distillation is on;
  colour jitter and grayscale with the probabilities `view_color_jitter` and `view_grayscale`.
- every view leaves as uint8 pixels; the model normalises them on its device with its own
  mean/std (`VisionTower.normalize`), a quarter of the bytes and none of the float work here.
- K captions by FLAIR diverse sampling (`diverse_captions`) over the sentences of all seven
  DreamLIP fields.
- decoder annotations for CAP/REF/GRD/VQA; `model.tasks.build_decoder_batch` turns them into
  one sample per task the image has data for.

A corrupt sample (bad JPEG or JSON, a truncated tar) is skipped and counted by reason; each
batch carries the counts its process saw since its previous batch (`BatchStats`).

Determinism and resume: every random choice comes from one `random.Random` per stream,
seeded by (seed, start_step, rank, loader process). A run that resumes at step s builds the
loader with start_step = s: a fresh, deterministic stream over resampled shards, so the data
position (steps and samples consumed) is restored exactly and the sample order continues
statistically, not sample for sample (open_clip's approach for resampled shards).
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from model.config import GoldiCLIPConfig
from model.tasks import IGNORE_INDEX, build_decoder_batch
from model.tokenizer import tokenize
from storage.fs import open_fs
from storage.tables import CAPTIONERS
from tasks.train.augment import crop_and_resize, dino_recipes, dino_view, map_box, random_resized_crop_box, to_pixels
from tasks.config import TrainConfig

# With static shapes, decoder sequences are padded to a multiple of this: a few shapes in a run,
# so a few compiled graphs.
DECODER_LENGTH_MULTIPLE = 16
_SENTENCE_SPLIT = re.compile(r"\n|</s>|\.")


# ---- captions ---------------------------------------------------------------------------------


def caption_fields(captions: dict) -> dict[str, str]:
    """The seven DreamLIP fields of a sample's `captions` record, by name (missing ones left out).

    In FLAIR's order: raw, then each captioner's short and long caption in turn (IB, SV, LLA),
    so a window of consecutive sentences that crosses a field pairs one captioner's short
    caption with its own long one, as in FLAIR's loader.
    """
    out = {"raw": captions.get("raw") or ""}
    short, long = captions.get("short") or {}, captions.get("long") or {}
    for captioner in CAPTIONERS:
        out[f"short.{captioner}"] = short.get(captioner) or ""
        out[f"long.{captioner}"] = long.get(captioner) or ""
    return {name: text for name, text in out.items() if text.strip()}


def split_sentences(text: str) -> list[str]:
    """Sentences split on newline, `</s>` and `.` (FLAIR), stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]


def diverse_captions(sentences: Sequence[str], num_captions: int, rng: random.Random) -> list[str]:
    """FLAIR's diverse sampling: per caption draw m in {1, 2, 3}; m = 1: one random sentence;
    else with p = 0.5 m consecutive sentences, otherwise m random ones; joined with '. '."""
    out = []
    for _ in range(num_captions):
        m = min(rng.choice((1, 2, 3)), len(sentences))
        if m == 1:
            chosen = [rng.choice(sentences)]
        elif rng.random() < 0.5:
            start = rng.randrange(len(sentences) - m + 1)
            chosen = list(sentences[start:start + m])
        else:
            chosen = rng.sample(list(sentences), m)
        out.append(". ".join(chosen))
    return out


# ---- one sample -------------------------------------------------------------------------------


class CorruptSample(ValueError):
    """A sample that cannot be used; `reason` is its failure count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decoder_annotation(meta: dict, crop: tuple[float, float, float, float]) -> dict:
    """What `build_decoder_batch` reads, with boxes moved into the L_ret view ([0, 1] coordinates)."""
    short = [t for t in (meta.get("captions", {}).get("short") or {}).values() if t and t.strip()]
    sentence_of = {p["text"]: p.get("sentence") or "" for p in meta.get("phrases") or []}
    boxes = []
    for b in meta.get("boxes") or []:
        box = map_box((b["x0"], b["y0"], b["x1"], b["y1"]), crop)
        if box is not None:
            boxes.append({"phrase": b["phrase"], "sentence": sentence_of.get(b["phrase"], ""), "box": box})
    qa = [p for p in meta.get("qa") or [] if p.get("question") and p.get("answer")]
    return {"short_captions": short, "boxes": boxes, "qa": qa}


@dataclass(frozen=True)
class SampleTransform:
    """Raw tar sample -> tensors and texts of one training example."""

    image_size: int
    local_image_size: int
    num_captions: int
    num_global_views: int
    num_local_views: int
    distill: bool
    retrieval_crop_scale: tuple[float, float] = (0.9, 1.0)
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    view_color_jitter: float = 0.8
    view_grayscale: float = 0.2

    @classmethod
    def from_config(cls, train: TrainConfig, model: GoldiCLIPConfig) -> SampleTransform:
        return cls(
            image_size=model.vision.image_size, local_image_size=model.vision.local_image_size,
            num_captions=train.captions_per_image, num_global_views=train.num_global_views,
            num_local_views=train.num_local_views, distill=model.distill.enabled,
            retrieval_crop_scale=tuple(train.retrieval_crop_scale), global_crop_scale=tuple(train.global_crop_scale),
            local_crop_scale=tuple(train.local_crop_scale), view_color_jitter=train.view_color_jitter,
            view_grayscale=train.view_grayscale,
        )

    def __call__(self, raw: dict, rng: random.Random) -> dict:
        if "jpg" not in raw or "json" not in raw:
            raise CorruptSample("missing_file", f"{raw.get('__key__')} has {sorted(k for k in raw if k[0] != '_')}")
        try:
            meta = json.loads(raw["json"])
        except ValueError as e:
            raise CorruptSample("bad_json", str(e)) from None
        try:
            image = Image.open(io.BytesIO(raw["jpg"]))
            image.load()
            image = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptSample("bad_image", str(e)) from None
        sentences = [s for text in caption_fields(meta.get("captions") or {}).values() for s in split_sentences(text)]
        if not sentences:
            raise CorruptSample("no_captions", raw.get("__key__", ""))

        crop = random_resized_crop_box(*image.size, rng, self.retrieval_crop_scale)
        sample = {
            "image": to_pixels(crop_and_resize(image, crop, self.image_size)),  # uint8 (3, H, W)
            "captions": diverse_captions(sentences, self.num_captions, rng),
            "annotation": decoder_annotation(meta, crop),
        }
        if self.distill:
            global_recipes, local_recipes = dino_recipes(
                self.image_size, self.local_image_size, self.num_global_views, self.num_local_views,
                self.global_crop_scale, self.local_crop_scale, self.view_color_jitter, self.view_grayscale)
            sample["global_views"] = torch.stack([dino_view(image, r, rng) for r in global_recipes])  # (G, 3, H, W)
            if local_recipes:
                sample["local_views"] = torch.stack([dino_view(image, r, rng) for r in local_recipes])  # (L, 3, h, w)
        return sample


# ---- batches ----------------------------------------------------------------------------------


@dataclass
class BatchStats:
    """What the loader process that made a batch saw since its previous batch."""

    samples: int = 0
    errors: Counter = field(default_factory=Counter)


def collate(samples: Sequence[dict], tokenizer, *, context_length: int, rng: random.Random,
            static_shapes: bool = False) -> dict[str, torch.Tensor]:
    """Samples -> the `GoldiCLIP.forward` batch (model/goldiclip.py documents every key).

    `static_shapes` (for a compiled model): one decoder row per (image, task), lengths in steps
    of 16, so torch.compile sees a handful of shapes instead of a new one every batch; eager
    training leaves it off and computes no padding rows.
    """
    batch_size, num_captions = len(samples), len(samples[0]["captions"])
    texts = [c for s in samples for c in s["captions"]]
    batch = {
        "images": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "caption_ids": tokenize(tokenizer, texts, context_length).view(batch_size, num_captions, -1),  # (B, K, T)
    }
    if "global_views" in samples[0]:
        batch["global_views"] = torch.stack([s["global_views"] for s in samples])  # (B, G, 3, H, W)
    if "local_views" in samples[0]:
        batch["local_views"] = torch.stack([s["local_views"] for s in samples])  # (B, L, 3, h, w)
    decoder = build_decoder_batch([s["annotation"] for s in samples], tokenizer, max_length=context_length, rng=rng,
                                  length_multiple=DECODER_LENGTH_MULTIPLE if static_shapes else 1,
                                  static_rows=static_shapes)
    if (decoder["decoder_labels"] != IGNORE_INDEX).any():  # else the model's no-decoder-sample path
        batch.update(decoder)
    return batch


def _open_shards(urls: Iterator[str]) -> Iterator[dict]:
    for url in urls:
        fs, path = open_fs(url)
        with fs.open(path, "rb") as stream:
            yield {"url": url, "stream": stream}


class TrainSamples(IterableDataset):
    """Batches of one Ray worker (`rank`), `num_batches` in all, split over its loader processes.

    Yields (batch, BatchStats); `batch` is exactly what `GoldiCLIP.forward` takes.
    """

    def __init__(self, urls: Sequence[str], transform: SampleTransform, tokenizer, *, batch_size: int,
                 context_length: int, num_batches: int, seed: int = 0, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1000, resampled: bool = True,
                 static_shapes: bool = False):
        if not urls:
            raise ValueError("no training shards (train/*.tar): run the shards stage first")
        self.urls = list(urls)
        self.transform, self.tokenizer = transform, tokenizer
        self.batch_size, self.context_length, self.num_batches = batch_size, context_length, num_batches
        self.seed, self.start_step, self.rank, self.world_size = seed, start_step, rank, world_size
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.static_shapes = static_shapes  # see `collate`
        self.errors: Counter = Counter()

    def __len__(self) -> int:
        return self.num_batches

    def _count_error(self, exn: Exception) -> bool:
        """webdataset handler: count and continue (a corrupt tar ends that shard, not the run)."""
        reason = exn.reason if isinstance(exn, CorruptSample) else (
            "bad_tar" if isinstance(exn, (tarfile.TarError, EOFError, OSError)) else "bad_sample")
        self.errors[reason] += 1
        return True

    def _shard_urls(self, rng: random.Random, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            # Each stream draws its own shards: its seed differs per rank and process, which
            # splits the data by node and by worker without partitioning the shard list.
            while True:
                yield rng.choice(self.urls)
        epoch = 0
        while True:  # shuffle -> split_by_node -> split_by_worker, epoch after epoch
            urls = sorted(self.urls)
            random.Random(f"{self.seed}-epoch-{epoch}").shuffle(urls)
            mine = urls[self.rank::self.world_size][worker::num_workers]
            if not mine:
                raise ValueError(f"{len(urls)} shards cannot feed {self.world_size} x {num_workers} loader "
                                 "processes; use resampled: true or more shards")
            yield from mine
            epoch += 1

    def _samples(self, rng: random.Random, worker: int, num_workers: int) -> Iterator[dict]:
        raw = group_by_keys(tar_file_expander(_open_shards(self._shard_urls(rng, worker, num_workers)),
                                              handler=self._count_error), handler=self._count_error)
        buffer: list[dict] = []
        for sample in raw:
            if not sample or "__key__" not in sample:
                continue
            buffer.append(sample)
            if len(buffer) < self.shuffle_buffer:
                continue
            # Swap a random element out of the full buffer (webdataset's shuffle stage).
            yield buffer.pop(rng.randrange(len(buffer)))

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], BatchStats]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}-{self.start_step}-{self.rank}-{worker}")
        mine = self.num_batches // num_workers + (worker < self.num_batches % num_workers)
        samples = self._samples(rng, worker, num_workers)
        for _ in range(mine):
            chosen, seen = [], 0
            while len(chosen) < self.batch_size:
                raw = next(samples)
                seen += 1
                try:
                    chosen.append(self.transform(raw, rng))
                except Exception as e:  # noqa: BLE001 - any bad sample is counted, never fatal
                    self._count_error(e if isinstance(e, CorruptSample) else CorruptSample("bad_sample", str(e)))
            batch = collate(chosen, self.tokenizer, context_length=self.context_length, rng=rng,
                            static_shapes=self.static_shapes)
            stats = BatchStats(samples=seen, errors=self.errors)
            self.errors = Counter()
            yield batch, stats


def _loader_process_init(_: int) -> None:
    torch.set_num_threads(1)  # each loader process is one core; torch ops inside would oversubscribe


def make_loader(dataset: TrainSamples, *, num_workers: int, prefetch_factor: int, pin_memory: bool) -> DataLoader:
    """A DataLoader whose processes decode and augment; batches are already collated (batch_size=None).

    The processes start by forkserver, not fork: the process that trains also runs threads
    (Ray's core worker, Prefect's client, CUDA's), and a fork of a threaded process can
    inherit a lock held by one of them and die or hang.
    """
    return DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=_loader_process_init if num_workers > 0 else None,
        multiprocessing_context="forkserver" if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


def train_shard_urls(train_dir: str) -> list[str]:
    """Complete `NNNNN.tar` shards under `train_dir` (temporaries of a running writer ignored)."""
    fs, path = open_fs(train_dir)
    if not fs.exists(path):
        return []
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    names = sorted(p for p in fs.ls(path, detail=False) if re.fullmatch(r"\d{5}\.tar", p.rsplit("/", 1)[-1]))
    return [prefix + p for p in names]


def iter_texts(urls: Sequence[str], limit: int | None = None) -> Iterator[str]:
    """Every caption text of the shards (for training a local tokenizer); bad samples skipped."""
    count = 0
    for sample in group_by_keys(tar_file_expander(_open_shards(iter(urls)), handler=lambda e: True),
                                handler=lambda e: True):
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError, TypeError):
            continue
        yield from caption_fields(meta.get("captions") or {}).values()
        for qa in meta.get("qa") or []:
            yield f"{qa.get('question', '')} {qa.get('answer', '')}"
        count += 1
        if limit is not None and count >= limit:
            return
