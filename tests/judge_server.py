"""A deterministic OpenAI-compatible judge on loopback, for the AutoDQ judge's tests and for `python train.py` runs
pointed at its URL: events are the sentences of a description, an event is entailed iff its sentence occurs in the
other text. It counts requests, reports a configurable model id, and fails or delays requests on cue.

    with judge_server(model_id="judge-v1") as server:    # server.base_url: http://127.0.0.1:PORT/v1
        server.faults = [Fault(503), Fault(delay_s=1.0), Fault(body=MALFORMED)]  # for the next 3 requests
        server.faults.append(Fault(500, when="a girl runs"))  # for the next request whose prompt contains this

Standalone, for a manual check: `python tests/judge_server.py [--port 8000] [--model-id ID]`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

MALFORMED = b"<html>upstream hiccup</html>"  # not a chat completion at all


def chat_completion(content: str | None, model_id: str = "judge-test-model") -> bytes:
    return json.dumps({"id": "chatcmpl-test", "object": "chat.completion", "model": model_id,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


def _sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in text.split(".") if s.strip()]


def _as_sentence(event: str) -> str:
    return event.strip().rstrip(".").strip().lower()


class StubLLM:
    """A deterministic 'LLM': events are the sentences of a description; an event is entailed iff its sentence
    occurs in the other description (case and final full stop aside). Answers with failures first when told to
    (`fail_with`, `sleep_s`: one per coming request, for the sampler's `stub` fixture)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_with: list[int] = []  # HTTP codes to answer with, one per coming request
        self.sleep_s: list[float] = []  # delays before answering, one per coming request

    def answer(self, prompt: str) -> str:
        description = re.search(r"Description:\n(.*?)(?:\n\nEvents:\n|$)", prompt, re.DOTALL).group(1)
        sentences = _sentences(description)
        if "Extract at most 10 key events" in prompt:
            return "```json\n" + json.dumps({"events": sentences}) + "\n```"
        events = json.loads(prompt.split("Events:\n", 1)[1])
        return json.dumps({"events": [{"event": e, "relationship": "entailment" if _as_sentence(e) in sentences
                                       else "neutral"} for e in events]})


def serve_loopback(handler: type[BaseHTTPRequestHandler],
                   port: int = 0) -> tuple[ThreadingHTTPServer, threading.Thread, str]:
    """A fake endpoint on a loopback port (0: a free one), served from a thread: (server, thread, its
    http://host:port origin)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.handle_error = lambda request, address: None  # a timed-out request's late answer hits a closed socket
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_address[1]}"


@dataclasses.dataclass
class Fault:
    """How to answer one coming request: `status` with `body` (None: the proper answer) after `delay_s`. `when`:
    only a request whose prompt contains this text (case-insensitive) takes this fault; None: any request."""

    status: int = 200
    body: bytes | None = None
    delay_s: float = 0.0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    when: str | None = None


class JudgeServer:
    """StubLLM's rule behind a loopback HTTP server. `requests`: every request received ({path, auth, body}, the
    prompt under body.messages[0].content); `faults`: consumed one per matching request, first match first;
    `delay_s`: added to every answer (to see requests overlap); `max_in_flight`: the most answered at once."""

    def __init__(self, model_id: str = "judge-test-model") -> None:
        self.model_id, self.delay_s = model_id, 0.0
        self.requests: list[dict] = []
        self.faults: list[Fault] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._llm = StubLLM()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.origin = self.base_url = ""

    @property
    def prompts(self) -> list[str]:
        return [r["body"]["messages"][0]["content"] for r in self.requests]

    def start(self, port: int = 0) -> Self:
        self._server, self._thread, self.origin = serve_loopback(self._handler(), port)
        self.base_url = self.origin + "/v1"
        return self

    def stop(self) -> None:
        """Stop answering (the port is closed: a request now fails to connect); `requests` stays readable."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> Self:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def respond(self, body: dict) -> tuple[Fault, bytes]:
        """The fault this request takes (a plain 200 when none) and the bytes to send."""
        prompt = body["messages"][0]["content"]
        with self._lock:
            index = next((i for i, fault in enumerate(self.faults)
                          if fault.when is None or fault.when.lower() in prompt.lower()), None)
            fault = self.faults.pop(index) if index is not None else Fault()
        payload = fault.body if fault.body is not None else chat_completion(self._llm.answer(prompt), self.model_id)
        return fault, payload

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                fault, payload = server.respond(body)
                with server._lock:
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    time.sleep(server.delay_s + fault.delay_s)
                finally:
                    with server._lock:
                        server._in_flight -= 1
                self.send_response(fault.status)
                for name, value in {"Content-Type": "application/json", **fault.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@contextlib.contextmanager
def judge_server(model_id: str = "judge-test-model") -> Iterator[JudgeServer]:
    """A running JudgeServer for the `with` block (also the body of a pytest fixture: `with judge_server() as s:
    yield s`)."""
    with JudgeServer(model_id) as server:
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-id", default="judge-test-model")
    args = parser.parse_args()
    with JudgeServer(args.model_id).start(args.port) as server:
        print(f"judge at {server.base_url} (model id {args.model_id}); Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
