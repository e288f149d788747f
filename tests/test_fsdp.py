"""FSDP2 on two real gloo ranks (CPU): the sharded ranks train like one unsharded model fed both ranks' batches —
same losses, gradient norms and updated weights — with frozen parts, LoRA, activation checkpointing, a text-only
rank next to a video rank, and DPO against a sharded frozen reference."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import AutoConfig

from tarsier_train.data.collate import VideoTextCollator, model_inputs
from tarsier_train.data.pairs import PairCollator, pair_inputs
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.data.video import encode_mp4
from tarsier_train.distributed import deferred_gradient_sync, shard_model
from tarsier_train.losses import summed_token_cross_entropy
from tarsier_train.losses.dpo import (
    DPOLossSettings,
    dpo_loss,
    pair_logps,
    sequence_logps,
)
from tarsier_train.models.controls import build_model
from tarsier_train.models.families import family_of
from tarsier_train.models.shared_media import paired_logits
from tarsier_train.models.vision import text_only_vision_term
from tarsier_train.optim import grouped_optimizer
from tarsier_train.toyworld import generate_clip, render_frames

from conftest import rank_processes

WORLD_SIZE, NUM_STEPS, DEADLINE_S = 2, 2, 900  # only catches true hangs: rank_processes stops at the first failure
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0}  # no dropout: the ranks and the reference must draw nothing
CASES: dict[str, dict[str, Any]] = {
    # generate() as the very first call (the sampler's case), ranks asking for different lengths, then training
    "all_trainable": {"batches": ("videos", "video_and_text"), "generate_first": True},
    # blocks frozen, merger trained; the root unit mixes a frozen patch embedding with trained token embeddings;
    # the units keep their parameters from forward to backward
    "vision_frozen": {"batches": ("videos", "video_and_text"), "trainable": {"vision": False},
                      "reshard_after_forward": False},
    # adapters next to frozen weights inside every decoder layer; frozen token embeddings feed checkpointed layers
    "lora_llm": {"batches": ("videos", "video_and_text"), "trainable": {"llm": False}, "lora": LORA,
                 "gradient_checkpointing": True},
    # one rank without any video: its dummy vision term must issue the video rank's collectives, in the same order
    "text_only_rank": {"batches": ("videos", "text"), "gradient_checkpointing": True},
    "lora_llm_text_only_rank": {"batches": ("videos", "text"), "trainable": {"llm": False}, "lora": LORA},
    # shared-media forward (ViT through get_video_features first) against a sharded frozen reference
    "dpo": {"batches": ("pair_a", "pair_b"), "objective": "dpo"},
    "bf16": {"batches": ("videos", "text"), "mixed_precision": "bf16"},
    # two micro-batches per step (the rank's batch twice at half weight), the first without a reduce-scatter
    "accumulate_deferred_sync": {"batches": ("videos", "video_and_text"), "accumulate": True},
}
# Qwen3-VL (DeepStack mergers in the root unit) and Tarsier1 (CLIP + Llama, another projector) shard other modules:
# they run a text-only rank's dummy vision term and the shared-media forward. Qwen2.5-VL has Qwen2-VL's modules.
FAMILY_CASES = ("text_only_rank", "dpo")
SHARDED_CASES = [("qwen2_vl", name) for name in CASES] + [
    (family, name) for family in ("qwen3_vl", "tarsier1") for name in FAMILY_CASES]
TOLERANCE = {"bf16": {"atol": 5e-2, "rtol": 5e-2}}  # bf16 compute against the fp32 reference
FP32_TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}  # the ranks sum gradients in another order than one process


def _record(text: str, with_video: bool, rejected: str | None = None) -> dict:
    answer = {"type": "text", "text": text} | ({"chosen": text, "rejected": rejected} if rejected else {})
    prompt = [{"type": "text", "text": "Describe the video in detail."}]
    if with_video:
        prompt.insert(0, {"type": "video", "video": {"video_file": "k.mp4"}})
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": [answer]}],
            "task": "video/caption"}


def build_batches(processor) -> dict[str, dict[str, torch.Tensor]]:
    """Per-rank batches of real processor inputs: video rows, a video row next to a text-only row, text-only rows,
    and DPO pair batches."""
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    videos = [encode_mp4(render_frames(generate_clip(np.random.default_rng(seed)))) for seed in range(3)]
    rows = [transform(canonical_sample(f"v{i}", _record(text, True)), [videos[i]]) for i, text in
            enumerate(["The red circle grows.", "The blue square moves up. It shrinks.", "The green circle appears."])]
    texts = [transform(canonical_sample(f"t{i}", _record(text, False)), []) for i, text in
             enumerate(["The blue square moves left.", "The red square appears. It moves down."])]
    collate, pairs = VideoTextCollator(processor.tokenizer.pad_token_id), PairCollator(processor.tokenizer.pad_token_id)

    def pair(seed: int, chosen: str, rejected: str) -> dict:
        sample = canonical_sample(f"p{seed}", _record(chosen, True, rejected))
        return pair_inputs(transform, sample, transform.prepare(sample, [videos[seed]]))

    prompt = canonical_sample("g", _record("", True))
    return {"videos": collate(rows[:2]), "video_and_text": collate([rows[2], texts[0]]), "text": collate(texts),
            "prompt": transform.generation_inputs(transform.prepare(prompt, [videos[0]])),
            "pair_a": pairs([pair(0, "The red circle grows.", "The red circle moves left.")]),
            "pair_b": pairs([pair(1, "The blue square moves up.", "The blue square appears.")])}


def _model(model_dir: str, case: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)  # LoRA's initial A matrices: fully_shard takes each rank's slice of its own copy
    return build_model(model_dir, trainable=case.get("trainable"), lora=case.get("lora"),
                       gradient_checkpointing=case.get("gradient_checkpointing", False))


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The recipes' optimiser: AdamW over named groups with vision layer-wise LR decay."""
    return grouped_optimizer(model, weight_decay=0.01, lr=1e-3, vision_layer_decay=0.9,
                             optimizer=functools.partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-6))


def lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, target tokens) as the LM recipe computes them, but with the dummy vision term taken
    *before* the forward: under FSDP2 every rank must run the ViT units at the same point of the step."""
    vision = text_only_vision_term(model, batch)
    loss_sum, num_tokens = summed_token_cross_entropy(model(**model_inputs(batch), use_cache=False).logits,
                                                      batch["labels"])
    return loss_sum + vision, num_tokens


def dpo_pair_loss(model: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The DPO recipe's loss on a pair batch, reference log-probs from a frozen reference model."""
    settings = DPOLossSettings()
    with torch.no_grad():
        reference_logps = pair_logps(*sequence_logps(paired_logits(reference, batch), batch["labels"])
                                     .split_chosen_rejected(), settings.ld_alpha)
    chosen, rejected = sequence_logps(paired_logits(model, batch), batch["labels"]).split_chosen_rejected()
    return dpo_loss(chosen, rejected, *reference_logps, settings)[0]


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Clip to 1.0 (Tarsier2) and step; the total gradient norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _generate(model: torch.nn.Module, prompt: dict[str, torch.Tensor], rank: int) -> list[int]:
    """Greedy tokens; the ranks ask for different lengths, as ranks whose descriptions end at different points."""
    with torch.no_grad():
        return model.generate(**prompt, max_new_tokens=2 + 3 * rank, do_sample=False, pad_token_id=0)[0].tolist()


def reference_run(model_dir: str, case: dict[str, Any], batches: dict) -> dict[str, Any]:
    """One unsharded process: each step's loss is the objective over both ranks' batches (LM: token mean over
    both; DPO: mean of the two ranks' pair means), which is what the sharded ranks optimise together."""
    model = _model(model_dir, case)
    generated = [_generate(model, batches["prompt"], rank) for rank in range(WORLD_SIZE)] \
        if case.get("generate_first") else None
    reference = _model(model_dir, case).eval().requires_grad_(False) if case.get("objective") == "dpo" else None
    optimizer, losses, norms = _optimizer(model), [], []
    rank_batches = [batches[name] for name in case["batches"]]
    for _ in range(NUM_STEPS):
        if reference is not None:
            loss = sum(dpo_pair_loss(model, reference, batch) for batch in rank_batches) / WORLD_SIZE
        else:
            sums, counts = zip(*(lm_loss_sum(model, batch) for batch in rank_batches))
            loss = sum(sums) / sum(counts)
        loss.backward()
        losses.append(float(loss.detach()))
        norms.append(_step(model, optimizer))
    return {"losses": losses, "grad_norms": norms, "generated": generated,
            "state": {k: v.detach() for k, v in model.state_dict().items()}}


def _rank_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's loss to backward, the loss over all ranks to report) with the LM recipe's normalisation."""
    loss_sum, num_tokens = lm_loss_sum(model, batch)
    global_tokens = num_tokens.float()
    dist.all_reduce(global_tokens)
    reported = loss_sum.detach().clone()
    dist.all_reduce(reported)
    return loss_sum * WORLD_SIZE / global_tokens, reported / global_tokens  # FSDP averages the ranks' gradients


def _sharded_run(model_dir: str, case: dict[str, Any], batches: dict, mesh: DeviceMesh) -> dict[str, Any]:
    """This rank's part of the same training, sharded; rank 0 gets the full trained state back."""
    model = _model(model_dir, case)
    names = [name for name, _ in model.named_parameters()]
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    precision = case.get("mixed_precision", "fp32")
    shard_model(model, mesh, precision, reshard_after_forward=case.get("reshard_after_forward", True))
    rank, batch = dist.get_rank(), batches[case["batches"][dist.get_rank()]]
    generated = _generate(model, batches["prompt"], rank) if case.get("generate_first") else None
    reference = None
    if case.get("objective") == "dpo":
        reference = shard_model(_model(model_dir, case).eval().requires_grad_(False), mesh, precision)
    optimizer, losses, norms, frozen_grads, reduced_early = _optimizer(model), [], [], [], []
    for _ in range(NUM_STEPS):
        if reference is not None:
            loss = dpo_pair_loss(model, reference, batch)  # FSDP averages the ranks' gradients: the mean over ranks
            reported = loss.detach().clone()
            dist.all_reduce(reported)
            reported /= WORLD_SIZE
        else:
            if case.get("accumulate"):
                with deferred_gradient_sync(model):
                    (_rank_lm_loss(model, batch)[0] / 2).backward()
                reduced_early += [name for name, p in model.named_parameters() if p.grad is not None]
            loss, reported = _rank_lm_loss(model, batch)
            loss = loss / 2 if case.get("accumulate") else loss
        loss.backward()
        frozen_grads += [name for name, p in model.named_parameters() if name in frozen and p.grad is not None]
        losses.append(float(reported))
        norms.append(_step(model, optimizer))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"losses": losses, "grad_norms": norms, "frozen_grads": frozen_grads, "reduced_early": reduced_early,
            "generated": generated,
            "names_kept": [name for name, _ in model.named_parameters()] == names,
            "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "state": state}


def _rank_main(job_file: str) -> None:
    job, rank = json.loads(Path(job_file).read_text()), int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{job['store']}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=job["timeout_s"]))
    batches = torch.load(job["batches"], weights_only=True)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    try:
        for name in job["cases"]:
            case = CASES[name]
            started = time.perf_counter()
            result = _sharded_run(job["model_dir"], case, batches, mesh)
            state = result.pop("state")
            if rank == 0:
                torch.save(state, Path(job["out"], f"{name}.pt"))
            result["seconds"] = time.perf_counter() - started
            Path(job["out"], f"{name}.rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, processor, tmp_path_factory) -> dict[str, Any]:
    """All cases on one pair of ranks (one start-up); the unsharded references computed meanwhile."""
    folder = tmp_path_factory.mktemp("fsdp")
    batches = build_batches(processor)
    torch.save(batches, folder / "batches.pt")
    family = family_of(AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)).name
    cases = {name: CASES[name] for family_name, name in SHARDED_CASES if family_name == family}
    job = {"model_dir": tiny_model_dir, "batches": str(folder / "batches.pt"), "out": str(folder),
           "cases": list(cases), "store": str(folder / "rendezvous.store"), "timeout_s": DEADLINE_S // 2}
    (folder / "job.json").write_text(json.dumps(job))
    with rank_processes(__file__, folder / "job.json", WORLD_SIZE, DEADLINE_S):
        torch.set_num_threads(1)
        references = {name: reference_run(tiny_model_dir, case, batches) for name, case in cases.items()}
    return {"folder": folder, "references": references}


@pytest.mark.parametrize("tiny_model_dir,name", SHARDED_CASES, indirect=["tiny_model_dir"])
def test_sharded_ranks_train_like_one_unsharded_model(runs, name, tiny_model_dir):
    reference = runs["references"][name]
    ranks = [json.loads((runs["folder"] / f"{name}.rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    tolerance = TOLERANCE.get(name, FP32_TOLERANCE)
    for rank in ranks:
        assert rank["names_kept"] and rank["sharded"] and not rank["frozen_grads"] and not rank["reduced_early"]
        assert rank["losses"] == ranks[0]["losses"] and rank["grad_norms"] == ranks[0]["grad_norms"]
    if reference["generated"] is not None:
        assert [rank["generated"] for rank in ranks] == reference["generated"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]), **tolerance)
    torch.testing.assert_close(torch.tensor(ranks[0]["grad_norms"]), torch.tensor(reference["grad_norms"]),
                               **tolerance)
    sharded = torch.load(runs["folder"] / f"{name}.pt", weights_only=True)
    assert sharded.keys() == reference["state"].keys()
    initial = _model(tiny_model_dir, CASES[name])
    for key, value in initial.named_parameters():
        changed = not torch.equal(reference["state"][key], value)
        assert changed == value.requires_grad, key  # every trained weight moved, every frozen one stayed
        if not value.requires_grad:
            assert torch.equal(sharded[key], value), key
        torch.testing.assert_close(sharded[key], reference["state"][key], **tolerance, msg=key)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
