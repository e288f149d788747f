"""Source transform: a Tarsier-format record -> the canonical (prompt, media, target) sample."""

from __future__ import annotations

import dataclasses
from typing import Any

from tarsier_train.data.chat_labels import TARGET_FLAG
from tarsier_train.data.record_check import IMAGE_EXTENSIONS, MEDIA_FILE_KEY, VIDEO_EXTENSIONS, RecordError, check_record


@dataclasses.dataclass(frozen=True)
class Turn:
    """An exchange before a multi-turn record's last one: the user's text, how many of the sample's media items (in
    order) the user's message shows, the assistant's answer, and whether that answer is a target."""

    prompt: str
    answer: str
    num_media: int = 0
    trained: bool = True


@dataclasses.dataclass(frozen=True)
class VideoTextSample:
    key: str
    prompt: str  # the last user turn's text
    target: str  # the last assistant turn's text
    # Every user turn's media items in order, as written: {"type": "video", "video": {video_file, optional
    # frame/time selection}} or {"type": "image", "image": {image_file}}; empty: text-only.
    media: tuple[dict[str, Any], ...]
    record: dict[str, Any]
    # The task was overridden (data.task / a source's task): the record's own question belongs to another task.
    retasked: bool = False
    history: tuple[Turn, ...] = ()  # the exchanges before the last one (multi-turn records)
    system: str | None = None  # the record's system message; None: the chat template's default, if any
    target_trained: bool = True  # False: the last answer says "loss": false

    @property
    def video(self) -> dict[str, Any] | None:
        """The payload of the sample's one video item (video tasks need exactly one); None without video."""
        videos = [item["video"] for item in self.media if item["type"] == "video"]
        if len(videos) > 1:
            raise ValueError(f"{self.key}: task {self.record.get('task')!r} needs one video, the record has {len(videos)}")
        return videos[0] if videos else None


def _text(message: dict[str, Any]) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(i["text"] for i in content if i["type"] == "text")


def _media(message: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    content = message["content"]
    return tuple(item for item in content if item["type"] in MEDIA_FILE_KEY) if isinstance(content, list) else ()


def _trained(assistant: dict[str, Any]) -> bool:
    return assistant.get(TARGET_FLAG, True) is not False


def canonical_sample(key: str, record: Any, task: str | None = None) -> VideoTextSample:
    """Read a record of the released Tarsier jsonl schema; `task` overrides the record's own. `messages` is an
    optional system message, then user and assistant turns in alternation, ending with the assistant's; every
    assistant answer is a target unless its message says "loss": false (or it is empty). A record that is not
    usable for the task raises `RecordError` (`check_record`: the same check the shard writer rejects with)."""
    try:
        check_record(record, task)
    except RecordError as error:
        raise RecordError(error.reason, f"{key}: {error.detail}") from None
    messages = record["messages"]
    system = _text(messages[0]) if messages[0].get("role") == "system" else None
    turns = messages[1:] if system is not None else messages
    pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]
    history = tuple(Turn(_text(user), _text(assistant), len(_media(user)), _trained(assistant))
                    for user, assistant in pairs[:-1])
    user, assistant = pairs[-1]
    media = tuple(item for turn_user, _ in pairs for item in _media(turn_user))
    retasked = task is not None and task != record.get("task")
    if retasked:
        record = {**record, "task": task}
    return VideoTextSample(key, _text(user), _text(assistant), media, record, retasked, history, system,
                           _trained(assistant))


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
    raise RecordError("missing_member", f"{sample.key}: no shard member for {item['type']} file {name!r} "
                                        f"(members: {present})")
