import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model import PoolingConfig, RetrievalConfig, SigmoidRetrievalLoss, TextConditionedPooling, gather_with_grad
from model import sample_caption_index
from model.retrieval import pooled_cosine

B, K, P, D = 4, 3, 5, 16


def test_downsampling_keeps_own_captions_and_one_of_every_other_image():
    generator = torch.Generator().manual_seed(0)
    index = sample_caption_index(num_images=B, num_captions=K, generator=generator)
    assert index.shape == (B, K + B - 1)
    for image in range(B):
        owners = [c // K for c in index[image].tolist()]
        assert owners.count(image) == K
        assert sorted(index[image, :K].tolist()) == list(range(image * K, image * K + K))
        assert sorted(owners[K:]) == [j for j in range(B) if j != image]  # B-1 negatives, one per image


def test_downsampling_rows_of_a_process_are_its_images():
    rows = sample_caption_index(num_images=8, num_captions=K, first_image=4, num_rows=2)
    assert rows.shape == (2, K + 7)
    for row, image in enumerate((4, 5)):
        assert [c // K for c in rows[row]].count(image) == K
        assert sorted({c // K for c in rows[row].tolist()}) == list(range(8))


def test_negative_captions_are_drawn_at_random():
    draws = torch.stack([sample_caption_index(num_images=2, num_captions=K)[0, K] for _ in range(200)])
    assert set(draws.tolist()) == {K, K + 1, K + 2}


def reference_loss(image_global, image_conditioned, texts, caption_index, scale, bias):
    """The formulas of METHOD.md sec. 3, one pair at a time."""
    num_images = image_global.shape[0]
    num_texts = texts.shape[0]
    agnostic = 0.0
    for i in range(num_images):
        for j in range(num_texts):
            y = 1.0 if j // K == i else -1.0
            logit = scale * F.cosine_similarity(image_global[i], texts[j], dim=0) + bias
            agnostic = agnostic - torch.log(torch.sigmoid(y * logit))
    conditioned = 0.0
    for i in range(num_images):
        for n, c in enumerate(caption_index[i].tolist()):
            y = 1.0 if c // K == i else -1.0
            logit = scale * F.cosine_similarity(image_conditioned[i, n], texts[c], dim=0) + bias
            conditioned = conditioned - torch.log(torch.sigmoid(y * logit))
    conditioned = conditioned / (num_images + K - 1)
    agnostic = agnostic / num_texts
    return (conditioned + agnostic) / 2


def test_loss_matches_the_formula_pair_by_pair():
    torch.manual_seed(0)
    loss_fn = SigmoidRetrievalLoss(RetrievalConfig(init_log_scale=1.5, init_bias=-2.0))
    image_global, texts = torch.randn(B, D), torch.randn(B * K, D)
    image_conditioned = torch.randn(B, B + K - 1, D)
    index = sample_caption_index(num_images=B, num_captions=K)
    out = loss_fn(image_global=image_global, conditioned_cosine=pooled_cosine(image_conditioned, texts[index]),
                  texts=texts, caption_index=index, num_captions=K)
    expected = reference_loss(image_global, image_conditioned, texts, index, math.exp(1.5), -2.0)
    assert torch.allclose(out["ret"], expected, atol=1e-5)


def test_scale_and_bias_init_and_clamp():
    loss_fn = SigmoidRetrievalLoss(RetrievalConfig())
    assert torch.isclose(loss_fn.scale(), torch.tensor(1 / 0.07))
    assert loss_fn.bias.item() == -10.0
    with torch.no_grad():
        loss_fn.log_scale.fill_(9.0)
    loss_fn.clamp_parameters()
    assert torch.isclose(loss_fn.scale(), torch.tensor(100.0))
    with torch.no_grad():
        loss_fn.log_scale.fill_(-3.0)
    loss_fn.clamp_parameters()
    assert loss_fn.scale().item() == 1.0


def test_log_scale_past_the_bound_gets_a_gradient_and_comes_back_after_a_step():
    """METHOD.md sec. 3: the clamp is on the parameter after the step (FLAIR's train loop), not in the
    forward, where it would have zero gradient past ln 100 and hold the scale there for good."""
    torch.manual_seed(0)
    loss_fn = SigmoidRetrievalLoss(RetrievalConfig(init_bias=0.0))
    with torch.no_grad():
        loss_fn.log_scale.fill_(math.log(100.0) + 0.5)
    image_global, texts = torch.randn(B, D), torch.randn(B * K, D)
    index = sample_caption_index(num_images=B, num_captions=K)
    cosine = pooled_cosine(torch.randn(B, B + K - 1, D), texts[index])
    loss = loss_fn(image_global=image_global, conditioned_cosine=cosine, texts=texts, caption_index=index,
                   num_captions=K)["ret"]
    assert math.isclose(loss_fn.scale().item(), 100.0 * math.exp(0.5), rel_tol=1e-6)  # unclamped in the forward
    loss.backward()
    assert loss_fn.log_scale.grad.abs().item() > 1e-4
    optimizer = torch.optim.SGD([loss_fn.log_scale], lr=1e-3)
    optimizer.step()
    loss_fn.clamp_parameters()
    assert 0.0 <= loss_fn.log_scale.item() <= math.log(100.0) + 1e-6  # ln 100 rounded to float32


def make_parity_inputs(num_images: int):
    generator = torch.Generator().manual_seed(1)
    return {
        "global": torch.randn(num_images, D, generator=generator),
        "patches": torch.randn(num_images, P, D, generator=generator),
        "texts": torch.randn(num_images * K, D, generator=generator),
        "index": sample_caption_index(num_images=num_images, num_captions=K, generator=generator),
    }


def run_retrieval(inputs, first_image: int, num_local: int, world_size: int):
    """Loss and gradients for images first_image.. on one process (texts gathered when distributed)."""
    torch.manual_seed(0)
    pooling = TextConditionedPooling(PoolingConfig(num_heads=4), D)
    loss_fn = SigmoidRetrievalLoss(RetrievalConfig(init_log_scale=2.0, init_bias=-3.0))
    rows = slice(first_image, first_image + num_local)
    image_global = inputs["global"][rows].clone().requires_grad_()
    patches = inputs["patches"][rows].clone().requires_grad_()
    texts = inputs["texts"][first_image * K:(first_image + num_local) * K].clone().requires_grad_()
    all_texts = gather_with_grad(texts)
    index = inputs["index"][rows]
    cosine = pooled_cosine(pooling(all_texts[index], patches), all_texts[index])
    out = loss_fn(image_global=image_global, conditioned_cosine=cosine, texts=all_texts,
                  caption_index=index, num_captions=K, image_offset=first_image, world_size=world_size)
    out["ret"].backward()
    params = {name: p.grad for name, p in [*pooling.named_parameters(), *loss_fn.named_parameters()]}
    return {"loss": out["ret"].detach(), "global": image_global.grad, "patches": patches.grad, "texts": texts.grad,
            "params": params}


def parity_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    num_local = 2 * B // world_size
    result = run_retrieval(make_parity_inputs(2 * B), rank * num_local, num_local, world_size)
    for grad in result["params"].values():  # what DDP does to parameter gradients
        dist.all_reduce(grad)
        grad /= world_size
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_distributed_loss_and_gradients_match_one_process(tmp_path):
    world_size = 2
    # spawn, not fork: forking a pytest process that may hold other libraries' threads can deadlock.
    mp.spawn(parity_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    single = run_retrieval(make_parity_inputs(2 * B), 0, 2 * B, 1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    # The mean over processes is the loss; each process's feature gradients are world_size x the
    # single-process ones (DDP divides parameter gradients by world_size).
    assert torch.allclose(sum(r["loss"] for r in ranks) / world_size, single["loss"], atol=1e-5)
    for name in ("global", "patches", "texts"):
        gathered = torch.cat([r[name] for r in ranks]) / world_size
        assert torch.allclose(gathered, single[name], atol=1e-5), name
    for name, grad in single["params"].items():
        assert torch.allclose(ranks[0]["params"][name], grad, atol=1e-5), name
        assert torch.allclose(ranks[1]["params"][name], grad, atol=1e-5), name
