"""Tarsier1: frame layout with separators, loading the released weight layout, labels, learning, frame stretching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, LlavaConfig

from tarsier_train.data.chat_labels import OFFSET_KWARGS, check_template_labels, encoded_target_mask
from tarsier_train.models.tarsier1 import (
    CHAT_TEMPLATE,
    Tarsier1ForConditionalGeneration,
    Tarsier1Processor,
    is_tarsier1_dir,
    load_tarsier1_model,
    load_tarsier1_processor,
    tiny_tarsier1_dir,
    tokens_per_frame,
)

ROWS = COLS = 4  # tiny: 56 px frames, 14 px patches
ANSWER = "The red circle moves left."


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny matrices: on shared cores extra threads only wait (40x slower measured)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_tarsier1_dir(str(tmp_path_factory.mktemp("tarsier1")))


@pytest.fixture(scope="module")
def processor(tiny_dir: str) -> Tarsier1Processor:
    return load_tarsier1_processor(tiny_dir)


def video(num_frames: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, 40, 60, 3), dtype=np.uint8)


def conversation(frames: np.ndarray, answer: str | None = ANSWER) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "video", "video": frames},
                                             {"type": "text", "text": "Describe the video in detail."}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def encode(processor: Tarsier1Processor, messages: list[dict], **kwargs) -> dict:
    return processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)


def test_tokens_per_frame_and_separator_positions(tiny_dir: str, processor: Tarsier1Processor) -> None:
    assert tokens_per_frame(LlavaConfig()) == 24 * 25 + 1 == 601  # the release: CLIP ViT-L/14 at 336 px
    model = load_tarsier1_model(tiny_dir).eval()
    assert model._no_split_modules == {"CLIPEncoderLayer", "LlamaDecoderLayer"}  # FSDP units
    config = model.config
    assert tokens_per_frame(config) == ROWS * (COLS + 1) + 1 == processor.tokens_per_frame == 21

    encoded = encode(processor, conversation(video(2)), add_generation_prompt=True)
    ids = encoded["input_ids"][0]
    image_positions = (ids == config.image_token_id).nonzero().flatten()
    assert len(image_positions) == 2 * 21 and (encoded["mm_token_type_ids"][0] == 1).sum() == 42
    start = int(image_positions[0])
    assert torch.equal(image_positions, torch.arange(start, start + 42))

    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"][0]), with_kwargs=True)
    with torch.no_grad():
        model(**encoded)
        hidden = model.model.vision_tower(encoded["pixel_values"], output_hidden_states=True).hidden_states[-2]
        patches = model.model.multi_modal_projector(hidden[:, 1:])  # (frames, 16, hidden), CLS dropped
        table = model.get_input_embeddings().weight
    embeds = seen["embeds"]
    text = torch.ones(len(ids), dtype=torch.bool)
    text[image_positions] = False
    torch.testing.assert_close(embeds[text], table[ids[text]])
    for frame in range(2):
        first = start + frame * 21
        for row in range(ROWS):
            row_start = first + row * (COLS + 1)
            torch.testing.assert_close(embeds[row_start:row_start + COLS], patches[frame, row * COLS:(row + 1) * COLS])
            torch.testing.assert_close(embeds[row_start + COLS], table[config.image_newline_idx])
        torch.testing.assert_close(embeds[first + 20], table[config.image_new_idx])


def released_name(name: str) -> str:
    """transformers-5 parameter name -> the name in released LLaVA-1.5 / Tarsier1 safetensors."""
    for new, old in [("lm_head.", "language_model.lm_head."), ("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")]:
        if name.startswith(new):
            return old + name.removeprefix(new)
    raise AssertionError(f"unexpected parameter {name}")


def released_config(tiny: LlavaConfig) -> dict:
    """A Tarsier-7b config.json at tiny sizes, with the keys and transformers-4 spellings the release has."""
    text, vision = tiny.text_config, tiny.vision_config
    return {
        "architectures": ["TarsierForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
        "image_token_index": tiny.image_token_index, "image_newline_idx": tiny.image_newline_idx,
        "image_new_idx": tiny.image_new_idx, "vocab_size": text.vocab_size, "pad_token_id": text.pad_token_id,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "torch_dtype": "bfloat16", "transformers_version": "4.39.3",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "model_type": "llama", "hidden_size": text.hidden_size,
                        "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
                        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                        "vocab_size": text.vocab_size, "torch_dtype": "float16"},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": vision.hidden_size,
                          "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers,
                          "num_attention_heads": vision.num_attention_heads, "image_size": vision.image_size,
                          "patch_size": vision.patch_size, "projection_dim": vision.projection_dim,
                          "hidden_act": "quick_gelu"},
    }


def test_loads_released_layout(tiny_dir: str, processor: Tarsier1Processor, tmp_path: Path) -> None:
    config = released_config(AutoConfig.from_pretrained(tiny_dir))
    torch.manual_seed(1)
    # .float(): built from a config, the LLM takes text_config's torch_dtype (float16); loading takes dtype=
    source = Tarsier1ForConditionalGeneration(LlavaConfig(**config)).float().eval()
    weights = {released_name(name): tensor.contiguous() for name, tensor in source.state_dict().items()}
    for name in ["vision_tower.vision_model.embeddings.patch_embedding.weight",
                 "vision_tower.vision_model.embeddings.class_embedding",
                 "vision_tower.vision_model.pre_layrnorm.weight",  # sic, CLIP's spelling
                 "vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight",
                 "vision_tower.vision_model.post_layernorm.bias",
                 "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias",
                 "language_model.model.embed_tokens.weight", "language_model.model.layers.3.mlp.gate_proj.weight",
                 "language_model.model.norm.weight", "language_model.lm_head.weight"]:
        assert name in weights
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ["tokenizer.json", "tokenizer_config.json"]:  # a release ships its tokenizer, no processor config
        (tmp_path / name).write_text((Path(tiny_dir) / name).read_text())

    assert is_tarsier1_dir(str(tmp_path))
    loaded = load_tarsier1_model(str(tmp_path)).eval()  # raises on any missing or unexpected weight
    released_processor = load_tarsier1_processor(str(tmp_path))
    encoded = encode(released_processor, conversation(video(3)))
    assert torch.equal(encoded["input_ids"], encode(processor, conversation(video(3)))["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**encoded).logits, source(**encoded).logits, rtol=0, atol=0)

    # what we save carries the released names and architecture, so exports load where releases do
    loaded.save_pretrained(tmp_path / "export")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as saved:
        assert set(saved.keys()) == set(weights)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == [
        "TarsierForConditionalGeneration"]


def test_tarsier1_dir_is_told_from_tarsier2(tmp_path: Path) -> None:
    def directory(name: str, config: dict) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return str(tmp_path / name)

    tarsier = {"architectures": ["TarsierForConditionalGeneration"], "model_type": "llava"}
    assert is_tarsier1_dir(directory("t1", {**tarsier, "text_config": {"model_type": "llama"},
                                            "vision_config": {"model_type": "clip_vision_model"}}))
    assert not is_tarsier1_dir(directory("t2", {**tarsier, "text_config": {"model_type": "qwen2_vl"},
                                                "vision_config": {"model_type": "qwen2_vl"}}))
    assert not is_tarsier1_dir(directory("llava", {"architectures": ["LlavaForConditionalGeneration"],
                                                   "model_type": "llava"}))


def test_labels_are_the_answer_and_eos(processor: Tarsier1Processor) -> None:
    check_template_labels(processor)
    messages = [{"role": "system", "content": "Be brief."}, *conversation(video(2))]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "<s>Be brief. USER: <video>\nDescribe the video in detail. ASSISTANT: " + ANSWER + "</s>")
    encoded = encode(processor, messages, processor_kwargs=OFFSET_KWARGS)
    prompt = encode(processor, messages[:2], add_generation_prompt=True)["input_ids"][0]
    ids = encoded["input_ids"][0]
    assert torch.equal(ids[:len(prompt)], prompt)  # the prompt is a prefix, so targets are exactly the rest
    mask = encoded_target_mask(processor, messages, encoded)
    assert mask.tolist() == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    assert processor.tokenizer.decode(ids[mask]) == ANSWER + "</s>" and ids[-1] == processor.tokenizer.eos_token_id


def test_processor_media_order_kwargs_and_stretch(processor: Tarsier1Processor, tmp_path: Path) -> None:
    # a 32 x 64 frame, green outer quarters: stretched to a square they stay at the edges (a crop would lose them)
    frame = np.zeros((32, 64, 3), dtype=np.uint8)
    frame[:, :, 0] = 255
    frame[:, :16], frame[:, 48:] = (0, 255, 0), (0, 255, 0)
    messages = [{"role": "user", "content": [{"type": "image", "image": frame}, {"type": "video", "video": video(2)},
                                             {"type": "text", "text": "Describe."}]}]
    # Qwen-style kwargs a generic transform passes are accepted; frame sampling is refused
    encoded = encode(processor, messages, add_generation_prompt=True, processor_kwargs={
        "videos_kwargs": {"do_sample_frames": False, "size": {"longest_edge": 1}}, "images_kwargs": {"size": {}}})
    pixels = encoded["pixel_values"]
    assert pixels.shape == (3, 3, 56, 56)  # the image first, then the video's frames, as in the text
    mean, std = (torch.tensor(processor.image_processor.image_mean)[:, None],
                 torch.tensor(processor.image_processor.image_std)[:, None])
    green, red = (torch.tensor([[0.0], [1.0], [0.0]]) - mean) / std, (torch.tensor([[1.0], [0.0], [0.0]]) - mean) / std
    torch.testing.assert_close(pixels[0, :, :, 0], green.expand(3, 56), atol=0.02, rtol=0)
    torch.testing.assert_close(pixels[0, :, :, 55], green.expand(3, 56), atol=0.02, rtol=0)
    torch.testing.assert_close(pixels[0, :, :, 28], red.expand(3, 56), atol=0.02, rtol=0)
    alone = encode(processor, conversation(video(2)), add_generation_prompt=True)["pixel_values"]
    torch.testing.assert_close(pixels[1:], alone)
    with pytest.raises(ValueError, match="does not sample frames"):
        encode(processor, messages, processor_kwargs={"fps": 2.0})

    processor.save_pretrained(tmp_path)
    reloaded = Tarsier1Processor.from_pretrained(str(tmp_path))
    assert reloaded.tokens_per_frame == 21 and reloaded.chat_template == CHAT_TEMPLATE
    torch.testing.assert_close(encode(reloaded, messages)["pixel_values"], encode(processor, messages)["pixel_values"])
    assert torch.equal(encode(reloaded, messages)["input_ids"], encode(processor, messages)["input_ids"])


def test_learns_one_clip_and_generates(tiny_dir: str, processor: Tarsier1Processor) -> None:
    torch.manual_seed(0)
    model = load_tarsier1_model(tiny_dir)
    messages = conversation(video(2))
    encoded = encode(processor, messages, processor_kwargs=OFFSET_KWARGS)
    mask = encoded_target_mask(processor, messages, encoded)
    labels = torch.where(mask, encoded["input_ids"][0], -100)[None]
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask", "pixel_values", "mm_token_type_ids")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert model.model.language_model.embed_tokens.weight.grad is None  # zeroed; below: separators got gradient
    model(**inputs, labels=labels).loss.backward()
    grad = model.model.language_model.embed_tokens.weight.grad
    assert grad[model.config.image_newline_idx].abs().sum() > 0 and grad[model.config.image_new_idx].abs().sum() > 0

    model.eval()
    vision_calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: vision_calls.append(1))
    prompt = encode(processor, messages[:1], add_generation_prompt=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    new = generated[0, prompt["input_ids"].shape[1]:]
    assert len(new) > 0 and len(vision_calls) == 1  # media encoded once, at prefill
    assert processor.tokenizer.decode(new) == ANSWER + "</s>"  # memorised the one clip's answer
