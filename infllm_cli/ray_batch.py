"""`--ray`: answer an `--each` batch on a Ray cluster, each worker an actor holding the model on its GPU (or CPUs).

The driver (this process) refuses what a local run refuses, before Ray starts (`app._check`). It then joins a
cluster (`--ray-address`, or Ray's own RAY_ADDRESS) or starts a local Ray runtime over this machine, makes the
workers and waits until each has loaded the model. Sources go out one at a time to whichever worker is free
(`ray.wait` says which finished); results come back in any order and are written as JSON lines in input order,
each as soon as every earlier one is out. A source that fails gets an error line, {"inputs", "error",
"exit_code"}, and the others go on; the run then exits with the first failure's code. Progress lines, one per
source, go to the driver's stderr.

Workers run the very code of a local `--each --json` (`app._answer_group`), so their lines are the same. They
read sources by path: on a cluster of several hosts, every host must see the sources at the same path.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from infllm.errors import EXIT_INTERNAL, InfllmError, ResourceError, UsageError
from infllm.cli.progress import Display


@dataclass(frozen=True)
class RayOptions:
    """How a batch is spread over Ray."""

    address: str | None = None  # None: RAY_ADDRESS if set (Ray's rule), else a new local runtime
    workers: int | None = None  # None: one per GPU of the cluster, or one when there is none


def options_from_flags(ray: bool, address: str | None, workers: int | None, each: bool, as_json: bool,
                       save: str | None) -> RayOptions | None:
    """RayOptions for --ray / --ray-address / --workers, or None for a local run; refuses combinations --ray
    cannot honour, before anything starts."""
    if not (ray or address):
        if workers is not None:
            raise UsageError("--workers sets the number of Ray workers: use it with --ray")
        return None
    if not (each and as_json):
        raise UsageError("--ray answers per source as JSON lines: use it with --each --json")
    if save is not None:
        raise UsageError("--save writes the memory of one read: not with --ray")
    if workers is not None and workers < 1:
        raise UsageError("--workers needs at least 1")
    return RayOptions(address, workers)


def _error(message: str, exit_code: int) -> InfllmError:
    """An error that exits with a code decided at run time (a worker's, a source's)."""
    err = InfllmError(message)
    err.exit_code = exit_code
    return err


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'infllm[ray]'") from None
    return ray


def _failure(sources: list[str], err: BaseException) -> dict:
    """The line a failed source gets: what `guarded` would print for it, and the exit code it would give."""
    from infllm.runtime.loading import one_line
    from infllm.runtime.resources import is_out_of_memory, out_of_memory_error

    if is_out_of_memory(err):
        err = out_of_memory_error(err)
    if isinstance(err, InfllmError):
        return {"inputs": sources, "error": str(err), "exit_code": err.exit_code}
    return {"inputs": sources, "error": f"internal error: {type(err).__name__}: {one_line(err)}",
            "exit_code": EXIT_INTERNAL}


class Worker:
    """One Ray actor: loads the model once, then answers one source at a time."""

    def __init__(self, plan, threads: int | None):
        from infllm.cli import app

        self.display = Display(quiet=True)  # progress is the driver's
        self.failed: dict | None = None
        try:
            import torch

            if threads:
                torch.set_num_threads(threads)  # the CPUs Ray gave this worker, not every core of the host
            source = plan.resolved.source
            if isinstance(source, Path) and not source.exists():  # another host: find the model here
                from infllm.runtime.loading import resolve_model

                plan = replace(plan, resolved=resolve_model(plan.spec))
            self.batch = app._load(self.display, plan)
        except Exception as err:  # noqa: BLE001 - reported by ready(), so the driver stops with one line
            self.failed = _failure([], err)

    def ready(self) -> dict | None:
        """None once the model is loaded, else the failure (error and exit code)."""
        return self.failed

    def answer(self, sources: list[str]) -> dict:
        """The JSON object a local `--each --json` prints for these sources, or their failure."""
        from infllm.cli import app

        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):  # _answer writes its JSON line to stdout
                app._answer_group(self.display, self.batch, sources)
            return json.loads(out.getvalue())
        except Exception as err:  # noqa: BLE001 - one source's failure must not stop the batch
            return _failure(sources, err)
        finally:
            self.batch.load_s = 0.0  # the model load is counted in the first answer's timings only


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes; one TCP connection says at once whether anything listens."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other names Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def _start(ray, options: RayOptions, display: Display) -> None:
    if options.address:
        _check_reachable(options.address)
    display.phase(f"joining the Ray cluster at {options.address}" if options.address
                  else "starting Ray (a local runtime unless RAY_ADDRESS names a cluster)")
    try:
        # log_to_driver=False: the workers' own output stays in Ray's logs; stderr carries our progress lines.
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"join the Ray cluster at {options.address}" if options.address else "start Ray"
        raise UsageError(f"cannot {where}: {' '.join(str(err).split())}") from None


def _make_workers(ray, plan, options: RayOptions, display: Display) -> list:
    """One actor per GPU (a model split by --device-map takes its share of them), or per CPU slot."""
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0)) if plan.opts.device != "cpu" else 0
    if gpus:
        count = options.workers or gpus
        per = max(1, gpus // count) if plan.opts.device_map is not None else 1
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
    display.phase(f"{count} worker{'s' if count > 1 else ''} ({what}) on a cluster of {gpus} GPUs and {cpus} CPUs; "
                  "loading the model")
    remote = ray.remote(**actor)(Worker)
    plan_ref = ray.put(plan)
    workers = [remote.remote(plan_ref, threads) for _ in range(count)]
    for failed in ray.get([w.ready.remote() for w in workers]):
        if failed:
            raise _error(f"a worker could not load the model: {failed['error']}", failed["exit_code"])
    return workers


def run_batch(display: Display, plan, groups: list[list[str]], options: RayOptions, out=None) -> None:
    """Answer every group on Ray; JSON lines to `out` (stdout) in input order. When sources failed, raises
    (after all the others are answered) with the first failure's exit code."""
    if any(s == "-" for group in groups for s in group):
        raise UsageError("--ray workers read sources by path; stdin ('-') cannot reach them: save it to a file")
    ray = _import_ray()
    out = out or sys.stdout
    started = time.perf_counter()
    _start(ray, options, display)
    try:
        workers = _make_workers(ray, plan, options, display)
        display.phase(f"workers ready in {time.perf_counter() - started:.1f} s; answering {len(groups)} sources")
        failures = _stream(ray, display, workers, groups, out, started)
    finally:
        ray.shutdown()
    if failures:
        first = failures[0]
        raise _error(f"{len(failures)} of {len(groups)} sources failed; the first, {first['inputs'][0]}: "
                     f"{first['error']}", first["exit_code"])


def _stream(ray, display: Display, workers: list, groups: list[list[str]], out, started: float) -> list[dict]:
    """Hand sources to free workers, write results in input order; returns the failures' lines, in input order."""
    pending = iter(enumerate(groups))
    running = {}  # object ref -> (index, worker)
    done: dict[int, dict] = {}  # answered, waiting for an earlier source before being written
    written = finished = tokens = 0
    failures: list[dict] = []

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
            result = _failure(groups[index], ResourceError(f"the worker died: {' '.join(str(err).split())[:300]}"))
            workers.remove(worker)  # the others, all busy while sources remain, take the rest
            if not workers:
                raise ResourceError(f"every Ray worker died; the last: {result['error']}") from None
        else:
            give(worker)
        finished += 1
        if "error" in result:
            display.phase(f"[{finished}/{len(groups)}] {groups[index][0]}: error: {result['error']}")
        else:
            tokens += result.get("tokens_read", 0)
            timings = result.get("timings", {})
            display.phase(f"[{finished}/{len(groups)}] {groups[index][0]}: {result.get('tokens_read', 0):,} tokens "
                          f"read, answered in {timings.get('total_s', 0) - timings.get('load_s', 0):.1f} s "
                          f"by worker {number[id(worker)]}")
        done[index] = result
        while written in done:
            line = done.pop(written)
            if "error" in line:
                failures.append(line)
            out.write(json.dumps(line) + "\n")
            out.flush()
            written += 1
    elapsed = time.perf_counter() - started
    display.phase(f"{len(groups)} sources in {elapsed:.1f} s ({len(failures)} failed), "
                  f"{len(groups) / elapsed * 60:.1f} per minute, {tokens / elapsed:,.0f} tokens/s read overall")
    return failures
