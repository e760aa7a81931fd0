"""Answer one question about many sources on a Ray cluster, each worker an actor holding the model.

The caller checks the run first (`infllm.run.check`, so what a local run refuses is refused before Ray starts).
`answers_on_ray` then joins a cluster (`RayOptions.address`, or Ray's own RAY_ADDRESS) or starts a local Ray
runtime over this machine, makes the workers and waits until each has loaded the model. Sources go out one at a
time to whichever worker is free (`ray.wait` says which finished); results come back in any order and are
yielded in input order, each as soon as every earlier one is out: an answer's `Answer.to_dict()`, or a failed
source's `Failure.to_dict()` ({"inputs", "error", "exit_code"}); the others go on. Progress lines, one per source,
go to the reporter.

Workers run `infllm.run.Runner`, as a local run does, so their results are the same. They read sources by path:
on a cluster of several hosts, every host must see the sources at the same path.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from infllm.errors import InfllmError, ResourceError, UsageError, one_line
from infllm.reporting import Reporter
from infllm.run import Failure, Plan, Runner


@dataclass(frozen=True)
class RayOptions:
    """How a batch is spread over Ray."""

    address: str | None = None  # None: RAY_ADDRESS if set (Ray's rule), else a new local runtime
    workers: int | None = None  # None: one per GPU of the cluster, or one when there is none


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'infllm[ray]'") from None
    return ray


class Worker:
    """One Ray actor: loads the model once, then answers one source at a time."""

    def __init__(self, plan: Plan, threads: int | None):
        self.failed: dict | None = None
        try:
            import torch

            if threads:
                torch.set_num_threads(threads)  # the CPUs Ray gave this worker, not every core of the host
            source = plan.resolved.source
            if isinstance(source, Path) and not source.exists():  # another host: find the model here
                from infllm.runtime.loading import resolve_model

                plan = replace(plan, resolved=resolve_model(plan.spec))
            self.runner = Runner(plan)  # progress is the driver's
        except Exception as err:  # noqa: BLE001 - reported by ready(), so the driver stops with one line
            self.failed = Failure.of([], err).to_dict()

    def ready(self) -> dict | None:
        """None once the model is loaded, else the failure (error and exit code)."""
        return self.failed

    def answer(self, sources: list[str]) -> dict:
        """What a local run answers for these sources (Answer.to_dict()), or their failure."""
        try:
            return self.runner.answer(sources).to_dict()
        except Exception as err:  # noqa: BLE001 - one source's failure must not stop the batch
            return Failure.of(sources, err).to_dict()


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes; one TCP connection says at once whether anything listens."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other names Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def _start(ray, options: RayOptions, report: Reporter) -> None:
    if options.address:
        _check_reachable(options.address)
    report.phase(f"joining the Ray cluster at {options.address}" if options.address
                  else "starting Ray (a local runtime unless RAY_ADDRESS names a cluster)")
    try:
        # log_to_driver=False: the workers' own output stays in Ray's logs; stderr carries our progress lines.
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"join the Ray cluster at {options.address}" if options.address else "start Ray"
        raise UsageError(f"cannot {where}: {one_line(err, limit=10**6)}") from None


def _make_workers(ray, plan: Plan, options: RayOptions, report: Reporter) -> list:
    """One actor per GPU (a model split by --device-map takes its share of them), or per CPU slot."""
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0)) if plan.opts.device != "cpu" else 0
    if gpus:
        count = options.workers or gpus
        per = max(1, gpus // count) if plan.device_map is not None else 1
        if count * per > gpus:
            raise UsageError(f"--workers {count} needs {count * per} GPUs; the Ray cluster has {gpus}")
        actor = dict(num_gpus=per, num_cpus=1)
        threads, what = None, f"{per} GPU{'s' if per > 1 else ''} each"
    else:
        count = options.workers or 1
        if count > cpus:
            raise UsageError(f"--workers {count} needs a CPU each; the Ray cluster has {cpus}")
        per = cpus // count
        actor, threads, what = dict(num_cpus=per), per, f"{per} CPU{'s' if per > 1 else ''} each"
    report.phase(f"{count} worker{'s' if count > 1 else ''} ({what}) on a cluster of {gpus} GPUs and {cpus} CPUs; "
                  "loading the model")
    remote = ray.remote(**actor)(Worker)
    plan_ref = ray.put(plan)
    workers = [remote.remote(plan_ref, threads) for _ in range(count)]
    for failed in ray.get([w.ready.remote() for w in workers]):
        if failed:
            raise InfllmError(f"a worker could not load the model: {failed['error']}", failed["exit_code"])
    return workers


def answers_on_ray(plan: Plan, groups: list[list[str]], options: RayOptions,
                   report: Reporter | None = None) -> Iterator[dict]:
    """Answer every group on Ray; yields each group's result in input order. When sources failed, raises (after
    all the others are answered) with the first failure's exit code."""
    if any(s == "-" for group in groups for s in group):
        raise UsageError("--ray workers read sources by path; stdin ('-') cannot reach them: save it to a file")
    ray = _import_ray()
    report = report or Reporter()
    started = time.perf_counter()
    _start(ray, options, report)
    failures = []
    try:
        workers = _make_workers(ray, plan, options, report)
        report.phase(f"workers ready in {time.perf_counter() - started:.1f} s; answering {len(groups)} sources")
        for line in _stream(ray, report, workers, groups, started):
            if "error" in line:
                failures.append(line)
            yield line
    finally:
        ray.shutdown()
    if failures:
        first = failures[0]
        raise InfllmError(f"{len(failures)} of {len(groups)} sources failed; the first, {first['inputs'][0]}: "
                          f"{first['error']}", first["exit_code"])


def _stream(ray, report: Reporter, workers: list, groups: list[list[str]], started: float) -> Iterator[dict]:
    """Hand sources to free workers; yield their results in input order."""
    pending = iter(enumerate(groups))
    running = {}  # object ref -> (index, worker)
    done: dict[int, dict] = {}  # answered, waiting for an earlier source before being written
    written = finished = tokens = failed = 0

    number = {id(w): i + 1 for i, w in enumerate(workers)}  # "worker N" in the progress lines

    def give(worker) -> None:
        item = next(pending, None)
        if item is not None:
            running[worker.answer.remote(item[1])] = (item[0], worker)

    for worker in workers:
        give(worker)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        index, worker = running.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:  # the worker itself died (killed, out of memory, host lost)
            result = Failure.of(groups[index], ResourceError(f"the worker died: {one_line(err)}")).to_dict()
            workers.remove(worker)  # the others, all busy while sources remain, take the rest
            if not workers:
                raise ResourceError(f"every Ray worker died; the last: {result['error']}") from None
        else:
            give(worker)
        finished += 1
        if "error" in result:
            report.phase(f"[{finished}/{len(groups)}] {groups[index][0]}: error: {result['error']}")
        else:
            tokens += result.get("tokens_read", 0)
            timings = result.get("timings", {})
            report.phase(f"[{finished}/{len(groups)}] {groups[index][0]}: {result.get('tokens_read', 0):,} tokens "
                          f"read, answered in {timings.get('total_s', 0) - timings.get('load_s', 0):.1f} s "
                          f"by worker {number[id(worker)]}")
        done[index] = result
        while written in done:
            line = done.pop(written)
            failed += "error" in line
            yield line
            written += 1
    elapsed = time.perf_counter() - started
    report.phase(f"{len(groups)} sources in {elapsed:.1f} s ({failed} failed), "
                  f"{len(groups) / elapsed * 60:.1f} per minute, {tokens / elapsed:,.0f} tokens/s read overall")
