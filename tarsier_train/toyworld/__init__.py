"""Synthetic moving-shape videos with exact event ground truth."""

from tarsier_train.toyworld.describe import DESCRIBE_PROMPT, describe, describe_grounded
from tarsier_train.toyworld.shards import ToyWorldSpec, ensure_derived, ensure_toyworld, toyworld_shards
from tarsier_train.toyworld.world import Clip, Event, generate_clip, render_frames

__all__ = ["DESCRIBE_PROMPT", "Clip", "Event", "ToyWorldSpec", "describe", "describe_grounded",
           "ensure_derived", "ensure_toyworld", "generate_clip", "render_frames", "toyworld_shards"]
