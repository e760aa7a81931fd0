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
from typing import Annotated, Optional

import typer

from core.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, InfllmError, UsageError
from core.sampling import SamplingConfig
from infllm_cli.progress import Display, memory_line

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


@app.callback()
def root() -> None:
    """Ask a local LLM about documents far longer than its context window."""


def guarded(command):
    """Run a command body so that every failure is one stderr line and a documented exit code."""

    @functools.wraps(command)
    def run(*args, **kwargs):
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
            if os.environ.get("INFLLM_DEBUG"):
                raise
            print(f"infllm: internal error: {type(err).__name__}: {err} (INFLLM_DEBUG=1 shows the traceback)",
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


def _split_question(args: list[str]) -> tuple[list[str], str]:
    if not args:
        raise UsageError("a question is needed: infllm ask SOURCE... \"question\"")
    *sources, question = args
    if not sources:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no document given: name a file, a directory or '-', or pipe text in")
        sources = ["-"]
    if not question.strip():
        raise UsageError("the question is empty")
    return sources, question


@app.command(epilog=EPILOG)
@guarded
def ask(
    args: Annotated[list[str], typer.Argument(metavar="SOURCE... QUESTION",
                    help="Files, directories or '-' (stdin), then the question. With no source, stdin is read.")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    window: Annotated[Optional[int], typer.Option(envvar="INFLLM_WINDOW", help="local window, tokens")] = None,
    topk: Annotated[Optional[int], typer.Option(envvar="INFLLM_TOPK", help="memory blocks retrieved per query chunk")] = None,
    sinks: Annotated[Optional[int], typer.Option(envvar="INFLLM_SINKS", help="initial tokens always attended")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="tokens per memory block")] = None,
    query_chunk: Annotated[Optional[int], typer.Option(help="queries sharing one retrieval")] = None,
    cache_blocks: Annotated[Optional[int], typer.Option(help="blocks per layer cached on the GPU")] = None,
    prefill_chunk: Annotated[Optional[int], typer.Option(help="tokens per prefill step")] = None,
    max_tokens: Annotated[int, typer.Option(help="longest answer, tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="sampling seed")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt (default: prompts/system.txt)")] = None,
    template: Annotated[str, typer.Option(help="built-in template name or a template file with {document} and {question}")] = "ask",
    cite: Annotated[int, typer.Option(help="print on stderr the N passages the memory drew on most (0: none)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of the bare answer")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress on stderr")] = False,
) -> None:
    """Answer a question about one or more documents read whole into the context memory."""
    display = Display(quiet)
    sources, question = _split_question(args)
    overrides = _engine_overrides(window, topk, sinks, block_size, query_chunk, cache_blocks, prefill_chunk)
    sampling = SamplingConfig(temperature, top_p, seed)
    if not 0 < top_p <= 1 or not temperature >= 0 or max_tokens < 1:  # `not >=` also refuses nan
        raise UsageError("need 0 < --top-p <= 1, --temperature >= 0 and --max-tokens >= 1")
    if cite < 0:
        raise UsageError("--cite needs a count of passages, 0 or more")
    _run_ask(display, sources, question, model, device, dtype, overrides, sampling, max_tokens, system, template,
             as_json, cite)


def _run_ask(display, sources, question, model, device, dtype, overrides, sampling, max_tokens, system, template,
             as_json, cite):
    from core.citations import SourceMap
    from core.defaults import engine_defaults
    from core.loading import pick_device, resolve_model
    from core.loading import load_model
    from core.prompting import build_prompt, builtin_template, load_template
    from core.session import Session, peak_memory
    from core.sources import read_text

    started = time.perf_counter()
    pick_device(device)
    display.phase("checking the model and settings (the first use of a GGUF converts it once, ~20 s)")
    resolved = resolve_model(model)
    config = engine_defaults(resolved.config).with_overrides(**overrides)
    config.validate(resolved.config.max_position_embeddings)
    display.phase("extracting text from " + ", ".join(sources))
    text, pieces = read_text(sources, stdin=sys.stdin.buffer if "-" in sources else None)
    t_extract = time.perf_counter()
    display.phase("loading model")
    loaded = load_model(resolved, device=device, dtype=dtype)
    t_load = time.perf_counter()
    session = Session(loaded, config)
    display.phase("tokenizing")
    document = session.tokenize(text, offsets=cite > 0)
    prompt = build_prompt(loaded.tokenizer, load_template(template), question,
                          system if system is not None else builtin_template("system").strip())
    t_tok = time.perf_counter()
    per_token = session.engine.memory_report_per_token()
    display.phase(f"{len(document):,} tokens from {len(text):,} characters; memory will take about "
                  f"{len(document) * per_token / 2**20:,.0f} MB")
    with display.reading(len(document), lambda: session.engine.memory_report().block_store_bytes) as update:
        session.read(prompt.prefix, document, on_progress=update)
    t_read = time.perf_counter()
    display.phase("answering")
    answer = []
    for chunk in session.answer(prompt, max_tokens, sampling, SourceMap(text, pieces) if cite else None, cite):
        answer.append(chunk)
        if not as_json:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    done = time.perf_counter()
    answer_text = "".join(answer)
    mem = peak_memory()
    timings = {"extract_s": t_extract - started, "load_s": t_load - t_extract, "tokenize_s": t_tok - t_load,
               "prefill_s": t_read - t_tok, "answer_s": done - t_read, "total_s": done - started}
    if as_json:
        json.dump({"answer": answer_text.strip(), "model": loaded.name, "inputs": sources,
                   "tokens_read": session.timings.tokens_read, "tokens_generated": session.timings.tokens_generated,
                   "timings": {k: round(v, 3) for k, v in timings.items()}, "memory": mem,
                   "engine": config.to_dict(), "sources": [c.to_dict() for c in session.citations]},
                  sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if cite and not as_json:
        for i, c in enumerate(session.citations, 1):
            display.always(f"[{i}] {c.location()} (weight {c.weight:.2f}): {c.excerpt}")
    rate = session.timings.tokens_read / max(timings["prefill_s"], 1e-9)
    display.phase(f"read {session.timings.tokens_read:,} tokens in {timings['prefill_s']:.1f} s ({rate:,.0f} tok/s), "
                  f"answered {session.timings.tokens_generated} tokens in {timings['answer_s']:.1f} s, "
                  f"total {timings['total_s']:.1f} s, peak RSS {mem['peak_rss_mb']:,.0f} MB"
                  + (f", peak GPU {mem['peak_gpu_mb']:,.0f} MB" if "peak_gpu_mb" in mem else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
