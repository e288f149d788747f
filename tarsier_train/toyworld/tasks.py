"""The toy world's other pre-training tasks, derived from its caption shards: video QA and multiple-choice
QA (same clips), single images (one frame of each clip) and text-only questions about descriptions.
Also synthetic preference pairs (`pair_sample`). Grounding, frame order and tracking need no shards of their own: a source's task override turns the
caption records into them (their records carry events and boxes)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from PIL import Image

from tarsier_train.data.video import decode_video
from tarsier_train.toyworld.world import ACTIONS

DerivedKind = Literal["qa", "image", "text", "pairs"]
DERIVED_KINDS: tuple[str, ...] = ("qa", "image", "text", "pairs")
_NUMBERS = ("zero", "one", "two", "three", "four", "five")
_LETTERS = "ABCD"


def _record(media: list[dict], question: str, answer: str, task: str, index: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [*media, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "dataset": "toyworld", "task": task, "idx": index}


def qa_sample(key: str, record: dict, mp4: bytes, index: int) -> dict[str, bytes]:
    """Even clips: an open question on the first event; odd clips: multiple choice on the last event."""
    events = record["extra_info"]["events"]
    subject = f"the {events[0]['colour']} {events[0]['shape']}"
    video = [{"type": "video", "video": {"video_file": f"{key}.mp4"}}]
    if index % 2 == 0:
        derived = _record(video, f"What does {subject} do first?", f"It {events[0]['action']}.", "video/qa", index)
    else:
        rng = np.random.default_rng(index)
        wrong = [a for a in ACTIONS if a != events[-1]["action"]]
        options = [events[-1]["action"], *rng.choice(wrong, size=3, replace=False)]
        order = rng.permutation(4)
        listed = " ".join(f"({_LETTERS[i]}) {options[o]}" for i, o in enumerate(order))
        answer = _LETTERS[int(np.flatnonzero(order == 0)[0])]
        derived = _record(video, f"What does {subject} do last? {listed}. Answer with the letter.", answer,
                          "video/mcqa", index)
    derived["extra_info"] = record["extra_info"]
    return {"__key__": key, "json": json.dumps(derived).encode(), "mp4": mp4}


def image_sample(key: str, record: dict, mp4: bytes, index: int) -> dict[str, bytes]:
    """The clip's first frame where the object is visible, as a PNG, with its colour and shape."""
    track = record["extra_info"]["tracking"]["boxes"]
    frame = decode_video(mp4)[int(min(track, key=int))]
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    event = record["extra_info"]["events"][0]
    derived = _record([{"type": "image", "image": {"image_file": f"{key}.png"}}], "What is in the image?",
                      f"A {event['colour']} {event['shape']}.", "image/qa", index)
    return {"__key__": key, "json": json.dumps(derived).encode(), "png": buffer.getvalue()}


def text_sample(key: str, record: dict, mp4: bytes, index: int) -> dict[str, bytes]:
    """A description in, its event count and last action out: reading descriptions without a video."""
    events = record["extra_info"]["events"]
    description = " ".join(event["text"] for event in events)
    question = f'How many events does this description have, and what happens last? "{description}"'
    answer = f"{_NUMBERS[len(events)].capitalize()}; last, it {events[-1]['action']}."
    return {"__key__": key, "json": json.dumps(_record([], question, answer, "text_only", index)).encode()}


def pair_sample(key: str, record: dict, mp4: bytes, index: int) -> dict[str, bytes]:
    """A synthetic preference pair: the true description against one with a temporal error (events in
    reverse order, or the opposite action for single-event clips). It stands in for the
    model-based sampler's pairs where a pair is needed without a trained model (tests, smoke runs)."""
    events = record["extra_info"]["events"]
    chosen = " ".join(event["text"] for event in events)
    if len(events) > 1:
        rejected = " ".join(event["text"] for event in reversed(events))
    else:
        rejected = events[0]["text"].replace(events[0]["action"], _OPPOSITE[events[0]["action"]])
    derived = json.loads(json.dumps(record))
    derived["messages"][-1]["content"][-1].update({"chosen": chosen, "rejected": rejected})
    derived["task"] = "video/caption"
    return {"__key__": key, "json": json.dumps(derived).encode(), "mp4": mp4}


_OPPOSITE = {"moves left": "moves right", "moves right": "moves left", "moves up": "moves down",
             "moves down": "moves up", "grows": "shrinks", "shrinks": "grows", "appears": "disappears",
             "disappears": "appears"}
DERIVE = {"qa": qa_sample, "image": image_sample, "text": text_sample, "pairs": pair_sample}


def derived_samples(kind: DerivedKind, caption_samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, bytes]]:
    """One derived sample per caption sample (same key), in order."""
    for index, raw in enumerate(caption_samples):
        yield DERIVE[kind](raw["__key__"], json.loads(raw["json"]), raw["mp4"], index)
