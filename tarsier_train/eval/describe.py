"""Greedy descriptions from a VLM, and their event scores on toy-world shards."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import torch
import webdataset as wds
from transformers import PreTrainedModel, ProcessorMixin

from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.eval.event_f1 import EventScore, corpus_event_score, reference_events
from tarsier_train.eval.generation import GenerationSettings, generate_texts
from tarsier_train.eval.grounding import GroundingScore, score_grounding


def greedy_description(model: PreTrainedModel, processor: ProcessorMixin, prompt_inputs: dict[str, torch.Tensor],
                       max_new_tokens: int = 48) -> str:
    """Greedy continuation of one prompt (batch of one, as `VideoTextTransform.generation_inputs` makes it)."""
    return generate_texts(model, processor, [prompt_inputs], GenerationSettings(max_new_tokens))[0]


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
