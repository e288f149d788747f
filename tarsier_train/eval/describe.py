"""Greedy descriptions from a VLM, and their event scores on toy-world shards."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import webdataset as wds
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel, ProcessorMixin

from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.eval.event_f1 import EventScore, corpus_event_score, reference_events
from tarsier_train.eval.grounding import GroundingScore, score_grounding


def generation_sync(model: PreTrainedModel) -> dict[str, bool]:
    """`generate` keyword arguments that keep sharded ranks in step: under FSDP every forward gathers the weights from
    all ranks, so a rank whose answer ends first must keep joining forwards until every rank's has ended
    (transformers' `synced_gpus`). An unsharded model generates on its own, without the per-token all-reduce."""
    sharded = isinstance(model, FSDPModule) and dist.is_available() and dist.is_initialized()
    return {"synced_gpus": True} if sharded and dist.get_world_size() > 1 else {}


@torch.no_grad()
def greedy_description(model: PreTrainedModel, processor: ProcessorMixin, prompt_inputs: dict[str, torch.Tensor],
                       max_new_tokens: int = 48) -> str:
    """Greedy continuation of one prompt (batch of one, as `VideoTextTransform.generation_inputs` makes it)."""
    inputs = {k: v.to(model.device) for k, v in prompt_inputs.items()}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=processor.tokenizer.pad_token_id, **generation_sync(model))
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate_event_f1(model: PreTrainedModel, processor: ProcessorMixin, shards: Iterable[str],
                      num_frames: int = 8, duplicate_frames: bool = True, max_new_tokens: int = 48) -> EventScore:
    """Corpus event score of the model's descriptions of every clip in the shards."""
    transform = VideoTextTransform(processor, FrameSampler(num_frames=num_frames), duplicate_frames=duplicate_frames)
    model.eval()

    def described() -> Iterator[tuple[str, list]]:
        for raw in wds.WebDataset(list(shards), shardshuffle=False, nodesplitter=None, workersplitter=None):
            record = json.loads(raw["json"])
            sample = canonical_sample(raw["__key__"], record)
            prompt = transform.generation_inputs(transform.prepare(sample, media_bytes(sample, raw)))
            yield greedy_description(model, processor, prompt, max_new_tokens), reference_events(record)

    return corpus_event_score(described())


def evaluate_grounding(model: PreTrainedModel, processor: ProcessorMixin, shards: Iterable[str],
                       num_frames: int = 8, duplicate_frames: bool = True, max_new_tokens: int = 64,
                       outputs: list[tuple[str, str]] | None = None) -> GroundingScore:
    """Frame-grounding score of the model's answers to every clip's grounded prompt (task video/grounding):
    exact `<frame: i-j>` spans and span IoU against the grounded reference of the same sampled frames.
    `outputs`, when given, collects (prediction, reference) per clip."""
    transform = VideoTextTransform(processor, FrameSampler(num_frames=num_frames), duplicate_frames=duplicate_frames)
    model.eval()
    total = GroundingScore()
    for raw in wds.WebDataset(list(shards), shardshuffle=False, nodesplitter=None, workersplitter=None):
        sample = canonical_sample(raw["__key__"], json.loads(raw["json"]), task="video/grounding")
        task_input = transform.prepare(sample, media_bytes(sample, raw))
        prediction = greedy_description(model, processor, transform.generation_inputs(task_input), max_new_tokens)
        total = total.add(score_grounding(prediction, task_input.target))
        if outputs is not None:
            outputs.append((prediction, task_input.target))
    return total
