"""Snapshots: what a second question about the same document costs, against reading it again.

For each length it runs the real command line in fresh processes (so RSS is the process's own):
  1. `infllm ask DOC Q --save SNAP --json`: read, write the snapshot, answer (the first question);
  2. `infllm ask SNAP Q --json`: open the snapshot and answer (the second question), twice.
It prints snapshot size per token, write, open and answer times, RSS after opening and after answering, and the
time to the second answer (open + answer, and the whole command) against reading again (prefill + answer).
The document is real text (Austen, then the KJV New Testament, from ../shared/docs) cut to the token count.

Example (CPU):  python benchmarks/snapshot.py --lengths 32768,131072 --workdir /tmp/snapbench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DOCS = [REPO.parent / "shared/docs/austen-pride-and-prejudice.txt", REPO.parent / "shared/docs/kjv-new-testament.txt"]
QUESTION = "What is the name of the family that lives at Longbourn?"


def make_document(tokens: int, path: Path) -> int:
    """Write the first `tokens` tokens of the reference texts to `path`; returns the exact count."""
    from transformers import AutoTokenizer

    from infllm.runtime.loading import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None).source, local_files_only=True)
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) < tokens:
        raise SystemExit(f"the reference texts hold only {len(enc['input_ids'])} tokens")
    path.write_text(text[: enc["offset_mapping"][tokens - 1][1]], encoding="utf-8")
    return tokens


def infllm(*args: str) -> tuple[dict, float]:
    """Run the CLI; returns its --json object and the command's wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "infllm.cli", *args, "--json", "-q", "--device", "cpu",
                           "--max-tokens", "32"], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"infllm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,131072", help="document lengths in tokens")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/infllm-snapshot-bench"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in map(int, args.lengths.split(",")):
        doc, snap = args.workdir / f"doc-{n}.txt", args.workdir / f"doc-{n}.infllm"
        make_document(n, doc)
        first, first_wall = infllm("ask", str(doc), QUESTION, "--save", str(snap))
        seconds = [infllm("ask", str(snap), QUESTION) for _ in range(2)]
        second, second_wall = min(seconds, key=lambda r: r[1])
        t1, t2 = first["timings"], second["timings"]
        size = snap.stat().st_size
        reread = t1["prefill_s"] + t1["answer_s"]
        from_snap = t2["open_s"] + t2["answer_s"]
        rows.append({
            "tokens": first["tokens_read"], "snapshot_mb": size / 2**20, "bytes_per_token": size / first["tokens_read"],
            "write_s": t1["save_s"], "open_s": t2["open_s"], "rss_after_open_mb": second["memory"]["rss_after_open_mb"],
            "rss_after_answer_mb": second["memory"]["rss_mb"], "peak_rss_first_mb": first["memory"]["peak_rss_mb"],
            "reread_s": reread, "snapshot_answer_s": from_snap, "speedup": reread / from_snap,
            "first_command_s": first_wall, "second_command_s": second_wall,
            "command_speedup": first_wall / second_wall, "same_answer": first["answer"] == second["answer"],
        })
        snap.unlink()
    head = ("tokens", "snap MB", "B/token", "write s", "open s", "RSS open", "RSS answer", "re-read s",
            "snap answer s", "speedup", "cmd 1st s", "cmd 2nd s", "cmd speedup", "same answer")
    keys = ("tokens", "snapshot_mb", "bytes_per_token", "write_s", "open_s", "rss_after_open_mb",
            "rss_after_answer_mb", "reread_s", "snapshot_answer_s", "speedup", "first_command_s", "second_command_s",
            "command_speedup", "same_answer")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r[k]:,.1f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
