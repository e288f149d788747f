import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tarsier_train.data.video import decode_video, encode_mp4
from tarsier_train.data.write_shards import main, output_size, write_shards


def _video_bytes(height: int = 64, width: int = 64, seed: int = 0) -> bytes:
    frames = np.random.default_rng(seed).integers(0, 255, (8, height, width, 3), dtype=np.uint8)
    return encode_mp4(frames, fps=8)


def _image_bytes(fmt: str, size: int = 16, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _gif_bytes() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


MEDIA = {
    "clips/plain.mp4": _video_bytes(seed=1),
    "clips/Upper.MOV": _video_bytes(seed=2),  # extension kept, lower-cased
    "clips/wide.mp4": _video_bytes(height=40, width=64, seed=3),
    "images/still.png": _image_bytes("PNG"),
    "images/photo.jpg": _image_bytes("JPEG", seed=4),
    "images/anim.gif": _gif_bytes(),
    "clips/corrupt.mp4": b"\x00\x00\x00\x18ftypmp42 not really a video",
    "notes/readme.txt": b"not media",
}


def _video(path: str, **fields) -> dict:
    return {"type": "video", "video": {"video_file": path, **fields}}


def _image(path: str) -> dict:
    return {"type": "image", "image": {"image_file": path}}


def _record(media: list[dict], answer: str = "An answer.", dataset: str = "ds_a", task: str = "video/caption",
            idx: int = 0, **answer_extra) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [*media, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer, **answer_extra}]},
        ],
        "dataset": dataset, "task": task, "idx": idx, "extra_info": {"note": "kept"},
    }


# line number (1-based) -> record; line 8 is left blank on purpose
VALID = {
    1: _record([_video("clips/plain.mp4")]),
    2: _record([_video("clips/plain.mp4", frame_indices=[0, 2, 4, 6])], idx=2),
    3: _record([_video("clips/Upper.MOV", start_frame=1, end_frame=6)], idx=3),
    4: _record([_video("clips/plain.mp4", time_indices=[0.0, 0.5])], idx=4),
    5: _record([_video("clips/wide.mp4", start_time=0.25, end_time=0.75, fps=8, n_frames=8)], idx=5),
    6: _record([_image("images/still.png")], dataset="ds_b", task="image/caption"),
    7: _record([_image("images/anim.gif")], dataset="ds_b", task="image/caption"),
    9: _record([_image("images/still.png"), _image("images/photo.jpg"), _image("images/anim.gif")],
               dataset="ds_b", task="multi_image"),
    10: _record([], dataset="ds_c", task="text_only"),
    11: _record([_video("images/anim.gif")], task="dpo", chosen="Good.", rejected="Bad."),
}
BAD = {
    12: ("{not json", "bad_json"),
    13: (json.dumps(_record([_video("clips/absent.mp4")])), "missing_media"),
    14: (json.dumps(_record([_video("clips/corrupt.mp4")])), "unreadable_media"),
    15: (json.dumps(_record([_video("notes/readme.txt")])), "unsupported_media"),
    16: (json.dumps({"dataset": "ds_a", "task": "video/caption", "pad": "x" * 600}), "bad_messages"),
    17: (json.dumps(_record([{"type": "audio", "audio": {"audio_file": "a.wav"}}])), "unsupported_item"),
}


def _write_jsonl(path: Path, lines: dict[int, str]) -> Path:
    path.write_text("\n".join(lines.get(n, "") for n in range(1, max(lines) + 1)) + "\n")
    return path


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    for relative, data in MEDIA.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def records_path(tmp_path_factory) -> Path:
    lines = {n: json.dumps(r) for n, r in VALID.items()} | {n: text for n, (text, _) in BAD.items()}
    return _write_jsonl(tmp_path_factory.mktemp("input") / "records.jsonl", lines)


@pytest.fixture(scope="module")
def written(records_path, media_root, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("out") / "shards"
    return output, write_shards(records_path, media_root, output, workers=1)


def _samples(folder: Path, manifest: dict) -> list[dict]:
    urls = [str(folder / shard["name"]) for shard in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None))


def _media_paths(record: dict) -> list[tuple[str, str]]:
    items = [item for message in record["messages"] for item in message["content"] if item["type"] != "text"]
    return [(item["type"], item[item["type"]][f"{item['type']}_file"]) for item in items]


def test_every_valid_record_round_trips_with_rewritten_paths_and_original_bytes(written):
    folder, manifest = written
    samples = _samples(folder, manifest)
    assert [s["__key__"] for s in samples] == [f"{n:09d}" for n in VALID]
    for sample, (line, original) in zip(samples, VALID.items()):
        key, stored = sample["__key__"], json.loads(sample["json"])
        expected = copy.deepcopy(original)
        for index, (kind, source) in enumerate(_media_paths(original)):
            extension = Path(source).suffix.lower().lstrip(".")
            member = f"{index}.{extension}"
            assert sample[member] == MEDIA[source], (line, member)
            payload = [i for m in expected["messages"] for i in m["content"] if i["type"] != "text"][index][kind]
            payload.update({f"{kind}_file": f"{key}.{member}", "source_file": source})
        assert stored == expected, line
        media_members = {k for k in sample if not k.startswith("__") and k != "json"}
        assert len(media_members) == len(_media_paths(original))


def test_dpo_and_text_only_records_pass_through(written):
    samples = {s["__key__"]: json.loads(s["json"]) for s in _samples(*written)}
    answer = samples["000000011"]["messages"][1]["content"][0]
    assert (answer["chosen"], answer["rejected"]) == ("Good.", "Bad.")
    assert samples["000000010"]["messages"] == VALID[10]["messages"]


def test_rejects_name_line_reason_and_truncated_record(written):
    folder, _ = written
    rejects = [json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(n, reason) for n, (_, reason) in BAD.items()]
    for reject in rejects:
        assert reject["record"] == BAD[reject["line"]][0][:500]
    assert len(rejects[4]["record"]) == 500
    assert "clips/absent.mp4" in rejects[1]["detail"] and "readme.txt" in rejects[3]["detail"]


def test_manifest_counts(written):
    folder, manifest = written
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert manifest["num_samples"] == len(VALID) == sum(s["num_samples"] for s in manifest["shards"])
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rejects.jsonl", "shard-000000.tar"]
    assert manifest["per_dataset"] == {"ds_a": 6, "ds_b": 3, "ds_c": 1}
    assert manifest["per_task"] == {"dpo": 1, "image/caption": 2, "multi_image": 1, "text_only": 1, "video/caption": 5}
    assert manifest["num_rejected"] == len(BAD)
    assert manifest["per_reject_reason"] == {"bad_json": 1, "bad_messages": 1, "missing_media": 1,
                                             "unreadable_media": 1, "unsupported_item": 1, "unsupported_media": 1}


def test_output_is_identical_across_worker_counts(written, records_path, media_root, tmp_path, capsys):
    folder, manifest = written
    other = tmp_path / "shards"
    assert main(["--input", str(records_path), "--media-root", str(media_root), "--output", str(other),
                 "--workers", "2"]) == 0
    assert "wrote 10 samples in 1 shards" in capsys.readouterr().out
    for name in ("manifest.json", "rejects.jsonl", "shard-000000.tar"):
        assert (other / name).read_bytes() == (folder / name).read_bytes(), name


def test_exit_code_1_when_nothing_is_valid(media_root, tmp_path, capsys):
    records = _write_jsonl(tmp_path / "bad.jsonl", {1: "{oops", 2: json.dumps(_record([_video("clips/absent.mp4")]))})
    output = tmp_path / "out"
    assert main(["--input", str(records), "--media-root", str(media_root), "--output", str(output)]) == 1
    printed = capsys.readouterr().out
    assert "wrote 0 samples" in printed and "bad_json: 1" in printed and "missing_media: 1" in printed
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json", "rejects.jsonl"]
    assert json.loads((output / "manifest.json").read_text())["num_rejected"] == 2


def test_runs_as_a_module_from_the_command_line(records_path, media_root, tmp_path):
    output = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "tarsier_train.data.write_shards", "--input", str(records_path),
                             "--media-root", str(media_root), "--output", str(output), "--workers", "1",
                             "--shard-size-mb", "0.0001"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"wrote {len(VALID)} samples in {len(VALID)} shards" in result.stdout
    assert "rejected 6 lines" in result.stdout and "unsupported_item: 1" in result.stdout
    assert len(list(output.glob("shard-*.tar"))) == len(VALID)


def test_refuses_a_non_empty_output_and_leaves_no_staging(records_path, media_root, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--output"):
        write_shards(records_path, media_root, output, workers=1)
    assert main(["--input", str(records_path), "--media-root", str(media_root), "--output", str(output)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        write_shards(tmp_path / "missing.jsonl", media_root, tmp_path / "new", workers=1)


def test_an_empty_output_directory_is_filled(records_path, media_root, tmp_path):
    (tmp_path / "out").mkdir()
    assert write_shards(records_path, media_root, tmp_path / "out", workers=1)["num_samples"] == len(VALID)


def test_shards_roll_over_at_the_size_limit(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    noise = _image_bytes("PNG", size=100, seed=9)  # incompressible: ~30 KB, so two fill a 0.05 MiB shard
    assert 26_300 < len(noise) < 52_000
    (media / "noise.png").write_bytes(noise)
    records = _write_jsonl(tmp_path / "r.jsonl", {n: json.dumps(_record([_image("noise.png")])) for n in range(1, 6)})
    manifest = write_shards(records, media, tmp_path / "out", shard_size_mb=0.05, workers=1)
    assert [(s["name"], s["num_samples"]) for s in manifest["shards"]] == [
        ("shard-000000.tar", 2), ("shard-000001.tar", 2), ("shard-000002.tar", 1)]
    samples = _samples(tmp_path / "out", manifest)
    assert [s["__key__"] for s in samples] == [f"{n:09d}" for n in range(1, 6)]
    assert all(s["0.png"] == noise for s in samples)


def _keyframe_positions(data: bytes) -> list[int]:
    with av.open(io.BytesIO(data)) as container:
        packets = sorted((p for p in container.demux(video=0) if p.size), key=lambda p: p.pts)
        return [i for i, packet in enumerate(packets) if packet.is_keyframe]


def test_transcode_caps_resolution_keeps_frames_and_sets_gop(media_root, tmp_path):
    lines = {1: json.dumps(_record([_video("clips/wide.mp4", start_frame=2)])),
             2: json.dumps(_record([_video("images/anim.gif"), _image("images/photo.jpg")]))}
    records = _write_jsonl(tmp_path / "r.jsonl", lines)
    manifest = write_shards(records, media_root, tmp_path / "out", workers=1, max_resolution=32, gop=2)
    wide, gif = _samples(tmp_path / "out", manifest)
    assert decode_video(wide["0.mp4"]).shape == (8, 20, 32, 3)  # 64x40 -> 32x20, aspect kept
    assert _keyframe_positions(wide["0.mp4"]) == [0, 2, 4, 6]
    video = json.loads(wide["json"])["messages"][0]["content"][0]["video"]
    assert video == {"video_file": "000000001.0.mp4", "source_file": "clips/wide.mp4", "start_frame": 2}
    assert decode_video(gif["0.mp4"]).shape == (3, 16, 16, 3)  # under the cap: size kept, gif -> mp4
    assert gif["1.jpg"] == MEDIA["images/photo.jpg"]  # images are never transcoded


def test_output_size_is_capped_even_and_keeps_aspect():
    assert output_size(1920, 1080, 640) == (640, 360)
    assert output_size(1080, 1920, 641) == (360, 640)
    assert output_size(63, 35, None) == (62, 34)
    assert output_size(100, 3, 10) == (10, 2)


def test_stream_takes_shard_sizes_from_the_writer_manifest(tmp_path, monkeypatch):
    import tarsier_train.data.stream as stream_module

    media = tmp_path / "media"
    media.mkdir()
    clip = media / "a.mp4"
    clip.write_bytes(encode_mp4(np.zeros((4, 32, 32, 3), dtype=np.uint8)))
    record = {"messages": [{"role": "user", "content": [{"type": "video", "video": {"video_file": "a.mp4"}}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(record) for _ in range(5)))
    write_shards(tmp_path / "in.jsonl", media, tmp_path / "out", workers=1)
    shards = sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))
    assert stream_module.shard_sample_counts(shards) == [5]
    monkeypatch.setattr(stream_module, "count_samples", lambda shard: pytest.fail("opened a tar"))
    assert stream_module.shard_sample_counts(shards) == [5]


def test_written_shards_train_through_the_loader(tmp_path, processor):
    """Writer output is loader input: the video member is found from the rewritten video_file."""
    import itertools

    from tarsier_train.data.records import canonical_sample, media_bytes
    from tarsier_train.data.sampling import FrameSampler
    from tarsier_train.data.stream import Source, VideoTextStream
    from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform
    from tarsier_train.toyworld import generate_clip, render_frames

    media = tmp_path / "media"
    media.mkdir()
    lines = []
    for index in range(3):
        (media / f"clip{index}.mp4").write_bytes(encode_mp4(render_frames(generate_clip(np.random.default_rng(index)))))
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "video", "video": {"video_file": f"clip{index}.mp4"}},
                                         {"type": "text", "text": "Describe the video in detail."}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"The red circle grows {index}."}]}],
            "task": "video/caption"}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines))
    write_shards(tmp_path / "in.jsonl", media, tmp_path / "out", workers=1)
    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))

    def make(key, record, members, rng):
        sample = canonical_sample(key, record)
        return {"target": sample.target, **transform(sample, media_bytes(sample, members), rng)}

    stream = VideoTextStream([Source(sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar")), make)])
    samples = list(itertools.islice(iter(stream), 3))
    assert sorted(s["target"] for s in samples) == [f"The red circle grows {i}." for i in range(3)]
    for s in samples:
        assert processor.tokenizer.decode(s["labels"][s["labels"] != IGNORE_INDEX]) == s["target"] + "<|im_end|>"
        assert s["video_grid_thw"][0].tolist() == [4, 8, 8]


# line -> (video temporal steps, number of images) once the loader has decoded it with 4-frame uniform sampling
LOADED_SHAPES = {1: ([4], 0), 2: ([4], 0), 3: ([4], 0), 4: ([2], 0), 5: ([4], 0), 6: ([], 1), 7: ([], 1),
                 9: ([], 3), 10: ([], 0), 11: ([4], 0)}


def test_every_written_variant_loads_with_the_frames_it_selects(written, processor):
    """Each writer output (video selections, images, gif as image and as video, multi-image, text-only)
    goes through the loader's source and model transforms with the media its record names."""
    from tarsier_train.data.records import canonical_sample, media_bytes
    from tarsier_train.data.sampling import FrameSampler
    from tarsier_train.data.transform import IGNORE_INDEX, VideoTextTransform

    transform = VideoTextTransform(processor, FrameSampler(num_frames=4))
    for raw in _samples(*written):
        line = int(raw["__key__"])
        sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
        out = transform(sample, media_bytes(sample, raw))
        steps, num_images = LOADED_SHAPES[line]
        assert out.get("video_grid_thw", np.zeros((0, 3), int))[:, 0].tolist() == steps, line
        assert len(out.get("image_grid_thw", [])) == num_images, line
        assert (out["mm_token_type_ids"] == 1).any() == (num_images > 0), line
        assert processor.tokenizer.decode(out["labels"][out["labels"] != IGNORE_INDEX]) == "An answer.<|im_end|>"
