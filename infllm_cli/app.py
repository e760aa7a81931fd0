"""The `infllm` command line: argument parsing, stdout/stderr discipline and exit codes, over `core/`.

stdout carries only the answer (streamed) or, with --json, one JSON object. Everything else goes to stderr.
Any `InfllmError` becomes one line on stderr and its exit code; Ctrl-C exits 130; a closed stdout ends quietly.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from infllm.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, InfllmError, UsageError
from infllm.engine.sampling import SamplingConfig
from infllm.cli.progress import Display, memory_line

if TYPE_CHECKING:  # the CLI imports torch and transformers only once a command runs
    from infllm.config import EngineConfig
    from infllm.runtime.loading import LoadedModel, ResolvedModel
    from infllm.runtime.placement import DeviceMap
    from infllm.documents.prompting import Prompt
    from infllm.session import Session
    from infllm.snapshot import SnapshotFile
    from infllm.cli.ray_batch import RayOptions

EPILOG = """\
Examples:

  infllm ask book.txt "Who does Elizabeth marry?"

  cat server.log | infllm ask "Which error came first?"

  infllm ask --model ./Qwen2.5-1.5B-Instruct --window 2048 notes/ "What is left to do?"

Exit codes: 0 ok, 1 internal error, 2 bad usage, 3 unreadable input, 4 model error, 5 snapshot error,
6 not enough memory, 130 interrupted.
"""

app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  help="Ask a local LLM about documents far longer than its context window.", epilog=EPILOG)

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", envvar="INFLLM_MODEL",
                     help="GGUF file, local HF model directory or cached hub id [default: SmolLM2-135M-Instruct]")]
DeviceOpt = Annotated[str, typer.Option(envvar="INFLLM_DEVICE", help="auto, cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option(envvar="INFLLM_DTYPE", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(envvar="INFLLM_DEVICE_MAP", metavar="MAP",
                         help="spread the model's layers over several GPUs: auto, a JSON object {module: GPU} or a "
                              "JSON file (docs/scaling.md)")]


@app.callback()
def root() -> None:
    """Ask a local LLM about documents far longer than its context window."""


def guarded(command):
    """Run a command body so that every failure is one stderr line and a documented exit code."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from infllm.cli import restore_interrupts

        restore_interrupts()  # Ctrl-C while starting exited at once (infllm_cli/__init__.py); now it raises
        try:
            return command(*args, **kwargs)
        except InfllmError as err:
            print(f"infllm: error: {err}", file=sys.stderr)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            print("infllm: interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader went away (`| head -1`): stop quietly, and keep Python from complaining at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(0) from None
        except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            from infllm.runtime.resources import is_out_of_memory, out_of_memory_error

            if is_out_of_memory(err):  # RAM or GPU ran out mid-run: explained, exit 6
                print(f"infllm: error: {out_of_memory_error(err)}", file=sys.stderr)
                raise typer.Exit(out_of_memory_error(err).exit_code) from None
            if os.environ.get("INFLLM_DEBUG"):
                raise
            detail = " ".join(str(err).split())  # one line, whatever the message holds
            print(f"infllm: internal error: {type(err).__name__}: {detail} (INFLLM_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
            raise typer.Exit(EXIT_INTERNAL) from None

    return run


def _engine_overrides(window, topk, sinks, block_size, query_chunk, cache_blocks, prefill_chunk) -> dict:
    """The engine settings the user set; the rest come from the model's defaults (core.defaults)."""
    overrides = dict(window=window, topk=topk, sinks=sinks, block_size=block_size, query_chunk=query_chunk,
                     cache_blocks=cache_blocks, prefill_chunk=prefill_chunk)
    for name, value in overrides.items():
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} cannot be negative")
    return overrides


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


def _listed(files_from: str, sources: list[str]) -> list[str]:
    from infllm.errors import SourceError
    from infllm.documents.readers import STDIN, read_path_list

    try:
        listed = read_path_list(files_from, stdin=sys.stdin.buffer if files_from == STDIN else None)
    except SourceError as err:
        raise SourceError(f"--files-from {err}") from None
    if files_from == STDIN and STDIN in sources + listed:
        raise UsageError("stdin holds the list of files (--files-from -), so '-' cannot also be a source")
    if not listed and not sources:
        raise UsageError(f"--files-from {files_from}: the list names no sources")
    return listed


WindowOpt = Annotated[Optional[int], typer.Option(envvar="INFLLM_WINDOW", help="local window, tokens")]
TopkOpt = Annotated[Optional[int], typer.Option(envvar="INFLLM_TOPK", help="memory blocks retrieved per query chunk")]
SinksOpt = Annotated[Optional[int], typer.Option(envvar="INFLLM_SINKS", help="initial tokens always attended")]
BlockOpt = Annotated[Optional[int], typer.Option(help="tokens per memory block")]
QueryChunkOpt = Annotated[Optional[int], typer.Option(help="queries sharing one retrieval")]
CacheOpt = Annotated[Optional[int], typer.Option(help="blocks per layer cached on the GPU")]
PrefillOpt = Annotated[Optional[int], typer.Option(help="tokens per prefill step")]
MaxTokensOpt = Annotated[int, typer.Option(help="longest answer, tokens")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy")]
TopPOpt = Annotated[float, typer.Option(help="nucleus sampling mass")]
SeedOpt = Annotated[Optional[int], typer.Option(help="sampling seed")]
SystemOpt = Annotated[Optional[str], typer.Option(help="system prompt (default: prompts/system.txt)")]
CiteOpt = Annotated[int, typer.Option(help="print on stderr the N passages of memory the question points at (0: none)")]
EachOpt = Annotated[bool, typer.Option("--each", help="answer per source (model loaded once); with --json one line each")]
FilesFromOpt = Annotated[Optional[str], typer.Option("--files-from", metavar="FILE",
                         help="also read the sources named in FILE, one a line or NUL-separated ('-': stdin), "
                              "e.g. find . -name '*.md' | infllm ask --each --files-from - \"q\"")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object (per source with --each) instead of the bare answer")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress on stderr")]
SaveOpt = Annotated[Optional[str], typer.Option("--save", metavar="PATH",
                    help="also write the memory to a snapshot file, to ask again without reading")]
RayOpt = Annotated[bool, typer.Option("--ray", help="with --each --json: spread the sources over Ray workers, each "
                   "holding the model (pip install 'infllm[ray]'; docs/scaling.md)")]
RayAddressOpt = Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="the Ray cluster to join (implies "
                          "--ray): auto, HOST:PORT or ray://HOST:PORT [default: RAY_ADDRESS, else a local runtime]")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Ray workers [default: one per GPU, or 1]")]


@dataclass
class RunOptions:
    """Everything a read-and-answer run needs besides the sources and the question."""

    model: str | None
    device: str
    dtype: str
    device_map: DeviceMap | None
    overrides: dict
    sampling: SamplingConfig
    max_tokens: int
    system: str | None
    template: str
    cite: int
    as_json: bool


def _options(model, device, dtype, device_map, window, topk, sinks, block_size, query_chunk, cache_blocks, prefill_chunk,
             max_tokens, temperature, top_p, seed, system, template, cite, as_json) -> RunOptions:
    overrides = _engine_overrides(window, topk, sinks, block_size, query_chunk, cache_blocks, prefill_chunk)
    if not 0 < top_p <= 1 or not 0 <= temperature < float("inf") or max_tokens < 1:  # `not <=` also refuses nan
        raise UsageError("need 0 < --top-p <= 1, a finite --temperature >= 0 and --max-tokens >= 1")
    if cite < 0:
        raise UsageError("--cite needs a count of passages, 0 or more")
    from infllm.runtime.placement import parse_device_map

    return RunOptions(model, device, dtype, parse_device_map(device_map, device), overrides,
                      SamplingConfig(temperature, top_p, seed), max_tokens, system,
                      template, cite, as_json)


@app.command(epilog=EPILOG)
@guarded
def ask(
    args: Annotated[list[str], typer.Argument(metavar="SOURCE... QUESTION",
                    help="Files, directories or '-' (stdin), then the question. With no source, stdin is read.")],
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", device_map: DeviceMapOpt = None,
    window: WindowOpt = None, topk: TopkOpt = None, sinks: SinksOpt = None, block_size: BlockOpt = None,
    query_chunk: QueryChunkOpt = None, cache_blocks: CacheOpt = None, prefill_chunk: PrefillOpt = None,
    max_tokens: MaxTokensOpt = 256, temperature: TemperatureOpt = 0.0, top_p: TopPOpt = 1.0, seed: SeedOpt = None,
    system: SystemOpt = None,
    template: Annotated[str, typer.Option(help="built-in template name or a template file with {document} and {question}")] = "ask",
    cite: CiteOpt = 0, each: EachOpt = False, files_from: FilesFromOpt = None, as_json: JsonOpt = False,
    quiet: QuietOpt = False, save: SaveOpt = None, ray: RayOpt = False, ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Answer a question about one or more documents read whole into the context memory, or about a snapshot
    written by `infllm read` (FILE.infllm: nothing is read again)."""
    sources, question = _split_question(args, files_from)
    opts = _options(model, device, dtype, device_map, window, topk, sinks, block_size, query_chunk, cache_blocks, prefill_chunk,
                    max_tokens, temperature, top_p, seed, system, template, cite, as_json)
    from infllm.cli.ray_batch import options_from_flags

    on_ray = options_from_flags(ray, ray_address, workers, each, as_json, save)
    _run(Display(quiet), opts, [[s] for s in sources] if each else [sources], question, save, on_ray, each)


SUMMARY_REQUEST = ("Summarize the whole document in a few short paragraphs, from its beginning to its end: "
                   "who or what it is about, and its main parts in order.")


@app.command(epilog=EPILOG)
@guarded
def summarize(
    sources: Annotated[Optional[list[str]], typer.Argument(metavar="[SOURCE...]",
                       help="Files, directories or '-' (stdin). With no source, stdin is read.")] = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", device_map: DeviceMapOpt = None,
    window: WindowOpt = None, topk: TopkOpt = None, sinks: SinksOpt = None, block_size: BlockOpt = None,
    query_chunk: QueryChunkOpt = None, cache_blocks: CacheOpt = None, prefill_chunk: PrefillOpt = None,
    max_tokens: MaxTokensOpt = 400, temperature: TemperatureOpt = 0.0, top_p: TopPOpt = 1.0, seed: SeedOpt = None,
    system: SystemOpt = None,
    template: Annotated[str, typer.Option(help="built-in template name or a template file")] = "summarize",
    cite: CiteOpt = 0, each: EachOpt = False, files_from: FilesFromOpt = None, as_json: JsonOpt = False,
    quiet: QuietOpt = False, save: SaveOpt = None, ray: RayOpt = False, ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Summarize whole documents (or a snapshot): one pass over the context memory, the request after the text."""
    sources, _ = _split_question([*(sources or []), SUMMARY_REQUEST], files_from)
    opts = _options(model, device, dtype, device_map, window, topk, sinks, block_size, query_chunk, cache_blocks, prefill_chunk,
                    max_tokens, temperature, top_p, seed, system, template, cite, as_json)
    from infllm.cli.ray_batch import options_from_flags

    on_ray = options_from_flags(ray, ray_address, workers, each, as_json, save)
    _run(Display(quiet), opts, [[s] for s in sources] if each else [sources], SUMMARY_REQUEST, save, on_ray, each)


@app.command("read", epilog=EPILOG)
@guarded
def read_command(
    sources: Annotated[Optional[list[str]], typer.Argument(metavar="[SOURCE...]",
                       help="Files, directories or '-' (stdin). With no source, stdin is read.")] = None,
    output: Annotated[str, typer.Option("--output", "-o", metavar="PATH",
                      help="snapshot file to write, e.g. book.infllm (replaced atomically)")] = "",
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", device_map: DeviceMapOpt = None,
    window: WindowOpt = None, topk: TopkOpt = None, sinks: SinksOpt = None, block_size: BlockOpt = None,
    query_chunk: QueryChunkOpt = None, cache_blocks: CacheOpt = None, prefill_chunk: PrefillOpt = None,
    system: SystemOpt = None,
    template: Annotated[str, typer.Option(help="template whose opening (before {document}) is read with the text")] = "ask",
    as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Read documents once and save the context memory as a snapshot: `infllm ask FILE.infllm "..."` and
    `infllm summarize FILE.infllm` then answer from it without reading the text again."""
    from infllm.defaults import engine_defaults
    from infllm.runtime.loading import load_model, pick_device, resolve_model
    from infllm.runtime.placement import parse_device_map
    from infllm.documents.prompting import build_prompt, builtin_template, load_template
    from infllm.session import Session, peak_memory

    if not output:
        raise UsageError("name the snapshot to write: infllm read SOURCE... -o FILE.infllm")
    sources, _ = _split_question([*(sources or []), "read"])
    overrides = _engine_overrides(window, topk, sinks, block_size, query_chunk, cache_blocks, prefill_chunk)
    display = Display(quiet)
    pick_device(device)
    placement = parse_device_map(device_map, device)
    resolved = resolve_model(model)
    config = engine_defaults(resolved.config).with_overrides(**overrides)
    config.validate(resolved.config.max_position_embeddings)
    template_text = load_template(template)
    started = time.perf_counter()
    display.phase("loading model")
    loaded = load_model(resolved, device=device, dtype=dtype, device_map=placement)
    timings = {"load_s": time.perf_counter() - started}
    system = system if system is not None else builtin_template("system").strip()
    session = Session(loaded, config)
    prompt = build_prompt(loaded.tokenizer, template_text, "", system)
    _read(display, session, prompt.prefix, sources, timings)
    size = _save(display, session, output, model, system, timings)
    if as_json:
        json.dump({"snapshot": output, "bytes": size, "model": loaded.name, "inputs": sources,
                   "tokens_read": session.timings.tokens_read,
                   "timings": {k: round(v, 3) for k, v in timings.items()}, "memory": peak_memory(),
                   "engine": config.to_dict()}, sys.stdout)
        sys.stdout.write("\n")


@app.command(epilog=EPILOG)
@guarded
def info(
    sources: Annotated[Optional[list[str]], typer.Argument(metavar="[SOURCE...]",
                       help="Files, directories or '-' (stdin). With no source, stdin is read.")] = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", device_map: DeviceMapOpt = None,
    window: WindowOpt = None, topk: TopkOpt = None, sinks: SinksOpt = None, block_size: BlockOpt = None,
    query_chunk: QueryChunkOpt = None, cache_blocks: CacheOpt = None, prefill_chunk: PrefillOpt = None,
    as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """What would be read: documents, pages, characters, exact tokens, memory blocks, memory and time estimates.

    The time estimate comes from reading one prefill chunk with the real model on this machine (the engine's
    rate is flat in length), so it loads the model. stdin is counted as it arrives, in flat memory.
    """
    from infllm.defaults import engine_defaults
    from infllm.documents.measure import TextSize, measure_stream
    from infllm.engine.sizing import memory_blocks, store_bytes_per_token
    from infllm.runtime.loading import load_model, pick_device, pick_dtype, resolve_model
    from infllm.runtime.placement import parse_device_map
    from infllm.session import Session
    from infllm.documents.readers import STDIN, describe_source, iter_pieces, read_text

    display = Display(quiet)
    sources, _ = _split_question([*(sources or []), "info"])
    overrides = _engine_overrides(window, topk, sinks, block_size, query_chunk, cache_blocks, prefill_chunk)
    dev = pick_device(device)
    placement = parse_device_map(device_map, device)
    resolved = resolve_model(model)
    config = engine_defaults(resolved.config).with_overrides(**overrides)
    config.validate(resolved.config.max_position_embeddings)
    described = [describe_source(s).__dict__ for s in sources if s != STDIN]
    # A pipe may be endless: with stdin among the sources the text is counted as it arrives, as `ask` reads it
    # (so only once the tokenizer is loaded). Files are extracted first, so an unreadable one fails before the load.
    streamed = STDIN in sources
    if not streamed:
        display.phase("extracting text")
        text, pieces = read_text(sources)
    display.phase("loading model")
    loaded = load_model(resolved, device=device, dtype=dtype, device_map=placement)
    session = Session(loaded, config)
    if streamed:
        display.phase("counting " + ", ".join(sources) + " (a stream: tokenized in pieces as it arrives, the same "
                      "tokens as the whole text)")
        size = measure_stream(loaded.tokenizer, iter_pieces(sources, stdin=sys.stdin.buffer), config.prefill_chunk)
    else:
        ids = session.tokenize(text)
        size = TextSize(len(text), len(pieces), len(ids), ids[: config.prefill_chunk])
    tokens, calibration = size.tokens, size.head
    session.read([], calibration[:64])  # first calls pay one-off kernel set-up; keep it out of the rate
    start = time.perf_counter()
    session.read([], calibration)
    rate = len(calibration) / max(time.perf_counter() - start, 1e-9)
    store = tokens * store_bytes_per_token(resolved.config, config, pick_dtype(dtype, dev))
    report = {"sources": described, "characters": size.characters, "pieces": size.pieces, "tokens": tokens,
              "memory_blocks_per_layer": memory_blocks(tokens, config), "block_store_mb": round(store / 2**20, 1),
              "working_mb": round(session.engine.memory_report().working_bytes / 2**20, 1),
              "device": str(dev), "estimated_read_s": round(tokens / rate, 1), "engine": config.to_dict()}
    if as_json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
        return
    for d in described:
        extra = "".join(f", {d[k]} {k}" for k in ("pages", "files") if d.get(k))
        sys.stdout.write(f"{d['source']}: {d['kind']}, {d['bytes']:,} bytes{extra}\n")
    sys.stdout.write(
        f"{size.characters:,} characters, {tokens:,} tokens ({loaded.name})\n"
        f"memory: {report['memory_blocks_per_layer']:,} blocks per layer, block store ~{report['block_store_mb']:,} MB"
        f" + {report['working_mb']:,} MB working buffers ({dev})\n"
        f"estimated reading time on this machine: ~{report['estimated_read_s']:,.0f} s ({rate:,.0f} tok/s)\n")


@dataclass
class Plan:
    """A checked run, nothing loaded yet: cheap, so a batch's driver makes it once and sends it to its workers."""

    opts: RunOptions
    question: str
    spec: str | None  # the model asked for (--model, or a snapshot's), for workers on other hosts
    resolved: ResolvedModel
    config: EngineConfig  # for the documents read
    snaps: dict[str, SnapshotFile]  # header and metadata checked
    template: str
    reads: bool  # whether some group is read (not a snapshot)
    failures: dict[int, InfllmError]  # --each: group index -> why it cannot be answered


@dataclass
class Loaded:
    """What every group of a run shares once the model is loaded."""

    plan: Plan
    loaded: LoadedModel
    load_s: float
    default_system: str | None
    prompt: Prompt
    reader: Session | None  # for the groups read (not snapshots)


def _run(display: Display, opts: RunOptions, groups: list[list[str]], question: str,
         save: str | None = None, ray: RayOptions | None = None, each: bool = False) -> None:
    """Check settings, load the model once, then answer about each group of sources (or snapshot) in order;
    with `ray`, on Ray workers (infllm_cli/ray_batch.py).

    With --each (`each`), a source that cannot be read, a bad snapshot or a source too big for memory is that
    source's failure (its line on stderr, with --json also its JSON line) and the others are still answered;
    the run then exits with the first failure's code. (Ray workers report their documents' failures themselves.)"""
    plan = _check(display, opts, groups, question, save, each and ray is None)
    if ray is not None:
        from infllm.cli.ray_batch import run_batch

        return run_batch(display, plan, groups, ray)
    failures = plan.failures
    batch = _load(display, plan)
    for i, sources in enumerate(groups):
        if i not in failures:
            with _per_document(each, failures, i):
                _answer_group(display, batch, sources, save, header=len(groups) > 1 and not opts.as_json)
                batch.load_s = 0.0
        if i in failures:
            _report_failure(display, opts, sources, failures[i])
    if failures:
        _raise_summary(failures, len(groups))


def _check(display: Display, opts: RunOptions, groups: list[list[str]], question: str, save: str | None,
           each: bool = False) -> Plan:
    """Everything that can be refused before the model loads: flags, special files, snapshots, settings."""
    from infllm.engine.attention import kernel_choice
    from infllm.defaults import engine_defaults
    from infllm.runtime.loading import pick_device, pick_dtype, resolve_model
    from infllm.documents.prompting import load_template
    from infllm.runtime.resources import memory_limit_bytes
    from infllm.snapshot import SnapshotFile, check_model, is_snapshot, snapshot_config
    from infllm.documents.readers import STDIN, refuse_special_files

    pick_dtype(opts.dtype, pick_device(opts.device))  # bad --device/--dtype: refused before any work
    memory_limit_bytes()  # and a bad INFLLM_MEMORY_LIMIT_MB
    kernel_choice()  # and a bad INFLLM_KERNELS
    failures: dict[int, InfllmError] = {}
    snaps = {}  # first source of a group -> its snapshot
    for i, sources in enumerate(groups):
        with _per_document(each, failures, i):
            refuse_special_files(sources)  # a FIFO would block is_snapshot's open forever
            found = [s for s in sources if s != STDIN and is_snapshot(s)]
            if found and len(sources) > 1:
                raise UsageError(f"a snapshot ({found[0]}) must be the only source of a question (or use --each)")
            if found:
                snaps[found[0]] = SnapshotFile(found[0])  # header and metadata checked now, before the model loads
    if save is not None and (len(groups) > 1 or snaps):
        raise UsageError("--save writes the memory of one read: not with --each or when asking a snapshot")
    if len(failures) == len(groups):  # nothing is left to answer: no model to load
        for i, sources in enumerate(groups):
            _report_failure(display, opts, sources, failures[i])
        _raise_summary(failures, len(groups))
    display.phase("checking the model and settings (the first use of a GGUF converts it once, ~20 s)")
    spec = opts.model
    if spec is None and snaps:  # ask a snapshot with the model it was read with
        stored = next(iter(snaps.values())).meta.get("model")
        spec = stored.get("spec") if isinstance(stored, dict) and isinstance(stored.get("spec"), str) else None
    resolved = resolve_model(spec)
    max_positions = resolved.config.max_position_embeddings
    config = engine_defaults(resolved.config).with_overrides(**opts.overrides)
    to_read = [i for i, sources in enumerate(groups) if sources[0] not in snaps and i not in failures]
    if to_read:  # something will be read: the settings must suit the model
        config.validate(max_positions)
    for i, sources in enumerate(groups):
        snap = snaps.get(sources[0])
        if snap is not None and i not in failures:
            with _per_document(each, failures, i):
                check_model(snap, resolved.fingerprint, resolved.name)
                snapshot_config(snap.meta, opts.overrides, snap.path).validate(max_positions)
    return Plan(opts, question, spec, resolved, config, snaps, load_template(opts.template), bool(to_read),
                failures)


def _load(display: Display, plan: Plan) -> Loaded:
    from infllm.runtime.loading import load_model
    from infllm.documents.prompting import NO_CHAT_TEMPLATE, build_prompt, builtin_template, has_chat_template
    from infllm.session import Session

    opts = plan.opts
    started = time.perf_counter()
    display.phase("loading model")
    loaded = load_model(plan.resolved, device=opts.device, dtype=opts.dtype, device_map=opts.device_map)
    load_s = time.perf_counter() - started
    default_system = opts.system if opts.system is not None else builtin_template("system").strip()
    reader = Session(loaded, plan.config) if plan.reads else None
    prompt = build_prompt(loaded.tokenizer, plan.template, plan.question, default_system)
    if not has_chat_template(loaded.tokenizer):
        display.warn(NO_CHAT_TEMPLATE)
    return Loaded(plan, loaded, load_s, default_system, prompt, reader)


def _answer_group(display: Display, batch: Loaded, sources: list[str], save: str | None = None,
                  header: bool = False) -> None:
    """Read one group of sources (or open its snapshot) and answer about it; header: a `==> name <==` line first,
    as `head` does for several files."""
    from infllm.documents.prompting import build_prompt

    opts, plan = batch.plan.opts, batch.plan
    timings = {"load_s": batch.load_s}
    if sources[0] in plan.snaps:
        session, system = _open(display, opts, batch.loaded, plan.snaps[sources[0]], timings)
        prompt = batch.prompt if system == batch.default_system else build_prompt(
            batch.loaded.tokenizer, plan.template, plan.question, system)
    else:
        session, prompt = batch.reader, batch.prompt
        _read(display, session, batch.prompt.prefix, sources, timings, keep_text=opts.cite > 0 or save is not None)
        if save is not None:
            _save(display, session, save, opts.model, batch.default_system, timings)
    if header:
        sys.stdout.write(f"==> {sources[0]} <==\n")
    _answer(display, opts, session, prompt, sources, timings)


@contextmanager
def _per_document(each: bool, failures: dict, index: int):
    """With --each, keep a failure that concerns one source for its turn instead of ending the run."""
    from infllm.errors import ResourceError, SnapshotError, SourceError

    try:
        yield
    except (SourceError, SnapshotError, ResourceError) as err:
        if not each:
            raise
        failures.setdefault(index, err)


def _report_failure(display: Display, opts: RunOptions, sources: list[str], err: InfllmError) -> None:
    display.error(str(err))
    if opts.as_json:
        json.dump({"inputs": sources, "error": str(err), "exit_code": err.exit_code}, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()


def _raise_summary(failures: dict[int, InfllmError], groups: int) -> None:
    """End an --each run that had failures: one closing line, and the exit code of the first failure."""
    summary = InfllmError(f"{len(failures)} of {groups} sources could not be answered (the lines above say why)")
    summary.exit_code = failures[min(failures)].exit_code
    raise summary


def _open(display: Display, opts: RunOptions, loaded, snap, timings: dict):
    """A session resumed from a snapshot, and the system prompt it was read with (unless --system overrides)."""
    from infllm.session import rss_mb
    from infllm.snapshot import open_session

    started = time.perf_counter()
    meta = snap.meta
    display.phase(f"opening snapshot {snap.path}: {meta.get('tokens', 0):,} tokens read earlier")
    session = open_session(loaded, snap, opts.overrides)
    timings["open_s"] = time.perf_counter() - started
    timings["rss_after_open_mb"] = rss_mb()
    stored = meta.get("system")
    return session, opts.system if opts.system is not None else (stored if isinstance(stored, str) else None)


def _read(display: Display, session, prefix: list[int], sources: list[str], timings: dict,
          keep_text: bool = True) -> None:
    """Extract, tokenize and read `sources` into the session's memory, after the prompt's prefix.

    With stdin among them, the text is read as it arrives (`_read_stream`); keep_text: citations or a snapshot
    will need the text (only a stream can do without it)."""
    from infllm.citations.passages import SourceMap
    from infllm.runtime.resources import check_reading
    from infllm.documents.readers import STDIN, read_text

    if STDIN in sources:
        _read_stream(display, session, prefix, sources, timings, keep_text)
        return
    started = time.perf_counter()
    display.phase("extracting text from " + ", ".join(sources))
    text, pieces = read_text(sources)
    t_extract = time.perf_counter()
    display.phase("tokenizing")
    document = session.tokenize(text)
    t_tok = time.perf_counter()
    per_token = session.engine.memory_report_per_token()
    display.phase(f"{len(document):,} tokens from {len(text):,} characters; memory will take about "
                  f"{len(document) * per_token / 2**20:,.0f} MB")
    check_reading(session, len(document), sources)  # refuse now, with numbers and flags, if it cannot fit
    with display.reading(len(document), lambda: session.engine.memory_report().block_store_bytes) as update:
        session.read(prefix, document, on_progress=update, source_map=SourceMap(text, pieces))
    timings.update(extract_s=t_extract - started, tokenize_s=t_tok - t_extract,
                   prefill_s=time.perf_counter() - t_tok)


def _read_stream(display: Display, session, prefix: list[int], sources: list[str], timings: dict,
                 keep_text: bool) -> None:
    """Read sources that include stdin as the text arrives: extracting, tokenizing and prefill in one pass, so
    memory grows only by the block store. Its size is unknown until the end, so the memory check runs before
    every prefill step instead of once."""
    from infllm.runtime.resources import check_reading
    from infllm.documents.readers import iter_pieces

    started = time.perf_counter()
    display.phase("extracting text from " + ", ".join(sources) + " (a stream: tokenized and read as it arrives, "
                  "so no total and no ETA)")
    pieces = iter_pieces(sources, stdin=sys.stdin.buffer)
    with display.reading(None, lambda: session.engine.memory_report().block_store_bytes) as update:
        session.read_stream(prefix, pieces, keep_text=keep_text, on_progress=update,
                            before_step=lambda tokens: check_reading(session, tokens, sources))
    timings["prefill_s"] = time.perf_counter() - started  # extraction and tokenizing included: they overlap


def _save(display: Display, session, path: str, model_spec: str | None, system: str, timings: dict) -> int:
    from infllm.snapshot import save_session

    display.phase(f"writing snapshot {path}")
    started = time.perf_counter()
    size = save_session(session, path, model_spec, system)
    timings["save_s"] = time.perf_counter() - started
    display.phase(f"wrote {path}: {size / 2**20:,.1f} MB in {timings['save_s']:.1f} s")
    return size


def _answer(display: Display, opts: RunOptions, session, prompt, sources: list[str], timings: dict) -> None:
    """Stream the answer to stdout (or one JSON object), then citations and a summary line on stderr."""
    from infllm.session import peak_memory, rss_mb

    display.phase("answering")
    started = time.perf_counter()
    answer = []
    for chunk in session.answer(prompt, opts.max_tokens, opts.sampling, cite=opts.cite):
        answer.append(chunk)
        if not opts.as_json:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    timings["answer_s"] = time.perf_counter() - started
    timings["total_s"] = sum(v for k, v in timings.items() if k.endswith("_s"))
    mem = {**peak_memory(), "rss_mb": rss_mb()}
    if "rss_after_open_mb" in timings:
        mem["rss_after_open_mb"] = timings.pop("rss_after_open_mb")
    if opts.as_json:
        json.dump({"answer": "".join(answer).strip(), "model": session.loaded.name, "inputs": sources,
                   "tokens_read": session.timings.tokens_read, "tokens_generated": session.timings.tokens_generated,
                   "timings": {k: round(v, 3) for k, v in timings.items()}, "memory": mem,
                   "engine": session.engine.config.to_dict(), "sources": [c.to_dict() for c in session.citations]},
                  sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if opts.cite and not opts.as_json:
        for i, c in enumerate(session.citations, 1):
            display.always(f"[{i}] {c.location()} (weight {c.weight:.2f}): {c.excerpt}")
    read = ""
    if "prefill_s" in timings:
        rate = session.timings.tokens_read / max(timings["prefill_s"], 1e-9)
        read = f"read {session.timings.tokens_read:,} tokens in {timings['prefill_s']:.1f} s ({rate:,.0f} tok/s), "
    elif "open_s" in timings:
        read = f"opened {session.timings.tokens_read:,} tokens in {timings['open_s']:.1f} s, "
    display.phase(f"{read}answered {session.timings.tokens_generated} tokens in {timings['answer_s']:.1f} s, "
                  f"total {timings['total_s']:.1f} s, peak RSS {mem['peak_rss_mb']:,.0f} MB"
                  + (f", peak GPU {mem['peak_gpu_mb']:,.0f} MB" if "peak_gpu_mb" in mem else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
