"""Bad data never stops a run: records that are valid JSON but not the shape we expect, broken media, a bug in a task
template, a source that mostly fails, all through real shards, real decoding and real train.py runs. Each fault ends
as a sample skipped and counted by reason (the same reason the shard writer rejects it with), or as a clear error."""

from __future__ import annotations

import copy
import csv
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds
from conftest import data_state, run_train

from tarsier_train.data import tasks as tasks_module
from tarsier_train.data.record_check import RecordError, check_record, parse_record
from tarsier_train.data.records import canonical_sample, media_bytes
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.skips import SKIP_REASONS_KEY, SkipBudget, TooManySkippedError
from tarsier_train.data.stream import EvalStream, Source, VideoTextStream
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.eval.event_f1 import reference_events
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

Mutation = Any  # (record, members) -> None, in place; members["json"] is rewritten from the record unless set


def _user(record: dict) -> dict:
    return record["messages"][0]


def _video(record: dict) -> dict:
    return next(item["video"] for item in _user(record)["content"] if item["type"] == "video")


def _set(path: str, value: Any) -> Mutation:
    def mutate(record: dict, members: dict) -> None:
        *parents, last = path.split(".")
        node = record
        for part in parents:
            node = node[part]
        node[last] = value
    return mutate


def _json_bytes(data: bytes) -> Mutation:
    return lambda record, members: members.update(json=data)


def _grounding_with_strings(record: dict, members: dict) -> None:
    record["task"] = "video/grounding"
    record["extra_info"]["events"] = [event["text"] for event in record["extra_info"]["events"]]


def _frame_indices(value: Any) -> Mutation:
    return lambda record, members: _video(record).update(frame_indices=value)


def _free_text_events(record: dict, members: dict) -> None:  # DREAM-1K's form, in words no exact judge reads
    record["extra_info"]["events"] = ["A woman opens the door.", "She waves at the camera."]


# fault -> (mutation, the reason it is skipped/rejected with; None: a valid form that trains)
FAULTS: dict[str, tuple[Mutation, str | None]] = {
    "bad_json": (_json_bytes(b'{"messages": [broken'), "bad_json"),
    "json_list": (_json_bytes(b'[{"messages": []}]'), "not_an_object"),
    "no_json": (lambda record, members: members.update(json=None), "no_record"),
    "tarsier1_form": (_json_bytes(b'{"text": {"prompt": "<video>Describe.", "response": "A cat."}}'),
                      "bad_messages"),
    "content_number": (lambda record, members: _user(record).update(content=5), "bad_content"),
    "assistant_first": (lambda record, members: record["messages"].reverse(), "bad_roles"),
    "extra_info_string": (_set("extra_info", "n/a"), "bad_extra_info"),
    "events_numbers": (_set("extra_info.events", [1, 2]), "bad_events"),
    "grounding_string_events": (_grounding_with_strings, "not_groundable"),
    "frame_indices_strings": (_frame_indices(["a", "b"]), "bad_frame_selection"),
    "frame_indices_huge": (_frame_indices(list(range(5000))), "too_many_frames"),
    "frame_indices_past_end": (_frame_indices([0, 999]), "bad_frame_selection"),
    "truncated_video": (lambda record, members: members.update(mp4=members["mp4"][: len(members["mp4"]) // 4]),
                        "undecodable_media"),
    "no_video_member": (lambda record, members: members.pop("mp4"), "missing_member"),
    "content_string": (lambda record, members: _user(record).update(content="Describe a video."), None),
    "extra_info_null": (_set("extra_info", None), None),
    "dream_events_caption": (_free_text_events, None),
    "toyworld_string_events": (_set("extra_info.events", ["The red circle moves up.", "The blue square moves left."]),
                               None),
}


def _toy_samples(root: Path, num_train: int, num_val: int) -> dict[str, list[dict]]:
    shards = toyworld_shards(root, ToyWorldSpec(num_train_clips=num_train, num_val_clips=num_val, seed=11))
    return {split: [{"__key__": raw["__key__"], "json": raw["json"], "mp4": raw["mp4"]}
                    for raw in wds.WebDataset(paths, shardshuffle=False, nodesplitter=None, workersplitter=None)]
            for split, paths in shards.items()}


def _faulty(sample: dict, fault: str) -> dict:
    members = dict(sample)
    record = copy.deepcopy(json.loads(members["json"]))
    members["json"] = json.dumps(record).encode()
    mutate, _ = FAULTS[fault]
    before = members["json"]
    mutate(record, members)
    if members["json"] is before:
        members["json"] = json.dumps(record).encode()
    return {name: data for name, data in members.items() if data is not None}


def _write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, list[dict]]:
    return _toy_samples(tmp_path_factory.mktemp("toy"), num_train=18, num_val=6)


def _make(transform: VideoTextTransform):
    def make(key: str, record: dict, members: dict, rng: Any) -> dict:
        sample = canonical_sample(key, record)
        return {"key": key, **transform(sample, media_bytes(sample, members), rng)}
    return make


def test_each_fault_is_skipped_with_its_reason_and_valid_forms_train(toy, processor, tmp_path, caplog):
    faults = list(FAULTS)
    assert len(faults) <= len(toy["train"])
    samples = [_faulty({**sample, "__key__": fault}, fault) for sample, fault in zip(toy["train"], faults)]
    shard = _write_shard(tmp_path / "faults-000000.tar", samples)
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    with caplog.at_level(logging.WARNING, logger="tarsier_train.data.stream"):
        out = list(EvalStream([shard], _make(transform)))
    skipped = dict(re.findall(r"skipping sample (\w+) \((\w+)\)", caplog.text))
    assert skipped == {fault: reason for fault, (_, reason) in FAULTS.items() if reason is not None}
    assert [s["key"] for s in out] == [fault for fault, (_, reason) in FAULTS.items() if reason is None]
    counted = Counter()
    for sample in out:
        counted.update(sample[SKIP_REASONS_KEY])
    # the samples carry their skips to the batch (the skips after the last one are logged by the stream)
    assert counted == Counter(reason for fault, (_, reason) in FAULTS.items()
                              if reason is not None and faults.index(fault) < faults.index(out[-1]["key"]))


def _record_check_reason(members: dict) -> str | None:
    try:
        check_record(parse_record(members["json"]))
    except RecordError as error:
        return error.reason
    return None


def test_the_record_check_alone_gives_the_loaders_reasons(toy):
    """What the shard writer rejects with (parse_record + check_record, no media read) is what the loader skips with,
    for every fault that is in the record alone, not in its media or in how the two fit."""
    found_with_the_media = ("truncated_video", "no_video_member", "no_json", "frame_indices_past_end")
    for fault, (_, reason) in FAULTS.items():
        if fault not in found_with_the_media:
            assert _record_check_reason(_faulty(toy["train"][0], fault)) == reason, fault


def test_reference_events_read_what_they_can_and_say_none_otherwise(toy):
    record = json.loads(toy["val"][0]["json"])
    exact = reference_events(record)
    assert exact and all(len(event) == 3 for event in exact)
    as_strings = {**record, "extra_info": {"events": [e["text"] for e in record["extra_info"]["events"]]}}
    as_spans = {**record, "extra_info": {"events": [{k: e[k] for k in ("start", "end", "text")}
                                                    for e in record["extra_info"]["events"]]}}
    assert reference_events(as_strings) == reference_events(as_spans) == exact
    assert reference_events({**record, "extra_info": {"events": ["A woman opens the door."]}}) is None
    assert reference_events({**record, "extra_info": None}) is None


def test_a_bug_in_a_task_template_costs_one_sample(toy, processor, tmp_path, monkeypatch, caplog):
    samples = [{**sample, "__key__": f"clip{i}"} for i, sample in enumerate(toy["train"][:3])]
    shard = _write_shard(tmp_path / "clips-000000.tar", samples)
    as_written = tasks_module.as_written

    def buggy(sample, visuals, indices, rng):
        if sample.key == "clip1":
            return 1 / 0
        return as_written(sample, visuals, indices, rng)

    monkeypatch.setattr(tasks_module, "as_written", buggy)
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    with caplog.at_level(logging.WARNING, logger="tarsier_train.data.stream"):
        out = list(EvalStream([shard], _make(transform)))
    assert [s["key"] for s in out] == ["clip0", "clip2"]
    assert out[1][SKIP_REASONS_KEY] == {"unexpected_ZeroDivisionError": 1}
    assert "skipping sample clip1 (unexpected_ZeroDivisionError): division by zero" in caplog.text


def test_a_source_that_mostly_fails_ends_the_stream_naming_source_count_and_reasons(toy, processor, tmp_path):
    good = _write_shard(tmp_path / "good-000000.tar", toy["train"][:4])
    bad = _write_shard(tmp_path / "bad-000000.tar",
                       [_faulty(s, "bad_json" if i % 2 else "truncated_video") for i, s in enumerate(toy["train"][:6])]
                       + [_faulty(toy["train"][6], "content_number")])
    transform = VideoTextTransform(processor, FrameSampler(num_frames=2))
    sources = [Source([good], _make(transform), 1.0, "good"), Source([bad], _make(transform), 1.0, "/data/bad-*.tar")]
    stream = VideoTextStream(sources, shuffle=False, skip_budget=SkipBudget(max_fraction=0.5, min_samples=6))
    samples = iter(stream)
    with pytest.raises(TooManySkippedError) as error:
        for _ in range(100):
            next(samples)
    message = str(error.value)
    assert "data source 1 (/data/bad-*.tar): 6 of the 6 samples" in message
    assert "data.max_skipped_fraction=0.5" in message
    assert re.search(r"top reasons: (bad_json 3, undecodable_media 3|undecodable_media 3, bad_json 3)", message)
    # whatever the fraction allowed, a run of skips (10 x skip_check_min_samples) ends a source that only fails
    lenient = iter(VideoTextStream(sources, shuffle=False, skip_budget=SkipBudget(max_fraction=1.0, min_samples=2)))
    with pytest.raises(TooManySkippedError, match=r"the last 20 in a row \(10 x data.skip_check_min_samples=2\)"):
        for _ in range(100):
            next(lenient)


# A third of the training records, and of the validation records, are malformed in the ways users hit.
TRAIN_FAULTS = ["bad_json", "json_list", "content_number", "extra_info_string", "grounding_string_events",
                "truncated_video"]
ACCEPTED = ["content_string", "extra_info_null", "dream_events_caption"]
VAL_FAULTS = {1: "bad_json", 4: "truncated_video"}


def _malformed_shards(toy: dict[str, list[dict]], folder: Path) -> tuple[str, str]:
    folder.mkdir()
    train = [_faulty(sample, TRAIN_FAULTS[i // 3]) if i % 3 == 2 else
             _faulty(sample, ACCEPTED[i % len(ACCEPTED)]) if i % 4 == 0 else sample
             for i, sample in enumerate(toy["train"])]
    val = [_faulty(sample, VAL_FAULTS[i]) if i in VAL_FAULTS else
           _faulty(sample, "dream_events_caption") if i == 5 else sample for i, sample in enumerate(toy["val"])]
    _write_shard(folder / "train-000000.tar", train[:9])
    _write_shard(folder / "train-000001.tar", train[9:])
    _write_shard(folder / "val-000000.tar", val)
    return f"{folder}/train-*.tar", f"{folder}/val-*.tar"


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))


def _last(rows: list[dict[str, str]], prefix: str) -> dict[str, float]:
    """The last logged value of each metric starting with prefix."""
    values = {}
    for row in rows:
        values.update({k: float(v) for k, v in row.items() if k.startswith(prefix) and v})
    return values


def test_training_on_a_third_malformed_finishes_counts_by_reason_validates_and_resumes_past_them(toy, tmp_path,
                                                                                                   cache_root):
    train, val = _malformed_shards(toy, tmp_path / "data")
    run = ["recipe=sft", "data=shards", f"data.train_shards={train}", f"data.val_shards={val}", "data.num_frames=4",
           "data.batch_size=4", "data.num_workers=1", "data.shuffle_block=4", "trainer.val_check_interval=3",
           "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=3", "logger=csv",
           "model.dir.text_layers=1"]
    run_dir = tmp_path / "outputs" / "sft"
    run_train([*run, "trainer.max_steps=3"], cwd=tmp_path, cache_root=cache_root)
    first = _last(_metrics(run_dir), "")
    consumed_first = sum(map(sum, data_state(torch.load(run_dir / "checkpoints" / "step-000003.ckpt",
                                                        weights_only=False))["num_consumed"]))
    # every sample read was trained on or skipped and counted: 3 steps x 4 trained
    assert first["data/skipped_samples"] == consumed_first - 12 > 0
    by_reason = {k.removeprefix("data/skipped/"): v for k, v in first.items() if k.startswith("data/skipped/")}
    assert sum(by_reason.values()) == first["data/skipped_samples"]
    assert set(by_reason) <= {FAULTS[fault][1] for fault in TRAIN_FAULTS}
    # validation ran on the good samples, skipped the broken ones, and says which events it could not score
    assert first["val/skipped_samples"] == len(VAL_FAULTS)
    assert 0.0 <= first["val/event_f1"] <= 1.0
    assert first["val/unscored_event_samples"] == 1.0

    # resume=auto continues past the malformed samples: nothing read again, nothing passed over
    run_train([*run, "trainer.max_steps=6", "resume=auto"], cwd=tmp_path, cache_root=cache_root)
    rows = _metrics(run_dir)
    second_start = next(i for i, row in enumerate(rows) if row.get("step") and int(row["step"]) > 3
                        and row.get("data/skipped_samples"))
    second = _last(rows[second_start:], "data/skipped")
    consumed_second = sum(map(sum, data_state(torch.load(run_dir / "checkpoints" / "step-000006.ckpt",
                                                         weights_only=False))["num_consumed"]))
    assert second["data/skipped_samples"] == consumed_second - consumed_first - 12
    all_reasons = Counter(by_reason) + Counter({k.removeprefix("data/skipped/"): v for k, v in second.items()
                                               if k.startswith("data/skipped/")})
    # 24 trained samples = two epochs of the 12 good ones: every malformed record was met at least once
    assert set(all_reasons) == {FAULTS[fault][1] for fault in TRAIN_FAULTS}

    # the same data with a strict budget ends the run with the source, the count and the reasons
    strict = run_train([*run, "trainer.max_steps=3", "run_name=strict", "data.max_skipped_fraction=0.2",
                        "data.skip_check_min_samples=6"], cwd=tmp_path, cache_root=cache_root, check=False)
    assert strict.returncode != 0
    assert re.search(r"data source 0 \(.*train-\*\.tar\): \d+ of the \d+ samples one loader worker read were "
                     r"skipped \(\d+%\), more than data.max_skipped_fraction=0.2; top reasons: \w+ \d", strict.stderr)
