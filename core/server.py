"""`infllm serve`: one process that keeps a model loaded and its recent readings open, answering clients one at a
time over a Unix socket (the wire format and the client: infllm.remote).

A question from a client is the same run as the client's own would be (infllm.run: checked, then read or opened,
then answered), with what does not change between questions kept: the model, and the last `keep` readings, each
found again by the client's working directory, the sources as named, their files' identity and modification
time, and the settings that shape a reading. A snapshot asked again is not even reopened, and a text file asked
about twice is read once (until it changes). A run that needs another model than the server's is refused with
one line, as is one naming stdin (the client answers that in its own process).

Requests are answered in turn: a CPU or GPU answering one question is busy, and readings are large. A client that
goes away mid-answer (Ctrl-C) stops its answer at the next token; the server goes on with the next client.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from infllm.errors import EXIT_INTERNAL, UsageError, one_line
from infllm.remote import LINE_LIMIT, Request
from infllm.reporting import Reporter
from infllm.run import Failure, RunOptions, Runner, check, prepare

UPDATE_INTERVAL_S = 0.2  # progress sent to a client at most this often (its display draws less often still)
CLIENT_TIMEOUT_S = 60.0  # a client silent this long (no request line, or not reading its replies) is dropped, so
# that a stuck or suspended client cannot hold the server from everyone else


class ClientGone(Exception):
    """The client closed its connection (Ctrl-C, a pipe reader gone): its answer stops here."""


class _Forward(Reporter):
    """The run's phases, warnings and progress, sent to the client as reply lines (infllm.remote)."""

    def __init__(self, send: Callable[[dict], None]):
        self.send = send

    def phase(self, text: str) -> None:
        self.send({"phase": text})

    def warn(self, text: str) -> None:
        self.send({"warn": text})

    def _throttled(self, key: str, extra: Callable[[], dict]) -> Callable[[int], None]:
        last = [0.0]

        def update(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= UPDATE_INTERVAL_S:
                last[0] = now
                self.send({key: done, **extra()})
        return update

    @contextmanager
    def reading_with(self, total: int | None, memory: Callable[[], str]) -> Iterator[Callable[[int], None]]:
        self.send({"reading": total})
        try:
            yield self._throttled("read", lambda: {"memory": memory()})
        finally:
            self.send({"read_done": True})

    @contextmanager
    def answering(self) -> Iterator[Callable[[int], None]]:
        self.send({"answering": True})
        try:
            yield self._throttled("generated", dict)
        finally:
            self.send({"answering_done": True})


@dataclass(eq=False)
class _Kept:
    reading: object  # infllm.api.Reading
    snap: object | None  # the infllm.snapshot.SnapshotFile it maps, closed when the reading is let go


class Server:
    """The model of `opts` (model, device, dtype, device map), loaded once; answers requests on a socket.

    keep: readings kept open for the next questions (each holds its memory: a snapshot's is mapped from the
    file, a read text's block store is in RAM). report: the server's own log (a line per request)."""

    def __init__(self, opts: RunOptions, keep: int = 2, report: Reporter | None = None):
        from infllm.runtime.loading import pick_device, pick_dtype

        self.opts, self.keep, self.report = opts, keep, report or Reporter()
        if keep < 0:
            raise UsageError(f"--keep needs a count of readings, 0 or more, got {keep}")
        self.device = pick_device(opts.device)
        self.dtype = pick_dtype(opts.dtype, self.device)
        self.model, _ = prepare(opts, self.report)  # as `infllm read` loads it
        self.model.warm_up()
        self.report.phase(f"loaded {self.model.name} in {self.model.load_s:.1f} s")
        self.model.load_s = 0.0  # a client's answer does not wait for it
        self.kept: OrderedDict[tuple, _Kept] = OrderedDict()
        self._listener: socket.socket | None = None
        self._stopping = False
        self.client_timeout_s = CLIENT_TIMEOUT_S

    # ---- the socket ---------------------------------------------------------------------------------------

    def serve(self, path: str | os.PathLike, ready: Callable[[], None] | None = None) -> None:
        """Listen at `path` (a socket only this user may open) and answer until interrupted; the socket file is
        removed on the way out. ready() is called once clients can connect."""
        path = Path(path).absolute()
        listener = self._listener = _listen(path)
        try:
            self.report.phase(f"listening at {path}: export INFLLM_SERVER={path} to answer through it")
            if ready is not None:
                ready()
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    if self._stopping:
                        return
                    raise
                with conn:
                    self.handle(conn)
        finally:
            listener.close()
            with suppress(FileNotFoundError):
                path.unlink()
            self.close()

    def preload(self, sources: list[str]) -> None:
        """Open (or read) each source now, as `infllm ask SOURCE` with its default options would, so that the first
        question about it is answered as fast as the next. A failure is the caller's, as at the command line."""
        self.keep = max(self.keep, len(sources))
        opts = RunOptions(model=self.opts.model)  # `infllm serve --model M` opens with M
        for source in sources:
            plan = check(opts, [[source]], "?", report=self.report)
            self._check_model(opts, plan)
            self._reading(Runner(plan, self.report, model=self.model), Request([source], ["?"], opts.to_dict()), "?")

    def stop(self) -> None:
        """End `serve` (from another thread) once the request in hand, if any, is answered."""
        self._stopping = True
        if self._listener is not None:
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(), which closing alone does not on Linux

    def close(self) -> None:
        """Let every kept reading go (and the snapshot files they map)."""
        while self.kept:
            _close(self.kept.popitem()[1])

    def handle(self, conn: socket.socket) -> None:
        """Answer one connection's request; a failure is the client's last reply line, never the server's end."""

        def send(event: dict) -> None:
            try:
                conn.sendall((json.dumps(event) + "\n").encode())
            except OSError as err:  # BrokenPipe, ConnectionReset: the client left; a timeout: it stopped reading
                raise ClientGone() from err

        started = time.perf_counter()
        request = None
        conn.settimeout(self.client_timeout_s)
        try:
            request = _receive(conn)
            answered = self.answer(request, send)
            self.report.phase(f"answered {answered} question(s) about {', '.join(request.sources)} in "
                              f"{time.perf_counter() - started:.1f} s")
        except ClientGone:
            self.report.phase("the client left before its answer was complete")
        except Exception as err:  # noqa: BLE001 - the client gets the one line its own run would print
            failure = Failure.of(request.sources if request else [], err)
            self.report.phase(f"failed (exit {failure.exit_code}): {failure.error}")
            if failure.exit_code == EXIT_INTERNAL:
                self.report.warn(traceback.format_exc())
            with suppress(ClientGone):
                send({"error": failure.error, "exit_code": failure.exit_code})

    # ---- a request ----------------------------------------------------------------------------------------

    def answer(self, request: Request, send: Callable[[dict], None]) -> int:
        """Answer each question of the request from one reading, streaming every reply line through send."""
        from infllm.documents.prompting import SUMMARY_REQUEST
        from infllm.documents.readers import STDIN

        if STDIN in request.sources:
            raise UsageError("a server reads files, not the client's stdin: answer stdin without INFLLM_SERVER")
        try:
            os.chdir(request.cwd)  # the client's relative paths, as its own run would read them
        except OSError as err:
            raise UsageError(f"the server cannot enter the client's directory {request.cwd} ({err.strerror})") from None
        try:
            opts = RunOptions.from_dict(request.options)
        except (TypeError, KeyError, ValueError) as err:
            raise UsageError(f"the server did not understand the request's options ({one_line(err)}): is the "
                             "client another version of infllm?") from None
        questions = request.questions if request.questions is not None else [SUMMARY_REQUEST]
        report = _Forward(send)
        plan = check(opts, [request.sources], questions[0], report=report)
        self._check_model(opts, plan)
        self.model.report = report  # the readings report through their model: to this client, for this run
        try:
            runner = Runner(plan, report, model=self.model)
            kept = self._reading(runner, request, questions[0])
            try:
                for question in questions:
                    answer = runner.ask(kept.reading, question, on_text=lambda text: send({"text": text}))
                    send({"answer": answer.to_dict()})
            finally:
                if kept not in self.kept.values():  # not kept (--keep 0, a directory): its snapshot goes now
                    _close(kept)
        finally:
            self.model.report = self.report
        return len(questions)

    def _check_model(self, opts: RunOptions, plan) -> None:
        """Refuse a run that needs another model (or device, dtype, device map) than the one loaded here."""
        from infllm.runtime.loading import pick_device, pick_dtype

        mine = f"{self.model.name} on {self.device} in {str(self.dtype).removeprefix('torch.')}"
        other = None
        if plan.resolved.fingerprint != self.model.loaded.fingerprint:
            other = f"the model {plan.resolved.name}"
        elif opts.device != "auto" and pick_device(opts.device) != self.device:
            other = f"--device {opts.device}"
        elif opts.dtype != "auto" and pick_dtype(opts.dtype, self.device) != self.dtype:
            other = f"--dtype {opts.dtype}"
        elif opts.device_map is not None and opts.device_map != self.opts.device_map:
            other = f"--device-map {opts.device_map}"
        if other is not None:
            raise UsageError(f"this infllm server holds {mine}, and this run asks for {other}: start a server "
                             "with those options, or unset INFLLM_SERVER to answer in this process")

    def _reading(self, runner: Runner, request: Request, question: str) -> _Kept:
        """The kept reading of the same sources and settings if it is still current, else a new one (kept)."""
        plan = runner.plan
        snap = plan.snaps.get(request.sources[0])
        if snap is not None:  # the settings it will answer with: the snapshot's, with those a question may change
            from infllm.snapshot import snapshot_config

            engine = snapshot_config(snap.meta, plan.opts.engine, snap.path)
        else:
            engine = plan.config
        # decode_chunk only changes how an answer retrieves, not what was read: a kept reading takes this one's.
        reading_settings = {k: v for k, v in engine.to_dict().items() if k != "decode_chunk"}
        key = _key(request, plan.opts, reading_settings, snapshot=snap is not None)
        kept = self.kept.get(key) if key is not None else None
        if kept is not None and list(kept.reading.prompt(question).prefix) == kept.reading.session.prefix:
            self.kept.move_to_end(key)
            kept.reading.session.engine.set_decode_chunk(engine.decode_chunk)
            if snap is not None:
                snap.close()  # check() opened it again to look at its header; the kept one stays mapped
                kept.reading.sources = list(request.sources)  # the answer names the file as this client did
            runner.model.report.phase(f"answering from the reading kept of {', '.join(request.sources)} "
                                      f"({kept.reading.tokens:,} tokens)")
            kept.reading.timings = {}  # its read was counted in the answer that made it: this one only answers
            return kept
        kept = _Kept(runner.reading(request.sources), snap)
        if key is not None and self.keep:
            if key in self.kept:
                _close(self.kept.pop(key))
            self.kept[key] = kept
            while len(self.kept) > self.keep:
                _close(self.kept.popitem(last=False)[1])
        return kept


def _key(request: Request, opts: RunOptions, engine: dict, snapshot: bool) -> tuple | None:
    """What makes a reading reusable: what was read (the files' identity and modification time), the engine
    settings in effect and the options that shape the reading, and for text also where from and by which names
    (its citations carry them; a snapshot's carry the names it was read with, whatever the snapshot is called).
    None when a source is not a plain file (a directory's files may change unseen)."""
    files = []
    for source in request.sources:
        try:
            st = os.stat(source)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        files.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    settings = json.dumps({"engine": engine, "system": opts.system, "template": opts.template, "gitignore": opts.gitignore,
                           "text": opts.cite > 0 or opts.passages > 0}, sort_keys=True)
    return (None if snapshot else (request.cwd, tuple(request.sources)), tuple(files), settings)


def _close(kept: _Kept) -> None:
    if kept.snap is not None:
        kept.snap.close()


def _receive(conn: socket.socket) -> Request:
    """The request line, refused (UsageError) when it is too long or not a request."""
    with conn.makefile("rb") as lines:
        try:
            line = lines.readline(LINE_LIMIT + 1)
        except TimeoutError:
            raise UsageError("no request came") from None
    if len(line) > LINE_LIMIT or not line.endswith(b"\n"):
        raise UsageError("the request is not one line of at most 64 MB")
    try:
        return Request.decode(line)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"not an infllm request ({one_line(err)})") from None


def _listen(path: Path) -> socket.socket:
    """A listening socket at `path` that only this user can connect to; a stale one (its server gone) is replaced,
    a live one refused."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UsageError(f"{path} exists and is not a socket: name another with --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            path.unlink()  # nobody listens there: a server that was killed left it
        else:
            raise UsageError(f"an infllm server already listens at {path}: stop it, or name another --socket")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created rw for its owner only: no window where others can connect
    try:
        listener.bind(os.fspath(path))
    except OSError as err:
        listener.close()
        raise UsageError(f"cannot listen at {path} ({err.strerror or err})") from None
    finally:
        os.umask(old)
    listener.listen(8)
    return listener
