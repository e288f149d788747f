"""FSDP2 for our model families: `fully_shard` on each ViT block, the projector and each decoder layer, then the
root, with the hooks that keep every rank's collectives in the same order whatever its batch holds."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from transformers import PreTrainedModel

from tarsier_train.models.families import family_of

log = logging.getLogger(__name__)

MixedPrecision = Literal["bf16", "fp32"]
# Entry points besides forward(): shared media for DPO and the text-only dummy vision term call the ViT through
# get_*_features, generate() encodes media through the base model. FSDP2 all-gathers the root's parameters (the
# patch embedding among them) around them as around forward(), and the root is the first unit to run whichever
# comes first (FSDP2 makes the first unit to run its root and refuses the real root afterwards).
ROOT_METHODS = ("get_video_features", "get_image_features", "generate")


def mixed_precision_policy(mixed_precision: MixedPrecision) -> MixedPrecisionPolicy:
    """bf16: parameters all-gathered and computed in bf16, gradients reduced and kept in fp32 (sharded fp32 master
    weights for the optimiser); fp32: no casting (CPU runs, reference numbers)."""
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mixed_precision == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"mixed_precision={mixed_precision!r}: allowed values are bf16, fp32")


def shard_unit_names(model: PreTrainedModel) -> list[str]:
    """The modules that become FSDP units, in forward order: the ViT blocks and decoder layers (the model's
    `_no_split_modules` classes) with the family's projector between them. The root keeps the rest: patch and token
    embeddings, final norm, lm_head (tied or not)."""
    family = family_of(model)
    blocks = [name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules]
    vision = [name for name in blocks if name.startswith(family.vision_blocks)]
    llm = [name for name in blocks if name.startswith(family.decoder_layers)]
    if not vision or not llm or len(vision) + len(llm) != len(blocks):
        raise ValueError(f"{type(model).__name__}: expected {family.name} blocks under {family.vision_blocks} and "
                         f"{family.decoder_layers} (classes {sorted(model._no_split_modules)}), found {blocks}")
    return vision + list(family.projector_units) + llm


def _runs_backward(model: PreTrainedModel, names: list[str]) -> list[bool]:
    """Whether each unit's output requires grad, i.e. FSDP2 runs its pre-backward: a vision unit when anything from
    the stem up to it trains; every decoder layer whenever anything trains (`_inputs_require_grad`)."""
    family = family_of(model)
    anything = any(p.requires_grad for p in model.parameters())
    upstream = any(p.requires_grad for name, p in model.named_parameters() if name.startswith(family.vision_stem))
    runs = []
    for name in names:
        if name.startswith(family.decoder_layers):
            runs.append(anything)
        else:
            upstream = upstream or any(p.requires_grad for p in model.get_submodule(name).parameters())
            runs.append(upstream)
    return runs


def _inputs_require_grad(model: PreTrainedModel) -> None:
    """The token embeddings' output always requires grad. Otherwise the first decoder layer's input needs grad on a
    rank whose batch scatters trained ViT features into it and not on a text-only rank: FSDP2 would reduce-scatter
    that layer's gradients at different points on the two ranks, and the collectives would no longer pair up."""

    def require_grad(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(require_grad)


def shard_model(model: PreTrainedModel, device_mesh: DeviceMesh, mixed_precision: MixedPrecision = "fp32",
                reshard_after_forward: bool = True,
                prepare_unit: Callable[[torch.nn.Module], None] | None = None) -> PreTrainedModel:
    """Apply FSDP2 in place: one unit per ViT block, the merger, one per decoder layer, then the root. Parameter
    names stay as they were (optimiser groups and LR decay use them); build the optimiser after this call. Every
    rank must hold the same weights before (same seed for LoRA's random init): each keeps its slice of its own copy.

    A model with nothing to train (the DPO reference) also frees the root's parameters after each forward, as no
    backward will. `device_mesh` is the 1-D data-parallel mesh (Lightning: `self.device_mesh["data_parallel"]`).
    Text-only batches must add `text_only_vision_term` *before* the model's forward, where a video batch runs the ViT.
    `prepare_unit` (e.g. a cast to fp32 master weights) runs on each unit just before it is sharded, so no rank ever
    holds more than one unit prepared in full.
    """
    policy = mixed_precision_policy(mixed_precision)
    names = shard_unit_names(model)
    trains = any(p.requires_grad for p in model.parameters())
    units: list[FSDPModule] = []
    for name in names:
        if prepare_unit is not None:
            prepare_unit(model.get_submodule(name))
        units.append(fully_shard(model.get_submodule(name), mesh=device_mesh, mp_policy=policy,
                                 reshard_after_forward=reshard_after_forward))
    if prepare_unit is not None:  # the root's own parameters: the units' are sharded (and prepared) already
        prepare_unit(model)
    # The root keeps its parameters from forward to backward (FSDP2's default for the root) when it trains.
    root = fully_shard(model, mesh=device_mesh, mp_policy=policy, reshard_after_forward=None if trains else True)
    for method in ROOT_METHODS:
        if hasattr(root, method):  # LLaVA (Tarsier1) has no get_video_features: its frames are images
            register_fsdp_forward_method(root, method)
    model._is_fsdp_managed_module = True  # transformers' generate() then keeps ranks in step (synced_gpus)
    if trains:
        _inputs_require_grad(model)
        _set_backward_prefetch(root, units, _runs_backward(model, names))
    log.info("FSDP2 over %d ranks: %d units + root, mixed precision %s", device_mesh.size(), len(units),
             mixed_precision)
    return model


def _set_backward_prefetch(root: FSDPModule, units: list[FSDPModule], runs_backward: list[bool]) -> None:
    """Each unit that runs backward prefetches the one that runs next (reverse forward order); the last, and every
    unit that never runs backward, "prefetches" the root, which stays unsharded until backward ends: a no-op.
    FSDP2's default instead prefetches whatever finished forward just before: that is the ViT on a video rank and
    the root on a text-only rank (its dummy vision term goes through the root's `get_video_features`), so the
    ranks' all-gathers and reduce-scatters would pair up wrongly."""
    chain = [root, *reversed([unit for unit, runs in zip(units, runs_backward) if runs]), root]
    for unit, previous in itertools.pairwise(chain):
        unit.set_modules_to_backward_prefetch([previous])
    for unit, runs in zip(units, runs_backward):
        if not runs:
            unit.set_modules_to_backward_prefetch([root])


@contextlib.contextmanager
def deferred_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """Backward passes inside keep each unit's unsharded gradient on its rank instead of reduce-scattering it; the
    first backward after the block reduce-scatters the accumulated sum once. Gradient accumulation then costs one
    reduce-scatter per optimiser step instead of one per micro-batch, at the price of a full (unsharded) gradient
    in memory on every rank."""
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)
