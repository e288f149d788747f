"""One writer per run directory: the launching global rank 0 holds <run_dir>/.lock for the process lifetime.

The lock is an flock on an open file: the kernel drops it when the holder dies however it dies (kill -9, OOM,
node reboot), so a requeued job takes over a dead run's directory without anyone deleting anything. The file
also names its holder (host, pid, start time) for the error message, and for filesystems without flock
(some Lustre/NFS mounts), where the holder's record is the lock: a dead pid on this host is taken over, a record
from another host is trusted until a user removes it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from tarsier_train.checkpoint.resume import remove_partial_saves

LOCK_NAME = ".lock"
# Set by torchrun (RANK, LOCAL_RANK, GROUP_RANK), SLURM (SLURM_PROCID), LSF (JSM_NAMESPACE_RANK) or Lightning's
# launcher (LOCAL_RANK, NODE_RANK) before the Trainer exists; global rank 0 is the only process with all of them 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_held: list[RunLock] = []  # keeps each lock's file open (and so held) until exit, whatever the caller keeps


class RunDirectoryLocked(RuntimeError):
    pass


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0, known from the launcher's environment before any process group."""
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


class RunLock:
    def __init__(self, path: Path, handle: IO[str]):
        self.path, self.handle = path, handle

    def release(self) -> None:
        """Clear the holder record (a clean exit leaves a free lock also where flock does not work), then unlock.
        The file itself stays: unlinking a locked file lets a waiter lock an inode nobody else sees."""
        if self.handle.closed:
            return
        self.handle.truncate(0)
        self.handle.flush()
        self.handle.close()


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(handle: IO[str]) -> dict | None:
    handle.seek(0)
    try:
        return json.loads(handle.read())
    except ValueError:  # empty (released, or a holder killed before writing) or foreign content
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _locked_error(path: Path, holder: dict | None, reason: str) -> RunDirectoryLocked:
    who = (f"process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
           if holder else "another process")
    return RunDirectoryLocked(
        f"run directory {path.parent} is in use: {who} holds {path} ({reason}). Two runs writing one directory "
        "would corrupt its checkpoints and logs. Wait for that run to end, stop it (a scheduler requeue while the "
        "old job still runs: cancel the old job), or start a separate run with run_name=<new name>.")


def _check_record(path: Path, handle: IO[str]) -> None:
    """Without flock: the record decides. Ours or a dead pid on this host: free; a live one, or another host's: held."""
    holder = _read_holder(handle)
    if holder is None or holder.get("host") != socket.gethostname():
        if holder is not None:
            raise _locked_error(path, holder, "this filesystem has no flock, so the lock file's record is trusted; "
                                "if that job is dead, delete the file")
        return
    if holder.get("pid") != os.getpid() and _pid_alive(int(holder.get("pid", 0))):
        raise _locked_error(path, holder, "no flock on this filesystem; the process is alive")


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Take <run_dir>/.lock or fail at once (never wait: a second writer is a mistake to report, not to queue)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(handle)
        handle.close()
        raise _locked_error(path, holder, "a live lock") from None
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            handle.close()
            raise
        try:
            _check_record(path, handle)
        except RunDirectoryLocked:
            handle.close()
            raise
    handle.seek(0)
    handle.truncate(0)
    handle.write(json.dumps(_holder_record()))
    handle.flush()
    os.fsync(handle.fileno())
    lock = RunLock(path, handle)
    _held.append(lock)
    atexit.register(lock.release)
    return lock


def claim_run_dir(run_dir: str | Path) -> RunLock | None:
    """On global rank 0: lock the run directory, then (safe only now) remove what killed saves left. Other ranks
    write nothing here and return None."""
    if not is_launch_rank_zero():
        return None
    lock = acquire_run_lock(Path(run_dir))
    remove_partial_saves(run_dir)
    return lock
