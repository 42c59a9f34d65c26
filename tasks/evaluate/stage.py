"""The evaluate stage: zero-shot retrieval and classification of a checkpoint (METHOD.md sec. 9).

Per evaluation set, scores from tasks/evaluate/scoring.py and metrics from tasks/evaluate/metrics.py:
retrieval R@1/5/10 both ways in each mode (agnostic, conditioned, rerank), classification top-1/5
(class names through the templates, the mean of the normalised template embeddings per class,
scored text-agnostically), each beside its chance level.

The stage contract (tasks/stage.py) with a single unit, every configured set against one
checkpoint (`evaluate.checkpoint`, else the latest of the train stage's run, else the newest under
`<root>/runs`; any format of tasks/train/checkpoint.py, on any fsspec root). Its fingerprint covers
the evaluate config and the checkpoint's files, so rerunning with the same ones is skipped and a
new checkpoint is evaluated. Results go to ``<root>/eval/metrics.json`` with flat names that say
what they are (``coco/conditioned/t2i_R@1``) and the chance level of each (``coco/chance/t2i_R@1``);
the stage summary (``_stages/evaluate.json``) carries the checkpoint and the metrics too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from storage import DatasetLayout, atomic_write_bytes, exists, join, read_json, write_json
from tasks.config import EvalDatasetConfig, EvaluateConfig, PipelineConfig
from tasks.evaluate.data import ClassificationSet, RetrievalSet, read_eval_set
from tasks.evaluate.metrics import chance_recalls, classification_accuracy, retrieval_recalls
from tasks.evaluate.report import paper_tables
from tasks.evaluate.scoring import (
    ImageFeatures,
    Scorer,
    build_scorer,
    conditioned_matrix,
    encode_image_set,
    encode_text_set,
    rerank_recalls,
)
from tasks.evaluate.sets.segmentation import SegmentationSet, evaluate_segmentation
from tasks.evaluate.sets.vqa_retrieval import QuestionRetrievalSet, evaluate_question_retrieval
from tasks.stage import SINGLE_UNIT, ShardOutcome, Stage
from tasks.train.checkpoint import checkpoint_identity, latest_checkpoint, newest_checkpoint, runs_dir
from tasks.train.stage import planned_run

SetResult = tuple[dict[str, float], dict[str, int], Counter]  # metrics, counts, failures of one set


def encode_readable_images(scorer: Scorer, data, config: EvaluateConfig
                           ) -> tuple[ImageFeatures, RetrievalSet | ClassificationSet, Counter]:
    """(features of the readable images, the set narrowed to them, every failure so far) of a dataset."""
    images, kept, failures = encode_image_set(scorer, data.image_paths, batch_size=config.image_batch_size,
                                              threads=config.loader_threads, resize_mode=config.resize_mode)
    data = data.select_images(kept)
    return images, data, failures + data.failures


def evaluate_retrieval(scorer: Scorer, data: RetrievalSet, config: EvaluateConfig) -> SetResult:
    """Metrics (named ``<set>/<mode>/<direction>_R@k``), counts and failures of one retrieval set."""
    images, data, failures = encode_readable_images(scorer, data, config)
    texts = encode_text_set(scorer, data.texts, batch_size=config.text_batch_size)
    text_image = torch.tensor(data.text_image, device=texts.device)

    metrics = {f"{data.name}/chance/{k}": v for k, v in chance_recalls(text_image, len(images)).items()}
    agnostic = scorer.score(texts, images, "agnostic")  # (N, I)
    if "agnostic" in config.modes:
        metrics |= {f"{data.name}/agnostic/{k}": v for k, v in retrieval_recalls(agnostic, text_image).items()}
    if "conditioned" in config.modes:
        conditioned = conditioned_matrix(scorer, texts, images, image_chunk=config.score_image_chunk,
                                         text_chunk=config.score_text_chunk)
        metrics |= {f"{data.name}/conditioned/{k}": v for k, v in retrieval_recalls(conditioned, text_image).items()}
    if "rerank" in config.modes:
        metrics |= {f"{data.name}/rerank_top{config.rerank_top_k}/{k}": v for k, v in
                    rerank_recalls(scorer, texts, images, agnostic, text_image, config).items()}
    counts = {f"{data.name}/images": len(images), f"{data.name}/texts": len(data.texts)}
    return metrics, counts, failures


def evaluate_classification(scorer: Scorer, data: ClassificationSet, config: EvaluateConfig) -> SetResult:
    images, data, failures = encode_readable_images(scorer, data, config)
    prompts = [t.format(name) for name in data.class_names for t in data.templates]
    embeddings = F.normalize(encode_text_set(scorer, prompts, batch_size=config.text_batch_size).float(), dim=-1)
    classes = embeddings.view(len(data.class_names), len(data.templates), -1).mean(1)  # (C, D)
    logits = scorer.score(classes, images, "agnostic").T  # (I, C)
    labels = torch.tensor(data.labels, device=logits.device)
    metrics = {f"{data.name}/agnostic/{k}": v for k, v in classification_accuracy(logits, labels).items()}
    num_classes = len(data.class_names)
    metrics |= {f"{data.name}/chance/top{k}": min(k, num_classes) / num_classes for k in (1, 5)}
    return metrics, {f"{data.name}/images": len(images), f"{data.name}/classes": num_classes}, failures


def evaluate_one_set(scorer: Scorer, dataset: EvalDatasetConfig, config: EvaluateConfig) -> SetResult:
    data = read_eval_set(dataset)
    if isinstance(data, ClassificationSet):
        return evaluate_classification(scorer, data, config)
    if isinstance(data, QuestionRetrievalSet):
        return evaluate_question_retrieval(scorer, data, config)
    if isinstance(data, SegmentationSet):
        return evaluate_segmentation(scorer, data, config)
    return evaluate_retrieval(scorer, data, config)


def metrics_path(config: PipelineConfig) -> str:
    return join(config.dataset.root, "eval", "metrics.json")


def paper_tables_path(config: PipelineConfig) -> str:
    return join(config.dataset.root, "eval", "paper_tables.md")


def resolve_checkpoint(config: PipelineConfig) -> str:
    """evaluate.checkpoint; else the latest checkpoint of the configured train run (the run the
    train stage would resume: same train config, same shards); else the newest under runs/."""
    if config.evaluate.checkpoint:
        if not exists(config.evaluate.checkpoint):
            raise ValueError(f"evaluate.checkpoint {config.evaluate.checkpoint} does not exist")
        return config.evaluate.checkpoint
    runs = runs_dir(config.dataset.root)
    if (run := planned_run(config)) and (found := latest_checkpoint(join(runs, run))):
        return found
    return newest_checkpoint(runs)


class EvaluateStage(Stage):
    """Every configured evaluation set against one checkpoint: one unit, `SINGLE_UNIT`.

    `evaluate_one(scorer, dataset, config)` evaluates one set (the flow runs each as a Prefect task).
    """

    name = "evaluate"
    task_name = "evaluate_checkpoint"

    def __init__(self, config: PipelineConfig, *,
                 evaluate_one: Callable[[Scorer, EvalDatasetConfig, EvaluateConfig], SetResult] = evaluate_one_set):
        super().__init__(config)
        self.evaluate_one = evaluate_one
        self.checkpoint: str | None = None
        self._checkpoint_identity: list | None = None

    @property
    def section(self) -> EvaluateConfig:
        return self.config.evaluate

    def list_shards(self) -> list[str]:
        return [SINGLE_UNIT] if self.section.datasets else []

    def prepare(self) -> None:
        """Find the checkpoint (its files decide the fingerprint); the model loads only if there is work."""
        if self.section.datasets:
            self.checkpoint = resolve_checkpoint(self.config)
            self._checkpoint_identity = checkpoint_identity(self.checkpoint)

    def extra_fingerprint(self) -> list | None:
        return self._checkpoint_identity

    def output_files(self, shard: str) -> dict[str, str]:
        return {"metrics": metrics_path(self.config), "paper_tables": paper_tables_path(self.config)}

    def process(self, shard: str) -> ShardOutcome:
        scorer = build_scorer(self.section, self.checkpoint)
        metrics, counts, failures = {}, Counter(), Counter()
        for dataset in self.section.datasets:
            set_metrics, set_counts, set_failures = self.evaluate_one(scorer, dataset, self.section)
            metrics |= set_metrics
            counts.update(set_counts)
            failures.update({f"{dataset.name}/{k}": v for k, v in set_failures.items()})
        write_json(metrics_path(self.config), {
            "checkpoint": self.checkpoint, "fingerprint": self.fingerprint(shard),
            "metrics": {name: round(value, 6) for name, value in metrics.items()},
            "counts": dict(counts), "failures": dict(failures)})
        atomic_write_bytes(paper_tables_path(self.config), paper_tables(metrics, self.section.datasets).encode())
        return ShardOutcome(counts, failures)

    def summary_extra(self) -> dict:
        """The checkpoint and metrics of the last evaluation, for the CLI and the demo to print."""
        result = read_json(metrics_path(self.config)) or {}
        return {"checkpoint": result.get("checkpoint"), "metrics": result.get("metrics", {})}


def describe_retrieval(metrics: dict[str, float], k: int = 1) -> list[str]:
    """One line per (set, mode, direction): R@k against chance, e.g. for the demo's output."""
    lines = []
    for name, value in metrics.items():
        set_name, mode, metric = name.split("/")
        if mode == "chance" or not metric.endswith(f"_R@{k}"):
            continue
        chance = metrics[f"{set_name}/chance/{metric}"]
        lines.append(f"{set_name} {mode} {metric.split('_')[0].upper()} R@{k} = {value:.3f} "
                     f"(chance {chance:.3f}, {value / chance:.1f}x chance)")
    return lines
