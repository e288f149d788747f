"""Optimiser parameter groups (per-part learning rates, layer-wise decay on the vision tower) and the warm-up +
cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

from tarsier_train.config.types import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFraction, PositiveInt
from tarsier_train.models.families import PARTS, family_of


def parameter_groups(model: torch.nn.Module, lr: NonNegativeFloat, weight_decay: NonNegativeFloat,
                     lr_scale: Mapping[str, NonNegativeFloat] | None = None,
                     vision_layer_decay: PositiveFraction = 1.0) -> list[dict]:
    """Optimiser groups over the trainable parameters only, so frozen ones get no optimiser state.

    A parameter's lr is lr x lr_scale[its part] (vision, merger, llm; 1.0 when not given), and on the vision tower
    also x vision_layer_decay ** depth: BEiT/MAE layer-wise decay, block i of n at depth n - i, the patch embedding
    at n + 1, the merger undecayed (Tarsier2 decays the vision encoder by 0.9). Matrices get weight decay; biases,
    norms and other vectors do not. Groups are named ("vision.block0/no_decay") and listed LLM first.
    """
    scale = {part: 1.0 for part in PARTS} | dict(lr_scale or {})
    if unknown := sorted(set(scale) - set(PARTS)):
        raise ValueError(f"optim.lr_scale.{unknown[0]}: not a model part (parts: {', '.join(PARTS)})")
    family = family_of(model)
    num_blocks = len(model.get_submodule(family.vision_blocks.rstrip(".")))
    groups: dict[tuple, dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part, decays = family.part(name), parameter.ndim >= 2
        depth = family.vision_depth(name, num_blocks) if part == "vision" else 0
        label = {0: part, num_blocks + 1: "vision.patch_embed"}.get(depth, f"vision.block{num_blocks - depth}")
        group = groups.setdefault((PARTS.index(part), -depth, not decays), {
            "name": label + ("" if decays else "/no_decay"), "params": [],
            "lr": lr * scale[part] * vision_layer_decay ** depth, "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def grouped_optimizer(model: torch.nn.Module, weight_decay: NonNegativeFloat,
                      optimizer: Callable[..., torch.optim.Optimizer], lr: NonNegativeFloat,
                      lr_scale: Mapping[str, NonNegativeFloat] | None = None,
                      vision_layer_decay: PositiveFraction = 1.0) -> torch.optim.Optimizer:
    """`optimizer` (a partial, e.g. AdamW with its betas) over parameter_groups of the model's trainable weights."""
    return optimizer(parameter_groups(model, lr, weight_decay, lr_scale, vision_layer_decay))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: NonNegativeInt, total_steps: PositiveInt,
                  min_lr_ratio: Fraction = 0.0) -> LambdaLR:
    """Linear warm-up from 0 to the peak over warmup_steps, then cosine down to min_lr_ratio x peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
