"""The InfLLM engine: streams tokens through the model's layers with a per-layer context memory.

Prefill runs layer-major over pieces of `prefill_chunk` tokens (large matmuls for projections and MLP); inside
each layer the memory scores every `query_chunk` step of the piece at once, and each step attends to its own blocks.
Working memory is fixed when the engine is built; only the block stores grow with the text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from infllm.engine.adapter import DecoderAdapter
from infllm.engine.attention import kernel_choice
from infllm.engine.graphs import DecodeGraphs, HeldTokenGraph
from infllm.engine.hostpages import HostPages
from infllm.engine.tally import RetrievalTally
from infllm.config import EngineConfig
from infllm.engine.sizing import store_bytes_per_token
from infllm.engine.masks import MaskCache
from infllm.engine.memory import LayerMemory
from infllm.engine.positions import rope_range
from infllm.engine.rope import RopeTable
from infllm.engine.sampling import SamplingConfig, next_token
from infllm.engine.scoring import score_scratch
from infllm.engine.sections import section


@dataclass
class MemoryReport:
    working_bytes: int  # window, sinks, stragglers, device caches, RoPE tables: flat in text length
    block_store_bytes: int  # grows linearly with the text
    blocks: int  # per layer
    spilled_bytes: int = 0  # of block_store_bytes, the pages in spill files (the disk tier) rather than in RAM


class Engine:
    def __init__(self, model: nn.Module, config: EngineConfig, offload: bool | None = None,
                 decode_4bit: bool = False, prefill_bf16: bool = False, decode_graphs: bool | None = None):
        self.adapter = DecoderAdapter(model, decode_4bit, prefill_bf16)
        self.config = config.validate(self.adapter.max_positions)
        self.kernels = kernel_choice()  # a bad INFLLM_KERNELS is refused before any work
        # Decoded tokens' dense work through CUDA graphs (infllm.engine.graphs), captured at the first one; by
        # default wherever the model sits on one CUDA device, unless INFLLM_KERNELS=reference asks for plain torch.
        if decode_graphs is None:
            decode_graphs = self.kernels != "reference" and DecodeGraphs.usable(self.adapter)
        self.decode_graphs = decode_graphs
        self._graphs: DecodeGraphs | None = None
        # Held decoded tokens as one graph each (infllm.engine.graphs.HeldTokenGraph), with the dense work's graphs;
        # off for good if its capture fails.
        self.held_graphs = decode_graphs
        self._held: HeldTokenGraph | None = None  # captured on the current memories
        self.model = model
        devices = {layer.device for layer in self.adapter.layers}
        self.offload = any(d.type != "cpu" for d in devices) if offload is None else offload
        lo, hi = rope_range(config)
        self._ropes = {d: RopeTable(self.adapter.rotary, lo, hi, d, self.adapter.dtype) for d in devices}
        self.masks = MaskCache(self.config)
        a = self.adapter
        self._scratch = {d: score_scratch(a.kv_heads, a.head_dim, a.dtype, d) for d in devices}
        cuda = tuple(sorted((d for d in devices if d.type == "cuda"), key=str))
        self.host = HostPages(pin=self.offload and bool(cuda), devices=cuda)
        self.reset()

    def reset(self) -> None:
        """Forget everything read so far."""
        a, cfg = self.adapter, self.config
        # New stores count their pages afresh (the old pages go with the old stores); the budget stays.
        self.host = HostPages(self.host.pin, self.host.budget, self.host.spill_dir, self.host.devices)
        self.layers = [
            LayerMemory(cfg, a.heads, a.kv_heads, a.head_dim, a.scale, a.dtype, layer.device,
                        self._ropes[layer.device], self.offload, self.masks, self.kernels,
                        self._scratch[layer.device], self.host)
            for layer in a.layers
        ]
        self._held = None  # its graph wrote the old memories' buffers

    def place_store(self, budget: int | None, spill_dir: Path | None) -> None:
        """Let the block stores' pages take at most `budget` bytes of RAM from now on (None: no limit) and put the
        pages past it in spill files in `spill_dir` (None: never spill; the budget is then not enforced here)."""
        self.host.budget, self.host.spill_dir = budget, spill_dir

    def checkpoint(self) -> list[dict]:
        """State to come back to: asking a question never changes what was read."""
        return [m.checkpoint() for m in self.layers]

    def restore(self, state: list[dict]) -> None:
        for m, s in zip(self.layers, state):
            m.restore(s)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The memory as named tensors (`layer.I.NAME`, views) and the counters every layer shares."""
        for device in {m.device for m in self.layers}:
            if device.type == "cuda":  # blocks reach pinned host pages by asynchronous copies: let them land
                torch.cuda.synchronize(device)
        tensors = {}
        for i, m in enumerate(self.layers):
            tensors.update({f"layer.{i}.{name}": t for name, t in m.export().items()})
        return tensors, self.layers[0].counters()

    def expected_shapes(self, counters: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Every tensor `export` gives at `counters`, with its shape; ValueError if the counters cannot occur."""
        return {f"layer.{i}.{name}": shape for i, m in enumerate(self.layers)
                for name, shape in m.expected_shapes(counters).items()}

    def adopt(self, tensors: dict[str, torch.Tensor], counters: dict[str, int],
              page_checks: dict[tuple[int, int], Callable[[], None]] | None = None) -> None:
        """Continue from exported tensors (validated with `expected_shapes`); page_checks[(layer, page)] runs
        before a block-store page is first read."""
        for i, m in enumerate(self.layers):
            prefix = f"layer.{i}."
            mine = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
            checks = {page: check for (layer, page), check in (page_checks or {}).items() if layer == i}
            m.adopt(mine, counters, checks)

    def count_retrievals(self, on: bool) -> RetrievalTally:
        """Start (on=True) or stop recording which blocks every layer retrieves; returns the shared tally."""
        tally = RetrievalTally()
        for m in self.layers:
            m.tally = tally if on else None
        return tally

    @property
    def position(self) -> int:
        return self.layers[0].position

    def set_block_prior(self, prior: torch.Tensor | None) -> None:
        """prior [blocks] float: added to every layer's standardized block scores at each retrieval until it is
        set to None (how strongly the question points at each block; a large value keeps a block in view). The
        next decoded token retrieves afresh: blocks held from before were picked without it."""
        for m in self.layers:
            m.prior = None if prior is None else prior.to(device=m.device, dtype=torch.float32)
            m.decoding.unhold()

    def set_decode_chunk(self, tokens: int) -> None:
        """Share each retrieval among `tokens` decoded tokens from the next one on (EngineConfig.decode_chunk,
        which the engine starts with): a setting of answering only, so one read can answer both ways."""
        self.config = replace(self.config, decode_chunk=tokens).validate()
        for m in self.layers:
            m.decoding.chunk = tokens

    def memory_report(self) -> MemoryReport:
        working = sum(m.working_nbytes() for m in self.layers) + sum(r.nbytes() for r in self._ropes.values())
        working += sum(t.numel() * t.element_size() for t in self._scratch.values() if t is not None)
        return MemoryReport(working, sum(m.store.nbytes() for m in self.layers), self.layers[0].store.count,
                            self.host.spilled_bytes)

    def memory_report_per_token(self) -> float:
        """Block-store bytes each token read will take (K, V and its share of representative keys)."""
        return store_bytes_per_token(self.adapter.config, self.config, self.adapter.dtype)

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """ids [L] -> last-layer hidden states [L, hidden]; every layer's memory advances by L tokens.
        after_layer(layers done) is called as each layer finishes."""
        a = self.adapter
        if ids.numel() == 1 and self.decode_graphs:
            graphs = self._decode_graphs()
            if graphs is not None:
                return self._forward_graphed(graphs, ids, after_layer)
        hidden = a.embed(ids.to(a.input_device))
        self.masks.clear()  # masks are per positions: this call's are shared by every layer, then dropped
        for i, layer in enumerate(a.layers):
            hidden = hidden.to(layer.device)
            with section("infllm.projections"):
                q, k, v = a.qkv(i, hidden)
            attn = self.layers[i].attend(q, k, v)
            with section("infllm.projections"):  # o projection and MLP
                hidden = a.finish(i, hidden, attn)
            if after_layer is not None:
                after_layer(i + 1)
        return hidden

    def _decode_graphs(self) -> DecodeGraphs | None:
        """The decode graphs, captured at the first call; None (and eager from then on) if this model's modules
        cannot be captured (an operator that waits for the host, say)."""
        if self._graphs is None:
            try:
                self._graphs = DecodeGraphs(self.adapter)
            except RuntimeError:
                self.decode_graphs = False
        return self._graphs

    def _forward_graphed(self, graphs: DecodeGraphs, ids: torch.Tensor,
                         after_layer: Callable[[int], None] | None) -> torch.Tensor:
        """`_forward` of one token: ids [1] -> hidden [1, hidden] (a static tensor of the graphs, valid until the
        next token). A held token is one replay of the whole token's graph; any other token replays one graph per
        layer boundary, each layer's attention eager in between."""
        a = self.adapter
        step = self._held_step() if after_layer is None and self.held_graphs else None
        if step is not None:
            if self._held is None:
                self._held = HeldTokenGraph(a, self.layers)
            try:
                out = self._held.run(a.embed(ids.to(a.input_device)), step)
            except RuntimeError:  # not capturable: its warm-up wrote what the eager token writes again
                self.held_graphs, self._held = False, None
            else:
                for memory in self.layers:
                    memory.advance_steady()
                return out
        graphs.hidden.copy_(a.embed(ids.to(a.input_device)))
        self.masks.clear()
        with section("infllm.projections"):
            out = graphs.replay(0)
        for i in range(len(a.layers)):
            graphs.attn.copy_(self.layers[i].attend(*out[1:]))
            with section("infllm.projections"):
                out = graphs.replay(i + 1)
            if after_layer is not None:
                after_layer(i + 1)
        return out[0]

    def _held_step(self) -> tuple[int, ...] | None:
        """The step every layer's next decoded token takes (LayerMemory.steady_step) if all can be attended by a
        held-token graph, else None. Layers seal, retrieve and compact at the same tokens, so they agree; should
        they not, the token takes the per-boundary graphs."""
        steps = {memory.steady_step() for memory in self.layers}
        return steps.pop() if len(steps) == 1 else None

    @torch.inference_mode()
    def feed(self, ids: Sequence[int] | torch.Tensor, all_logits: bool = False,
             on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Read tokens into memory. Returns the last token's logits [vocab], or [N, vocab] with all_logits.

        on_progress(tokens_done) is called as each layer finishes a prefill piece, the piece's tokens counted in
        proportion to the layers done: a piece takes seconds to minutes on a CPU, its layers a fraction of that.
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("feed() needs at least one token")
        outs = []
        last = None
        for start in range(0, ids.numel(), self.config.prefill_chunk):
            piece = ids[start : start + self.config.prefill_chunk]
            after_layer = None
            if on_progress is not None:
                after_layer = _piece_progress(on_progress, start, piece.numel(), len(self.adapter.layers))
            hidden = self._forward(piece, after_layer)
            if all_logits:
                outs.append(self.adapter.logits(hidden))
            else:
                last = hidden[-1:]
        if all_logits:
            return torch.cat(outs)
        return self.adapter.logits(last)[0]

    def generate(self, logits: torch.Tensor, max_new_tokens: int, stop_ids: set[int],
                 sampling: SamplingConfig = SamplingConfig()) -> Iterator[int]:
        """Yield tokens one by one, starting from the logits of the last token fed; stops at a stop id."""
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        for _ in range(max_new_tokens):
            token = next_token(logits, sampling, generator)
            if token in stop_ids:
                return
            yield token
            logits = self.feed([token])


def _piece_progress(on_progress: Callable[[int], None], start: int, size: int, layers: int) -> Callable[[int], None]:
    """after_layer for a prefill piece of `size` tokens from `start`: tokens done in proportion to layers done."""
    return lambda done: on_progress(start + size * done // layers)
