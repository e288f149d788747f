"""Model controls on the real tiny Qwen2-VL: frozen parts, per-part LRs with vision LLRD, LoRA + merged export,
activation checkpointing; and one train.py run with all of them."""

import functools
import math

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

from tarsier_train.checkpoint.export import export_checkpoint, export_full_state_dict, export_hf
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.models.controls import PARTS, adapter_parameter_names, build_model, lora_config, model_part
from tarsier_train.optim import grouped_optimizer, warmup_cosine
from tarsier_train.toyworld import generate_clip, render_frames
from tarsier_train.toyworld.describe import describe

from conftest import TINY_DATA, run_train

ADAMW = functools.partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-6)
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def batch(processor) -> dict[str, torch.Tensor]:
    """Two toy-world clips (4 frames each) with their descriptions, through the real processor."""
    conversations = []
    for seed in (0, 1):
        clip = generate_clip(np.random.default_rng(seed))
        conversations.append([
            {"role": "user", "content": [{"type": "video", "video": render_frames(clip)[::4]},
                                         {"type": "text", "text": "Describe the video."}]},
            {"role": "assistant", "content": [{"type": "text", "text": describe(clip.events)}]}])
    encoded = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                            processor_kwargs={"padding": True,
                                                              "videos_kwargs": {"do_sample_frames": False}})
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return dict(encoded)


def _loss(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss_sum, num_tokens = summed_token_cross_entropy(model(**inputs, use_cache=False).logits, batch["labels"])
    return loss_sum / num_tokens


def _train(model, batch, num_steps: int = 3, **groups) -> torch.optim.Optimizer:
    optimizer = grouped_optimizer(model, 0.01, ADAMW, lr=1e-2, **groups)
    model.train()
    for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        optimizer.step()
    return optimizer


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("frozen", [("vision",), ("merger",), ("llm",), ("vision", "llm")])
def test_frozen_parts_stay_bit_identical_without_grads_or_optimizer_state(tiny_model_dir, batch, frozen):
    model = build_model(tiny_model_dir, trainable={part: False for part in frozen})
    before = _snapshot(model)
    optimizer = _train(model, batch)
    params = dict(model.named_parameters())
    frozen_names = [n for n in params if model_part(model, n) in frozen]
    assert frozen_names and all(not params[n].requires_grad and params[n].grad is None for n in frozen_names)
    assert all(torch.equal(params[n], before[n]) for n in frozen_names)
    trained = [n for n in params if n not in frozen_names]
    assert all(not torch.equal(params[n], before[n]) for n in trained)  # every trainable weight moved
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_groups == {id(params[n]) for n in trained}
    assert {id(p) for p in optimizer.state} == in_groups  # optimiser state for trainable weights only


def test_part_lrs_and_vision_layer_decay_are_exact_and_survive_the_schedule(tiny_model_dir):
    model = build_model(tiny_model_dir)
    lr, decay, scale = 1e-3, 0.9, {"vision": 0.5, "merger": 2.0, "llm": 1.0}
    optimizer = grouped_optimizer(model, 0.01, ADAMW, lr=lr, lr_scale=scale, vision_layer_decay=decay)
    num_blocks = 2  # the tiny model's vision depth
    expected = {f"vision.block{i}": lr * 0.5 * decay ** (num_blocks - i) for i in range(num_blocks)}
    expected |= {"vision.patch_embed": lr * 0.5 * decay ** (num_blocks + 1), "merger": lr * 2.0, "llm": lr}
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {name.removesuffix("/no_decay") for name in groups} == set(expected)
    for name, group in groups.items():
        assert group["lr"] == pytest.approx(expected[name.removesuffix("/no_decay")], rel=1e-12), name
        assert group["weight_decay"] == (0.0 if name.endswith("/no_decay") else 0.01)
        assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])
    assert optimizer.param_groups[0]["name"] == "llm"  # train/lr logs the first group: the base lr
    by_param = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    for name, parameter in model.named_parameters():  # each weight in the group its name says
        group = by_param[id(parameter)]
        if ".blocks." in name:
            assert group.startswith(f"vision.block{name.split('.blocks.')[1].split('.')[0]}"), name
        else:
            part = model_part(model, name)
            assert group.startswith({"vision": "vision.patch_embed"}.get(part, part)), name
    assert len(by_param) == sum(1 for _ in model.parameters())

    scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    seen = []
    for _ in range(4):
        optimizer.step()  # no grads: a no-op that keeps the scheduler's order check quiet
        scheduler.step()
        factors = [g["lr"] / expected[g["name"].removesuffix("/no_decay")] for g in optimizer.param_groups]
        assert factors == pytest.approx([factors[0]] * len(factors), rel=1e-12)  # one schedule, ratios kept
        seen.append(factors[0])
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in (1, 2)]
    assert seen == pytest.approx([1.0, 1.0, *cosine], rel=1e-12)  # warm-up done, cosine under way


def test_bad_part_names_are_reported_with_the_key(tiny_model_dir):
    with pytest.raises(ValueError, match=r"model\.trainable\.visual: not a model part"):
        build_model(tiny_model_dir, trainable={"visual": False})
    with pytest.raises(ValueError, match=r"model\.trainable\.llm=false"):
        build_model(tiny_model_dir, lora=LORA)  # adapters on a part that also trains in full
    with pytest.raises(ValueError, match="nothing to train"):
        build_model(tiny_model_dir, trainable={part: False for part in PARTS})
    with pytest.raises(ValueError, match=r"optim\.lr_scale\.vit"):
        grouped_optimizer(build_model(tiny_model_dir), 0.01, ADAMW, lr=1e-3, lr_scale={"vit": 0.1})


def test_lora_trains_only_adapters_and_exports_a_plain_merged_model(tiny_model_dir, batch, tmp_path, processor):
    torch.manual_seed(0)
    model = build_model(tiny_model_dir, trainable={part: False for part in PARTS}, lora=LORA)
    adapters = adapter_parameter_names(model)
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # adapters in the model's dtype (FSDP2)
    before = _snapshot(model)
    _train(model, batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == adapters

    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted_logits = model(**inputs).logits
    # what the end-of-fit export does under FSDP2: a gathered copy of the adapted model's state dict
    gathered = {name: value.clone() for name, value in model.state_dict().items()}
    export_full_state_dict(model, gathered, processor, tmp_path / "gathered")
    export_hf(model, processor, tmp_path / "hf")
    assert not (tmp_path / "hf" / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(merged) is Qwen2VLForConditionalGeneration
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).state_dict()
    exported = merged.state_dict()
    assert exported.keys() == base.keys()
    moved = {k for k in base if not torch.equal(base[k], exported[k])}
    assert moved == {f"model.language_model.layers.{i}.self_attn.{proj}.weight" for i in range(4)
                     for proj in ("q_proj", "v_proj")}
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)
    from_gathered = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "gathered", local_files_only=True)
    assert all(torch.equal(value, exported[name]) for name, value in from_gathered.state_dict().items())


@pytest.mark.parametrize("controls", [{}, {"trainable": {"vision": False, "llm": False}, "lora": LORA}],
                         ids=["full", "lora_frozen"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_model_dir, batch, controls):
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation in both
        model = build_model(tiny_model_dir, gradient_checkpointing=checkpointing, **controls).train()
        assert model.model.language_model.layers[0].gradient_checkpointing is checkpointing
        assert model.model.visual.blocks[0].gradient_checkpointing is checkpointing
        loss = _loss(model, batch)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = runs
    torch.testing.assert_close(checkpointed_loss, loss)
    assert grads.keys() == checkpointed_grads.keys()
    assert all(g is not None for g in checkpointed_grads.values())  # frozen inputs still carry gradients
    assert any(g.abs().sum() > 0 for g in checkpointed_grads.values())
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_train_py_with_frozen_parts_lora_and_checkpointing(tmp_path, cache_root, tiny_model_dir):
    """Tarsier1-style run: vision tower frozen, LLM through LoRA adapters, merger trained in full."""
    run_train(["recipe=sft", *TINY_DATA, "trainer.max_steps=2",
               "callbacks.checkpoint.every_n_train_steps=2", "logger=csv", "model.trainable.vision=false",
               "model.trainable.llm=false", "model.lora.rank=4", "model.gradient_checkpointing=true"],
              cwd=tmp_path, cache_root=cache_root)
    run_dir = tmp_path / "outputs" / "sft"
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).state_dict()
    exported = Qwen2VLForConditionalGeneration.from_pretrained(run_dir / "hf", local_files_only=True).state_dict()
    assert exported.keys() == base.keys()  # merged: no adapter weights left
    moved = {k for k in base if not torch.equal(base[k], exported[k])}
    adapted = {k for k in base if k.startswith("model.language_model.layers.") and k.endswith("_proj.weight")}
    merger = {k for k in base if k.startswith("model.visual.merger.")}
    assert moved == adapted | merger  # the frozen vision tower and the LLM's other weights stay as they were

    checkpoint = torch.load(run_dir / "checkpoints" / "step-000002.ckpt", map_location="cpu", weights_only=False)
    num_adapters = sum(".lora_" in k for k in checkpoint["state_dict"])
    assert num_adapters == 4 * 7 * 2  # 4 layers x 7 projections x (A, B)
    assert len(checkpoint["optimizer_states"][0]["state"]) == num_adapters + len(merger)
    export_checkpoint(run_dir / "checkpoints" / "step-000002.ckpt", tmp_path / "from_ckpt")
    again = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "from_ckpt", local_files_only=True)
    assert all(torch.equal(v, exported[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("parts", [[], ["llm", "decoder"]])
def test_lora_parts_must_name_model_parts(parts):
    with pytest.raises(ValueError, match=r"model.lora.parts=.*: give one or more of llm, merger, vision"):
        lora_config(rank=4, parts=parts)
