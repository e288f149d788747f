"""What trains: freeze or train each part (vision, merger, llm) of a model of any family (`families.py`), LoRA
adapters through peft, activation checkpointing; and folding the adapters back in for a plain Hugging Face export."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from tarsier_train.models.families import PARTS, ModelFamily, family_of
from tarsier_train.models.load import load_model

log = logging.getLogger(__name__)

LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_part(model: torch.nn.Module, name: str) -> str:
    """The part ("vision", "merger" or "llm") a parameter of this model belongs to, from its name and family."""
    return family_of(model).part(name)


def adapter_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the peft adapter weights (lora_A, lora_B, ...): inside a tuner layer, outside its base layer."""
    tuner_prefixes = [name + "." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    return {name for name, _ in model.named_parameters()
            if any(name.startswith(p) and not name[len(p):].startswith("base_layer.") for p in tuner_prefixes)}


def lora_config(rank: int = 0, alpha: float = 16.0, dropout: float = 0.05,
                target_modules: Sequence[str] = LLM_PROJECTIONS,
                parts: Sequence[str] | None = None) -> LoraConfig | None:
    """peft's LoraConfig for the `model.lora` settings; None when rank is 0 (no adapters). `parts` keeps the
    adapters inside those model parts (`in_parts`), where module names repeat across them (CLIP's q_proj)."""
    if rank < 0:
        raise ValueError(f"model.lora.rank={rank}: must be 0 (no LoRA) or a positive adapter rank")
    if rank == 0:
        return None
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"model.lora.target_modules={target_modules!r}: give a list of module names, "
                         "e.g. [q_proj, v_proj] (the LLM) or [qkv, fc1, fc2] (the vision blocks)")
    if parts is not None and (not parts or set(parts) - set(PARTS)):
        raise ValueError(f"model.lora.parts={list(parts)}: give one or more of {', '.join(PARTS)}, "
                         "or null for adapters in any part")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))


def in_parts(config: LoraConfig, family: ModelFamily, parts: Sequence[str] | None) -> LoraConfig:
    """The config with its target modules matched only inside these parts of a model of this family (all parts:
    None); peft reads a string as a regex over full module names."""
    if parts is None:
        return config
    prefixes = [re.escape(prefix) for part in parts for prefix in getattr(family, part)]
    names = "|".join(re.escape(name) for name in sorted(config.target_modules))
    config.target_modules = rf"({'|'.join(prefixes)}).*\b({names})"
    return config


def set_trainable(model: torch.nn.Module, trainable: Mapping[str, bool]) -> None:
    """requires_grad per part. Adapter weights always train; the weights they adapt stay frozen, so a part that
    holds adapters cannot also be trained in full. Parameters the forward never uses (`idle_parameters`) stay frozen."""
    family = family_of(model)
    adapters, part, idle = adapter_parameter_names(model), family.part, family.idle_parameters(model)
    doubled = sorted({part(name) for name in adapters if trainable[part(name)]})
    if doubled:
        raise ValueError(
            "model.lora puts adapters into " + ", ".join(doubled) + ", which model.trainable also trains in full: "
            + " ".join(f"model.trainable.{part}=false" for part in doubled) + " (train the adapters only), "
            "or model.lora.rank=0 (no LoRA)")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_((name in adapters or trainable[part(name)]) and not name.startswith(idle))


def build_model(model_dir: str, dtype: str = "float32", attn_implementation: str = "sdpa",
                trainable: Mapping[str, bool] | None = None, lora: Mapping | None = None,
                gradient_checkpointing: bool = False) -> PreTrainedModel:
    """The model a run trains: weights from model_dir, LoRA adapters if model.lora.rank > 0, each part frozen or
    trained as model.trainable says (default: all, as Tarsier2), activation checkpointing if asked."""
    parts = {part: True for part in PARTS} | dict(trainable or {})
    if unknown := sorted(set(parts) - set(PARTS)):
        raise ValueError(f"model.trainable.{unknown[0]}: not a model part (parts: {', '.join(PARTS)})")
    adapter_config = lora_config(**(lora or {}))  # settings checked before the weights load
    model = load_model(model_dir, dtype, attn_implementation)
    if adapter_config is not None:
        # In place (peft's integration API): the model keeps its class and module paths, so vision code,
        # generate() and per-block sharding see the same model with or without adapters.
        inject_adapter_in_model(in_parts(adapter_config, family_of(model), (lora or {}).get("parts")), model)
    set_trainable(model, parts)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: every model.trainable part is false and model.lora.rank=0")
    if gradient_checkpointing:
        # Non-reentrant checkpointing gives gradients to trainable weights behind frozen inputs too.
        model.activation_checkpointing_enable({"use_reentrant": False})
    log.info("training %s%s: %d of %d parameters", ", ".join(p for p in PARTS if parts[p]) or "no part in full",
             f" + LoRA rank {adapter_config.r}" if adapter_config else "",
             sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    return model


def fp32_master_weights(module: torch.nn.Module, keep_frozen_dtype: bool) -> None:
    """Parameters that train become fp32, whatever dtype the checkpoint loaded in: Adam's steps at Tarsier2's learning
    rates (1e-6 to 2e-5) lie below bf16's resolution for most weights and would be rounded away, and the optimiser
    state follows the parameters' dtype. Frozen parameters keep theirs when the compute runs in bf16 anyway
    (keep_frozen_dtype: half the memory), else become fp32 too, so that no op meets two dtypes."""
    for parameter in module.parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.float32 and (
                parameter.requires_grad or not keep_frozen_dtype):
            parameter.data = parameter.data.float()


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into the weight it adapts and put the plain layer back, in place: peft's merge_and_unload
    for a model adapted with inject_adapter_in_model. The result saves as an ordinary Hugging Face model."""
    tuner_layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in tuner_layers:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
    if tuner_layers:
        del model.peft_config  # peft's record of the injected adapters, gone with them
    return model
