"""Runs: one question about one or more groups of sources, checked before the model loads, then answered in turn.

`check` refuses, before anything heavy, what would fail later (settings, special files, snapshots made with
another model or unusable settings): the command line calls it first, so a bad flag costs no model load, and a
batch's driver sends the resulting `Plan` to its workers. A `Runner` loads the model once and answers each group
through the public API (infllm.api), reading the sources or opening the group's snapshot.

With `each` (one answer per source), a failure that concerns one source (unreadable, a bad snapshot, too big
for memory) is kept in `Plan.failures` or returned as that source's `Failure`, and the others are still answered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace

from infllm.documents.readers import STDIN
from infllm.snapshot import check_output
from infllm.api import check_answer
from infllm.engine.sampling import SamplingConfig
from infllm.errors import EXIT_INTERNAL, InfllmError, ResourceError, SnapshotError, SourceError, UsageError, one_line
from infllm.reporting import Reporter


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides the sources and the question."""

    model: str | None = None  # GGUF file, model folder or hub id; None: the default model (or a snapshot's)
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # auto, a JSON object {module: GPU} or a JSON file (docs/scaling.md)
    engine: dict[str, int | None] = field(default_factory=dict)  # settings set; the rest are the model's defaults
    sampling: SamplingConfig = SamplingConfig()
    max_tokens: int = 256
    system: str | None = None  # None: prompts/system.txt (or, for a snapshot, the system prompt it was read with)
    template: str = "ask"
    cite: int = 0  # passages to cite per answer
    cache: bool = False  # open the reads kept in the read cache, keep new ones there (infllm.cache)
    refuse_stale: bool = False  # refuse a snapshot whose source files changed since it was read (else: a warning)
    passages: int = 3  # best passages by the question's words, re-read before it (infllm.session.Focus)
    gitignore: bool = True  # inside directories, skip what .gitignore files ignore

    def __post_init__(self):
        check_answer(self.max_tokens, self.sampling, self.cite, self.passages)  # before the model loads

    def to_dict(self) -> dict:
        """Plain JSON-ready values (what a client sends `infllm serve`)."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "RunOptions":
        """The options of `to_dict` (or of the command line's flags, infllm.cli), checked."""
        sampling = d.get("sampling", {})
        return RunOptions(**{**d, "sampling": SamplingConfig(**{**sampling, "stop": tuple(sampling.get("stop", ()))})})


@dataclass
class Plan:
    """A checked run, nothing loaded yet: cheap, so a batch's driver makes it once and sends it to its workers."""

    opts: RunOptions
    question: str
    resolved: object  # infllm.runtime.loading.ResolvedModel
    config: object  # infllm.config.EngineConfig, for the groups read
    snaps: dict[str, object]  # first source of a group -> its infllm.snapshot.SnapshotFile, header checked
    failures: dict[int, InfllmError]  # each: group index -> why it cannot be answered
    spec: str | None = None  # the model asked for (--model, or a snapshot's), for workers on other hosts
    device_map: object | None = None  # opts.device_map parsed: an infllm.runtime.placement.DeviceMap


@contextmanager
def per_source(each: bool, failures: dict[int, InfllmError], index: int) -> Iterator[None]:
    """With `each`, keep a failure that concerns one source for its turn instead of ending the run."""
    try:
        yield
    except (SourceError, SnapshotError, ResourceError) as err:
        if not each:
            raise
        failures.setdefault(index, err)


def check(opts: RunOptions, groups: list[list[str]], question: str, *, save: str | None = None,
          each: bool = False, report: Reporter | None = None, read_here: bool = True) -> Plan:
    """Everything that can be refused before the model loads: settings, missing and special files, snapshots.
    read_here=False: other machines read the sources (Ray workers), so a path missing here is theirs to judge."""
    from infllm.cache import limit_bytes
    from infllm.defaults import settings_for
    from infllm.documents.prompting import load_template
    from infllm.documents.readers import STDIN, check_sources
    from infllm.engine.attention import kernel_choice
    from infllm.runtime.loading import pick_device, pick_dtype, resolve_model
    from infllm.runtime.placement import parse_device_map
    from infllm.runtime.resources import memory_limit_bytes, spill_limit_bytes
    from infllm.snapshot import SnapshotFile, changed_sources, check_model, is_snapshot, snapshot_config

    report = report or Reporter()
    pick_dtype(opts.dtype, pick_device(opts.device))  # bad --device/--dtype: refused before any work
    device_map = parse_device_map(opts.device_map, opts.device)
    memory_limit_bytes()  # and a bad INFLLM_MEMORY_LIMIT_MB
    spill_limit_bytes()  # and a bad INFLLM_SPILL_LIMIT_MB
    kernel_choice()  # and a bad INFLLM_KERNELS
    if opts.cache:
        limit_bytes()  # and a bad INFLLM_CACHE_LIMIT_MB
    load_template(opts.template)  # and a missing or unusable template
    failures: dict[int, InfllmError] = {}
    snaps = {}
    for i, sources in enumerate(groups):
        with per_source(each, failures, i):
            check_sources(sources, missing_ok=not read_here)  # a FIFO would block is_snapshot's open forever
            found = [s for s in sources if s != STDIN and is_snapshot(s)]
            if found and len(sources) > 1:
                raise UsageError(f"a snapshot ({found[0]}) must be the only source of a question (or use --each)")
            if found:
                snaps[found[0]] = snap = SnapshotFile(found[0])  # header and metadata checked now, before loading
                for name in changed_sources(snap):
                    stale = f"{name} changed since {snap.path} was read; read it again"
                    if opts.refuse_stale:
                        raise SnapshotError(stale)
                    report.warn(stale)
    if save is not None and (len(groups) > 1 or snaps):
        raise UsageError("--save writes the memory of one read: not with --each or when asking a snapshot")
    if save is not None:
        check_output(save, groups[0])
    plan = Plan(opts, question, None, None, snaps, failures)
    if len(failures) == len(groups):  # nothing is left to answer: no model to load
        return plan
    report.phase("checking the model and settings")
    spec = opts.model
    if spec is None and snaps:  # ask a snapshot with the model it was read with
        stored = next(iter(snaps.values())).meta.get("model")
        spec = stored.get("spec") if isinstance(stored, dict) and isinstance(stored.get("spec"), str) else None
    resolved = resolve_model(spec, report)
    max_positions = resolved.config.max_position_embeddings
    # When something will be read, the settings must suit the model.
    reads = any(sources[0] not in snaps and i not in failures for i, sources in enumerate(groups))
    config = settings_for(resolved.config, opts.engine, validate=reads)
    for i, sources in enumerate(groups):
        snap = snaps.get(sources[0])
        if snap is not None and i not in failures:
            with per_source(each, failures, i):
                check_model(snap, resolved.fingerprint, resolved.name)
                snapshot_config(snap.meta, opts.engine, snap.path).validate(max_positions)
    return replace(plan, resolved=resolved, config=config, spec=spec, device_map=device_map)


def check_read(sources: list[str], output: str) -> None:
    """What `infllm read` refuses before the model loads: a source that cannot be read, a snapshot path that cannot
    be written."""
    from infllm.documents.readers import check_sources

    check_sources(sources)
    check_output(output, sources)


def prepare(opts: RunOptions, report: Reporter | None = None):
    """(infllm.api.Model, its engine settings), the settings checked before the model loads: for a read that is
    not a question (`infllm read`, `infllm info`)."""
    from infllm.api import Model
    from infllm.defaults import settings_for
    from infllm.runtime.loading import pick_device, resolve_model
    from infllm.runtime.placement import parse_device_map

    pick_device(opts.device)
    device_map = parse_device_map(opts.device_map, opts.device)
    resolved = resolve_model(opts.model, report)
    settings = settings_for(resolved.config, opts.engine)
    return Model.load(resolved, device=opts.device, dtype=opts.dtype, device_map=device_map, report=report), settings


@dataclass
class Failure:
    """Why one group got no answer: the one line the command line prints, and its exit code."""

    inputs: list[str]
    error: str
    exit_code: int

    @staticmethod
    def of(inputs: list[str], err: BaseException) -> "Failure":
        from infllm.runtime.resources import is_out_of_memory, out_of_memory_error

        if is_out_of_memory(err):
            err = out_of_memory_error(err)
        if isinstance(err, InfllmError):
            return Failure(inputs, str(err), err.exit_code)
        return Failure(inputs, f"internal error: {type(err).__name__}: {one_line(err)}", EXIT_INTERNAL)

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "error": self.error, "exit_code": self.exit_code}


class Runner:
    """The model of a checked plan, loaded once; answers group after group."""

    def __init__(self, plan: Plan, report: Reporter | None = None, model=None):
        """model: an infllm.api.Model loaded already (a server's), used instead of loading the plan's."""
        from infllm.api import Model

        from infllm.cache import ReadCache

        self.plan = plan
        opts = plan.opts
        self.model = model or Model.load(plan.resolved, device=opts.device, dtype=opts.dtype,
                                         device_map=plan.device_map, report=report)
        self.cache = ReadCache(report=self.model.report) if opts.cache else None

    def reading(self, sources: list[str], *, save: str | None = None):
        """Read one group of sources (or open its snapshot, or the cached read of the same bytes) and save it if
        asked: an infllm.api.Reading to ask the plan's question, or others."""
        plan, opts = self.plan, self.plan.opts
        snap = plan.snaps.get(sources[0])
        if snap is not None:
            return self.model.open(snap, engine=opts.engine, system=opts.system, template=opts.template)
        reading = self.model.read(sources, engine=plan.config, template=opts.template, system=opts.system,
                                  question=plan.question, keep_text=opts.cite > 0 or opts.passages > 0 or save is not None,
                                  cache=self.cache, gitignore=opts.gitignore)
        if save is not None:
            reading.save(save, opts.model)
        return reading

    def ask(self, reading, question: str, on_text: Callable[[str], None] | None = None):
        """An infllm.api.Answer to `question` with the plan's answer settings; on_text receives it as it comes."""
        opts = self.plan.opts
        return reading.ask(question, max_tokens=opts.max_tokens, sampling=opts.sampling, cite=opts.cite,
                           passages=opts.passages, on_text=on_text)

    def answer(self, sources: list[str], *, save: str | None = None,
               on_text: Callable[[str], None] | None = None):
        """Read one group of sources (`reading`) and answer the plan's question (an infllm.api.Answer)."""
        snap = self.plan.snaps.get(sources[0])
        # A batch may ask thousands of snapshots: each file is closed once its answer is given.
        with closing(snap) if snap is not None else nullcontext():
            return self.ask(self.reading(sources, save=save), self.plan.question, on_text)


def batch_failure(failures: list[Failure], groups: int) -> InfllmError:
    """The closing error of a batch that had failures: a count, and the exit code of the first failure."""
    return InfllmError(f"{len(failures)} of {groups} sources could not be answered (the lines above say why)",
                       failures[0].exit_code)
