"""Training (`train:`, with its memory options) and evaluation (`evaluate:`) sections."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import Section


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
        "num_to_keep", "max_failures", "log_every", "compile", "memory", "report_every_s", "progress_every_s",
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
    num_local_views: int = Field(default=6, ge=0, description="L local crops at the preset's local size; 0: the "
                                 "students are the global views alone, each paired with the other globals (G >= 2).")
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    view_color_jitter: float = Field(
        default=0.8, ge=0, le=1,
        description="Probability that a distillation view is colour-jittered (DINO: 0.8; brightness, contrast, "
        "saturation, hue). Views whose content is mostly colour (the demo) need it lower: see the demo config.",
    )
    view_grayscale: float = Field(default=0.2, ge=0, le=1, description="Probability that a distillation view is "
                                  "made grey (DINO: 0.2).")
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
    report_every_s: float = Field(
        default=600.0, ge=0, description="Seconds between live versions of the `train-report` artifact (curves "
        "inline) while training runs; 0: at every metric row.")
    progress_every_s: float = Field(
        default=120.0, ge=0, description="Output not a terminal: seconds between training progress log lines "
        "(step, loss, images/s, time left), or 10% of the steps; a terminal gets one per metric row.")
    seed: int = 0
    memory: TrainMemoryConfig = Field(default_factory=TrainMemoryConfig)

    @field_validator("model_overrides")
    @classmethod
    def _memory_in_its_own_section(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        if "memory" in overrides:
            raise ValueError("memory options go in train.memory, not train.model_overrides")
        return overrides

    @model_validator(mode="after")
    def _enough_views_to_distill(self) -> "TrainConfig":
        if self.num_global_views + self.num_local_views < 2:
            raise ValueError("self-distillation pairs each student view with the teacher's other global views: "
                             "num_global_views + num_local_views must be at least 2 (with no local view, "
                             "num_global_views >= 2)")
        return self

    def model_overrides_with_memory(self) -> dict[str, Any]:
        """`get_preset(preset, **this)`: the preset's overrides plus `memory`, the model's MemoryConfig."""
        return {**self.model_overrides, "memory": self.memory.model_dump()}


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
