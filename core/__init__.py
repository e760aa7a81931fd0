"""infllm: ask a local LLM about documents far longer than its context window (InfLLM context memory).

The public API is `Model`, `Reading` and `Answer` (infllm.api) with the errors (infllm.errors); `infllm.run`
holds the checked, batched runs the command line and Ray workers share. They load on first use, so importing
the package (as `infllm --help` does) costs no torch import.
"""

from __future__ import annotations

from importlib import import_module

from infllm.errors import InfllmError

_PUBLIC = {"Model": "infllm.api", "Reading": "infllm.api", "Answer": "infllm.answer",
           "EngineConfig": "infllm.config", "SamplingConfig": "infllm.engine.sampling",
           # Lists of files or questions, one a line ('-': stdin), read without torch: a server's client does.
           "read_path_list": "infllm.documents.readers", "STDIN": "infllm.documents.readers"}

__all__ = ["InfllmError", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'infllm' has no attribute {name!r}")
