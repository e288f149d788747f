"""Tarsier-format jsonl + media files -> WebDataset shards, manifest.json and rejects.jsonl.

Sample key = the input line number (1-based, 9 digits); `{key}.json` is the record with each media
path rewritten to its member `{key}.{i}.{ext}` (original kept as `source_file`). Worker processes check
records (with record_check, the loader's own check) and media, and optionally transcode; the parent writes
in input order, so output does not depend on the worker count. Blank lines are not records and are skipped;
every other line is written or rejected with a stable reason code, so bad data never stops a run: media must
stay inside --media-root and under --max-media-mb, a transcode past --transcode-timeout-s is abandoned, and a
line whose worker dies (OOM kill, segfault) is retried alone and rejected only if it kills that worker too.

The output is built in `.<output name>.partial` next to it, with a journal (progress.json) rewritten each
time a shard closes. Rerunning the command of a killed run continues from its last closed shard, and the
finished output, renamed into place at the end, is byte-identical to that of an uninterrupted run."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import select
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import av
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from tarsier_train.data.record_check import (IMAGE_EXTENSIONS, MEDIA_FILE_KEY, VIDEO_EXTENSIONS, RecordError,
                                             check_record, parse_record)

SHARD_PATTERN = "shard-%06d.tar"
REJECTS_NAME, MANIFEST_NAME, JOURNAL_NAME = "rejects.jsonl", "manifest.json", "progress.json"
BYTES_PER_MB = 1024 * 1024
MAX_REJECT_CHARS = 500
SUPPORTED_EXTENSIONS = {"video": set(VIDEO_EXTENSIONS), "image": set(IMAGE_EXTENSIONS)}
TRANSCODE_CRF, TRANSCODE_PRESET = "18", "medium"  # visually lossless; training decodes many times, encodes once
FUTURES_PER_WORKER = 4  # bounds parent memory: results hold media bytes until written in order
DEFAULT_MAX_MEDIA_MB = 2048
DEFAULT_TRANSCODE_TIMEOUT_S = 600.0
# Fixed tar mtime so identical input gives byte-identical shards (reproducible builds).
SHARD_MTIME = 0

# The writer's own reason codes, for a line's media and its processing (record_check names the record's faults).
UNSUPPORTED_MEDIA = "unsupported_media"  # a file extension the loader does not decode for that item type
MEDIA_OUTSIDE_ROOT = "media_outside_root"  # absolute, with '..', or a symlink leading out of --media-root
MISSING_MEDIA = "missing_media"  # no such file under --media-root
MEDIA_TOO_LARGE = "media_too_large"  # over --max-media-mb on disk (never read into memory)
UNREADABLE_MEDIA = "unreadable_media"  # cannot be read, or not decodable as its item type
TRANSCODE_TIMEOUT = "transcode_timeout"  # transcoding took longer than --transcode-timeout-s
WORKER_CRASHED = "worker_crashed"  # its worker process died twice, the second time on this line alone


@dataclasses.dataclass(frozen=True)
class Transcode:
    max_resolution: int | None
    gop: int | None


@dataclasses.dataclass(frozen=True)
class MediaRules:
    """Where a line's media may come from and what they may cost; sent with every line to the workers."""
    root: Path  # resolved: no media path may lead outside it
    max_bytes: int
    transcode_timeout_s: float
    transcode: Transcode | None


@dataclasses.dataclass(frozen=True)
class Sample:
    line: int
    members: dict[str, bytes]  # webdataset extension ("json", "0.mp4", ...) -> bytes
    dataset: str
    task: str

    @property
    def key(self) -> str:
        return sample_key(self.line)


@dataclasses.dataclass(frozen=True)
class Reject:
    line: int
    reason: str
    detail: str
    record: str


def sample_key(line_number: int) -> str:
    return f"{line_number:09d}"


def process_line(line_number: int, raw: bytes, rules: MediaRules) -> Sample | Reject:
    """Turn one input line into a sample (record checked, media read, checked, maybe transcoded) or a reject."""
    try:
        record = parse_record(raw)
        check_record(record)
        key = sample_key(line_number)
        members = {}
        for index, item in enumerate(media_items(record)):
            extension, data = load_media(item, rules)
            members[f"{index}.{extension}"] = data
            payload, file_key = item[item["type"]], MEDIA_FILE_KEY[item["type"]]
            payload["source_file"], payload[file_key] = payload[file_key], f"{key}.{index}.{extension}"
        members["json"] = json_bytes(record)
        return Sample(line_number, members, str(record.get("dataset", "unknown")), str(record.get("task", "unknown")))
    except RecordError as error:
        return Reject(line_number, error.reason, error.detail, shown_record(raw))
    except Exception as error:  # noqa: BLE001 - a decoder's or our own bug costs this line, named by its type
        return Reject(line_number, f"unexpected_{type(error).__name__}", repr(error), shown_record(raw))


def shown_record(raw: bytes) -> str:
    """The line as rejects.jsonl shows it: text, truncated."""
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")[:MAX_REJECT_CHARS]


def json_bytes(value: Any) -> bytes:
    # A JSON "\ud800" escape parses into a lone surrogate, which UTF-8 cannot encode: writing it back as that
    # escape keeps the JSON valid and equal to the input instead of crashing the run.
    return json.dumps(value, ensure_ascii=False).encode("utf-8", errors="backslashreplace")


def media_items(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The video/image content items of all messages, in order, of a record that passed check_record."""
    return [item for message in record["messages"] if isinstance(message.get("content"), list)
            for item in message["content"] if item["type"] in MEDIA_FILE_KEY]


def load_media(item: dict[str, Any], rules: MediaRules) -> tuple[str, bytes]:
    """(member extension, bytes) of one media item, checked readable; videos transcoded when asked."""
    kind = item["type"]
    relative = item[kind][MEDIA_FILE_KEY[kind]]
    extension = Path(relative).suffix.lower().lstrip(".")
    if extension not in SUPPORTED_EXTENSIONS[kind]:
        supported = ", ".join(sorted(SUPPORTED_EXTENSIONS[kind]))
        raise RecordError(UNSUPPORTED_MEDIA, f"{kind} file {relative!r}: extension {extension!r} not in {supported}")
    path = media_path(relative, rules.root)
    data = read_media(path, rules.max_bytes)
    if kind == "image":
        check_image(data, path)
        return extension, data
    if rules.transcode is not None:
        deadline = time.monotonic() + rules.transcode_timeout_s
        return "mp4", transcode_video(data, path, rules.transcode, deadline)
    check_video(data, path)
    return extension, data


def media_path(relative: str, root: Path) -> Path:
    """The resolved path of a record's media file, which must lie inside the (resolved) media root: a record
    names files of its dataset, never /etc/passwd, another dataset's files, or a symlink pointing at them."""
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise RecordError(MEDIA_OUTSIDE_ROOT, f"{relative!r}: media paths are relative to --media-root, "
                                              "without '..'")
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte, an unencodable name
        raise RecordError(UNREADABLE_MEDIA, f"{relative!r}: {error}") from error
    if not resolved.is_relative_to(root):
        raise RecordError(MEDIA_OUTSIDE_ROOT, f"{relative!r} resolves to {resolved}, outside --media-root {root}")
    return resolved


def read_media(path: Path, max_bytes: int) -> bytes:
    """The file's bytes; its size is checked first, so an oversized file never reaches memory."""
    if not path.is_file():
        raise RecordError(MISSING_MEDIA, str(path))
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise RecordError(MEDIA_TOO_LARGE, f"{path}: {size / BYTES_PER_MB:.1f} MiB, over --max-media-mb "
                                               f"{max_bytes / BYTES_PER_MB:g}")
        return path.read_bytes()
    except OSError as error:
        raise RecordError(UNREADABLE_MEDIA, f"{path}: {error}") from error


def check_image(data: bytes, path: Path) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # PIL raises all of these
        raise RecordError(UNREADABLE_MEDIA, f"{path}: {error}") from error


def check_video(data: bytes, path: Path) -> None:
    """PyAV can open the container and decode its first video frame."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            next(container.decode(video=0))
    except (av.FFmpegError, IndexError, ValueError, StopIteration) as error:
        raise RecordError(UNREADABLE_MEDIA, f"{path}: {error!r}") from error


def transcode_video(data: bytes, path: Path, transcode: Transcode, deadline: float) -> bytes:
    """Re-encode every frame as H.264 yuv420p mp4, longest side capped; frame count is kept. Abandoned once
    past `deadline` (time.monotonic): one pathological video must not hold a worker for hours."""
    buffer = io.BytesIO()
    try:
        with av.open(io.BytesIO(data), mode="r") as source, av.open(buffer, mode="w", format="mp4") as target:
            num_frames = _encode_h264(source, target, transcode, deadline)
    except TimeoutError as error:  # before FFmpegError: PyAV's own timeout is one too
        raise RecordError(TRANSCODE_TIMEOUT, f"{path}: {error}") from error
    except (av.FFmpegError, IndexError, ValueError) as error:
        raise RecordError(UNREADABLE_MEDIA, f"{path}: {error!r}") from error
    if num_frames == 0:
        raise RecordError(UNREADABLE_MEDIA, f"{path}: no decodable video frames")
    return buffer.getvalue()


def _encode_h264(source: Any, target: Any, transcode: Transcode, deadline: float) -> int:
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
        # Between frames, not with a signal or a thread: works in any worker process and any thread.
        if time.monotonic() > deadline:
            raise TimeoutError(f"transcoding not done after {num_frames} frames (--transcode-timeout-s)")
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


def _input_lines(input_path: Path, first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    with input_path.open("rb") as lines:  # bytes: a non-UTF-8 line is one reject, not a crash
        for line_number, raw in enumerate(lines, start=1):
            if line_number >= first_line and raw.strip():
                yield line_number, raw


@dataclasses.dataclass
class _Job:
    line: int
    raw: bytes
    future: Future | None = None  # None: submitting it found the pool broken


def processed_in_order(lines: Iterable[tuple[int, bytes]], rules: MediaRules,
                       workers: int) -> Iterator[Sample | Reject]:
    """process_line over all lines, in input order, on `workers` processes (never in this one: a segfault in a
    decoder must not kill the writer). A worker that dies breaks its pool: the lines in flight are retried one
    at a time, each alone in a fresh process, so only a line that kills its worker again is lost (rejected),
    and a new pool goes on with the rest."""
    lines, in_flight = iter(lines), collections.deque()
    while True:
        with _worker_pool(workers) as pool:
            try:
                yield from _pooled(pool, lines, in_flight, rules, workers * FUTURES_PER_WORKER)
                return
            except BrokenProcessPool:
                pass
        yield from (_salvaged(job, rules) for job in in_flight)  # the pool is shut down: every future is final
        in_flight.clear()


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    """Workers forked from multiprocessing's fork server, never from the writer: the writer may run inside a
    process with threads (a trainer, a test session, FFmpeg's own), and a fork copies whatever lock one of them
    holds at that instant into a child that then waits on it for ever. The fork server is a fresh
    single-threaded process with this module preloaded, so a pool starts in milliseconds, not an import."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_writer, initargs=(os.getpid(),))


def _die_with_writer(writer_pid: int) -> None:
    """Worker initializer. Workers wait for work on a pipe they hold both ends of (and keep the fork server alive),
    so a writer killed (OOM kill, SIGKILL) would leave them waiting forever, holding memory and the writer's
    stdout: a watcher thread ends the worker the moment the writer exits."""
    threading.Thread(target=_exit_when_gone, args=(writer_pid,), daemon=True, name="writer-watch").start()


def _exit_when_gone(pid: int) -> None:
    try:
        if hasattr(os, "pidfd_open"):  # Linux: woken by the exit itself
            select.select([os.pidfd_open(pid)], [], [])
        else:
            while True:
                os.kill(pid, 0)
                time.sleep(1.0)
    except ProcessLookupError:  # gone already
        pass
    os._exit(1)


def _pooled(pool: ProcessPoolExecutor, lines: Iterator[tuple[int, bytes]], in_flight: collections.deque,
            rules: MediaRules, window: int) -> Iterator[Sample | Reject]:
    """Results in order until the lines run out; raises BrokenProcessPool with the unfinished jobs in in_flight."""
    for number, raw in lines:
        in_flight.append(job := _Job(number, raw))
        job.future = pool.submit(process_line, number, raw, rules)
        if len(in_flight) >= window:
            yield _oldest_result(in_flight)
    while in_flight:
        yield _oldest_result(in_flight)


def _oldest_result(in_flight: collections.deque) -> Sample | Reject:
    result = in_flight[0].future.result()  # raises BrokenProcessPool when a worker died: the job stays in flight
    in_flight.popleft()
    return result


def _salvaged(job: _Job, rules: MediaRules) -> Sample | Reject:
    """A job in flight when its pool broke: its result if it had finished, else a retry alone (the line that
    died, or one killed with it, e.g. by the kernel's OOM killer when all workers together ran out of memory)."""
    future = job.future
    if future is not None and not future.cancelled() and future.exception() is None:
        return future.result()
    with _worker_pool(1) as alone:
        try:
            return alone.submit(process_line, job.line, job.raw, rules).result()
        except BrokenProcessPool:
            detail = "the worker process died working on this line alone (killed, e.g. out of memory, or crashed)"
            return Reject(job.line, WORKER_CRASHED, detail, shown_record(job.raw))


class ShardSink:
    """Size-capped shards, numbered on from `first`. As in webdataset's ShardWriter, a shard rolls over before
    the first sample that finds it full; here the caller sees that moment (`full`) to journal the closed shard,
    which is on disk (synced) by then."""

    def __init__(self, folder: Path, max_bytes: float, first: int):
        self._folder, self._max_bytes, self._index = folder, max_bytes, first
        self._file: BinaryIO | None = None
        self._tar: wds.TarWriter | None = None
        self._size = 0

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close_shard()

    @property
    def name(self) -> str:
        return SHARD_PATTERN % self._index

    @property
    def full(self) -> bool:
        return self._tar is not None and self._size >= self._max_bytes

    def write(self, sample: Sample) -> str:
        """Write into the open shard, opening the next one if none is; returns its name."""
        if self._tar is None:
            self._file = (self._folder / self.name).open("wb")
            self._tar = wds.TarWriter(self._file, mtime=SHARD_MTIME)
        self._size += self._tar.write({"__key__": sample.key, **sample.members})
        return self.name

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # leaves our file open
        _sync_close(self._file)
        self._file, self._tar, self._size = None, None, 0
        self._index += 1


COUNTS = ("shards", "per_dataset", "per_task", "per_reject_reason")


@dataclasses.dataclass
class Progress:
    """What the partial output holds. Saved as the journal when a shard closes: then the closed shards, the
    first `rejects_bytes` of rejects.jsonl and these counts cover exactly the input lines before `next_line`."""
    fingerprint: dict[str, Any]  # the input and the arguments that shape the output
    next_line: int = 1
    rejects_bytes: int = 0
    shards: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    per_dataset: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    per_task: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    per_reject_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @classmethod
    def load(cls, folder: Path) -> Progress | None:
        try:
            state = json.loads((folder / JOURNAL_NAME).read_text())
        except FileNotFoundError:
            return None
        return cls(state["fingerprint"], state["next_line"], state["rejects_bytes"],
                   *(collections.Counter(state[name]) for name in COUNTS))

    def count(self, result: Sample | Reject, shard: str | None = None) -> None:
        if isinstance(result, Reject):
            self.per_reject_reason[result.reason] += 1
            return
        self.shards[shard] += 1
        self.per_dataset[result.dataset] += 1
        self.per_task[result.task] += 1

    def save(self, folder: Path, next_line: int, rejects: BinaryIO) -> None:
        """Journal that what is written (shards closed, rejects flushed here) covers the lines before next_line."""
        _sync(rejects)
        self.next_line, self.rejects_bytes = next_line, rejects.tell()
        state = {"fingerprint": self.fingerprint, "next_line": self.next_line, "rejects_bytes": self.rejects_bytes,
                 **{name: dict(getattr(self, name)) for name in COUNTS}}
        temporary = folder / f"{JOURNAL_NAME}.tmp"
        with temporary.open("w") as journal:
            journal.write(json.dumps(state))
            _sync(journal)
        os.replace(temporary, folder / JOURNAL_NAME)  # atomic: a kill leaves the old journal or the new one

    def manifest(self) -> dict[str, Any]:
        return {
            "shards": [{"name": name, "num_samples": count} for name, count in sorted(self.shards.items())],
            "num_samples": self.shards.total(),
            "per_dataset": dict(sorted(self.per_dataset.items())),
            "per_task": dict(sorted(self.per_task.items())),
            "num_rejected": self.per_reject_reason.total(),
            "per_reject_reason": dict(sorted(self.per_reject_reason.items())),
        }


def _sync(file: Any) -> None:
    file.flush()
    os.fsync(file.fileno())


def _sync_close(file: BinaryIO) -> None:
    _sync(file)
    file.close()


def write_outputs(results: Iterable[Sample | Reject], folder: Path, shard_size_mb: float, progress: Progress,
                  bar: tqdm) -> dict[str, Any]:
    """Shards and rejects.jsonl into folder, going on from `progress` and journaling it at every shard close;
    then manifest.json (counts over all runs). Returns the manifest."""
    with (folder / REJECTS_NAME).open("ab") as rejects, \
            ShardSink(folder, shard_size_mb * BYTES_PER_MB, first=len(progress.shards)) as shards:
        for result in results:
            if isinstance(result, Reject):
                rejects.write(json_bytes(dataclasses.asdict(result)) + b"\n")
                progress.count(result)
            else:
                if shards.full:
                    shards.close_shard()
                    # A rerun starts a new shard at this line, so shards end where an uninterrupted run's do.
                    progress.save(folder, result.line, rejects)
                progress.count(result, shards.write(result))
            bar.update()
            bar.set_postfix(written=progress.shards.total(), rejected=progress.per_reject_reason.total(),
                            refresh=False)
    manifest = progress.manifest()
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def partial_dir(output_dir: Path) -> Path:
    """Where output_dir is built: named after it (a rerun finds it), next to it (the final rename is atomic)."""
    return output_dir.parent / f".{output_dir.name}.partial"


def write_shards(input_path: str | Path, media_root: str | Path, output_dir: str | Path,
                 shard_size_mb: float = 1024, workers: int | None = None, max_resolution: int | None = None,
                 gop: int | None = None, max_media_mb: float = DEFAULT_MAX_MEDIA_MB,
                 transcode_timeout_s: float = DEFAULT_TRANSCODE_TIMEOUT_S) -> dict[str, Any]:
    """Write the shards of a Tarsier jsonl into output_dir (built aside, then renamed); returns the manifest.
    A partial output left by a killed run of the same input and arguments is continued, not redone."""
    input_path, media_root, output_dir = Path(input_path), Path(media_root), Path(output_dir)
    workers = default_workers() if workers is None else workers
    _check_arguments(input_path, media_root, output_dir, shard_size_mb, workers, max_resolution, gop, max_media_mb,
                     transcode_timeout_s)
    transcode = None if max_resolution is None and gop is None else Transcode(max_resolution, gop)
    rules = MediaRules(media_root.resolve(), int(max_media_mb * BYTES_PER_MB), transcode_timeout_s, transcode)
    # Workers are left out: they do not change the output, so a rerun may use another number.
    settings = {"media_root": str(rules.root), "shard_size_mb": shard_size_mb, "max_resolution": max_resolution,
                "gop": gop, "max_media_mb": max_media_mb, "transcode_timeout_s": transcode_timeout_s}
    partial = partial_dir(output_dir)
    progress = resume_or_start(partial, input_fingerprint(input_path) | settings)
    with progress_bar(input_path, progress.next_line) as bar:
        results = processed_in_order(_input_lines(input_path, progress.next_line), rules, workers)
        manifest = write_outputs(results, partial, shard_size_mb, progress, bar)
    _refuse_non_empty(output_dir)  # again: something may have appeared while we worked
    (partial / JOURNAL_NAME).unlink(missing_ok=True)  # none when no shard closed before the last
    partial.rename(output_dir)  # atomic: readers never see a half-written output (replaces an empty dir)
    return manifest


def input_fingerprint(input_path: Path) -> dict[str, Any]:
    """Tells another input from this one without reading it all: its size and the hash of its first MiB."""
    with input_path.open("rb") as file:
        head = file.read(BYTES_PER_MB)
    return {"input_size": input_path.stat().st_size, "input_head_sha256": hashlib.sha256(head).hexdigest()}


def resume_or_start(partial: Path, fingerprint: dict[str, Any]) -> Progress:
    """The journaled progress of a killed run in `partial`, its folder cut back to what the journal covers;
    or a fresh start in an emptied folder when there is no journal (the run was killed before a shard closed)."""
    progress = Progress.load(partial)
    if progress is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / REJECTS_NAME).touch()
        return Progress(fingerprint)
    if progress.fingerprint != fingerprint:
        changed = sorted(name for name in fingerprint.keys() | progress.fingerprint.keys()
                         if fingerprint.get(name) != progress.fingerprint.get(name))
        raise ValueError(f"{partial} holds the partial output of a run with another input or other arguments "
                         f"(differs in: {', '.join(changed)}); rerun that command to continue it, or delete "
                         f"{partial} to start over")
    for shard in partial.glob("shard-*.tar"):
        if shard.name not in progress.shards:  # the one being written when the run was killed
            shard.unlink()
    (partial / f"{JOURNAL_NAME}.tmp").unlink(missing_ok=True)  # killed while journaling: would end up in the output
    with (partial / REJECTS_NAME).open("r+b") as rejects:
        rejects.truncate(progress.rejects_bytes)
    print(f"continuing the run killed in {partial}: {len(progress.shards)} shards kept, input lines before "
          f"{progress.next_line} done", file=sys.stderr)
    return progress


def progress_bar(input_path: Path, next_line: int) -> tqdm:
    """Lines done, written, rejected and ETA on stderr (a terminal only). The lines are counted first: cheap
    next to their media. Lines done by an earlier run count as done."""
    total = done = 0
    for number, _ in _input_lines(input_path):
        total += 1
        done += number < next_line
    return tqdm(total=total, initial=done, unit="line", file=sys.stderr, disable=None, dynamic_ncols=True)


def _check_arguments(input_path: Path, media_root: Path, output_dir: Path, shard_size_mb: float, workers: int,
                     max_resolution: int | None, gop: int | None, max_media_mb: float,
                     transcode_timeout_s: float) -> None:
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
    if max_media_mb <= 0:
        raise ValueError(f"--max-media-mb must be positive, got {max_media_mb}")
    if transcode_timeout_s <= 0:
        raise ValueError(f"--transcode-timeout-s must be positive, got {transcode_timeout_s}")


def _refuse_non_empty(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"--output {output_dir} exists and is not an empty directory; choose a new path")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tarsier_train.data.write_shards",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="Tarsier-format jsonl, one record per line")
    parser.add_argument("--media-root", required=True, type=Path,
                        help="media paths in records are relative to it and must stay inside it")
    parser.add_argument("--output", required=True, type=Path,
                        help="new (or empty) directory for shards; rerun the same command to continue a killed run")
    parser.add_argument("--shard-size-mb", type=float, default=1024, help="roll over to a new shard at this many MiB")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes reading/transcoding media")
    parser.add_argument("--max-resolution", type=int, help="transcode videos: longest side at most PX")
    parser.add_argument("--gop", type=int, help="transcode videos: keyframe at least every N frames")
    parser.add_argument("--max-media-mb", type=float, default=DEFAULT_MAX_MEDIA_MB,
                        help="reject a line whose media file is larger than this many MiB")
    parser.add_argument("--transcode-timeout-s", type=float, default=DEFAULT_TRANSCODE_TIMEOUT_S,
                        help="reject a line whose video takes longer than this to transcode")
    return parser.parse_args(argv)


def print_summary(manifest: dict[str, Any], output_dir: Path) -> None:
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {output_dir}")
    print(f"rejected {manifest['num_rejected']} lines (details in {output_dir / REJECTS_NAME})")
    for reason, count in manifest["per_reject_reason"].items():
        print(f"  {reason}: {count}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry: 0 when at least one sample was written, 1 when none was, 2 on a usage error."""
    args = parse_args(argv)
    try:
        manifest = write_shards(args.input, args.media_root, args.output, args.shard_size_mb, args.workers,
                                args.max_resolution, args.gop, args.max_media_mb, args.transcode_timeout_s)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(manifest, args.output)
    return 0 if manifest["num_samples"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
