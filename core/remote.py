"""Asking a resident `infllm serve` process instead of loading the model here: the client side and the wire format.

A server keeps the model loaded and its recent readings open (infllm.server), so a question about a snapshot (or
a file asked about before) skips importing torch, loading the weights and opening or reading the text. Nothing
here imports torch: a client starts in a fraction of the time a process that loads the model does.

The wire: a Unix socket (a file only its owner may open), one connection per request. The client sends one JSON
line, a `Request`; the server answers with JSON lines, each an object with one of these keys:

  phase, warn          a line for stderr, as the client's own run would show it
  reading / read / read_done    a read begins (its total, or null for a stream) / tokens read so far and the
                       server's memory line / it ends
  answering / generated / answering_done    likewise for the tokens of an answer
  text                 the next piece of the answer, as it is generated
  answer               the finished answer (`infllm.answer.Answer.to_dict`); one per question
  error, exit_code     the run failed: the one line the command line prints, and its exit code; the last line

Relative paths are the client's: the request carries its working directory, and the server answers from there,
so sources and citations read exactly as in a run of the client's own.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infllm.answer import Answer
from infllm.errors import EXIT_USAGE, InfllmError
from infllm.reporting import Reporter

PROTOCOL = 1
LINE_LIMIT = 64 * 2**20  # the longest request a server takes: the questions and options, never a document


class ServerError(InfllmError):
    """No server answers at the socket named (none started, or it stopped)."""

    exit_code = EXIT_USAGE


def default_socket() -> Path:
    """Where `infllm serve` listens unless told: the user's runtime directory, else a folder of the temp dir that
    only this user may enter."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(os.environ.get("TMPDIR", "/tmp")) / f"infllm-{os.getuid()}"
    return base / "infllm.sock"


@dataclass
class Request:
    """One run for a server: the sources (as the client named them, relative to `cwd`), the questions answered in
    turn from the same reading (None: a summary), and the run's options (`infllm.run.RunOptions.to_dict`)."""

    sources: list[str]
    questions: list[str] | None
    options: dict
    cwd: str = field(default_factory=os.getcwd)
    protocol: int = PROTOCOL

    def encode(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    @staticmethod
    def decode(line: bytes) -> "Request":
        """A request line, refused (ValueError) when it is not one of this protocol's."""
        d = json.loads(line)
        if not isinstance(d, dict) or d.get("protocol") != PROTOCOL:
            raise ValueError(f"not an infllm request of protocol {PROTOCOL}")
        questions = d["questions"]
        if not (isinstance(d["sources"], list) and all(isinstance(s, str) for s in d["sources"])
                and (questions is None or isinstance(questions, list) and all(isinstance(q, str) for q in questions))
                and isinstance(d["options"], dict) and isinstance(d["cwd"], str)):
            raise ValueError("malformed request")
        return Request(d["sources"], questions, d["options"], d["cwd"])


def connect(path: str | Path) -> socket.socket:
    """A connection to the server at `path`, or a ServerError saying that none answers there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError as err:
        sock.close()
        raise ServerError(f"no infllm server answers at {path} ({err.strerror or err}): start one with "
                          "infllm serve, or unset INFLLM_SERVER to answer in this process") from None
    return sock


def events(sock: socket.socket) -> Iterator[dict]:
    """The server's reply lines, as they come."""
    with sock.makefile("rb") as lines:
        for line in lines:
            yield json.loads(line)


def ask(server: str | Path, request: Request, report: Reporter | None = None,
        on_text: Callable[[int, str], None] | None = None) -> Iterator[Answer]:
    """Send `request` to the server at `server` and yield each question's answer as it is finished. report: shows
    the server's phases, warnings and progress as the client's run would; on_text(question index, text) receives
    each answer as it is generated. A failure on the server is raised here as an InfllmError with its exit code
    (and the answers before it are yielded first)."""
    report = report or Reporter()
    sock = connect(server)
    with sock, ExitStack() as progress:
        sock.sendall(request.encode())
        sock.shutdown(socket.SHUT_WR)
        asked, update, memory = 0, None, [""]
        for event in events(sock):
            if "text" in event:
                if on_text is not None:
                    on_text(asked, event["text"])
            elif "generated" in event or "read" in event:
                memory[0] = event.get("memory", memory[0])
                if update is not None:
                    update(event.get("generated", event.get("read")))
            elif "reading" in event:
                update = progress.enter_context(report.reading_with(event["reading"], lambda: memory[0]))
            elif "answering" in event:
                update = progress.enter_context(report.answering())
            elif "read_done" in event or "answering_done" in event:
                progress.close()
                update = None
            elif "phase" in event:
                report.phase(event["phase"])
            elif "warn" in event:
                report.warn(event["warn"])
            elif "answer" in event:
                asked += 1
                yield Answer.from_dict(event["answer"])
            elif "error" in event:
                raise InfllmError(event["error"], event["exit_code"])
        if asked < (1 if request.questions is None else len(request.questions)):  # a summary is one answer
            raise ServerError(f"the infllm server at {server} stopped before it answered")
