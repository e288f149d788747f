"""Generation for many prompts at once: prompts left-padded into one batch, so every row's answer starts at the same
position and `generate` runs one forward per token for the whole batch. Works for every model family: each prompt
is what `VideoTextTransform.generation_inputs` made, its visual inputs concatenated in row order as in training."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel, ProcessorMixin

from tarsier_train.config.types import NonNegativeFloat, PositiveFraction, PositiveInt
from tarsier_train.data.transform import VISUAL_INPUTS

TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Greedy by default (Tarsier2's benchmarks: greedy, 512 new tokens); temperature > 0 samples with top_p."""

    max_new_tokens: PositiveInt = 512
    temperature: NonNegativeFloat = 0.0
    top_p: PositiveFraction = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"generation needs max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1, got "
                             f"{self.max_new_tokens}, {self.temperature}, {self.top_p}")

    def generate_kwargs(self) -> dict[str, object]:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}


def generation_sync(model: PreTrainedModel) -> dict[str, bool]:
    """`generate` keyword arguments that keep sharded ranks in step: under FSDP every forward gathers the weights from
    all ranks, so a rank whose answer ends first must keep joining forwards until every rank's has ended
    (transformers' `synced_gpus`). An unsharded model generates on its own, without the per-token all-reduce."""
    sharded = isinstance(model, FSDPModule) and dist.is_available() and dist.is_initialized()
    return {"synced_gpus": True} if sharded and dist.get_world_size() > 1 else {}


def with_prefill(prompt: dict[str, torch.Tensor], prefill_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """A prompt whose answer starts with given text tokens (multiple choice: " Answer: ("): they follow the
    assistant header as text the model continues from."""
    if not prefill_ids:
        return prompt
    extra = torch.tensor([list(prefill_ids)], dtype=prompt["input_ids"].dtype)
    return {**prompt, "input_ids": torch.cat([prompt["input_ids"], extra], dim=1),
            "attention_mask": torch.cat([prompt["attention_mask"], torch.ones_like(extra)], dim=1),
            **({"mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)}
               if "mm_token_type_ids" in prompt else {})}


def left_padded(prompts: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch-of-one prompts -> one batch, each row's tokens at the right end (attention_mask 0 on the padding);
    visual inputs concatenated in row order (text-only rows add none)."""
    unknown = {name for prompt in prompts for name in prompt} - set(TOKEN_INPUTS) - set(VISUAL_INPUTS)
    if unknown:
        raise ValueError(f"prompt inputs {sorted(unknown)} are neither tokens nor known visual inputs")
    length = max(prompt["input_ids"].shape[1] for prompt in prompts)
    batch = {}
    for name in TOKEN_INPUTS:
        if name not in prompts[0]:
            continue
        fill = pad_token_id if name == "input_ids" else 0
        rows = torch.full((len(prompts), length), fill, dtype=prompts[0][name].dtype)
        for row, prompt in zip(rows, prompts):
            row[length - prompt[name].shape[1]:] = prompt[name][0]
        batch[name] = rows
    for name in VISUAL_INPUTS:
        if any(name in prompt for prompt in prompts):
            batch[name] = torch.cat([prompt[name] for prompt in prompts if name in prompt])
    return batch


@torch.no_grad()
def generate_texts(model: PreTrainedModel, processor: ProcessorMixin, prompts: Sequence[dict[str, torch.Tensor]],
                   settings: GenerationSettings = GenerationSettings()) -> list[str]:
    """One answer per prompt, from a single batched `generate` (special tokens and surrounding spaces removed)."""
    if not prompts:
        return []
    tokenizer = processor.tokenizer
    inputs = {k: v.to(model.device) for k, v in left_padded(prompts, tokenizer.pad_token_id).items()}
    output = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **settings.generate_kwargs(),
                            **generation_sync(model))
    answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]
