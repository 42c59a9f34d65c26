"""The worker's training step in its named pieces, on one process without Ray (METHOD.md sec. 8)."""

from __future__ import annotations

import torch

from model import GoldiCLIP
from model.tokenizer import build_local_tokenizer
from tasks.config import TrainConfig
from tasks.demo.train_shards import write_train_shards
from tasks.train.checkpoint import latest_checkpoint
from tasks.train.data import SampleTransform, TrainSamples, iter_texts
from tasks.train.loop import (
    ERROR_REASONS,
    Worker,
    backward,
    forward_and_loss,
    load_batch,
    log_metrics,
    model_config,
    optimizer_step,
    read_metrics,
    update_ema,
)
from tasks.train.optim import build_optimizer, build_scheduler
from tasks.train.report import is_health_metric


def test_a_step_in_named_pieces_trains_and_logs(tmp_path):
    train = TrainConfig(preset="debug", batch_size_per_worker=4, captions_per_image=2, num_local_views=2,
                        steps=3, warmup_steps=1, lr=1e-3)
    urls = write_train_shards(tmp_path / "train", num_shards=2, per_shard=12)
    tokenizer = build_local_tokenizer(iter_texts(urls), tmp_path / "tokenizer", vocab_size=256)
    torch.manual_seed(0)
    model = GoldiCLIP(model_config(train, tokenizer))
    optimizer = build_optimizer(model, train, torch.device("cpu"))
    samples = TrainSamples(urls, SampleTransform.from_config(train, model.config), tokenizer, batch_size=4,
                           context_length=model.config.text.context_length, num_batches=train.steps,
                           shuffle_buffer=4)
    w = Worker(train=train, run_dir=str(tmp_path / "run"), tokenizer="tok", rank=0, world_size=1,
               device=torch.device("cpu"), model=model, params=[p for p in model.parameters() if p.requires_grad],
               forward=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, train), loader=iter(samples),
               step=0, data={"step": 0, "samples_seen": 0, "seed": 0, "errors": dict.fromkeys(ERROR_REASONS, 0),
                             "samples_read": 0}, rows=[])
    student = model.pooling.query_proj.weight.detach().clone()
    teacher = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("teacher.")}

    batch = load_batch(w)
    assert batch["images"].shape[0] == 4 and w.local_read == 4
    loss, metrics = forward_and_loss(w, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and "loss/ret" in metrics
    grad_norm = backward(w, loss)
    assert grad_norm > 0 and model.pooling.query_proj.weight.grad is not None
    with torch.no_grad():  # past ln 100, as a large step could put it: the step brings it back
        model.retrieval_loss.log_scale.fill_(5.0)
    optimizer_step(w)
    assert not torch.equal(model.pooling.query_proj.weight, student)  # the student moved
    assert 0.0 <= model.retrieval_loss.log_scale.item() <= 4.6052
    prototypes = model.distill_heads["ta"].prototypes
    assert prototypes.grad is None  # frozen in the first steps (DINO's freeze_last_layer)
    assert w.scheduler.get_last_lr()[0] == train.lr  # one warm-up step done: the peak
    update_ema(w)
    moved = [n for n, p in model.named_parameters() if n.startswith("teacher.") and not torch.equal(p, teacher[n])]
    assert moved and all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("teacher."))
    w.step, w.window_steps = 1, 1

    row = log_metrics(w, grad_norm, metrics)
    assert row["step"] == 1 and row["samples_seen"] == 4 and row["loss/total"] == float(loss.detach())
    assert w.data["samples_read"] == 4 and w.data["step"] == 1 and w.local_read == 0  # counted once
    assert read_metrics(w.run_dir) == [row]  # rank 0 wrote it
    # The distillation health metrics land in the row, and the report plots exactly them as health.
    health = {f"sd_{b}/{n}" for b in ("ta", "tc")
              for n in ("teacher_entropy_frac", "teacher_batch_entropy_frac", "kl", "center_norm")}
    assert {name for name in row if is_health_metric(name)} == health
    assert latest_checkpoint(w.run_dir) is None  # checkpoints come from `save_and_report`, through Ray


def test_model_config_carries_the_memory_options(tokenizer):
    train = TrainConfig(preset="debug", memory={"checkpoint_text": True, "pooling_chunk_size": 2})
    memory = model_config(train, tokenizer).memory
    assert memory.checkpoint_text and memory.pooling_chunk_size == 2 and not memory.checkpoint_vision
