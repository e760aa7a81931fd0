"""The command line's options, declared once and shared by the commands that take them.

A command names the groups it takes (`@options(MODEL, ENGINE, ...)`); each group adds its flags to the command's
signature and hands the command one value built from them (a `ModelChoice`, the engine settings, ...). The
engine's flags are generated from `infllm.config.EngineConfig`: a new setting there is a new flag everywhere.
Nothing here imports torch, so `infllm --help` and a usage error stay fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, Optional

import typer

from infllm.config import EngineConfig
from infllm.errors import UsageError


@dataclass(frozen=True)
class OptionGroup:
    """Flags that belong together, and how they become the one value the command receives as `name`."""

    name: str
    params: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]  # called with the group's flags as keyword arguments


def _option(name: str, kind: Any, default: Any, *flags: str, **settings: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, typer.Option(*flags, **settings)])


def options(*groups: OptionGroup):
    """Add the groups' flags to a command; the command receives each group's value under the group's name."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # the command's own annotations, resolved
        names = {g.name for g in groups}
        kept = [p for p in signature.parameters.values() if p.name not in names]

        @functools.wraps(command)
        def run(**kwargs):
            for g in groups:
                kwargs[g.name] = g.build(**{p.name: kwargs.pop(p.name) for p in g.params})
            return command(**kwargs)

        params = kept + [p for g in groups for p in g.params]
        run.__signature__ = signature.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}  # typer reads both
        return run

    return decorate


@dataclass(frozen=True)
class ModelChoice:
    model: str | None
    device: str
    dtype: str
    device_map: str | None  # as given; parsed (and checked) once the run starts


MODEL = OptionGroup("model_choice", (
    _option("model", Optional[str], None, "--model", "-m", envvar="INFLLM_MODEL",
            help="GGUF file, local HF model directory or cached hub id [default: SmolLM2-135M-Instruct]"),
    _option("device", str, "auto", envvar="INFLLM_DEVICE", help="auto, cpu, cuda, cuda:N"),
    _option("dtype", str, "auto", envvar="INFLLM_DTYPE",
            help="auto (bfloat16 on GPU; float32 on CPU, decoded tokens through 4-bit weights when the model's "
                 "are 4-bit, as the default model's, and reading's products in bfloat16 where the CPU has native "
                 "bfloat16), float32 (every product), bfloat16, float16"),
    _option("device_map", Optional[str], None, envvar="INFLLM_DEVICE_MAP", metavar="MAP",
            help="spread the model's layers over several GPUs: auto, a JSON object {module: GPU} or a JSON file "
                 "(docs/scaling.md)"),
), ModelChoice)


def _engine_settings(**given: int | str | None) -> dict[str, int | str | None]:
    """The engine settings the user set (None: the model's default, infllm.defaults)."""
    for name, value in given.items():
        if isinstance(value, int) and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} cannot be negative")
    return given


def _engine_option(f) -> inspect.Parameter:
    """The flag of one engine setting: an integer, or one of a few words (EngineConfig.validate checks which)."""
    choices = f.metadata.get("choices")
    help = f.metadata["help"] + (f" [default: {choices[0]}]" if choices else "")
    return _option(f.name, Optional[str] if choices else Optional[int], None, f"--{f.name.replace('_', '-')}",
                   envvar=f"INFLLM_{f.name.upper()}", help=help,
                   **({"metavar": "|".join(choices)} if choices else {}))


ENGINE = OptionGroup("engine", tuple(_engine_option(f) for f in fields(EngineConfig)), _engine_settings)


@dataclass(frozen=True)
class AnswerChoice:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    repetition_penalty: float
    no_repeat_ngram: int
    top_k: int
    min_p: float
    stop: list[str]
    system: str | None
    template: str
    cite: int
    passages: int


def answer_options(max_tokens: int, template: str, template_help: str, repetition_penalty: float = 1.0,
                   no_repeat_ngram: int = 0, passages: int = 3) -> OptionGroup:
    """How answers are written; the defaults differ per command (a summary is longer, has its own template and
    is kept from repeating itself)."""
    return OptionGroup("answer_choice", (
        _option("max_tokens", int, max_tokens, help="longest answer, tokens"),
        _option("temperature", float, 0.0, help="0 = greedy"),
        _option("top_p", float, 1.0, help="nucleus sampling mass"),
        _option("seed", Optional[int], None, help="sampling seed"),
        _option("repetition_penalty", float, repetition_penalty,
                help="above 1 makes the answer's tokens less likely to come again (1: off)"),
        _option("no_repeat_ngram", int, no_repeat_ngram, metavar="N",
                help="never write the same N tokens twice (0: off)"),
        _option("top_k", int, 0, help="with --temperature: sample among the K most likely tokens (0: all)"),
        _option("min_p", float, 0.0, help="with --temperature: drop tokens below this share of the most likely "
                                          "one's probability (0: off)"),
        _option("stop", list[str], [], "--stop", metavar="TEXT",
                help="end the answer before this text (repeat for several)"),
        _option("system", Optional[str], None, help="system prompt (default: prompts/system.txt)"),
        _option("template", str, template, help=template_help),
        _option("cite", int, 0, help="print on stderr the N passages of memory the question points at (0: none)"),
        _option("passages", int, passages, metavar="N",
                help="re-read after the document the N passages that share most words with the question, and let "
                     "those words steer which memory blocks every layer retrieves (0: neither)"),
    ), AnswerChoice)


@dataclass(frozen=True)
class BatchChoice:
    each: bool
    files_from: str | None
    save: str | None
    ray: bool
    ray_address: str | None
    workers: int | None

    def __post_init__(self):
        """Refuse what --ray cannot honour, before anything starts."""
        if not (self.ray or self.ray_address):
            if self.workers is not None:
                raise UsageError("--workers sets the number of Ray workers: use it with --ray")
            return
        if self.save is not None:
            raise UsageError("--save writes the memory of one read: not with --ray")
        if self.workers is not None and self.workers < 1:
            raise UsageError("--workers needs at least 1")

    @property
    def on_ray(self) -> bool:
        return self.ray or self.ray_address is not None


BATCH = OptionGroup("batch", (
    _option("each", bool, False, "--each", help="answer per source (model loaded once); with --json one line each"),
    _option("files_from", Optional[str], None, "--files-from", metavar="FILE",
            help="also read the sources named in FILE, one a line or NUL-separated ('-': stdin), "
                 "e.g. find . -name '*.md' | infllm ask --each --files-from - \"q\""),
    _option("save", Optional[str], None, "--save", metavar="PATH",
            help="also write the memory to a snapshot file, to ask again without reading"),
    _option("ray", bool, False, "--ray", help="with --each --json: spread the sources over Ray workers, each "
            "holding the model (pip install 'infllm[ray]'; docs/scaling.md)"),
    _option("ray_address", Optional[str], None, metavar="ADDRESS", help="the Ray cluster to join (implies --ray): "
            "auto, HOST:PORT or ray://HOST:PORT [default: RAY_ADDRESS, else a local runtime]"),
    _option("workers", Optional[int], None, help="Ray workers [default: one per GPU, or 1]"),
), BatchChoice)


@dataclass(frozen=True)
class Output:
    as_json: bool
    quiet: bool


OUTPUT = OptionGroup("output", (
    _option("as_json", bool, False, "--json",
            help="print one JSON object (per source with --each) instead of the bare answer"),
    _option("quiet", bool, False, "--quiet", "-q", help="nothing on stderr but errors (and --cite's "
            "passages): no progress, no warnings"),
), Output)


@dataclass(frozen=True)
class Reuse:
    """Whether earlier reads may answer instead of reading again."""

    cache: bool
    refuse_stale: bool


REUSE = OptionGroup("reuse", (
    _option("no_cache", bool, False, "--no-cache",
            help="read the sources even if the read cache holds them, and keep nothing there (infllm cache list)"),
    _option("refuse_stale", bool, False, "--refuse-stale",
            help="refuse (exit 5) a snapshot whose source files changed since it was read, instead of a warning"),
), lambda no_cache, refuse_stale: Reuse(not no_cache, refuse_stale))


SOURCES = OptionGroup("gitignore", (
    _option("no_ignore", bool, False, "--no-ignore",
            help="inside directories, also read the files that .gitignore files ignore (hidden ones, .git/ "
                 "among them, stay skipped)"),
), lambda no_ignore: not no_ignore)


SERVER = OptionGroup("server", (
    _option("server", Optional[str], None, "--server", envvar="INFLLM_SERVER", metavar="SOCKET",
            help="answer through the `infllm serve` process listening at SOCKET (model loaded, recent readings "
                 "kept open); stdin, --each, --ray and --save are still answered here"),
), lambda server: server)
