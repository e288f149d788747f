"""Judge answers kept on disk, so a score can be reproduced (and rescored offline) from the very answers it was
computed from: an append-only jsonl, one fsync'd entry per answer, keyed by everything that shapes the answer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FILE = "judge_cache.jsonl"


def cache_key(model: str, prompt_version: str, sampling: dict[str, Any], prompt: str) -> str:
    """sha256 of what decides an answer: the judge model asked for, the prompt templates' version, the sampling
    settings and the full prompt. A changed template or model misses instead of reusing an old answer."""
    identity = {"model": model, "prompt_version": prompt_version, "sampling": sampling, "prompt": prompt}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """`directory`/judge_cache.jsonl: `{"key": ..., **entry}` per line. Thread-safe; the first entry stored for a
    key wins (two threads asking the same prompt at once both use the first answer, as a rescore will). A torn
    last line (a process killed mid-write) is cut off on load; any other unreadable line is skipped with a warning
    (its answer is asked again: a miss never reuses a wrong answer)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CACHE_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Store `entry` under `key` unless an entry is there already; return the stored one."""
        with self._lock:
            if key in self._entries:
                return self._entries[key]
            line = json.dumps({"key": key, **entry}, sort_keys=True, ensure_ascii=False) + "\n"
            created = not self.path.exists()
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line.encode())  # one write per line: never interleaved with another writer's
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            if created:  # the file's own name survives a crash too
                directory = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
            self._entries[key] = entry
            return entry

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete, newline, tail = data.rpartition(b"\n")
        broken = [number for number, line in enumerate(complete.split(b"\n"), 1)
                  if line.strip() and not self._add(line)]
        if broken:  # a missing answer is asked again; a wrong one is never used
            log.warning("judge cache %s: skipped %d unreadable lines (%s); their answers will be asked again",
                        self.path, len(broken), ", ".join(map(str, broken[:10])))
        if tail.strip():
            self._repair_tail(len(complete) + len(newline), tail)

    def _add(self, line: bytes) -> bool:
        """Index one stored line (the first entry for a key wins); False when it is not an entry."""
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            return False
        self._entries.setdefault(entry.pop("key"), entry)
        return True

    def _repair_tail(self, offset: int, tail: bytes) -> None:
        """A last line without its newline: complete JSON (killed before the newline) is kept and terminated; a
        torn fragment is cut off, so the next entry starts a line of its own."""
        with open(self.path, "r+b") as file:
            if self._add(tail):
                file.seek(0, os.SEEK_END)
                file.write(b"\n")
            else:
                log.warning("judge cache %s: dropped a torn last line (%d bytes) left by an interrupted write",
                            self.path, len(tail))
                file.truncate(offset)
            file.flush()
            os.fsync(file.fileno())
