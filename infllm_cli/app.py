"""The `infllm` command line: flags in, answers out, over the public API (infllm.api, infllm.run).

stdout carries only the answer (streamed) or, with --json, one JSON object. Everything else goes to stderr.
Any `InfllmError` becomes one line on stderr and its exit code; Ctrl-C exits 130; a closed stdout ends quietly.
Commands import the library (and so torch) only once they run: `infllm --help` and usage errors stay fast.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer

from infllm.cli.options import (BATCH, ENGINE, MODEL, OUTPUT, REUSE, SERVER, SOURCES, AnswerChoice, BatchChoice,
                                ModelChoice, Output, Reuse, answer_options, options)
from infllm.cli.progress import discard, for_terminal
from infllm.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_RESOURCES, InfllmError, UsageError

if TYPE_CHECKING:
    from infllm.api import Answer
    from infllm.cli.progress import Display
    from infllm.run import RunOptions

EXIT_CODES = """Exit codes: 0 ok, 1 internal error, 2 bad usage, 3 unreadable input, 4 model error, 5 snapshot error,
6 not enough memory, 130 interrupted (129, 143: stopped by SIGHUP, SIGTERM).
"""


def _epilog(*examples: str) -> str:
    """A command's --help ends with its examples and the exit codes."""
    return "Examples:\n\n" + "".join(f"  {example}\n\n" for example in examples) + EXIT_CODES


EPILOG = _epilog('infllm ask book.txt "Who does Elizabeth marry?"', 'cat server.log | infllm ask "Which error came first?"',
                 'infllm ask --model ./Qwen2.5-1.5B-Instruct --window 2048 notes/ "What is left to do?"')
ASK_EPILOG = _epilog('infllm ask book.txt "Who does Elizabeth marry?"',
                     'cat server.log | infllm ask "Which error came first?"',
                     'infllm ask --json --cite 3 notes/ "What is left to do?" | jq .answer',
                     "infllm ask --questions questions.txt book.txt",
                     'infllm ask --each --json --files-from list.txt "Any errors?"')
SUMMARIZE_EPILOG = _epilog("infllm summarize book.txt", "infllm summarize --each --json logs/*.log",
                           "infllm summarize --max-tokens 800 book.infllm")
READ_EPILOG = _epilog("infllm read book.pdf -o book.infllm", 'infllm ask book.infllm "Who betrayed whom?"')
INFO_EPILOG = _epilog("infllm info book.pdf notes/", "zcat huge.log.gz | infllm info -")
SERVE_EPILOG = _epilog("infllm serve book.infllm &   # then: export INFLLM_SERVER=<the socket it names>",
                      'infllm ask book.infllm "Who betrayed whom?"   # answered by the server, no model load',
                      "infllm serve --model ./Qwen2.5-1.5B-Instruct --socket /tmp/qwen.sock --keep 4")
CHAT_EPILOG = _epilog("infllm chat book.txt", "infllm chat -q book.infllm < questions.txt")
MODELS_EPILOG = _epilog("infllm models", 'infllm ask --model Qwen/Qwen2.5-1.5B-Instruct book.txt "..."')
CACHE_EPILOG = _epilog("infllm cache list", "infllm cache clear", "INFLLM_CACHE_LIMIT_MB=20000 infllm ask book.txt "
                       '"..."')

app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Ask a local LLM about documents far longer than its context window.", epilog=EPILOG)


def _show_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"infllm {version('infllm')}")
        except PackageNotFoundError:
            print("infllm (not installed: version unknown)")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                          help="print the version and exit")] = False,
) -> None:
    """Ask a local LLM about documents far longer than its context window."""


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, as Ctrl-C is: what is being written (a snapshot's temporary
    file, a model's conversion) is removed on the way out instead of being left behind by an instant death."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_signals: list[int] = []  # the signals that reached the running command, in order


def _stop(signum, frame) -> None:
    _signals.append(signum)
    raise _Stopped(signum)


def _interrupt(signum, frame) -> None:
    _signals.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stopping_cleanly() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the command (see _Stopped) while it runs, and Ctrl-C as always; each is noted, so
    that an error it caused is reported as the signal (a library that catches the KeyboardInterrupt, as
    transformers' lazy imports do, turns it into an import error). The handlers are restored after."""
    previous = {}
    _signals.clear()
    try:
        for signum, handler in ((signal.SIGTERM, _stop), (signal.SIGHUP, _stop), (signal.SIGINT, _interrupt)):
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The interruption that caused `err`, if a signal reached the command: what `guarded` reports instead."""
    if not _signals or isinstance(err, typer.Exit):  # an exit the command chose stays its own
        return None
    signum = _signals[0]
    return KeyboardInterrupt() if signum == signal.SIGINT else _Stopped(signum)


def guarded(command):
    """Run a command body so that every failure is one stderr line and a documented exit code."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from infllm.cli import restore_interrupts

        restore_interrupts()  # Ctrl-C while starting exited at once (infllm_cli/__init__.py); now it raises
        json_lines = _json_lines

        def failed(error: str, code: int) -> typer.Exit:
            # With --json a script reads stdout only: a failure that left no JSON line there is one.
            if kwargs.get("as_json") and _json_lines == json_lines:
                _print_json({"error": error, "exit_code": code})
            return typer.Exit(code)

        try:
            with _stopping_cleanly():
                try:
                    return command(*args, **kwargs)
                except Exception as err:
                    signalled = _signal_behind(err)
                    if signalled is None:
                        raise
                    raise signalled from None
        except InfllmError as err:
            _say(f"infllm: error: {err}")
            raise failed(str(err), err.exit_code) from None
        except _Stopped as stopped:
            _say(f"infllm: stopped by {signal.Signals(stopped.signum).name}")
            raise _leave(failed("stopped", 128 + stopped.signum)) from None  # 143 for SIGTERM, 129 for SIGHUP
        except KeyboardInterrupt:
            _say("infllm: interrupted")
            raise _leave(failed("interrupted", EXIT_INTERRUPTED)) from None
        except BrokenPipeError:
            # The reader went away (`| head -1`): stop quietly, and keep Python from complaining at exit.
            discard(sys.stdout)
            raise typer.Exit(0) from None
        except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            from infllm.run import Failure

            failure = Failure.of([], err)  # RAM or GPU running out mid-run is explained, exit 6
            if failure.exit_code != EXIT_INTERNAL:
                _say(f"infllm: error: {failure.error}")
            elif os.environ.get("INFLLM_DEBUG"):
                raise
            else:
                _say(f"infllm: {failure.error} (INFLLM_DEBUG=1 shows the traceback)")
            raise failed(failure.error, failure.exit_code) from None

    return run


def _leave(exit: typer.Exit) -> typer.Exit:
    """The exit of an interrupted or stopped command. Run as the program, it leaves at once, streams flushed:
    CPython 3.11 takes a KeyboardInterrupt raised inside exec() (which dataclasses and typing run while modules
    import) for an unhandled one even after it is caught, and then ends the process by SIGINT instead of with the
    exit code (-2, not 130, for a Ctrl-C during a command's first imports). What the command was writing has been
    removed by the time the interrupt reaches here. Called in-process (tests, other programs), it returns the exit."""
    from infllm.cli import AS_PROGRAM

    if AS_PROGRAM:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # its reader left, or it is closed
                pass
        os._exit(exit.exit_code)
    return exit


def _say(line: str) -> None:
    """The run's last line on stderr, safe for a terminal; a stderr that is gone cannot change the exit code."""
    try:
        print(for_terminal(line), file=sys.stderr, flush=True)
    except (OSError, ValueError):  # its reader left, or it is closed
        discard(sys.stderr)


def _stdout():
    """stdout, refused when it is closed (`>&-`): before any work, rather than with the answer in hand."""
    if sys.stdout is None:
        raise UsageError("stdout is closed, so the output has nowhere to go; redirect it (> answer.txt, or "
                         "> /dev/null to discard it)")
    return sys.stdout


def _out(text: str) -> None:
    """Write to stdout at once. Its reader leaving ends the run quietly (guarded); a full disk is exit 6 and any
    other failure exit 2, each one line."""
    try:
        stdout = _stdout()
        stdout.write(text)
        stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # not a ResourceError: --each must not go on to the next
            raise InfllmError(f"not enough disk space to write the output to stdout ({err.strerror})",
                              EXIT_RESOURCES) from None
        raise UsageError(f"cannot write the output to stdout ({err.strerror or err})") from None


def _split_question(args: list[str], files_from: str | None = None) -> tuple[list[str], str]:
    """(sources, question) from the arguments, the sources named by --files-from appended; stdin if none."""
    if not args:
        raise UsageError("a question is needed: infllm ask SOURCE... \"question\"")
    *sources, question = args
    if files_from is not None:
        sources += _listed(files_from, sources)
    if not sources:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no document given: name a file, a directory or '-', or pipe text in")
        sources = ["-"]
    if not question.strip():
        raise UsageError("the question is empty")
    return sources, question


def _check_question_order(args: list[str]) -> None:
    """Catch a forgotten question (the one argument names a file) or one put first (the last argument names a
    file, an earlier one does not) before the model loads, instead of reading stdin or failing on a missing file."""
    if not args:
        return  # _split_question says that the question is needed
    *sources, last = args
    if not os.path.exists(last):
        return
    stray = next((s for s in sources if s != "-" and not os.path.exists(s)), None)
    if stray is None:
        raise UsageError(f"the question is missing: {last} is a file; infllm ask SOURCE... \"question\"")
    raise UsageError(f"the question comes last: {stray!r} is not a file and {last} is; "
                     "infllm ask SOURCE... \"question\"")


def _question_list(path: str, sources: list[str]) -> list[str]:
    from infllm import STDIN, read_path_list  # not from infllm.run: a server's client imports no torch
    from infllm.errors import SourceError

    if path == STDIN and STDIN in sources:
        raise UsageError("stdin holds the questions (--questions -), so it cannot also be the document")
    try:  # the same rules as a list of files: one a line, blank lines skipped, CRLF accepted
        listed = read_path_list(path, stdin=sys.stdin.buffer if path == STDIN else None)
    except SourceError as err:
        raise SourceError(f"--questions {err}") from None
    if not listed:
        raise UsageError(f"--questions {path}: no questions in it")
    return listed


def _listed(files_from: str, sources: list[str]) -> list[str]:
    from infllm import STDIN, read_path_list  # not from infllm.run: a server's client imports no torch
    from infllm.errors import SourceError

    try:
        listed = read_path_list(files_from, stdin=getattr(sys.stdin, "buffer", None) if files_from == STDIN else None)
    except SourceError as err:
        raise SourceError(f"--files-from {err}") from None
    if files_from == STDIN and STDIN in sources + listed:
        raise UsageError("stdin holds the list of files (--files-from -), so '-' cannot also be a source")
    if not listed and not sources:
        raise UsageError(f"--files-from {files_from}: the list names no sources")
    return listed



def _run_fields(model_choice: ModelChoice, engine: dict, answer: AnswerChoice, reuse: Reuse,
                gitignore: bool) -> dict:
    """The run's options as plain values (infllm.run.RunOptions.to_dict): built without torch, so that a run
    answered by a server never imports it."""
    return {"model": model_choice.model, "device": model_choice.device, "dtype": model_choice.dtype,
            "device_map": model_choice.device_map, "engine": engine,
            "sampling": {"temperature": answer.temperature, "top_p": answer.top_p, "seed": answer.seed,
                         "repetition_penalty": answer.repetition_penalty, "no_repeat_ngram": answer.no_repeat_ngram,
                         "top_k": answer.top_k, "min_p": answer.min_p, "stop": list(answer.stop)},
            "max_tokens": answer.max_tokens, "system": answer.system, "template": answer.template,
            "cite": answer.cite, "cache": reuse.cache, "refuse_stale": reuse.refuse_stale,
            "passages": answer.passages, "gitignore": gitignore}


def _run_options(fields: dict) -> RunOptions:
    from infllm.run import RunOptions

    return RunOptions.from_dict(fields)


def _through(server: str | None, sources: list[str], batch: BatchChoice | None, output: Output) -> bool:
    """Whether a server answers this run: one is named and the run is one it can answer (files, one reading)."""
    if server is None:
        return False
    why = ("stdin is" if "-" in sources else "--each is" if batch and batch.each else "--ray is"
           if batch and batch.on_ray else "--save is" if batch and batch.save else None)
    if why is not None:
        _display(output).phase(f"{why} answered in this process, not by the server at {server}")
    return why is None


def _remote(server: str, sources: list[str], questions: list[str] | None, fields: dict, output: Output,
            one_line: bool = False) -> None:
    """Answer through the server at `server` (infllm.remote), shown exactly as an answer of this process."""
    from infllm.remote import Request, ask

    _stdout()
    display = _display(output, streamed=not one_line)
    outs = [_AnswerOut(None, output.as_json, q if one_line else None) for q in questions or [None]]
    for i, answer in enumerate(ask(server, Request(sources, questions, fields), display,
                                   on_text=lambda i, text: outs[i].write(text))):
        _show(answer, outs[i], display)


SOURCES_HELP = "Files, directories or '-' (stdin). With no source, stdin is read."
# Greedy summaries of the default model looped: on a 6K-token excerpt, 12 of 16 sentences were repeats. These
# stopped it (docs/benchmarks.md, "Summaries"); answers to questions stay exactly greedy.
SUMMARY_REPETITION_PENALTY = 1.2
SUMMARY_NO_REPEAT_NGRAM = 4


@app.command(epilog=ASK_EPILOG)
@guarded
@options(MODEL, ENGINE, answer_options(256, "ask", "built-in template name or a template file with {document}, "
                                       "{question} and optionally {passages}"), BATCH, REUSE, SOURCES, OUTPUT, SERVER)
def ask(
    args: Annotated[Optional[list[str]], typer.Argument(metavar="SOURCE... QUESTION", show_default=False,
                    help="Files, directories or '-' (stdin), then the question. With no source, stdin is read.")]
    = None,
    questions: Annotated[Optional[str], typer.Option("--questions", metavar="FILE", help=(
        "ask every question in FILE (one a line; '-': stdin), each from the state after the read: one answer a "
        "line on stdout (a JSON line each with --json); the arguments are then all sources"))] = None,
    *, model_choice: ModelChoice, engine: dict, answer_choice: AnswerChoice, batch: BatchChoice, reuse: Reuse,
    gitignore: bool, output: Output, server: str | None,
) -> None:
    """Answer a question about one or more documents read whole into the context memory, or about a snapshot
    written by `infllm read` (FILE.infllm: nothing is read again)."""
    fields = _run_fields(model_choice, engine, answer_choice, reuse, gitignore)
    args = args or []  # none: the sources come from --files-from (with --questions) or the question is missing
    if questions is None:
        _check_question_order(args)
        sources, question = _split_question(args, batch.files_from)
        if _through(server, sources, batch, output):
            _remote(server, sources, [question], fields, output)
            return
        _answer_all(sources, question, _run_options(fields), batch, output)
        return
    if batch.each or batch.on_ray:
        raise UsageError("--questions asks one reading several questions: not with --each or --ray")
    sources, _ = _split_question([*args, "questions"], batch.files_from)
    asked = _question_list(questions, sources)
    if _through(server, sources, batch, output):
        _remote(server, sources, asked, fields, output, one_line=True)
        return
    _ask_many(sources, asked[0], iter(asked), _run_options(fields), output, save=batch.save, one_line=True)


@app.command(epilog=SUMMARIZE_EPILOG)
@guarded
@options(MODEL, ENGINE, answer_options(400, "summarize", "built-in template name or a template file",
                                       repetition_penalty=SUMMARY_REPETITION_PENALTY,
                                       no_repeat_ngram=SUMMARY_NO_REPEAT_NGRAM, passages=0), BATCH, REUSE, SOURCES,
         OUTPUT, SERVER)
def summarize(
    sources: Annotated[Optional[list[str]], typer.Argument(metavar="[SOURCE...]", help=SOURCES_HELP)] = None,
    *, model_choice: ModelChoice, engine: dict, answer_choice: AnswerChoice, batch: BatchChoice, reuse: Reuse,
    gitignore: bool, output: Output, server: str | None,
) -> None:
    """Summarize whole documents (or a snapshot): one pass over the context memory, the request after the text."""
    fields = _run_fields(model_choice, engine, answer_choice, reuse, gitignore)
    sources, _ = _split_question([*(sources or []), "summary"], batch.files_from)
    if _through(server, sources, batch, output):
        _remote(server, sources, None, fields, output)
        return
    from infllm.api import SUMMARY_REQUEST

    _answer_all(sources, SUMMARY_REQUEST, _run_options(fields), batch, output)


@app.command("read", epilog=READ_EPILOG)
@guarded
@options(MODEL, ENGINE, SOURCES, OUTPUT)
def read_command(
    sources: Annotated[Optional[list[str]], typer.Argument(metavar="[SOURCE...]", help=SOURCES_HELP)] = None,
    output_path: Annotated[str, typer.Option("--output", "-o", metavar="PATH",
                           help="snapshot file to write, e.g. book.infllm (replaced atomically)")] = "",
    system: Annotated[Optional[str], typer.Option(help="system prompt (default: prompts/system.txt)")] = None,
    template: Annotated[str, typer.Option(help="template whose opening (before {document}) is read with the "
                                              "text")] = "ask",
    *, model_choice: ModelChoice, engine: dict, gitignore: bool, output: Output,
) -> None:
    """Read documents once and save the context memory as a snapshot: `infllm ask FILE.infllm "..."` and
    `infllm summarize FILE.infllm` then answer from it without reading the text again."""
    if not output_path:
        raise UsageError("name the snapshot to write: infllm read SOURCE... -o FILE.infllm")
    if output.as_json:
        _stdout()
    sources, _ = _split_question([*(sources or []), "read"])
    from infllm.run import check_read, prepare

    check_read(sources, output_path)  # before the model loads and the text is read
    model, settings = prepare(_model_options(model_choice, engine), _display(output))
    reading = model.read(sources, engine=settings, template=template, system=system, gitignore=gitignore)
    size = reading.save(output_path, model_choice.model)
    if output.as_json:
        _print_json({"snapshot": output_path, "bytes": size, "model": model.name, "inputs": sources,
                     "tokens_read": reading.tokens, "timings": {k: round(v, 3) for k, v in reading.timings.items()},
                     "memory": reading.peak_memory(), "engine": settings.to_dict()})


@app.command(epilog=INFO_EPILOG)
@guarded
@options(MODEL, ENGINE, SOURCES, OUTPUT)
def info(
    sources: Annotated[Optional[list[str]], typer.Argument(metavar="[SOURCE...]", help=SOURCES_HELP)] = None,
    *, model_choice: ModelChoice, engine: dict, gitignore: bool, output: Output,
) -> None:
    """What would be read: documents, pages, characters, exact tokens, memory blocks, memory and time estimates.

    The time estimate comes from reading one prefill chunk with the real model on this machine (the engine's
    rate is flat in length), so it loads the model. stdin is counted as it arrives, in flat memory.
    """
    from infllm.estimate import estimate
    from infllm.run import prepare

    _stdout()
    sources, _ = _split_question([*(sources or []), "info"])
    display = _display(output)
    report = estimate(sources, lambda: prepare(_model_options(model_choice, engine), display), model_choice.device,
                      model_choice.dtype, display, gitignore)
    rate = report.pop("tokens_per_s")
    if output.as_json:
        _print_json({k: v for k, v in report.items() if k != "model"})
        return
    for d in report["sources"]:
        extra = "".join(f", {d[k]} {k}" for k in ("pages", "files") if d.get(k))
        _out(f"{for_terminal(d['source'])}: {d['kind']}, {d['bytes']:,} bytes{extra}\n")
    _out(
        f"{report['characters']:,} characters, {report['tokens']:,} tokens ({report['model']})\n"
        f"memory: {report['memory_blocks_per_layer']:,} blocks per layer, block store ~{report['block_store_mb']:,} MB"
        f" + {report['working_mb']:,} MB working buffers ({report['device']})\n"
        f"{_tier_line(report['block_store'])}\n"
        f"{_keys_line(report)}"
        f"estimated reading time on this machine: ~{report['estimated_read_s']:,.0f} s ({rate:,.0f} tok/s)\n")


def _keys_line(report: dict) -> str:
    """On a GPU, the representative keys: the part of the memory that grows with the text in GPU memory."""
    if not report["device"].startswith("cuda"):
        return ""
    hint = " (--repr-dtype int8 halves them)" if report["engine"]["repr_dtype"] == "model" else ""
    return f"representative keys: ~{report['representative_keys_mb']:,} MB of GPU memory beside the weights{hint}\n"


def _tier_line(tier: dict) -> str:
    if tier["tier"] == "ram":
        return "block store: in RAM"
    if tier["tier"] == "disk":
        return (f"block store: past the RAM budget, ~{tier['spill_mb']:,} MB of it in the disk tier ({tier['spill_dir']}"
                "; answers read it from there)")
    return f"block store: does not fit: {tier['why']}"


@app.command(epilog=MODELS_EPILOG)
@guarded
def models() -> None:
    """The models --model can name on this machine without a download (nothing is downloaded at run time), and
    where infllm looked: the default model, GGUFs converted earlier, the local Hugging Face cache."""
    from infllm.api import find_models

    found, looked = find_models()
    for m in found:
        sys.stdout.write(f"{m.spec}\t{m.kind}" + (f", {m.model_type}" if m.model_type else "") + "\n")
    print("infllm: looked in " + "; ".join(looked) + ". --model also takes any GGUF file or model folder by path",
          file=sys.stderr)


cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, epilog=CACHE_EPILOG,
                        help="The read cache: reads kept so that asking about the same bytes again opens them.")
app.add_typer(cache_app, name="cache")


@cache_app.command("list", epilog=CACHE_EPILOG)
@guarded
def cache_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON object per entry")] = False) -> None:
    """The cached reads, most recently used first: size, last use, tokens, model and sources."""
    from infllm.api import ReadCache

    cache = ReadCache()
    entries = cache.entries()
    for e in entries:
        if as_json:
            _print_json(e.to_dict())
        else:
            sys.stdout.write(f"{e.bytes / 2**20:10,.1f} MB  {e.to_dict()['last_used'][:16]}  {e.tokens:>9,} tokens  "
                             f"{e.model}  {', '.join(e.sources)}\n")
    total = sum(e.bytes for e in entries)
    print(f"infllm: {len(entries)} cached reads, {total / 2**20:,.1f} MB of {cache.limit / 2**20:,.0f} MB "
          f"(INFLLM_CACHE_LIMIT_MB) in {cache.root}", file=sys.stderr)


@cache_app.command("clear", epilog=CACHE_EPILOG)
@guarded
def cache_clear() -> None:
    """Remove every cached read."""
    from infllm.api import ReadCache

    cache = ReadCache()
    count, size = cache.clear()
    print(f"infllm: removed {count} cached reads ({size / 2**20:,.1f} MB) from {cache.root}", file=sys.stderr)


@app.command(epilog=CHAT_EPILOG)
@guarded
@options(MODEL, ENGINE, answer_options(256, "ask", "built-in template name or a template file with {document}, "
                                       "{question} and optionally {passages}"), REUSE, SOURCES, OUTPUT, SERVER)
def chat(
    sources: Annotated[list[str], typer.Argument(metavar="SOURCE...|SNAPSHOT",
                       help="files, directories or a snapshot (stdin holds the questions)")],
    *, model_choice: ModelChoice, engine: dict, answer_choice: AnswerChoice, reuse: Reuse, gitignore: bool,
    output: Output, server: str | None,
) -> None:
    """Read once, then answer the questions typed at the `> ` prompt (on stderr), one a line, until end of input
    (Ctrl-D). Each question is answered from the state right after the read, independently of the others."""
    from infllm.run import STDIN

    if STDIN in sources:
        raise UsageError("chat reads its questions from stdin, so stdin cannot be a source: name a file")

    def typed():
        while True:
            if not output.quiet:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                if not output.quiet:
                    sys.stderr.write("\n")
                return
            if line.strip():
                yield line.strip()

    fields = _run_fields(model_choice, engine, answer_choice, reuse, gitignore)
    if _through(server, sources, None, output):
        for question in typed():  # the server keeps the reading between questions
            _remote(server, sources, [question], fields, output)
        return
    _ask_many(sources, "", typed(), _run_options(fields), output)


@app.command(epilog=SERVE_EPILOG)
@guarded
@options(MODEL)
def serve(
    sources: Annotated[Optional[list[str]], typer.Argument(
        metavar="[SOURCE...]", help="snapshots (or files) to open now, each its own reading, so that their first "
                                    "question is answered as fast as the next (--keep is raised to hold them)")] = None,
    socket_path: Annotated[Optional[str], typer.Option(
        "--socket", envvar="INFLLM_SERVER", metavar="PATH",
        help="the Unix socket to listen at (only you can connect) [default: $XDG_RUNTIME_DIR/infllm.sock, else "
             "/tmp/infllm-UID/infllm.sock]")] = None,
    keep: Annotated[int, typer.Option(metavar="N", help="readings kept open between questions (snapshots are "
                                                        "mapped from their file; a read text's memory stays in RAM)")] = 2,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no log lines on stderr but errors")] = False,
    *, model_choice: ModelChoice,
) -> None:
    """Keep the model loaded and recent readings open, and answer `infllm ask`, `summarize` and `chat` run with
    --server (or INFLLM_SERVER) set to this socket: no torch import, no model load, no reopening per question.
    One question at a time; stops with Ctrl-C or SIGTERM."""
    from infllm.cli.progress import Display
    from infllm.remote import default_socket
    from infllm.server import Server

    display = Display(quiet)
    server = Server(_model_options(model_choice, {}), keep, display)
    server.preload(sources or [])
    server.serve(socket_path or default_socket())


def _ask_many(sources: list[str], first: str, questions, opts: RunOptions, output: Output, *,
              save: str | None = None, one_line: bool = False) -> None:
    """Read (or open) the sources once, then answer each question from the state after the read. first: the
    question the prompt's opening is built with (only a template that asks before the document uses it)."""
    from infllm.run import Runner, check

    display = _display(output, streamed=not one_line)
    plan = check(opts, [sources], first, save=save, report=display)
    runner = Runner(plan, display)
    reading = runner.reading(sources, save=save)
    for question in questions:
        out = _AnswerOut(None, output.as_json, question if one_line else None)
        _show(runner.ask(reading, question, on_text=out.write), out, display)


def _display(output: Output, streamed: bool = False) -> Display:
    """streamed: the command streams its answer to stdout, which, on a terminal, shows the answer coming; else (a
    file, a pipe, --json) stderr counts the answer's tokens while it is generated."""
    from infllm.cli.progress import Display

    return Display(output.quiet, answer_shown=streamed and not output.as_json and _is_terminal(sys.stdout))


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _model_options(model_choice: ModelChoice, engine: dict) -> RunOptions:
    from infllm.run import RunOptions

    return RunOptions(model_choice.model, model_choice.device, model_choice.dtype, model_choice.device_map, engine)


_json_lines = 0  # JSON lines printed by this process so far (guarded prints a failure as one if none came)


def _print_json(obj: dict) -> None:
    global _json_lines
    _json_lines += 1
    _out(json.dumps(obj) + "\n")


def _answer_all(sources: list[str], question: str, opts: RunOptions, batch: BatchChoice, output: Output) -> None:
    """Check everything that can be refused before the model loads, load it once, then answer about each group of
    sources (or snapshot) in order: every source with --each, on Ray workers with --ray.

    With --each, a source that cannot be read, a bad snapshot or a source too big for memory is that source's
    failure (its line on stderr, with --json also its JSON line) and the others are still answered; the run
    then exits with the first failure's code."""
    from infllm.run import Failure, Runner, batch_failure, check, per_source

    _stdout()
    if batch.on_ray and not (batch.each and output.as_json):
        raise UsageError("--ray answers per source as JSON lines: use it with --each --json")
    display = _display(output, streamed=True)
    groups = [[s] for s in sources] if batch.each else [sources]
    plan = check(opts, groups, question, save=batch.save, each=batch.each and not batch.on_ray, report=display,
                 read_here=not batch.on_ray)
    if batch.on_ray:
        from infllm.batch import RayOptions, answers_on_ray

        for line in answers_on_ray(plan, groups, RayOptions(batch.ray_address, batch.workers), display):
            _print_json(line)
        return
    failures = dict(plan.failures)
    runner = Runner(plan, display) if len(failures) < len(groups) else None
    for i, group in enumerate(groups):
        if i not in failures:
            with per_source(batch.each, failures, i):
                out = _AnswerOut(group[0] if len(groups) > 1 else None, output.as_json)
                _show(runner.answer(group, save=batch.save, on_text=out.write), out, display)
        if i in failures:
            display.error(str(failures[i]))
            if output.as_json:
                _print_json(Failure.of(group, failures[i]).to_dict())
    if failures:
        raise batch_failure([Failure.of(groups[i], failures[i]) for i in sorted(failures)], len(groups))


class _AnswerOut:
    """The answer on stdout as it comes (nothing with --json); when several are answered, a `==> name <==` line
    before each, as `head` does for several files. For one of a list of questions, the answer on one line once
    complete (its JSON line then names the question)."""

    def __init__(self, header: str | None, as_json: bool, question: str | None = None):
        self.header, self.as_json, self.question = header, as_json, question

    def write(self, text: str) -> None:
        if self.as_json or self.question is not None:
            return
        if self.header is not None:
            _out(f"==> {for_terminal(self.header)} <==\n")
            self.header = None
        _out(text)

    def close(self, answer: Answer) -> None:
        if self.as_json:
            _print_json(answer.to_dict() if self.question is None else {"question": self.question,
                                                                         **answer.to_dict()})
            return
        if self.question is not None:
            _out(" ".join(answer.text.split("\n")))
        self.write("")
        _out("\n")


def _show(answer: Answer, out: _AnswerOut, display: Display) -> None:
    """Close the answer on stdout (or print it as JSON), then citations and a summary line on stderr."""
    out.close(answer)
    if answer.citations and not out.as_json:
        # Best first by the heads' votes and the question's words together; the vote alone (`weight` in --json)
        # is not shown: beside a ranking it does not follow, it read as a ranking out of order.
        for i, c in enumerate(answer.citations, 1):
            display.always(f"[{i}] {c.location()}: {c.excerpt}")
    timings, mem = answer.timings, answer.memory
    read = ""
    if "prefill_s" in timings:
        rate = answer.tokens_read / max(timings["prefill_s"], 1e-9)
        read = f"read {answer.tokens_read:,} tokens in {timings['prefill_s']:.1f} s ({rate:,.0f} tok/s), "
    elif "open_s" in timings:
        read = f"opened {answer.tokens_read:,} tokens in {timings['open_s']:.1f} s, "
    kept = " (two answers; kept: the re-read passages' alone)" if answer.answered_from == "passages" else ""
    display.phase(f"{read}answered {answer.tokens_generated} tokens{kept} in {timings['answer_s']:.1f} s, "
                  f"total {timings['total_s']:.1f} s, peak RSS {mem['peak_rss_mb']:,.0f} MB"
                  + (f", peak GPU {mem['peak_gpu_mb']:,.0f} MB" if "peak_gpu_mb" in mem else ""))


def main() -> NoReturn:
    """The `infllm` command: the app, then an exit without the interpreter's teardown (`_exit`)."""
    _standard_streams()
    try:
        app()  # ends in SystemExit with the command's exit code
    except SystemExit as done:
        _exit(done.code)
    _exit(0)


def _exit(code: int | str | None) -> NoReturn:
    """End the process with `code` as Python would, minus the interpreter's teardown: freeing a loaded model and
    an opened reading object by object took 1.2-1.6 s after the answer was out (2-core CPU, docs/benchmarks.md
    "Answer latency from a snapshot"). Exit handlers still run (a conversion's spare folder, Ray) and the
    standard streams are flushed; every file a command writes is closed where it is written, and no command
    leaves a thread running."""
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # what a normal exit runs first; os._exit skips them otherwise
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader that left, a closed stream: nothing more to say
            stream.flush()
    os._exit(code or 0)


def _standard_streams() -> None:
    """Give a closed stdin, stdout or stderr (`<&-`, `>&-`, `2>&-`) /dev/null. Otherwise the next file opened takes
    its number, and what is written to that stream (by Python, by a library) lands in that file: a snapshot being
    written, say. A closed stdout is still refused by the commands that print (_stdout); a closed stderr only
    silences the progress lines, which Python would otherwise print on stdout, into the answer."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one, or a lower one moved up
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the process's stderr, open until it exits


if __name__ == "__main__":
    main()
