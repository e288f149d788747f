"""A benchmark as Tarsier2 releases them: a jsonl of annotation records plus a directory of videos (`vid` -> file),
or WebDataset shards of the same records with their media; and how its answers are scored."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, get_args

from tarsier_train.data.record_check import VIDEO_EXTENSIONS
from tarsier_train.eval.benchmark_records import record_key

# caption: event recall/precision per source (AutoDQ, or the exact toy-world judge); multiple_choice: accuracy over
# parsed answers (MVBench, TVBench, Next-QA, EgoSchema, FAVOR-Bench); videomme: unparsed answers count as wrong.
Scoring = Literal["caption", "multiple_choice", "videomme"]
SCORINGS: tuple[str, ...] = get_args(Scoring)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    scoring: Scoring
    annotations: str | None = None  # jsonl, one record per line
    video_dir: str | None = None  # where `vid` (a stem or relative path) is found
    shards: str | list[str] | None = None  # instead of annotations + video_dir

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"benchmark.scoring={self.scoring!r}: allowed values are {', '.join(SCORINGS)}")
        if (self.annotations is None) == (self.shards is None):
            raise ValueError(f"benchmark {self.name}: set benchmark.annotations (a jsonl, with benchmark.video_dir) "
                             "or benchmark.shards, one of them")
        if self.annotations is not None:
            if not Path(self.annotations).is_file():
                raise FileNotFoundError(f"benchmark.annotations={self.annotations!r}: no such file")
            if self.video_dir is None or not Path(self.video_dir).is_dir():
                raise FileNotFoundError(f"benchmark.video_dir={self.video_dir!r}: not a directory (the videos the "
                                        "records' vid fields name)")

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """(key, record) of every annotation line, in file order; a line that is not a JSON object fails, naming it
        (a benchmark with a silently dropped line would report a score over the wrong set)."""
        records, seen = [], set()
        with open(self.annotations) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{self.annotations}:{number}: not JSON ({error})") from None
                if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                    raise ValueError(f"{self.annotations}:{number}: not a Tarsier annotation record (no messages)")
                key = record_key(record, number)
                if key in seen:
                    raise ValueError(f"{self.annotations}:{number}: key {key!r} (dataset#idx) appears twice")
                seen.add(key)
                records.append((key, record))
        return records


def video_path(video_dir: str | Path, vid: Any) -> Path:
    """The file a record's `vid` names: a relative path, or a stem with any video extension."""
    directory = Path(video_dir)
    given = directory / str(vid)
    if given.is_file():
        return given
    for extension in VIDEO_EXTENSIONS:
        candidate = directory / f"{vid}.{extension}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no video for vid {vid!r} in {directory} (tried {vid} and {vid}.<"
                            f"{'|'.join(VIDEO_EXTENSIONS)}>)")
