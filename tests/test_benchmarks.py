"""Benchmarks as released: the annotation format read and written (the prediction beside the reference, `"reference":
null` on the other items, the multiple-choice pre-fill), videos found by `vid`, bad files named with their line, the
same prompts from a jsonl + video directory and from shards of the same records, and the per-source chart."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import webdataset as wds
from PIL import Image

from datamodules.benchmark import BenchmarkDataModule
from tarsier_train.eval.benchmark_records import (answer_prefill, prediction_text, record_key, reference_text,
                                                  subtask_of, with_prediction)
from tarsier_train.eval.benchmarks import Benchmark, video_path
from tarsier_train.eval.plots import grouped_bar_chart
from tarsier_train.toyworld.benchmark import toyworld_benchmark

MC = {"messages": [{"role": "user", "content": [{"type": "video", "video": {"video_file": "<placeholder>"}},
                                                {"type": "text", "text": "Question: Which?\n(A) a\n(B) b"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": " Answer: (", "reference": None},
                                                     {"type": "text", "text": None, "reference": "B"}]}],
      "dataset": "MVBench/action_sequence", "idx": 7, "vid": "clip_00001"}


def test_released_record_fields_are_read_and_written_in_place():
    assert (reference_text(MC), prediction_text(MC), answer_prefill(MC)) == ("B", "", " Answer: (")
    predicted = with_prediction(MC, "B) b")
    assert predicted["messages"][-1]["content"][1] == {"type": "text", "text": "B) b", "reference": "B"}
    assert MC["messages"][-1]["content"][1]["text"] is None  # the input record is left as it was
    assert (subtask_of(MC), record_key(MC)) == ("action_sequence", "MVBench/action_sequence#7")
    training = {"messages": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A dog runs."}]}
    assert reference_text(training) == "A dog runs." and answer_prefill(training) == ""
    assert prediction_text(with_prediction(training, "A cat sits.")) == "A cat sits."
    assert reference_text(with_prediction(training, "A cat sits.")) == "A dog runs."


def test_benchmark_files_fail_clearly(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "clip_00001.mkv").write_bytes(b"x")
    (tmp_path / "videos" / "sub").mkdir()
    (tmp_path / "videos" / "sub" / "a.mp4").write_bytes(b"x")
    assert video_path(tmp_path / "videos", "clip_00001").name == "clip_00001.mkv"
    assert video_path(tmp_path / "videos", "sub/a.mp4").name == "a.mp4"
    with pytest.raises(FileNotFoundError, match="no video for vid 'nope'"):
        video_path(tmp_path / "videos", "nope")
    annotations = tmp_path / "a.jsonl"
    annotations.write_text(json.dumps(MC) + "\n\n{not json\n")
    benchmark = Benchmark("MVBench", "multiple_choice", str(annotations), str(tmp_path / "videos"))
    with pytest.raises(ValueError, match=r"a.jsonl:3: not JSON"):
        benchmark.records()
    annotations.write_text(json.dumps(MC) + "\n" + json.dumps(MC) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:2: key 'MVBench/action_sequence#7'.*twice"):
        benchmark.records()
    with pytest.raises(ValueError, match="allowed values are caption, multiple_choice, videomme"):
        Benchmark("X", "accuracy", str(annotations), str(tmp_path / "videos"))
    with pytest.raises(ValueError, match="one of them"):
        Benchmark("X", "caption", str(annotations), str(tmp_path / "videos"), shards="/s/*.tar")
    with pytest.raises(FileNotFoundError, match="benchmark.video_dir"):
        Benchmark("X", "caption", str(annotations), str(tmp_path / "nope"))


def _prompts(module: BenchmarkDataModule) -> dict[str, list[int]]:
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    return {item["key"]: item["inputs"]["input_ids"][0].tolist() for batch in module.predict_dataloader()
            for item in batch}


def test_shards_and_jsonl_give_the_same_prompts(processor, cache_root, tmp_path):
    """The toy benchmark, once as its jsonl + videos and once as WebDataset shards of the same records (a
    multiple-choice record among them: its pre-fill ends the prompt)."""
    benchmark = toyworld_benchmark(str(cache_root / "toyworld"), num_clips=3)
    records = [record for _, record in benchmark.records()]
    records.append({**MC, "vid": records[0]["vid"]})
    annotations = tmp_path / "mixed.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in records))
    with wds.TarWriter(str(tmp_path / "bench-000000.tar")) as sink:
        for record in records:
            key = record_key(record)
            video = Path(benchmark.video_dir) / f"{record['vid']}.mp4"
            sink.write({"__key__": key.replace("/", "_").replace("#", "_"), "json": json.dumps(record).encode(),
                        "mp4": video.read_bytes()})
    settings = {"processor": processor, "num_workers": 0, "batch_size": 2}
    from_jsonl = _prompts(BenchmarkDataModule(benchmark=Benchmark("mixed", "caption", str(annotations),
                                                                    benchmark.video_dir), **settings))
    from_shards = _prompts(BenchmarkDataModule(benchmark=Benchmark("mixed", "caption",
                                                                   shards=str(tmp_path / "bench-*.tar")), **settings))
    assert len(from_jsonl) == len(from_shards) == 4
    assert sorted(from_jsonl.values()) == sorted(from_shards.values())
    prefill = processor.tokenizer(" Answer: (", add_special_tokens=False)["input_ids"]
    assert from_jsonl[record_key(MC)][-len(prefill):] == prefill
    assert all(ids[-len(prefill):] != prefill for key, ids in from_jsonl.items() if key != record_key(MC))


def test_per_source_chart_is_drawn(tmp_path):
    path = grouped_bar_chart({"recall": {"a": 0.5, "b": 0.25, "OVERALL": 0.375},
                              "f1": {"a": 0.4, "b": 1.0, "OVERALL": 0.7}}, "toy", tmp_path / "chart.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 480
        pixels = image.convert("RGB")
        # the tallest bar (b's F1 = 1.0, second series' colour) reaches the top of the plot area
        assert (219, 68, 55) in {pixels.getpixel((x, 61)) for x in range(image.size[0])}


RELEASED = Path(__file__).parent / "data" / "released"  # lines of Tarsier2's released annotation files (main branch)


@pytest.mark.parametrize("name, scoring, prefill", [("DREAM-1k", "caption", ""), ("TVBench", "multiple_choice",
                                                                                    " Answer: (")])
def test_released_annotation_lines_become_prompts(name, scoring, prefill, processor, cache_root, tmp_path):
    """As the released files write them: nulls on every item, integer or relative-path vids, "video/QA" tasks."""
    annotations = RELEASED / f"{name}.head.jsonl"
    clip = Path(toyworld_benchmark(str(cache_root / "toyworld"), num_clips=3).video_dir) / "clip_00000.mp4"
    for line in annotations.read_text().splitlines():
        vid = Path(str(json.loads(line)["vid"]))
        target = tmp_path / "videos" / (vid if vid.suffix else vid.with_suffix(".mp4"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(clip.read_bytes())  # any real clip: the container is probed, not the extension
    benchmark = Benchmark(name, scoring, str(annotations), str(tmp_path / "videos"))
    records = benchmark.records()
    assert all(reference_text(record) and answer_prefill(record) == prefill for _, record in records)
    prompts = _prompts(BenchmarkDataModule(processor, benchmark, num_workers=0, batch_size=2))
    assert sorted(prompts) == sorted(key for key, _ in records)  # none skipped
