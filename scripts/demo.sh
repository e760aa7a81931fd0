#!/usr/bin/env bash
# `make demo`: ask the default model about the first 12 chapters of Pride and Prejudice (public domain, from
# ../shared/docs; ~25K tokens, 3x the model's 8K window), about a fact from chapter 1, ~24K tokens before the
# question, so far outside the local window: only the context memory can bring it back.
set -euo pipefail
book=${1:-../shared/docs/austen-pride-and-prejudice.txt}
question=${2:-"What is the name of the estate that has been let at last?"}
if [ ! -r "$book" ]; then echo "demo: cannot read $book (pass a text file: make demo DEMO_DOC=path)" >&2; exit 3; fi
end=$(grep -n '^Chapter 13$' "$book" | cut -d: -f1 || true)
echo "demo: question: $question" >&2
if [ -n "$end" ]; then
  head -n $((end - 1)) "$book" | .venv/bin/infllm ask --cite 3 - "$question"
else
  .venv/bin/infllm ask --cite 3 "$book" "$question"
fi
