"""Source transform: a Tarsier-format record -> the canonical (prompt, video, target) sample."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class VideoTextSample:
    key: str
    prompt: str
    target: str
    video: dict[str, Any]  # the record's video item: video_file plus optional frame/time selection
    record: dict[str, Any]


def canonical_sample(key: str, record: dict[str, Any]) -> VideoTextSample:
    """Read a single-video caption record (the released Tarsier jsonl schema)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{key}: record needs 'messages' with a user and an assistant turn")
    user, assistant = messages[0], messages[-1]
    videos = [item["video"] for item in user["content"] if item.get("type") == "video"]
    if len(videos) != 1:
        raise ValueError(f"{key}: expected one video item in the user turn, found {len(videos)}")
    prompt = " ".join(item["text"] for item in user["content"] if item.get("type") == "text")
    target = " ".join(item["text"] for item in assistant["content"] if item.get("type") == "text")
    return VideoTextSample(key, prompt, target, videos[0], record)
