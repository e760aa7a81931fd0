"""Answer latency from a snapshot: seconds from starting `infllm ask` to the answer's first byte on stdout, and to
the command's exit, answered in the command's own process against through a running `infllm serve`.

The real command line in fresh processes, default model, a snapshot of the first ~25K tokens of *Pride and
Prejudice* (written once into --workdir). Rows, each repeated and alternated with the others:
  process            `infllm ask SNAP Q`: import torch, load the model, open the snapshot, answer
  server, opened     `infllm ask --server S SNAP Q` to a server that holds no reading yet (a different snapshot file
                     each time, so the server opens it as a first question would)
  server, kept       the same question again: the server answers from the reading it kept
  server, at start   the first question about a snapshot the server opened when it started (`infllm serve SNAP`)
A server is started for each repeat with SNAP to open (its own start is not counted: it is what a server is for).

Example (CPU):  python benchmarks/first_token.py --repeats 3 --cite 0,3 --workdir /tmp/firsttoken
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO.parent / "shared/docs/austen-pride-and-prejudice.txt"
QUESTION = "What is the name of the estate that has been let at last?"
INFLLM = [sys.executable, "-m", "infllm.cli"]


def timed(argv: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds to the first stdout byte, seconds to exit, stdout) of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = proc.stdout.read(1)
    to_first = time.perf_counter() - started
    rest = proc.stdout.read()
    proc.wait()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
    return to_first, time.perf_counter() - started, (first + rest).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/infllm-first-token"))
    ap.add_argument("--chars", type=int, default=100_000, help="characters of the novel read (~25K tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cite", default="0,3", help="--cite values, one row set each")
    args = ap.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "INFLLM_CACHE": str(work / "cache")}  # no read cache of the user's answers for us
    text, snap = work / "doc.txt", work / "doc.infllm"
    if not snap.exists():
        text.write_text(DOC.read_text(encoding="utf-8")[: args.chars], encoding="utf-8")
        subprocess.run([*INFLLM, "read", str(text), "-o", str(snap)], check=True, env=env)
    sock = work / "serve.sock"
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    answers = set()
    for r in range(args.repeats):
        server = subprocess.Popen([*INFLLM, "serve", str(snap), "--socket", str(sock), "--keep", "2"],
                                  stderr=subprocess.PIPE, env=env, text=True)
        for line in server.stderr:  # wait until it listens
            if "listening at" in line:
                break
        try:
            for i, cite in enumerate(int(c) for c in args.cite.split(",")):
                base = ["ask", "--cite", str(cite), "--max-tokens", "16"]
                copy = work / f"copy-{r}-{cite}.infllm"  # a file the server has not opened yet
                shutil.copyfile(snap, copy)
                runs = [("process", [*INFLLM, *base, str(snap), QUESTION]),
                        ("server, opened", [*INFLLM, *base, "--server", str(sock), str(copy), QUESTION]),
                        ("server, kept", [*INFLLM, *base, "--server", str(sock), str(copy), QUESTION])]
                if i == 0:  # the server's first question: about the snapshot it opened at its start
                    runs.insert(1, ("server, at start", [*INFLLM, *base, "--server", str(sock), str(snap), QUESTION]))
                for name, argv in runs:
                    first, whole, out = timed(argv, env)
                    rows.setdefault((name, cite), []).append((first, whole))
                    answers.add(out.strip())
                copy.unlink()
        finally:
            server.terminate()
            server.wait()
    print(f"\n{args.repeats} runs each (median), {os.cpu_count()} CPUs; answers seen: {sorted(answers)}\n")
    print("| run | --cite | first answer byte s | whole command s |")
    print("|---|---|---|---|")
    for (name, cite), times in rows.items():
        print(f"| {name} | {cite} | {statistics.median(t[0] for t in times):.2f} | "
              f"{statistics.median(t[1] for t in times):.2f} |")


if __name__ == "__main__":
    main()
