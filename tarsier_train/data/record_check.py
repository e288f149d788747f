"""Is a record a usable Tarsier-format record, and if not, why? One check for the shard writer (which rejects the
line into rejects.jsonl) and the loader (which skips the sample and counts it): each failure is a `RecordError` with
a stable reason code, so both report the same reasons under the same names."""

from __future__ import annotations

import json
import math
from typing import Any

MEDIA_FILE_KEY = {"video": "video_file", "image": "image_file"}
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "gif")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
ROLES = ("system", "user", "assistant")
# A record may pick its frames itself (frame_indices / time_indices); more than this is not a frame selection but a
# mistake (a whole decoded video's worth of indices), and would make the loader decode without bound.
MAX_SELECTED_FRAMES = 1024
# Tasks whose targets are built from the record's annotations rather than read from its answer.
GROUNDING, TRACKING, FRAME_ORDER = "video/grounding", "video/tracking", "video/frame_order"
ONE_VIDEO_TASKS = (GROUNDING, TRACKING, FRAME_ORDER)

# The stable reason codes (rejects.jsonl, manifest.json's per_reject_reason, the loader's data/skipped/<reason>).
BAD_JSON = "bad_json"  # not UTF-8 JSON
NOT_AN_OBJECT = "not_an_object"  # JSON, but not an object (a list, a string, ...)
BAD_MESSAGES = "bad_messages"  # no 'messages' list of message objects
BAD_ROLES = "bad_roles"  # not (system) user, assistant, user, assistant, ... ending with the assistant
BAD_CONTENT = "bad_content"  # a message's content is neither a string nor a list of items; an item without its text
UNSUPPORTED_ITEM = "unsupported_item"  # a content item of a type other than text, video, image
BAD_MEDIA_ITEM = "bad_media_item"  # a video/image item without its file name
BAD_FRAME_SELECTION = "bad_frame_selection"  # frame_indices, time_indices, start/end fields of the wrong type or sign
TOO_MANY_FRAMES = "too_many_frames"  # frame_indices/time_indices longer than MAX_SELECTED_FRAMES
BAD_TASK = "bad_task"  # 'task' is not a string
BAD_EXTRA_INFO = "bad_extra_info"  # 'extra_info' is not an object (null is allowed: no extra information)
BAD_EVENTS = "bad_events"  # extra_info.events is not a list of strings or of objects
NOT_GROUNDABLE = "not_groundable"  # a grounding sample without {start, end, text} events
BAD_TRACKING = "bad_tracking"  # a tracking sample without extra_info.tracking.boxes {frame: [x1, y1, x2, y2]}
WRONG_MEDIA_COUNT = "wrong_media_count"  # a one-video task (grounding, tracking, frame order) on another count
BAD_ANSWERS = "bad_answers"  # a preference record whose chosen/rejected are not both strings


class RecordError(ValueError):
    """A record that cannot become a sample: `reason` is a stable code (above), `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_record(raw: bytes | str) -> dict[str, Any]:
    """A JSON line (or a shard's json member) -> the record object, checked to be an object."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(BAD_JSON, str(error)) from error
    if not isinstance(record, dict):
        raise RecordError(NOT_AN_OBJECT, f"the record is a JSON {type(record).__name__}, not an object")
    return record


def extra_info(record: dict[str, Any]) -> dict[str, Any]:
    """The record's extra_info object; {} when it has none (absent or null)."""
    info = record.get("extra_info")
    return info if isinstance(info, dict) else {}


def check_record(record: Any, task: str | None = None) -> None:
    """Raise `RecordError` unless `record` is a usable Tarsier-format record for `task` (None: the record's own)."""
    if not isinstance(record, dict):
        raise RecordError(NOT_AN_OBJECT, f"the record is a JSON {type(record).__name__}, not an object")
    if record.get("task") is not None and not isinstance(record["task"], str):
        raise RecordError(BAD_TASK, f"'task' is {record['task']!r}, not a string")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        older = " (this is Tarsier1's older {text: {prompt, response}} form: rewrite it as messages)" \
            if isinstance(record.get("text"), dict) and "prompt" in record["text"] else ""
        raise RecordError(BAD_MESSAGES, f"the record needs 'messages', a list of message objects{older}")
    _check_roles(messages)
    media = [item for index, message in enumerate(messages) for item in _content_media(index, message)]
    if record.get("extra_info") is not None and not isinstance(record["extra_info"], dict):
        raise RecordError(BAD_EXTRA_INFO, f"'extra_info' is a JSON {type(record['extra_info']).__name__}, "
                                          "not an object")
    events = extra_info(record).get("events")
    if events is not None and not (isinstance(events, list) and (all(isinstance(e, str) for e in events)
                                                                 or all(isinstance(e, dict) for e in events))):
        raise RecordError(BAD_EVENTS, "extra_info.events must be a list of strings (DREAM-1K) or of objects "
                                      f"({{start, end, text}}), got {_short(events)}")
    _check_task_needs(record, task if task is not None else record.get("task"), media)
    _check_preference_answers(messages[-1])


def _check_roles(messages: list[dict[str, Any]]) -> None:
    turns = messages[1:] if messages[0].get("role") == "system" else messages
    roles = [message.get("role") for message in turns]
    if len(turns) < 2 or roles != ["user", "assistant"] * (len(turns) // 2):
        raise RecordError(BAD_ROLES, "user and assistant turns must alternate, ending with the assistant's, after "
                                     f"an optional system message; got roles {_short(roles)}")


def _content_media(index: int, message: dict[str, Any]) -> list[dict[str, Any]]:
    """A message's video/image items, its content checked on the way."""
    content = message.get("content")
    if isinstance(content, str):
        return []
    if not isinstance(content, list) or not all(isinstance(item, dict) for item in content):
        raise RecordError(BAD_CONTENT, f"messages[{index}].content must be a string or a list of item objects, "
                                       f"got {_short(content)}")
    media = []
    for item in content:
        kind = item.get("type")
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise RecordError(BAD_CONTENT, f"messages[{index}]: a text item's 'text' is {_short(item.get('text'))}")
        elif kind in MEDIA_FILE_KEY:
            _check_media_item(index, item)
            media.append(item)
        else:
            raise RecordError(UNSUPPORTED_ITEM, f"messages[{index}]: content item type {kind!r} (expected text, "
                                                "video or image)")
    return media


def _check_media_item(index: int, item: dict[str, Any]) -> None:
    kind = item["type"]
    payload = item.get(kind)
    if not isinstance(payload, dict) or not isinstance(payload.get(MEDIA_FILE_KEY[kind]), str) \
            or not payload[MEDIA_FILE_KEY[kind]]:
        raise RecordError(BAD_MEDIA_ITEM, f"messages[{index}]: a {kind} item needs '{kind}.{MEDIA_FILE_KEY[kind]}', "
                                          "a file name")
    if kind == "video":
        _check_frame_selection(payload)


def _check_frame_selection(video: dict[str, Any]) -> None:
    for name, integral in (("frame_indices", True), ("time_indices", False)):
        values = video.get(name)
        if values is None:
            continue
        if not isinstance(values, list) or not values or not all(_is_number(v, integral) and v >= 0 for v in values):
            kind = "integers" if integral else "numbers"
            raise RecordError(BAD_FRAME_SELECTION, f"video.{name} must be a non-empty list of non-negative {kind}, "
                                                   f"got {_short(values)}")
        if len(values) > MAX_SELECTED_FRAMES:
            raise RecordError(TOO_MANY_FRAMES, f"video.{name} selects {len(values)} frames (at most "
                                               f"{MAX_SELECTED_FRAMES})")
    for name, integral in (("start_frame", True), ("end_frame", True), ("start_time", False), ("end_time", False)):
        value = video.get(name)
        if value is not None and not (_is_number(value, integral) and value >= 0):
            raise RecordError(BAD_FRAME_SELECTION, f"video.{name} must be a non-negative "
                                                   f"{'integer' if integral else 'number'}, got {_short(value)}")


def _check_task_needs(record: dict[str, Any], task: str | None, media: list[dict[str, Any]]) -> None:
    """What a task's template reads from the record is there, in the form it reads it."""
    if task in ONE_VIDEO_TASKS and sum(item["type"] == "video" for item in media) != 1:
        raise RecordError(WRONG_MEDIA_COUNT, f"task {task} needs exactly one video, the record has "
                                             f"{sum(item['type'] == 'video' for item in media)}")
    info = extra_info(record)
    if task == GROUNDING:
        events = info.get("events") or []
        if not events or not all(_is_span_event(event) for event in events):
            raise RecordError(NOT_GROUNDABLE, "grounding needs extra_info.events as {start, end, text} objects "
                                              f"(frame span, description), got {_short(events)}")
    if task == TRACKING:
        track = info.get("tracking")
        boxes = track.get("boxes") if isinstance(track, dict) else None
        if not isinstance(boxes, dict) or len(boxes) < 2 or not all(_is_frame_box(f, b) for f, b in boxes.items()):
            raise RecordError(BAD_TRACKING, "tracking needs extra_info.tracking.boxes, {frame: [x1, y1, x2, y2]} "
                                            f"for two frames or more, got {_short(boxes)}")


def _check_preference_answers(assistant: dict[str, Any]) -> None:
    content = assistant.get("content")
    texts = [item for item in content if item.get("type") == "text"] if isinstance(content, list) else []
    if texts and ("chosen" in texts[-1] or "rejected" in texts[-1]):
        if not isinstance(texts[-1].get("chosen"), str) or not isinstance(texts[-1].get("rejected"), str):
            raise RecordError(BAD_ANSWERS, "a preference record's answer needs 'chosen' and 'rejected' strings")


def _is_span_event(event: Any) -> bool:
    return (isinstance(event, dict) and _is_number(event.get("start"), True) and _is_number(event.get("end"), True)
            and event["start"] <= event["end"] and isinstance(event.get("text"), str))


def _is_frame_box(frame: str, box: Any) -> bool:
    return str(frame).isdigit() and isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)


def _is_number(value: Any, integral: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return not integral or float(value).is_integer()


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
