"""Tarsier-format jsonl + media files -> WebDataset shards, manifest.json and rejects.jsonl.

Sample key = the input line number (1-based, 9 digits); `{key}.json` is the record with each media
path rewritten to its member `{key}.{i}.{ext}` (original kept as `source_file`). Workers check and
optionally transcode media; the parent writes in input order, so output does not depend on the
worker count. Blank lines are not records and are skipped; every other line is written or rejected."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import webdataset as wds
from PIL import Image

from tarsier_train.data.records import IMAGE_EXTENSIONS, MEDIA_FILE_KEY, VIDEO_EXTENSIONS

SHARD_PATTERN = "shard-%06d.tar"
BYTES_PER_MB = 1024 * 1024
MAX_REJECT_CHARS = 500
SUPPORTED_EXTENSIONS = {"video": set(VIDEO_EXTENSIONS), "image": set(IMAGE_EXTENSIONS)}
TRANSCODE_CRF, TRANSCODE_PRESET = "18", "medium"  # visually lossless; training decodes many times, encodes once
FUTURES_PER_WORKER = 4  # bounds parent memory: results hold media bytes until written in order
# Fixed tar mtime so identical input gives byte-identical shards (reproducible builds).
SHARD_MTIME = 0


class RecordRejected(ValueError):
    """One input line that cannot become a sample; `reason` is a stable category, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Transcode:
    max_resolution: int | None
    gop: int | None


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str
    members: dict[str, bytes]  # webdataset extension ("json", "0.mp4", ...) -> bytes
    dataset: str
    task: str


@dataclasses.dataclass(frozen=True)
class Reject:
    line: int
    reason: str
    detail: str
    record: str


def process_line(line_number: int, raw: bytes, media_root: Path, transcode: Transcode | None) -> Sample | Reject:
    """Turn one input line into a sample (media read, checked, maybe transcoded) or a reject."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    try:
        record = parse_record(raw)
        key = f"{line_number:09d}"
        members = {}
        for index, item in enumerate(media_items(record)):
            extension, data = load_media(item, media_root, transcode)
            members[f"{index}.{extension}"] = data
            payload, file_key = item[item["type"]], MEDIA_FILE_KEY[item["type"]]
            payload["source_file"], payload[file_key] = payload[file_key], f"{key}.{index}.{extension}"
        members["json"] = json.dumps(record, ensure_ascii=False).encode()
        return Sample(key, members, str(record.get("dataset", "unknown")), str(record.get("task", "unknown")))
    except RecordRejected as rejected:
        return Reject(line_number, rejected.reason, rejected.detail, text[:MAX_REJECT_CHARS])


def parse_record(raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordRejected("bad json", str(error)) from error
    if not isinstance(record, dict) or "messages" not in record:
        raise RecordRejected("missing messages", "the line is not a json object with a 'messages' key")
    if not isinstance(record["messages"], list):
        raise RecordRejected("malformed record", "'messages' is not a list")
    return record


def media_items(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The video/image content items of all messages, in order; text items are skipped."""
    items = []
    for message_index, message in enumerate(record["messages"]):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):  # plain-text message: no media
            continue
        if not isinstance(content, list):
            raise RecordRejected("malformed record", f"messages[{message_index}] has no 'content' list")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                continue
            if kind not in MEDIA_FILE_KEY:
                raise RecordRejected("unsupported media", f"content item type {kind!r} (expected video, image or text)")
            payload = item.get(kind)
            if not isinstance(payload, dict) or not isinstance(payload.get(MEDIA_FILE_KEY[kind]), str):
                raise RecordRejected("malformed record", f"{kind} item has no '{kind}.{MEDIA_FILE_KEY[kind]}' string")
            items.append(item)
    return items


def load_media(item: dict[str, Any], media_root: Path, transcode: Transcode | None) -> tuple[str, bytes]:
    """(member extension, bytes) of one media item, checked readable; videos transcoded when asked."""
    kind = item["type"]
    relative = item[kind][MEDIA_FILE_KEY[kind]]
    extension = Path(relative).suffix.lower().lstrip(".")
    if extension not in SUPPORTED_EXTENSIONS[kind]:
        supported = ", ".join(sorted(SUPPORTED_EXTENSIONS[kind]))
        raise RecordRejected("unsupported media",
                             f"{kind} file {relative!r}: extension {extension!r} not in {supported}")
    path = media_root / relative
    if not path.is_file():
        raise RecordRejected("missing media", str(path))
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RecordRejected("unreadable media", f"{path}: {error}") from error
    if kind == "image":
        check_image(data, path)
        return extension, data
    if transcode is not None:
        return "mp4", transcode_video(data, path, transcode)
    check_video(data, path)
    return extension, data


def check_image(data: bytes, path: Path) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # PIL raises all of these
        raise RecordRejected("unreadable media", f"{path}: {error}") from error


def check_video(data: bytes, path: Path) -> None:
    """PyAV can open the container and decode its first video frame."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            next(container.decode(video=0))
    except (av.FFmpegError, IndexError, ValueError, StopIteration) as error:
        raise RecordRejected("unreadable media", f"{path}: {error!r}") from error


def transcode_video(data: bytes, path: Path, transcode: Transcode) -> bytes:
    """Re-encode every frame as H.264 yuv420p mp4, longest side capped; frame count is kept."""
    buffer = io.BytesIO()
    try:
        with av.open(io.BytesIO(data), mode="r") as source, av.open(buffer, mode="w", format="mp4") as target:
            num_frames = _encode_h264(source, target, transcode)
    except (av.FFmpegError, IndexError, ValueError) as error:
        raise RecordRejected("unreadable media", f"{path}: {error!r}") from error
    if num_frames == 0:
        raise RecordRejected("unreadable media", f"{path}: no decodable video frames")
    return buffer.getvalue()


def _encode_h264(source: Any, target: Any, transcode: Transcode) -> int:
    source_stream = source.streams.video[0]
    # Constant rate at the source's average: frame indices (and times, for constant-rate sources)
    # in the record keep pointing at the same frames.
    rate = Fraction(source_stream.average_rate or source_stream.guessed_rate or 25)
    stream, num_frames = None, 0
    for frame in source.decode(source_stream):
        if stream is None:
            stream = _add_h264_stream(target, rate, frame.width, frame.height, transcode)
        resized = frame.reformat(stream.width, stream.height, format="yuv420p")
        resized.pts, resized.time_base = num_frames, 1 / rate
        target.mux(stream.encode(resized))
        num_frames += 1
    if stream is not None:
        target.mux(stream.encode(None))
    return num_frames


def _add_h264_stream(target: Any, rate: Fraction, width: int, height: int, transcode: Transcode) -> Any:
    stream = target.add_stream("libx264", rate=rate)
    stream.width, stream.height = output_size(width, height, transcode.max_resolution)
    stream.pix_fmt = "yuv420p"
    options = {"crf": TRANSCODE_CRF, "preset": TRANSCODE_PRESET}
    if transcode.gop is not None:
        options["g"] = str(transcode.gop)
    stream.options = options
    return stream


def output_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """Longest side at most max_resolution, aspect kept, both sides even (yuv420p needs it)."""
    scale = min(1.0, max_resolution / max(width, height)) if max_resolution else 1.0
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def _input_lines(input_path: Path) -> Iterator[tuple[int, bytes]]:
    with input_path.open("rb") as lines:  # bytes: a non-UTF-8 line is one reject, not a crash
        for line_number, raw in enumerate(lines, start=1):
            if raw.strip():
                yield line_number, raw


def processed_in_order(lines: Iterable[tuple[int, bytes]], media_root: Path, transcode: Transcode | None,
                       workers: int) -> Iterator[Sample | Reject]:
    """process_line over all lines, in input order, on `workers` processes."""
    if workers == 1:
        yield from (process_line(number, raw, media_root, transcode) for number, raw in lines)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for number, raw in lines:
            pending.append(pool.submit(process_line, number, raw, media_root, transcode))
            if len(pending) >= workers * FUTURES_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_outputs(results: Iterable[Sample | Reject], folder: Path, shard_size_mb: float) -> dict[str, Any]:
    """Shards, rejects.jsonl and manifest.json into folder; returns the manifest."""
    counts = {name: collections.Counter() for name in ("shards", "per_dataset", "per_task", "per_reject_reason")}
    # maxcount out of the way: shard size alone decides where shards roll over.
    with (folder / "rejects.jsonl").open("w") as rejects, wds.ShardWriter(
            str(folder / SHARD_PATTERN), maxsize=shard_size_mb * BYTES_PER_MB, maxcount=sys.maxsize,
            verbose=0, mtime=SHARD_MTIME) as sink:
        for result in results:
            if isinstance(result, Reject):
                rejects.write(json.dumps(dataclasses.asdict(result), ensure_ascii=False) + "\n")
                counts["per_reject_reason"][result.reason] += 1
                continue
            sink.write({"__key__": result.key, **result.members})
            counts["shards"][Path(sink.fname).name] += 1
            counts["per_dataset"][result.dataset] += 1
            counts["per_task"][result.task] += 1
    for shard in folder.glob("shard-*.tar"):
        if shard.name not in counts["shards"]:  # ShardWriter opens its first shard before any sample comes
            shard.unlink()
    manifest = {
        "shards": [{"name": name, "num_samples": count} for name, count in sorted(counts["shards"].items())],
        "num_samples": counts["shards"].total(),
        "per_dataset": dict(sorted(counts["per_dataset"].items())),
        "per_task": dict(sorted(counts["per_task"].items())),
        "num_rejected": counts["per_reject_reason"].total(),
        "per_reject_reason": dict(sorted(counts["per_reject_reason"].items())),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def write_shards(input_path: str | Path, media_root: str | Path, output_dir: str | Path,
                 shard_size_mb: float = 1024, workers: int | None = None, max_resolution: int | None = None,
                 gop: int | None = None) -> dict[str, Any]:
    """Write the shards of a Tarsier jsonl into output_dir (built aside, then renamed); returns the manifest."""
    input_path, media_root, output_dir = Path(input_path), Path(media_root), Path(output_dir)
    workers = default_workers() if workers is None else workers
    _check_arguments(input_path, media_root, output_dir, shard_size_mb, workers, max_resolution, gop)
    transcode = None if max_resolution is None and gop is None else Transcode(max_resolution, gop)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
    try:
        results = processed_in_order(_input_lines(input_path), media_root, transcode, workers)
        manifest = write_outputs(results, staging, shard_size_mb)
        _refuse_non_empty(output_dir)  # again: something may have appeared while we worked
        staging.rename(output_dir)  # atomic: readers never see a half-written output (replaces an empty dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _check_arguments(input_path: Path, media_root: Path, output_dir: Path, shard_size_mb: float, workers: int,
                     max_resolution: int | None, gop: int | None) -> None:
    if not input_path.is_file():
        raise FileNotFoundError(f"--input {input_path}: no such file")
    if not media_root.is_dir():
        raise FileNotFoundError(f"--media-root {media_root}: no such directory")
    _refuse_non_empty(output_dir)
    if shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb must be positive, got {shard_size_mb}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if max_resolution is not None and max_resolution < 2:
        raise ValueError(f"--max-resolution must be at least 2 pixels, got {max_resolution}")
    if gop is not None and gop < 1:
        raise ValueError(f"--gop must be at least 1, got {gop}")


def _refuse_non_empty(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"--output {output_dir} exists and is not an empty directory; choose a new path")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tarsier_train.data.write_shards",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="Tarsier-format jsonl, one record per line")
    parser.add_argument("--media-root", required=True, type=Path, help="media paths in records are relative to it")
    parser.add_argument("--output", required=True, type=Path, help="new (or empty) directory for shards")
    parser.add_argument("--shard-size-mb", type=float, default=1024, help="roll over to a new shard at this many MiB")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes reading/transcoding media")
    parser.add_argument("--max-resolution", type=int, help="transcode videos: longest side at most PX")
    parser.add_argument("--gop", type=int, help="transcode videos: keyframe at least every N frames")
    return parser.parse_args(argv)


def print_summary(manifest: dict[str, Any], output_dir: Path) -> None:
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {output_dir}")
    print(f"rejected {manifest['num_rejected']} lines (details in {output_dir / 'rejects.jsonl'})")
    for reason, count in manifest["per_reject_reason"].items():
        print(f"  {reason}: {count}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry: 0 when at least one sample was written, 1 when none was, 2 on a usage error."""
    args = parse_args(argv)
    try:
        manifest = write_shards(args.input, args.media_root, args.output, args.shard_size_mb, args.workers,
                                args.max_resolution, args.gop)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(manifest, args.output)
    return 0 if manifest["num_samples"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
