"""Ending a distributed run that cannot go on: on SIGTERM (how schedulers preempt) promptly, even while the main thread
is blocked in a collective, and with an error naming the rank and step when a collective times out."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
# How a collective that will never complete surfaces: gloo's own timeout, a peer that died (gloo), NCCL's watchdog.
_COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                        "Watchdog caught collective operation timeout")


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete: another rank is stuck (in other work, or a collective of its own) or dead."""


def collective_failure(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in _COLLECTIVE_FAILURES)


class SigtermStop:
    """On SIGTERM: log it, forward it (`on_signal`, e.g. to Lightning's child ranks) and raise SystemExit in the main
    thread. A Python handler only runs once the main thread is back in Python; one blocked in a C collective never
    is, so a watcher thread, woken through the signal wakeup fd, ends the process `grace_s` later if it still runs."""

    def __init__(self, describe: Callable[[], str], grace_s: float, on_signal: Callable[[int], None] | None = None):
        self.describe, self.grace_s, self.on_signal = describe, grace_s, on_signal
        self._received, self._lock = False, threading.Lock()

    def install(self) -> None:
        """From the main thread. Again after others (Lightning's trainer) replace the handler: theirs may run a
        collective inside the handler, which blocks for ever when a peer is not there to join it."""
        if signal.getsignal(signal.SIGTERM) == self.handle:
            return
        signal.signal(signal.SIGTERM, self.handle)
        if not hasattr(self, "_wakeup"):
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)  # set_wakeup_fd requires it: the C handler must never block
            self._wakeup = write_end
            threading.Thread(target=self._watch, args=(read_end,), name="sigterm-watch", daemon=True).start()
        signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self._note()
        raise SystemExit(SIGTERM_EXIT_CODE)

    def _note(self) -> None:
        with self._lock:  # the handler and the watcher both get here: log and forward once
            if self._received:
                return
            self._received = True
        log.error("%s: SIGTERM: stopping (forced exit in %g s if still blocked)", self.describe(), self.grace_s)
        if self.on_signal is not None:
            self.on_signal(signal.SIGTERM)

    def _watch(self, read_end: int) -> None:
        while signal.SIGTERM not in os.read(read_end, 64):
            pass  # the wakeup fd carries every signal with a Python handler: only SIGTERM matters here
        self._note()
        threading.main_thread().join(self.grace_s)
        if threading.main_thread().is_alive():
            log.error("%s: still running %g s after SIGTERM (blocked, e.g. in a collective): exiting now",
                      self.describe(), self.grace_s)
            logging.shutdown()
            os._exit(SIGTERM_EXIT_CODE)
