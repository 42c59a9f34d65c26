import torch
from transformers import CLIPModel

from model import GoldiCLIP, TextTower, VisionTower, tokenize


def test_vision_tower_runs_global_and_local_crops(debug_config):
    vision = VisionTower(debug_config.vision, debug_config.embed_dim)
    for size in (debug_config.vision.image_size, debug_config.vision.local_image_size):
        image_global, patches = vision(torch.randn(3, 3, size, size))
        assert image_global.shape == (3, debug_config.embed_dim)
        assert patches.shape == (3, (size // debug_config.vision.patch_size) ** 2, debug_config.embed_dim)


def test_global_and_patch_tokens_share_one_projection(debug_config):
    vision = VisionTower(debug_config.vision, debug_config.embed_dim)
    pixels = torch.randn(2, 3, 32, 32)
    image_global, patches = vision(pixels)
    hidden = vision.vision_model(pixel_values=pixels)
    assert torch.allclose(image_global, vision.visual_projection(hidden.pooler_output), atol=1e-5)
    normed = vision.vision_model.post_layernorm(hidden.last_hidden_state[:, 1:])
    assert torch.allclose(patches, normed @ vision.visual_projection.weight.T, atol=1e-5)


def test_text_tower_pools_the_first_eot_and_is_causal(debug_config, tokenizer):
    text = TextTower(debug_config.text, debug_config.embed_dim).eval()
    ids = tokenize(tokenizer, ["a red square", "a blue circle on a green background"], 12)
    sentence, tokens = text(ids)
    assert sentence.shape == (2, debug_config.embed_dim) and tokens.shape == (2, 12, debug_config.text.width)
    eot = (ids[0] == tokenizer.eos_token_id).nonzero()[0].item()
    assert torch.allclose(sentence[0], text.text_projection(tokens[0, eot]), atol=1e-6)
    changed = ids.clone()
    changed[0, eot + 1:] = 7  # tokens after the EOT cannot reach it
    changed_sentence, changed_tokens = text(changed)
    assert torch.allclose(changed_sentence[0], sentence[0], atol=1e-6)
    assert torch.allclose(changed_tokens[0, :eot + 1], tokens[0, :eot + 1], atol=1e-6)


def test_export_reloads_as_hf_clip(debug_config, tokenizer, tmp_path):
    model = GoldiCLIP(debug_config).eval()
    model.export_pretrained(tmp_path)
    clip = CLIPModel.from_pretrained(tmp_path).eval()
    ids = tokenize(tokenizer, ["a red square", "a blue circle"], debug_config.text.context_length)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clip.get_text_features(input_ids=ids).pooler_output, model.encode_text(ids), atol=1e-5)
        assert torch.allclose(clip.get_image_features(pixel_values=pixels).pooler_output, model.encode_image(pixels)[0],
                              atol=1e-5)
    reloaded = GoldiCLIP.from_pretrained_towers(tmp_path, debug_config).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded.score(ids, pixels), model.score(ids, pixels), atol=1e-5)
    teacher_vision = reloaded.teacher.model["vision"].state_dict()
    assert all(torch.equal(teacher_vision[k], v) for k, v in reloaded.vision.state_dict().items())
