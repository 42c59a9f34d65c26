"""Question retrieval: Retrieval-VQA (RetVQA) on Visual Genome, R@2 per question type (paper sec. 4.5, table 2).

RetVQA (Penamakuri et al. 2023, arXiv 2306.16713) gives every question a pool of Visual Genome
images, some relevant (they hold the answer) and the rest not. The question is the query; each
image of its pool is scored against it, and R@2 is the share of its relevant images among the two
best-scored (ties count against the model, as in tasks/evaluate/metrics.py). The paper reports R@2
per question type and their mean ("Average" in table 2 is the mean of the five type columns).
`hit@2` (any relevant image in the top two) is reported beside it, since the paper does not say
which of the two its R@2 is.

Format, as RetVQA ships it: ``retvqa_release_v1.json`` (`path`), ``{qid: {question, answer,
q_type, pos_imgs: [VG image id], neg_imgs: [VG image id], split, ...}}``; the questions of
`split` (default test) are read. Images are Visual Genome's (`images`: the directory holding
``VG_100K/`` and ``VG_100K_2/`` as VG's two zips unpack, or the ``<id>.jpg`` files directly).
`max_images` keeps the first N questions.

Scoring is per (question, pool image) pair, so memory and time grow with the pool sizes, never
with questions x images: text-conditioned pairs go through `pair_scores` in chunks of
`score_text_chunk`, text-agnostic ones are cos(t, v_g).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from storage import exists, join
from tasks.config import EvalDatasetConfig, EvaluateConfig
from tasks.evaluate.data import _clean
from tasks.evaluate.scoring import ImageFeatures, Scorer, encode_image_set, encode_text_set, pair_scores
from tasks.evaluate.sets.files import basename, list_dir, read_required_json

RVQA_K = 2  # the paper's R@2
VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")


@dataclass
class QuestionRetrievalSet:
    name: str
    image_paths: list[str]  # every image of any pool, once
    questions: list[str]
    question_types: list[str]
    pools: list[list[int]]  # per question: its pool, indices into image_paths
    relevant: list[list[int]]  # per question: the relevant images of its pool
    failures: Counter = field(default_factory=Counter)

    def select_images(self, keep: list[int]) -> QuestionRetrievalSet:
        """The set over images `keep` only: pools lose the others; a question left without a
        relevant image, or with a pool of fewer than RVQA_K images, is dropped (counted)."""
        new_index = {old: new for new, old in enumerate(keep)}
        failures = Counter(self.failures)
        kept = []
        for question, kind, pool, relevant in zip(self.questions, self.question_types, self.pools, self.relevant):
            pool = [new_index[i] for i in pool if i in new_index]
            relevant = [new_index[i] for i in relevant if i in new_index]
            if not relevant:
                failures["question_without_relevant_image"] += 1
            elif len(pool) < RVQA_K:
                failures["pool_too_small"] += 1
            else:
                kept.append((question, kind, pool, relevant))
        columns = [list(c) for c in zip(*kept)] if kept else [[], [], [], []]
        return QuestionRetrievalSet(self.name, [self.image_paths[i] for i in keep], *columns, failures)


def _visual_genome_index(image_dir: str) -> dict[str, str]:
    """VG image id -> path, over ``VG_100K/``, ``VG_100K_2/`` and the directory itself."""
    directories = [d for d in (join(image_dir, sub) for sub in VG_IMAGE_DIRS) if exists(d)] or [image_dir]
    index = {}
    for directory in directories:
        for path in list_dir(directory, "Visual Genome images"):
            stem, _, suffix = basename(path).rpartition(".")
            if suffix.lower() in ("jpg", "jpeg", "png"):
                index[stem] = path
    return index


def read_rvqa(config: EvalDatasetConfig) -> QuestionRetrievalSet:
    data = read_required_json(config.path, "RetVQA questions (retvqa_release_v1.json)")
    if not isinstance(data, dict):
        raise ValueError(f"{config.path}: RetVQA's release file maps question ids to questions")
    image_of_id = _visual_genome_index(config.images)
    failures = Counter()
    image_index: dict[str, int] = {}
    questions, kinds, pools, relevant = [], [], [], []
    for entry in data.values():
        if not isinstance(entry, dict) or entry.get("split") != config.split:
            continue
        if config.max_images is not None and len(questions) == config.max_images:
            break
        question = _clean(entry.get("question"))
        positives, negatives = entry.get("pos_imgs"), entry.get("neg_imgs")
        if question is None or not isinstance(positives, list) or not isinstance(negatives, list):
            failures["bad_question"] += 1
            continue
        pool, kept_positives = [], []
        for image_id, positive in [(p, True) for p in positives] + [(n, False) for n in negatives]:
            path = image_of_id.get(str(image_id))
            if path is None:
                failures["missing_image"] += 1
                continue
            index = image_index.setdefault(path, len(image_index))
            pool.append(index)
            if positive:
                kept_positives.append(index)
        questions.append(question)
        kinds.append(str(entry.get("q_type", "all")).strip().lower())
        pools.append(pool)
        relevant.append(kept_positives)
    if not questions:
        raise ValueError(f"{config.path} has no questions in split {config.split!r}")
    # select_images drops what lost its relevant images or its pool to missing files.
    return QuestionRetrievalSet(config.name, list(image_index), questions, kinds, pools, relevant,
                                failures).select_images(list(range(len(image_index))))


def top_k_relevant(scores: torch.Tensor, is_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, k) bool: whether each of a query's k best-scored pool images is relevant.

    scores (Q, P) with -inf on padding, is_relevant (Q, P). Ties count against the model: among
    equal scores the irrelevant images come first (a stable sort by relevance, then by score).
    """
    by_relevance = torch.sort(is_relevant.to(torch.int8), dim=1, stable=True).indices  # irrelevant first
    order = torch.sort(scores.gather(1, by_relevance), dim=1, descending=True, stable=True).indices
    return is_relevant.gather(1, by_relevance).gather(1, order)[:, :k]


def _padded(values: list[list], fill) -> torch.Tensor:
    width = max(len(v) for v in values)
    return torch.tensor([v + [fill] * (width - len(v)) for v in values])


def pool_recalls(scores: list[torch.Tensor], relevant: list[list[int]], k: int = RVQA_K
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per question (scores of its pool in pool order, positions of its relevant images in the pool):
    (R@k, the share of its relevant images in its top k; hit@k, whether any is)."""
    padded = _padded([s.tolist() for s in scores], -math.inf)  # (Q, P)
    is_relevant = torch.zeros(padded.shape, dtype=torch.bool)
    for q, positions in enumerate(relevant):
        is_relevant[q, positions] = True
    top = top_k_relevant(padded, is_relevant, k)  # (Q, k)
    return top.sum(1) / is_relevant.sum(1), top.any(1).float()


def chance_pool_recalls(pool_sizes: list[int], num_relevant: list[int], k: int = RVQA_K
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected R@k (k / pool size) and hit@k (1 - C(P - r, k) / C(P, k)) of a random order."""
    recall = [min(k, p) / p for p in pool_sizes]
    hit = [1 - math.comb(p - r, min(k, p)) / math.comb(p, min(k, p)) for p, r in zip(pool_sizes, num_relevant)]
    return torch.tensor(recall), torch.tensor(hit)


def _metric_name(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", kind).strip("_") or "other"


def per_type(values: torch.Tensor, kinds: list[str], metric: str) -> dict[str, float]:
    """{"<type>_<metric>": mean over that type's questions, ..., "average_<metric>": mean over types}."""
    by_type = {}
    for kind in sorted(set(kinds)):
        mask = torch.tensor([k == kind for k in kinds])
        by_type[f"{_metric_name(kind)}_{metric}"] = values[mask].mean().item()
    return {**by_type, f"average_{metric}": sum(by_type.values()) / len(by_type)}


def evaluate_question_retrieval(scorer: Scorer, data: QuestionRetrievalSet, config: EvaluateConfig
                                ) -> tuple[dict[str, float], dict[str, int], Counter]:
    """Metrics ``<set>/<mode>/<type>_R@2`` (and ``_hit@2``, ``average_*``) for the conditioned and
    agnostic modes of `config.modes` (re-ranking a pool of a few images is the conditioned ranking)."""
    images, kept, failures = encode_image_set(scorer, data.image_paths, batch_size=config.image_batch_size,
                                              threads=config.loader_threads, resize_mode=config.resize_mode)
    data = data.select_images(kept)
    failures += data.failures
    if not data.questions:
        raise ValueError(f"{data.name}: no question kept a relevant image ({dict(failures)})")
    texts = encode_text_set(scorer, data.questions, batch_size=config.text_batch_size)
    pairs = torch.tensor([(q, i) for q, pool in enumerate(data.pools) for i in pool], device=texts.device)  # (M, 2)
    positions = [[pool.index(i) for i in relevant] for pool, relevant in zip(data.pools, data.relevant)]
    sizes = [len(pool) for pool in data.pools]

    chance_recall, chance_hit = chance_pool_recalls(sizes, [len(r) for r in data.relevant])
    metrics = {f"{data.name}/chance/{k}": v for k, v in
               {**per_type(chance_recall, data.question_types, f"R@{RVQA_K}"),
                **per_type(chance_hit, data.question_types, f"hit@{RVQA_K}")}.items()}
    for mode in ("conditioned", "agnostic"):
        if mode not in config.modes:
            continue
        scores = (pair_scores(scorer, texts, images, pairs, chunk=config.score_text_chunk) if mode == "conditioned"
                  else _agnostic_pair_scores(texts, images, pairs, chunk=config.score_text_chunk))
        recall, hit = pool_recalls(list(scores.float().cpu().split(sizes)), positions)
        metrics |= {f"{data.name}/{mode}/{k}": v for k, v in
                    {**per_type(recall, data.question_types, f"R@{RVQA_K}"),
                     **per_type(hit, data.question_types, f"hit@{RVQA_K}")}.items()}
    counts = {f"{data.name}/questions": len(data.questions), f"{data.name}/images": len(images)}
    return metrics, counts, failures


def _agnostic_pair_scores(texts: torch.Tensor, images: ImageFeatures, pairs: torch.Tensor, *,
                          chunk: int) -> torch.Tensor:
    """(M,) cos(t, v_g) of the (text, image) index pairs (M, 2): the agnostic score, pair by pair."""
    unit_texts, unit_images = F.normalize(texts.float(), dim=-1), F.normalize(images.global_.float(), dim=-1)
    return torch.cat([(unit_texts[p[:, 0]] * unit_images[p[:, 1]]).sum(-1) for p in pairs.split(chunk)])
