"""Source transform: a Tarsier-format record -> the canonical (prompt, media, target) sample."""

from __future__ import annotations

import dataclasses
from typing import Any

MEDIA_FILE_KEY = {"video": "video_file", "image": "image_file"}


@dataclasses.dataclass(frozen=True)
class VideoTextSample:
    key: str
    prompt: str
    target: str
    # The user turn's media items in order, as written: {"type": "video", "video": {video_file, optional
    # frame/time selection}} or {"type": "image", "image": {image_file}}; empty: text-only.
    media: tuple[dict[str, Any], ...]
    record: dict[str, Any]
    # The task was overridden (data.task / a source's task): the record's own question belongs to another task.
    retasked: bool = False

    @property
    def video(self) -> dict[str, Any] | None:
        """The payload of the sample's one video item (video tasks need exactly one); None without video."""
        videos = [item["video"] for item in self.media if item["type"] == "video"]
        if len(videos) > 1:
            raise ValueError(f"{self.key}: task {self.record.get('task')!r} needs one video, the record has {len(videos)}")
        return videos[0] if videos else None


def canonical_sample(key: str, record: dict[str, Any], task: str | None = None) -> VideoTextSample:
    """Read a record of the released Tarsier jsonl schema; `task` overrides the record's own."""
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{key}: record needs 'messages' with a user and an assistant turn")
    user, assistant = messages[0], messages[-1]
    media = tuple(item for item in user["content"] if item.get("type") in MEDIA_FILE_KEY)
    for item in media:
        if not isinstance(item.get(item["type"]), dict) or MEDIA_FILE_KEY[item["type"]] not in item[item["type"]]:
            raise ValueError(f"{key}: {item['type']} item without '{item['type']}.{MEDIA_FILE_KEY[item['type']]}'")
    prompt = " ".join(item["text"] for item in user["content"] if item.get("type") == "text")
    target = " ".join(item["text"] for item in assistant["content"] if item.get("type") == "text")
    retasked = task is not None and task != record.get("task")
    if retasked:
        record = {**record, "task": task}
    return VideoTextSample(key, prompt, target, media, record, retasked)


VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "gif")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def media_members(members: dict[str, Any]) -> dict[str, bytes]:
    """A WebDataset sample's media members (no record json, no `__key__`-style metadata), to write it out again."""
    return {name: data for name, data in members.items() if not name.startswith("__") and name != "json"}


def media_bytes(sample: VideoTextSample, members: dict[str, Any]) -> list[bytes]:
    """The bytes of each media item inside its WebDataset sample: the member its file names (`{key}.mp4`
    in the toy world, `{key}.0.mp4` from the shard writer), else, for a sample with one item, its only
    member of that kind."""
    return [_member_bytes(sample, item, members) for item in sample.media]


def _member_bytes(sample: VideoTextSample, item: dict[str, Any], members: dict[str, Any]) -> bytes:
    name = item[item["type"]][MEDIA_FILE_KEY[item["type"]]]
    member = name[len(sample.key) + 1:] if name.startswith(sample.key + ".") else None
    if member in members:
        return members[member]
    extensions = VIDEO_EXTENSIONS if item["type"] == "video" else IMAGE_EXTENSIONS
    candidates = [k for k in members if k.rsplit(".", 1)[-1].lower() in extensions]
    if len(sample.media) == 1 and len(candidates) == 1:
        return members[candidates[0]]
    present = sorted(k for k in members if not k.startswith("__"))
    raise ValueError(f"{sample.key}: no shard member for {item['type']} file {name!r} (members: {present})")
