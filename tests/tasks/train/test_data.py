"""The training data loader: batch format, caption sampling, box mapping, bad samples, determinism."""

from __future__ import annotations

import random
import tarfile
from collections import Counter

import pytest
import torch

from model import GoldiCLIP
from model.tasks import IGNORE_INDEX, TASKS
from model.tokenizer import build_local_tokenizer
from storage import ShardWriter, make_key
from tasks.train.augment import dino_recipes, dino_view, map_box, random_resized_crop_box
from tasks.config import TrainConfig
from tasks.train.loop import model_config
from tasks.train.data import (
    DECODER_LENGTH_MULTIPLE,
    SampleTransform,
    TrainSamples,
    caption_fields,
    decoder_annotation,
    diverse_captions,
    iter_texts,
    make_loader,
    split_sentences,
)
from tasks.demo.train_shards import sample_record, write_train_shards

TRAIN = TrainConfig(preset="debug", captions_per_image=3, batch_size_per_worker=4, num_local_views=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    urls = write_train_shards(root / "train", num_shards=2, per_shard=12)
    tokenizer = build_local_tokenizer(iter_texts(urls), root / "tokenizer", vocab_size=256)
    return urls, tokenizer, model_config(TRAIN, tokenizer)


def dataset(urls, tokenizer, config, **kwargs) -> TrainSamples:
    options = dict(batch_size=4, context_length=config.text.context_length, num_batches=2, shuffle_buffer=6)
    return TrainSamples(urls, SampleTransform.from_config(TRAIN, config), tokenizer, **(options | kwargs))


def test_batch_is_what_forward_takes(shards):
    urls, tokenizer, config = shards
    batch, stats = next(iter(dataset(urls, tokenizer, config)))
    size, local = config.vision.image_size, config.vision.local_image_size
    assert batch["images"].shape == (4, 3, size, size) and batch["images"].dtype == torch.uint8
    assert batch["caption_ids"].shape == (4, 3, config.text.context_length)
    assert batch["caption_ids"].dtype == torch.long
    assert batch["global_views"].shape == (4, 2, 3, size, size)
    assert batch["local_views"].shape == (4, 2, 3, local, local)
    num = batch["decoder_task"].shape[0]
    assert batch["decoder_input_ids"].shape == batch["decoder_labels"].shape and batch["decoder_input_ids"].shape[0] == num
    assert batch["decoder_image_index"].dtype == torch.long and int(batch["decoder_image_index"].max()) < 4
    # every caption row holds BOS ... EOS
    assert (batch["caption_ids"][..., 0] == tokenizer.bos_token_id).all()
    assert ((batch["caption_ids"] == tokenizer.eos_token_id).sum(-1) >= 1).all()
    assert stats.samples == 4 and not stats.errors
    loss, metrics = GoldiCLIP(config)(batch)
    assert torch.isfinite(loss) and "loss/sd" in metrics and "loss/vqa" in metrics


@pytest.mark.parametrize("static_shapes", [False, True])
def test_decoder_samples_only_for_present_tasks(tmp_path, shards, static_shapes):
    _, tokenizer, config = shards
    url = str(tmp_path / "00000.tar")
    rng = random.Random(0)
    with ShardWriter(url) as writer:
        for i in range(4):
            jpg, meta = sample_record(make_key(0, i), rng, with_boxes=False, with_qa=False)
            writer.write(make_key(0, i), {"jpg": jpg, "json": meta})
    batch, _ = next(iter(dataset([url], tokenizer, config, shuffle_buffer=1, static_shapes=static_shapes)))
    has_target = (batch["decoder_labels"] != IGNORE_INDEX).any(1)
    assert batch["decoder_task"][has_target].tolist() == [TASKS.index("cap")] * 4
    assert batch["decoder_image_index"][has_target].tolist() == [0, 1, 2, 3]
    if static_shapes:  # for a compiled model: one row per (image, task), samples first, then rows with no target
        assert has_target.tolist() == [True] * 4 + [False] * (4 * len(TASKS) - 4)
        assert batch["decoder_input_ids"].shape[1] % DECODER_LENGTH_MULTIPLE == 0
    else:  # eager: only the samples, as long as the longest
        assert has_target.all() and batch["decoder_input_ids"].shape[0] == 4
        assert (batch["decoder_input_ids"][:, -1] != tokenizer.pad_token_id).any()  # no padding-only column


def test_diverse_sampling_statistics():
    sentences = [f"s{i}" for i in range(8)]
    rng = random.Random(0)
    sizes, consecutive = Counter(), Counter()
    for caption in diverse_captions(sentences, 6000, rng):
        parts = [int(p[1:]) for p in caption.split(". ")]
        sizes[len(parts)] += 1
        if len(parts) > 1:
            consecutive[parts == list(range(parts[0], parts[0] + len(parts)))] += 1
    assert set(sizes) == {1, 2, 3}
    assert all(abs(sizes[m] / 6000 - 1 / 3) < 0.03 for m in (1, 2, 3))
    multi = sum(consecutive.values())
    # half consecutive by design, plus random draws that happen to be in order (1/56 for 2, ~1/336 for 3)
    assert 0.5 < consecutive[True] / multi < 0.56
    assert diverse_captions(["only one"], 5, rng) == ["only one"] * 5


def test_sentences_split_on_newline_eos_and_period():
    assert split_sentences("A cat. A dog\nA bird</s>A fish. ") == ["A cat", "A dog", "A bird", "A fish"]


def test_boxes_move_with_the_crop():
    # crop (10, 20)-(60, 70) of the image: a box at (20, 30)-(40, 50) sits at 0.2..0.6 of it
    assert map_box((20, 30, 40, 50), (10, 20, 60, 70)) == pytest.approx((0.2, 0.2, 0.6, 0.6))
    assert map_box((20, 30, 40, 50), (10, 20, 60, 70), flipped=True) == pytest.approx((0.4, 0.2, 0.8, 0.6))
    assert map_box((0, 0, 40, 40), (30, 30, 100, 100)) is None  # mostly cropped away
    assert map_box((0, 0, 100, 50), (0, 0, 100, 50)) == pytest.approx((0, 0, 1, 1))  # no crop: a plain scale
    meta = {"boxes": [{"phrase": "red square", "x0": 20, "y0": 30, "x1": 40, "y1": 50, "score": 0.9}],
            "phrases": [{"text": "red square", "sentence": "A red square", "field": "long.LLA"}],
            "captions": {"short": {"IB": "a red square", "SV": ""}}}
    annotation = decoder_annotation(meta, (10, 20, 60, 70))
    assert annotation["boxes"][0]["box"] == pytest.approx((0.2, 0.2, 0.6, 0.6))
    assert annotation["boxes"][0]["sentence"] == "A red square" and annotation["short_captions"] == ["a red square"]


def test_random_resized_crop_stays_inside_and_in_scale():
    rng = random.Random(1)
    for _ in range(200):
        x0, y0, x1, y1 = random_resized_crop_box(300, 200, rng, (0.05, 0.4))
        assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200
        assert (x1 - x0) * (y1 - y0) <= 0.42 * 300 * 200


def test_view_colour_augmentations_follow_the_config(shards):
    """`view_color_jitter` / `view_grayscale` set DINO's colour-jitter and grayscale probabilities of
    every view; at 0 a view keeps the image's colours (the demo's setting), at DINO's 0.8 / 0.2 not."""
    from PIL import Image

    colour = torch.tensor([100, 20, 20], dtype=torch.uint8).view(3, 1, 1)  # < 128: solarize leaves it
    image = Image.new("RGB", (64, 48), tuple(colour.flatten().tolist()))

    def views(recipes):
        rng = random.Random(0)
        return [dino_view(image, recipe, rng) for _ in range(10) for recipe in recipes]

    kept = views(sum(dino_recipes(32, 16, 2, 4, jitter=0.0, grayscale=0.0), []))
    assert all(torch.equal(view, colour.expand_as(view)) for view in kept)
    recipes = sum(dino_recipes(32, 16, 2, 4), [])
    assert {(r.jitter, r.grayscale) for r in recipes} == {(0.8, 0.2)}  # DINO's
    assert sum(not torch.equal(view, colour.expand_as(view)) for view in views(recipes)) > 20
    config = shards[2]
    transform = SampleTransform.from_config(TRAIN.model_copy(update={"view_color_jitter": 0.0, "view_grayscale": 0.5}),
                                            config)
    assert (transform.view_color_jitter, transform.view_grayscale) == (0.0, 0.5)
    assert (SampleTransform.from_config(TRAIN, config).view_color_jitter, TRAIN.view_grayscale) == (0.8, 0.2)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, shards):
    urls, tokenizer, config = shards
    bad = str(tmp_path / "00000.tar")
    rng = random.Random(0)
    with ShardWriter(bad) as writer:
        for i in range(6):
            jpg, meta = sample_record(make_key(0, i), rng)
            writer.write(make_key(0, i), {"jpg": b"not a jpeg" if i == 2 else jpg, "json": meta})
    truncated = tmp_path / "00001.tar"
    data = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(bad) as tar:
        member = tar.getmembers()[7]  # sample 3's json
    truncated.write_bytes(data[: member.offset_data + member.size // 2])  # cut inside a member
    ds = dataset([bad, str(truncated)], tokenizer, config, num_batches=6, shuffle_buffer=1, resampled=False)
    errors, batches = Counter(), 0
    for batch, stats in ds:
        errors.update(stats.errors)
        batches += 1
        assert batch["images"].shape[0] == 4
    assert batches == 6
    assert errors["bad_image"] >= 1 and errors["bad_tar"] >= 1


def test_stream_is_deterministic_and_restarts_per_step(shards):
    urls, tokenizer, config = shards
    first = next(iter(dataset(urls, tokenizer, config, seed=3)))[0]
    again = next(iter(dataset(urls, tokenizer, config, seed=3)))[0]
    later = next(iter(dataset(urls, tokenizer, config, seed=3, start_step=10)))[0]
    assert torch.equal(first["images"], again["images"]) and torch.equal(first["caption_ids"], again["caption_ids"])
    assert not torch.equal(first["images"], later["images"])


def test_loader_processes_split_the_epoch(shards):
    urls, tokenizer, config = shards
    loader = make_loader(dataset(urls, tokenizer, config, num_batches=3), num_workers=2, prefetch_factor=1,
                         pin_memory=False)
    batches = list(loader)
    assert len(batches) == 3 and all(b["images"].shape[0] == 4 for b, _ in batches)


def test_training_and_evaluation_normalise_pixels_with_the_model_s_statistics(tmp_path):
    # The demo's near-white images need their own mean/std (pipelines/configs/demo.yaml): it is part
    # of the model config. The loader ships raw uint8 views and the model normalises them on its
    # device; evaluation normalises on the CPU. Both must give the same pixels.
    import io

    from PIL import Image

    from model import GoldiCLIP, get_preset
    from tasks.evaluate.data import preprocess_image

    mean, std = (0.9, 0.8, 0.7), (0.1, 0.2, 0.3)
    config = get_preset("debug", vision={"image_mean": mean, "image_std": std})
    transform = SampleTransform.from_config(TRAIN, config)
    grey = (128, 128, 128)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), grey).save(buffer, format="PNG")
    expected = (torch.tensor(grey) / 255 - torch.tensor(mean)) / torch.tensor(std)  # (3,)
    raw = {"__key__": "k", "jpg": buffer.getvalue(), "json": b'{"captions": {"raw": "a grey square"}}'}
    sample = transform(raw, random.Random(0))
    assert sample["image"].dtype == torch.uint8 and (sample["image"] == 128).all()
    vision = GoldiCLIP(config).vision
    normalised = vision.normalize(sample["image"][None])[0]
    assert torch.allclose(normalised, expected[:, None, None].expand_as(normalised), atol=1e-5)
    # DINO views: brightness jitter (+-40%) and solarize move a flat grey, but its red channel stays
    # far below 0 with these statistics (with CLIP's it would sit near 0.07).
    for views in (sample["global_views"], sample["local_views"]):
        assert views.dtype == torch.uint8
        assert (vision.normalize(views)[:, 0] < -1.5).all()
    pixels = preprocess_image(buffer.getvalue(), config.vision.image_size, config.vision.image_mean,
                              config.vision.image_std)
    assert torch.allclose(pixels, expected[:, None, None].expand_as(pixels), atol=1e-5)
    # A float input is taken as already normalised: evaluation's pixels pass through unchanged.
    assert torch.equal(vision.normalize(pixels[None]), pixels[None])


def test_caption_fields_in_flair_order():
    """raw, then each captioner's short and long in turn, so a window crossing fields pairs one captioner's."""
    captions = {"raw": "r", "short": {"LLA": "s3", "IB": "s1", "SV": "s2"},
                "long": {"SV": "l2", "IB": "l1", "LLA": "l3"}}
    assert list(caption_fields(captions).items()) == [
        ("raw", "r"), ("short.IB", "s1"), ("long.IB", "l1"), ("short.SV", "s2"), ("long.SV", "l2"),
        ("short.LLA", "s3"), ("long.LLA", "l3")]
    assert list(caption_fields({"short": {"SV": "s2"}, "long": {"SV": " "}})) == ["short.SV"]
