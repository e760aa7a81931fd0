"""Named sections of the engine's work for the torch profiler, free while no profiler runs.

`benchmarks/speed.py --breakdown` reads where the time goes from these sections (projections, attention, retrieval,
sealing, gathering). Entering a `record_function` costs ~6 µs even with no profiler running; a decoded token
enters six per layer, ~1 ms per token for the default model on a 2-core CPU, so sections are only opened while a
profiler records.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch.autograd.profiler as autograd_profiler
from torch.profiler import record_function

_NOTHING = nullcontext()


def section(name: str) -> AbstractContextManager:
    """`record_function(name)` while a profiler records, else a context that does nothing."""
    return record_function(name) if autograd_profiler._is_profiler_enabled else _NOTHING
