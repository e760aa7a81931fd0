"""How much an answer repeats itself: repeated sentences and repeated word 4-grams in `infllm ... --json` output.

  infllm summarize --json book.txt > summary.json
  python benchmarks/repeats.py summary.json [more.json ...]

A sentence (split after . ! or ?, compared lower-cased) counts as repeated from its second occurrence on; so does
a 4-gram of words. Results: docs/benchmarks.md, "Summaries".
"""

from __future__ import annotations

import argparse
import json
import re


def repeats(text: str) -> dict[str, int]:
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return {"sentences": len(sentences), "repeated_sentences": len(sentences) - len(set(sentences)),
            "4grams": len(grams), "repeated_4grams": len(grams) - len(set(grams))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="JSON outputs of infllm ask/summarize --json")
    for path in parser.parse_args().files:
        with open(path, encoding="utf-8") as f:
            answer = json.load(f)
        counts = repeats(answer["answer"])
        print(f"{path}: {answer['tokens_generated']} tokens ({answer.get('finish_reason', '?')}), "
              f"{counts['repeated_sentences']} of {counts['sentences']} sentences repeated, "
              f"{counts['repeated_4grams']} of {counts['4grams']} 4-grams repeated")


if __name__ == "__main__":
    main()
