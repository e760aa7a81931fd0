"""Two trees of infllm timed against each other by `benchmarks/speed.py`, alternating, on the same machine.

Machines here are shared and move between calls more than most changes do; what holds is a ratio against a
baseline timed in the same call, round after round. This runs the base tree's speed.py and this tree's with the
same arguments, one process each, `--rounds` times (base first in odd rounds, this tree first in even ones, so
neither always runs on a warmer machine), and prints each round's figures, the medians, and this tree's medians
over the base's.

  python benchmarks/ab.py --base HEAD~1 --rounds 3 -- --full-max 0 --shape llama8b --lengths 131072 --systems infllm
  python benchmarks/ab.py --base-tree /path/to/exported/tree -- --shape smollm2 --device cpu --lengths 16384 ...

`--base REF` exports a git revision of this repository (`git archive`) into a temporary folder; `--base-tree` takes
a folder already holding one (its core/, infllm_cli/, prompts/ and benchmarks/), for a machine without the
repository's history. Each tree is imported as the package `infllm` from its own folders, whatever is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The package's folders, as pyproject.toml maps them: core/ is `infllm`, the others its subpackages.
SUBPACKAGES = {"cli": "infllm_cli", "prompts": "prompts"}
FIGURES = ("prefill_tok_s", "decode_ms", "decode_median_ms", "gpu_gb", "rss_gb")


def package(tree: Path, into: Path) -> Path:
    """A folder to put first on PYTHONPATH so that `import infllm` is `tree`'s: into/infllm holds links to core/'s
    entries and to the subpackages' folders."""
    root = into / "infllm"
    root.mkdir(parents=True)
    for entry in (tree / "core").iterdir():
        (root / entry.name).symlink_to(entry.resolve())
    for name, folder in SUBPACKAGES.items():
        (root / name).symlink_to((tree / folder).resolve())
    return into


def export(ref: str, into: Path) -> Path:
    """This repository's `ref` as files in `into` (the folders a tree needs to be timed)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "core", "infllm_cli", "prompts", "benchmarks"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(tree: Path, pkg: Path, speed_args: list[str], scratch: Path) -> list[dict]:
    """One process of `tree`'s speed.py: its rows (the JSON it writes)."""
    out = scratch / "rows.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(pkg), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "speed.py"), *speed_args, "--json", str(out)],
                          cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"ab.py: speed.py in {tree} failed (exit {proc.returncode}): "
                 + (proc.stderr.strip().splitlines() or ["no error output"])[-1])
    return json.loads(out.read_text())


def key(row: dict) -> tuple[str, int]:
    return row["system"], row["tokens"]


def table(results: dict[str, list[list[dict]]]) -> list[str]:
    """Markdown lines: per system and length, each tree's figures round by round, their medians, and the ratio of
    this tree's median to the base's."""
    lines = ["| system | tokens | figure | base, each round | this tree, each round | base median | "
             "this median | this / base |", "|---|---|---|---|---|---|---|---|"]
    rows = {key(r): r for r in results["base"][0]}
    for system, tokens in rows:
        for figure in FIGURES:
            values = {}
            for tree, rounds in results.items():
                values[tree] = [r[figure] for rows_ in rounds for r in rows_
                                if key(r) == (system, tokens) and r.get(figure) is not None]
            if not values["base"] or not values["this"]:
                continue
            base, this = statistics.median(values["base"]), statistics.median(values["this"])
            ratio = f"{this / base:.3f}x" if base else ""
            lines.append(f"| {system} | {tokens:,} | {figure} | {' / '.join(f'{v:,.2f}' for v in values['base'])} | "
                         f"{' / '.join(f'{v:,.2f}' for v in values['this'])} | {base:,.2f} | {this:,.2f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="a git revision of this repository to time against")
    which.add_argument("--base-tree", type=Path, help="a folder holding the base tree's core/, infllm_cli/, "
                                                      "prompts/ and benchmarks/")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree, alternating (default 3)")
    parser.add_argument("speed_args", nargs=argparse.REMAINDER, help="-- then speed.py's arguments")
    args = parser.parse_args()
    speed_args = args.speed_args[1:] if args.speed_args[:1] == ["--"] else args.speed_args
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if "--json" in speed_args:
        parser.error("speed.py's --json is ab.py's own (each process writes its rows there)")
    with tempfile.TemporaryDirectory(prefix="infllm-ab-") as scratch:
        scratch = Path(scratch)
        if args.base_tree is not None:
            if not (args.base_tree / "core").is_dir() or not (args.base_tree / "benchmarks" / "speed.py").is_file():
                parser.error(f"--base-tree {args.base_tree}: no core/ and benchmarks/speed.py there")
            base = args.base_tree.resolve()  # each tree's speed.py runs from its own folder
        else:
            (scratch / "base").mkdir()
            try:
                base = export(args.base, scratch / "base")
            except subprocess.CalledProcessError:
                parser.error(f"--base {args.base}: not a revision git can export here")
        trees = {"base": (base, package(base, scratch / "pkg-base")),
                 "this": (REPO, package(REPO, scratch / "pkg-this"))}
        results: dict[str, list[list[dict]]] = {"base": [], "this": []}
        for i in range(args.rounds):
            for name in ("base", "this") if i % 2 == 0 else ("this", "base"):
                tree, pkg = trees[name]
                results[name].append(run(tree, pkg, speed_args, scratch))
                print(f"round {i + 1}, {name}: " + "; ".join(
                    f"{r['system']} {r['tokens']:,}: {r['prefill_tok_s']:,.0f} tok/s"
                    + (f", {r['decode_ms']:.1f} ms/token" if r.get("decode_ms") is not None else "")
                    for r in results[name][-1]), file=sys.stderr, flush=True)
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
