"""Schemas of the config that no `_target_` signature covers: the root keys, `optim`, `model` (structured-config
dataclasses), and types several signatures share. Optional keys have defaults; the defaults themselves live in
conf/, these are never instantiated."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal, TypedDict

from tarsier_train.config.types import (
    Allowed, Fraction, FractionBelowOne, Instantiated, NonEmptyList, NonNegativeFloat, NonNegativeInt, PositiveFloat,
    PositiveFraction, PositiveInt,
)
from tarsier_train.data.sampling import SamplingMode
from tarsier_train.models.load import ModelDtype

Mode = Literal["fit", "predict"]
Resume = Annotated[str | None, Allowed("null, auto, or a path to a .ckpt file")]
# One frame count, or a list to draw from per training sample.
FrameCounts = PositiveInt | NonEmptyList[PositiveInt]


class _DataSourceShards(TypedDict):
    shards: str | NonEmptyList[str]


class DataSource(_DataSourceShards, total=False):
    """An entry of data.sources: its shards, and what it overrides of data.* (absent: data.*'s value)."""

    weight: PositiveFloat
    task: str | None
    num_frames: FrameCounts
    frame_sampling: SamplingMode


@dataclasses.dataclass
class LrScale:
    """Each model part's lr = optim.lr x its scale."""

    vision: NonNegativeFloat = 1.0
    merger: NonNegativeFloat = 1.0
    llm: NonNegativeFloat = 1.0


@dataclasses.dataclass
class Optim:
    lr: NonNegativeFloat  # 0 is a real setting: a stage that must export its initial weights
    betas: tuple[FractionBelowOne, FractionBelowOne]
    eps: PositiveFloat
    weight_decay: NonNegativeFloat
    warmup_steps: NonNegativeInt
    min_lr_ratio: Fraction
    lr_scale: LrScale = dataclasses.field(default_factory=LrScale)
    vision_layer_decay: PositiveFraction = 1.0  # 1.0: off
    grad_clip: PositiveFloat | None = None


@dataclasses.dataclass
class Trainable:
    vision: bool = True
    merger: bool = True
    llm: bool = True


@dataclasses.dataclass
class Lora:
    rank: NonNegativeInt = 0  # 0: no LoRA
    alpha: PositiveFloat = 16.0
    dropout: FractionBelowOne = 0.05
    target_modules: list[str] = dataclasses.field(default_factory=list)
    parts: list[Literal["llm", "merger", "vision"]] | None = None  # None: adapters in any part


@dataclasses.dataclass
class Model:
    dir: Instantiated
    dtype: ModelDtype
    attn_implementation: str  # transformers' names, which grow with its versions and kernels
    path: str | None = None  # model=qwen2_vl: the local HF directory model.dir reads
    trainable: Trainable = dataclasses.field(default_factory=Trainable)
    lora: Lora = dataclasses.field(default_factory=Lora)
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class Config:
    """The root: train.yaml's keys and one node per config group."""

    seed: int
    run_name: str | int  # run_name=2024 reaches us as an int (Hydra parses it); it names a directory all the same
    output_root: Path
    run_dir: Path
    cache_root: Path
    resume: Resume
    init_from: Path | None  # the previous stage: its run dir or an HF export
    mode: Mode
    optim: Optim
    model: Model
    data: Instantiated
    objective: Instantiated
    trainer: Instantiated
    logger: Instantiated
    callbacks: dict[str, Instantiated | None] = dataclasses.field(default_factory=dict)
    benchmark: Instantiated | None = None  # recipe=evaluate
    judge: Instantiated | None = None  # recipe=evaluate on captions
