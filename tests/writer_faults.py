"""Faults the shard writer's tests inject into its worker processes. Workers come from a fork server, not from
the test process, so a monkeypatch there never reaches them: the tests hand the writer one of these (picklable
by reference) as its per-line function instead, which does the fault in the worker, then the real work."""

import os
import signal
import threading
from pathlib import Path

from tarsier_train.data import write_shards as writer

_read_bytes = Path.read_bytes


def process_line_dying_on(media_name: str, line_number: int, raw: bytes, rules: writer.MediaRules):
    """A worker killed (segfault, OOM kill, as the writer sees it) by any line that names `media_name`."""
    if media_name.encode() in raw:
        os.kill(os.getpid(), signal.SIGKILL)
    return writer.process_line(line_number, raw, rules)


def process_line_never_reading(media_name: str, line_number: int, raw: bytes, rules: writer.MediaRules):
    """Fails the line (an unexpected error, in the rejects) if the worker reads `media_name` into memory."""
    def refuse(path: Path) -> bytes:
        if path.name == media_name:
            raise AssertionError(f"read {media_name} into memory")
        return _read_bytes(path)

    Path.read_bytes = refuse
    try:
        return writer.process_line(line_number, raw, rules)
    finally:
        Path.read_bytes = _read_bytes


# Held by the test's own thread while the writer runs: a lock some thread of the writer's process holds when a
# worker starts (FFmpeg's, a logger's, a trainer's). A worker forked from that process would start with it held.
LOCK_HELD_ELSEWHERE = threading.Lock()


def process_line_taking_the_lock(line_number: int, raw: bytes, rules: writer.MediaRules):
    if not LOCK_HELD_ELSEWHERE.acquire(timeout=20):
        raise RuntimeError("the worker started with a lock its writer's process held: forked from it")
    LOCK_HELD_ELSEWHERE.release()
    return writer.process_line(line_number, raw, rules)
