"""Source transform: a Tarsier-format record -> the canonical (prompt, video, target) sample."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class VideoTextSample:
    key: str
    prompt: str
    target: str
    video: dict[str, Any] | None  # the record's video item (video_file, optional frame/time selection); None: text-only
    record: dict[str, Any]


def canonical_sample(key: str, record: dict[str, Any]) -> VideoTextSample:
    """Read a single-video caption record (the released Tarsier jsonl schema)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{key}: record needs 'messages' with a user and an assistant turn")
    user, assistant = messages[0], messages[-1]
    videos = [item["video"] for item in user["content"] if item.get("type") == "video"]
    if len(videos) > 1:
        raise ValueError(f"{key}: {len(videos)} video items in the user turn; one (or none, text-only) is supported")
    prompt = " ".join(item["text"] for item in user["content"] if item.get("type") == "text")
    target = " ".join(item["text"] for item in assistant["content"] if item.get("type") == "text")
    return VideoTextSample(key, prompt, target, videos[0] if videos else None, record)


VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "gif")


def video_bytes(sample: VideoTextSample, members: dict[str, Any]) -> bytes | None:
    """The bytes of the sample's video inside its WebDataset sample: the member that `video_file` names
    (`{key}.mp4` in the toy world, `{key}.0.mp4` from the shard writer), else the sample's only video member;
    None for a text-only sample."""
    if sample.video is None:
        return None
    name = sample.video["video_file"]
    member = name[len(sample.key) + 1:] if name.startswith(sample.key + ".") else None
    if member in members:
        return members[member]
    videos = [k for k in members if k.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS]
    if len(videos) == 1:
        return members[videos[0]]
    present = sorted(k for k in members if not k.startswith("__"))
    raise ValueError(f"{sample.key}: no shard member for video_file {name!r} (members: {present})")
