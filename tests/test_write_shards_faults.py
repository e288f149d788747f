"""The shard writer under bad data and crashes: media paths leading out of the media root, oversized media, slow
transcodes, a worker killed mid-line, the writer itself killed mid-run. Real files, shards and processes."""

import functools
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tarsier_train.data import write_shards as writer
from tarsier_train.data.write_shards import main, write_shards
from test_write_shards import _image, _image_bytes, _record, _samples, _video, _video_bytes, _write_jsonl
from writer_faults import (LOCK_HELD_ELSEWHERE, process_line_dying_on, process_line_never_reading,
                           process_line_taking_the_lock)

CLIP = _video_bytes(height=32, width=32)


def _rejects(folder: Path) -> list[tuple[int, str]]:
    return [(r["line"], r["reason"]) for r in map(json.loads, (folder / "rejects.jsonl").read_text().splitlines())]


def _keys(folder: Path) -> list[int]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [int(sample["__key__"]) for sample in _samples(folder, manifest)]


def _same_files(folder: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in names:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


def test_media_paths_must_stay_inside_the_media_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "clips").mkdir(parents=True)
    outside.mkdir()
    (root / "clips" / "a.mp4").write_bytes(CLIP)
    (outside / "secret.mp4").write_bytes(CLIP)
    (root / "inside_link.mp4").symlink_to(root / "clips" / "a.mp4")
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    (tmp_path / "root_link").symlink_to(root, target_is_directory=True)  # the root itself may be a symlink
    paths = {1: "clips/a.mp4", 2: str(outside / "secret.mp4"), 3: "clips/../clips/a.mp4", 4: "../outside/secret.mp4",
             5: "escape.mp4", 6: "linked_dir/secret.mp4", 7: "inside_link.mp4"}
    records = _write_jsonl(tmp_path / "in.jsonl", {n: json.dumps(_record([_video(p)])) for n, p in paths.items()})
    manifest = write_shards(records, tmp_path / "root_link", tmp_path / "out", workers=1)
    assert _rejects(tmp_path / "out") == [(n, "media_outside_root") for n in (2, 3, 4, 5, 6)]
    assert manifest["per_reject_reason"] == {"media_outside_root": 5}
    samples = _samples(tmp_path / "out", manifest)
    assert [s["__key__"] for s in samples] == ["000000001", "000000007"]
    assert all(s["0.mp4"] == CLIP for s in samples)
    assert json.loads(samples[1]["json"])["messages"][0]["content"][0]["video"]["source_file"] == "inside_link.mp4"
    details = [json.loads(line)["detail"] for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert f"resolves to {(outside / 'secret.mp4').resolve()}" in details[3] and "outside --media-root" in details[4]


def test_odd_names_and_strings_are_rejects_or_samples_not_crashes(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "loop.mp4").symlink_to(media / "loop.mp4")
    (media / "a.png").write_bytes(_image_bytes("PNG"))
    surrogate = _record([_image("a.png")], answer="\ud800")  # valid JSON ("\\ud800"), not encodable as UTF-8
    lines = {1: json.dumps(_record([_video("loop.mp4")])), 2: json.dumps(_record([_video("a\x00.mp4")])),
             3: json.dumps(surrogate)}
    manifest = write_shards(_write_jsonl(tmp_path / "in.jsonl", lines), media, tmp_path / "out", workers=1)
    assert _rejects(tmp_path / "out") == [(1, "unreadable_media"), (2, "unreadable_media")]
    stored = json.loads(_samples(tmp_path / "out", manifest)[0]["json"])
    assert stored["messages"][1] == surrogate["messages"][1]


def test_media_over_the_size_cap_are_rejected_without_being_read(tmp_path, monkeypatch):
    media = tmp_path / "media"
    media.mkdir()
    small, big = _image_bytes("PNG", size=16), _image_bytes("PNG", size=100)
    (media / "small.png").write_bytes(small)
    (media / "big.png").write_bytes(big)
    with (media / "huge.mp4").open("wb") as sparse:  # 3 GiB on paper, nothing on disk
        sparse.truncate(3 * 1024 ** 3)
    monkeypatch.setattr(writer, "process_line", functools.partial(process_line_never_reading, "huge.mp4"))
    lines = {1: json.dumps(_record([_image("small.png")])), 2: json.dumps(_record([_image("big.png")])),
             3: json.dumps(_record([_video("huge.mp4")]))}
    records = _write_jsonl(tmp_path / "in.jsonl", lines)
    cap_mb = (len(small) + len(big)) / 2 / 1024 ** 2
    assert main(["--input", str(records), "--media-root", str(media), "--output", str(tmp_path / "capped"),
                 "--max-media-mb", str(cap_mb), "--workers", "1"]) == 0
    assert _keys(tmp_path / "capped") == [1]
    assert _rejects(tmp_path / "capped") == [(2, "media_too_large"), (3, "media_too_large")]
    write_shards(records, media, tmp_path / "default_cap", workers=1)  # 2048 MiB
    assert _keys(tmp_path / "default_cap") == [1, 2]
    assert _rejects(tmp_path / "default_cap") == [(3, "media_too_large")]
    assert "3072.0 MiB, over --max-media-mb 2048" in (tmp_path / "default_cap" / "rejects.jsonl").read_text()


def test_a_transcode_over_the_time_limit_is_abandoned(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(CLIP)
    (media / "still.png").write_bytes(_image_bytes("PNG"))
    lines = {1: json.dumps(_record([_video("clip.mp4")])), 2: json.dumps(_record([_image("still.png")]))}
    records = _write_jsonl(tmp_path / "in.jsonl", lines)
    manifest = write_shards(records, media, tmp_path / "slow", workers=1, max_resolution=16, transcode_timeout_s=1e-4)
    assert _rejects(tmp_path / "slow") == [(1, "transcode_timeout")]  # images are never transcoded
    assert manifest["num_samples"] == 1 and _keys(tmp_path / "slow") == [2]
    assert "not done after 1 frames" in (tmp_path / "slow" / "rejects.jsonl").read_text()
    assert write_shards(records, media, tmp_path / "in_time", workers=1, max_resolution=16)["num_samples"] == 2


def test_a_line_that_kills_its_worker_costs_only_itself(tmp_path, monkeypatch):
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(CLIP)
    (media / "still.png").write_bytes(_image_bytes("PNG"))
    (media / "crash.mp4").write_bytes(CLIP)
    monkeypatch.setattr(writer, "process_line", functools.partial(process_line_dying_on, "crash.mp4"))
    media_of = {0: _image("still.png"), 1: _video("clip.mp4")}
    lines = {n: json.dumps(_record([media_of[n % 2]], idx=n)) for n in range(1, 12)} | {12: "{bad"}
    crashing = json.dumps(_record([_video("crash.mp4")]))
    records = _write_jsonl(tmp_path / "in.jsonl", lines | {3: crashing, 9: crashing})  # two pools break
    manifest = write_shards(records, media, tmp_path / "out", shard_size_mb=0.01, workers=2)
    assert _rejects(tmp_path / "out") == [(3, "worker_crashed"), (9, "worker_crashed"), (12, "bad_json")]
    assert _keys(tmp_path / "out") == [n for n in range(1, 12) if n not in (3, 9)]
    assert manifest["num_rejected"] == 3 and len(manifest["shards"]) > 1
    # Everything else is written as if the crashing lines were blank: same shards, byte for byte.
    blanked = _write_jsonl(tmp_path / "blanked.jsonl", lines | {3: "", 9: ""})
    write_shards(blanked, media, tmp_path / "reference", shard_size_mb=0.01, workers=2)
    for shard in manifest["shards"]:
        assert (tmp_path / "out" / shard["name"]).read_bytes() == (tmp_path / "reference" / shard["name"]).read_bytes()


def test_workers_never_start_with_a_lock_the_writers_process_held(tmp_path, monkeypatch):
    """The writer runs inside processes with threads (a trainer, a test session, FFmpeg's). Forked from such a
    process, a worker inherits every lock another thread holds at that instant and can wait on it for ever (a CI
    run hung so); workers come from the fork server instead."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "still.png").write_bytes(_image_bytes("PNG"))
    records = _write_jsonl(tmp_path / "in.jsonl", {n: json.dumps(_record([_image("still.png")])) for n in (1, 2, 3)})
    monkeypatch.setattr(writer, "process_line", process_line_taking_the_lock)
    with LOCK_HELD_ELSEWHERE:
        manifest = write_shards(records, media, tmp_path / "out", workers=2)
    assert manifest["num_samples"] == 3 and manifest["num_rejected"] == 0, _rejects(tmp_path / "out")


# Runs the writer's CLI and SIGKILLs the whole process when the line numbered argv[1] comes out of the workers.
KILLED_WRITER = """
import os, signal, sys
from tarsier_train.data import write_shards as writer

def dying(results, line):
    for result in results:
        if result.line == line:
            os.kill(os.getpid(), signal.SIGKILL)
        yield result

processed_in_order = writer.processed_in_order
writer.processed_in_order = lambda *args: dying(processed_in_order(*args), int(sys.argv[1]))
sys.exit(writer.main(sys.argv[2:]))
"""


def test_a_killed_writer_rerun_continues_and_ends_as_an_uninterrupted_run(tmp_path, capsys):
    media = tmp_path / "media"
    media.mkdir()
    lines = {}
    for n in [*range(1, 16), 46, 47, 48]:  # about three samples a shard
        (media / f"{n}.png").write_bytes(_image_bytes("PNG", size=24, seed=n))
        lines[n] = json.dumps(_record([_image(f"{n}.png")], dataset=f"ds_{n % 3}"))
    lines |= {4: "{bad", 8: json.dumps(_record([_image("absent.png")])), 11: "", 13: "[]"}
    lines |= {n: "{" + "x" * 600 for n in range(16, 46)}  # more rejects than a file buffer holds: some reach disk
    records = _write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out"
    args = ["--input", str(records), "--media-root", str(media), "--output", str(output), "--workers", "2",
            "--shard-size-mb", "0.005"]
    write_shards(records, media, tmp_path / "reference", shard_size_mb=0.005, workers=1)

    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, "47", *args], capture_output=True, timeout=90)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    partial = tmp_path / ".out.partial"
    journal = json.loads((partial / "progress.json").read_text())
    assert 1 < journal["next_line"] < 16 and len(journal["shards"]) >= 2
    # The kill left more than the journal covers (a shard being written, rejects), which the rerun must drop.
    assert set(journal["shards"]) < {p.name for p in partial.glob("shard-*.tar")}
    assert (partial / "rejects.jsonl").stat().st_size > journal["rejects_bytes"]

    assert main([*args, "--shard-size-mb", "0.01"]) == 2  # other arguments: refused, nothing touched
    assert "differs in: shard_size_mb" in capsys.readouterr().err
    (media / "1.png").unlink()  # were line 1 processed again, it would now be rejected
    assert main(args) == 0
    assert f"input lines before {journal['next_line']} done" in capsys.readouterr().err
    _same_files(output, tmp_path / "reference")
    assert not partial.exists()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["num_samples"] == 14 and len(manifest["shards"]) > len(journal["shards"])
    assert _rejects(output) == [(4, "bad_json"), (8, "missing_media"), (13, "not_an_object"),
                                *((n, "bad_json") for n in range(16, 46))]


def test_a_writer_killed_before_any_shard_closed_starts_over(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(_image_bytes("PNG"))
    records = _write_jsonl(tmp_path / "in.jsonl", {n: json.dumps(_record([_image("a.png")])) for n in range(1, 4)})
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "shard-000000.tar").write_bytes(b"half a shard")
    (partial / "rejects.jsonl").write_text('{"line": 1, "reason": "half"}\n')
    write_shards(records, media, tmp_path / "out", workers=1)
    write_shards(records, media, tmp_path / "reference", workers=1)
    _same_files(tmp_path / "out", tmp_path / "reference")
    assert not partial.exists()


@pytest.mark.parametrize("flag", ["--max-media-mb", "--transcode-timeout-s"])
def test_limits_must_be_positive(flag, tmp_path, capsys):
    records = _write_jsonl(tmp_path / "in.jsonl", {1: "{}"})
    assert main(["--input", str(records), "--media-root", str(tmp_path), "--output", str(tmp_path / "o"), flag,
                 "0"]) == 2
    assert f"{flag} must be positive" in capsys.readouterr().err
