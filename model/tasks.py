"""Decoder tasks and their prompts (paper sec. 3.3; METHOD.md sec. 5; LocCa).

| task | prompt                                   | target                         |
| cap  | `caption is`                             | one short caption              |
| ref  | `REF <phrase>, box is`                   | `x0 y0 x1 y1`                  |
| grd  | `OBGR x0 y0 x1 y1, grounded caption is`  | the sentence holding the phrase |
| vqa  | `VQA <question>, answer is`              | the answer                     |

`build_decoder_batch` turns per-image annotation dicts into the decoder tensors of the
GoldiCLIP batch: one sample per task per image, skipping a task an image has no data for.
An annotation dict may hold:

    "short_captions": list[str]
    "boxes": list[{"phrase": str, "sentence": str, "box": (x0, y0, x1, y1)}]  # relative to the
             training view, in [0, 1] (a collator that crops must move the boxes with it)
    "qa": list[{"question": str, "answer": str}]
"""

import random
from collections.abc import Sequence

import torch

from .decoder import IGNORE_INDEX
from .tokenizer import clean_text, format_box, quantize_box

TASKS = ("cap", "ref", "grd", "vqa")


def task_prompt_and_target(task: str, annotation: dict, rng: random.Random) -> tuple[str, str] | None:
    """(prompt, target) text for one task on one image, or None if the image lacks the data."""
    if task == "cap":
        captions = annotation.get("short_captions") or []
        return ("caption is", rng.choice(captions)) if captions else None
    if task in ("ref", "grd"):
        boxes = [b for b in annotation.get("boxes") or [] if b.get("phrase" if task == "ref" else "sentence")]
        if not boxes:
            return None
        chosen = rng.choice(boxes)
        box_text = format_box(quantize_box(chosen["box"]))
        if task == "ref":
            return f"REF {chosen['phrase']}, box is", box_text
        return f"OBGR {box_text}, grounded caption is", chosen["sentence"]
    if task == "vqa":
        pairs = annotation.get("qa") or []
        if not pairs:
            return None
        chosen = rng.choice(pairs)
        return f"VQA {chosen['question']}, answer is", chosen["answer"]
    raise ValueError(f"unknown task {task!r}; choices: {TASKS}")


def encode_prompt_and_target(tokenizer, prompt: str, target: str, max_length: int) -> tuple[list[int], int]:
    """BOS prompt target EOS as ids, and the number of prompt ids (BOS included).

    Prompt and target are cleaned as CLIP cleans text and tokenised apart, so the boundary is
    exact; an over-long target is cut, keeping its EOS.
    """
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(clean_text(prompt), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(clean_text(target), add_special_tokens=False)["input_ids"]
    room = max_length - len(prompt_ids) - 1
    if room < 1:
        raise ValueError(f"prompt {prompt!r} leaves no room for a target in {max_length} tokens")
    return prompt_ids + target_ids[:room] + [tokenizer.eos_token_id], len(prompt_ids)


def build_decoder_batch(annotations: Sequence[dict], tokenizer, *, max_length: int, rng: random.Random,
                        tasks: Sequence[str] = TASKS, pad_to: int | None = None, length_multiple: int = 1,
                        static_rows: bool = False) -> dict[str, torch.Tensor]:
    """Decoder tensors for a batch of images (see `model.goldiclip` for the batch format).

    Sequences are right-padded to the longest one rounded up to `length_multiple` (at most
    `max_length`), or to `pad_to`. labels[m, t] is the token position t must predict,
    input_ids[m, t + 1], where that token is part of the target (target tokens and the
    closing EOS); every prompt and padding position holds IGNORE_INDEX.

    `static_rows` pads the samples to one row per (image, task), len(annotations) * len(tasks),
    with all-padding rows (no target: they carry no loss and count for no task). With it and a
    `length_multiple`, a training run sees a handful of shapes, so torch.compile builds a
    handful of graphs instead of one per batch.
    """
    sequences, prompt_lengths, image_index, task_index = [], [], [], []
    for image, annotation in enumerate(annotations):
        for task in tasks:
            pair = task_prompt_and_target(task, annotation, rng)
            if pair is None:
                continue
            ids, prompt_length = encode_prompt_and_target(tokenizer, *pair, max_length=max_length)
            sequences.append(ids)
            prompt_lengths.append(prompt_length)
            image_index.append(image)
            task_index.append(TASKS.index(task))
    longest = max((len(s) for s in sequences), default=1)
    length = pad_to or min(max_length, -(-longest // length_multiple) * length_multiple)
    rows = len(annotations) * len(tasks) if static_rows else len(sequences)
    image_index += [0] * (rows - len(sequences))
    task_index += [0] * (rows - len(sequences))
    input_ids = torch.full((rows, length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        # Position t predicts token t + 1: the last prompt position predicts the first target token.
        labels[row, prompt_length - 1:len(ids) - 1] = torch.tensor(ids[prompt_length:])
    return {
        "decoder_input_ids": input_ids,
        "decoder_labels": labels,
        "decoder_image_index": torch.tensor(image_index, dtype=torch.long),
        "decoder_task": torch.tensor(task_index, dtype=torch.long),
    }
