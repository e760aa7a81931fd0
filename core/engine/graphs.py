"""CUDA graphs of a decoded token: its dense work between two layers' attention, or the whole token.

A decoded token on a GPU is bound by launches, not arithmetic: about 54 operators per layer, each launched from
Python, and, when it retrieves (one token in `decode_chunk`), one wait for the device per layer (retrieval's block
ids reach the host for the device cache), after which the device idles until the host launches again. Twenty of
those operators are the same every token and touch no memory state: layer i's o projection, residual, norm and
MLP, then layer i+1's norm and q/k/v projections.
`DecodeGraphs` captures that stretch once per layer boundary and replays it with one launch (54 -> 34 launches per
layer); the attention between (`LayerMemory.attend`, which retrieves, gathers and decides on the host) stays eager.

Most decoded tokens leave the host nothing to decide, though: they attend the blocks held from a retrieval up
to `decode_chunk` - 1 tokens before (15 of 16 by default), seal nothing and only move every index by one
(`LayerMemory.steady_step`). `HeldTokenGraph` captures such a token whole, every layer's attention included
(`LayerMemory.attend_steady`, its indices read from a small tensor on the device), and replays it with one
launch; the host then advances its counters (`advance_steady`). The other tokens take `DecodeGraphs`.

Graphs replay the kernels they captured on the same addresses: inputs are copied into static buffers, outputs
are the captured tensors, valid until the next replay of the same graph. Graph i reads the hidden state graph
i - 1 wrote, so one token is: embed into `hidden`, replay 0 (qkv of layer 0), then per layer attend, copy its output
into `attn`, replay i + 1 (finish of layer i and qkv of layer i + 1; the last replay finishes the last layer).
A held-token graph also writes the memories' buffers in place (recent buffers, rings, tails), so it is bound to
the LayerMemory objects it was captured on: a new set (Engine.reset) needs a new capture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from infllm.engine.adapter import DecoderAdapter

if TYPE_CHECKING:
    from infllm.engine.memory import LayerMemory


# Only the capturing thread is held to what a capture allows: the block store's slab thread
# (infllm.engine.hostpages) may be registering host memory meanwhile, which the default mode forbids any thread.
CAPTURE_MODE = "thread_local"


class DecodeGraphs:
    """One graph per layer boundary of a single-row forward on one CUDA device (module docstring)."""

    def __init__(self, adapter: DecoderAdapter):
        self.adapter = adapter
        self.device = adapter.layers[0].device
        a = adapter
        self.hidden = torch.zeros((1, a.config.hidden_size), dtype=a.dtype, device=self.device)  # [1, hidden]
        self.attn = torch.zeros((a.heads, 1, a.head_dim), dtype=a.dtype, device=self.device)  # [H, 1, D]
        self.graphs: list[torch.cuda.CUDAGraph] = []
        # outputs[i]: (hidden [1, hidden], q [H, 1, D], k/v [Hkv, 1, D]); the last boundary has no q/k/v
        self.outputs: list[tuple[torch.Tensor, ...]] = []
        self._capture()

    @staticmethod
    def usable(adapter: DecoderAdapter) -> bool:
        """Whether every layer, the embeddings and the head sit on one CUDA device (a device map across GPUs, or a
        CPU, runs eagerly)."""
        devices = {layer.device for layer in adapter.layers} | {adapter.input_device,
                                                               adapter.lm_head.weight.device}
        return len(devices) == 1 and next(iter(devices)).type == "cuda"

    def _boundary(self, i: int, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The eager work of boundary i: finish layer i - 1 (if any), then layer i's q/k/v (if any)."""
        a = self.adapter
        if i > 0:
            hidden = a.finish(i - 1, hidden, self.attn)
        if i == len(a.layers):
            return (hidden,)
        return (hidden, *a.qkv(i, hidden))

    def _capture(self) -> None:
        _warm_up(self.device, lambda: [self._boundary(i, self.hidden) for i in range(len(self.adapter.layers) + 1)])
        pool = torch.cuda.graph_pool_handle()  # replayed strictly in capture order: one pool serves them all
        hidden = self.hidden
        for i in range(len(self.adapter.layers) + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=CAPTURE_MODE):
                out = self._boundary(i, hidden)
            self.graphs.append(graph)
            self.outputs.append(out)
            hidden = out[0]

    def replay(self, i: int) -> tuple[torch.Tensor, ...]:
        """Run boundary i on the current `hidden` chain and `attn`; returns its outputs (static tensors)."""
        self.graphs[i].replay()
        return self.outputs[i]


def _warm_up(device: torch.device, work) -> None:
    """Run `work` once on a side stream, as CUDA graphs ask before a capture: cuBLAS creates its handles and
    workspaces then."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(device).wait_stream(side)


class HeldTokenGraph:
    """One graph of a whole decoded token that every layer attends by `LayerMemory.attend_steady` (module
    docstring), on the memories `layers`; captured at its first `run`."""

    STEP = 6  # the values of LayerMemory.steady_step

    def __init__(self, adapter: DecoderAdapter, layers: list[LayerMemory]):
        self.adapter = adapter
        self.layers = layers
        self.device = adapter.layers[0].device
        self.hidden = torch.zeros((1, adapter.config.hidden_size), dtype=adapter.dtype, device=self.device)
        self.step = torch.zeros(self.STEP, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None  # [1, hidden], valid until the next run

    def _token(self) -> torch.Tensor:
        a = self.adapter
        hidden = self.hidden
        for i, memory in enumerate(self.layers):
            q, k, v = a.qkv(i, hidden)
            hidden = a.finish(i, hidden, memory.attend_steady(q, k, v, self.step))
        return hidden

    def run(self, hidden: torch.Tensor, step: tuple[int, ...]) -> torch.Tensor:
        """The token whose embedding is `hidden` [1, hidden] and whose steady_step is `step`: its last-layer hidden
        state [1, hidden] (a static tensor). The memories' buffers are written as `attend_steady` writes them; the
        caller advances their counters. Capturing runs the token once first (the warm-up), which writes the same
        values the replay then writes again."""
        self.hidden.copy_(hidden)
        # From pinned memory: the copy waits for nothing on the host, and the caching host allocator keeps the
        # buffer until the copy has run.
        self.step.copy_(torch.tensor(step, dtype=torch.long).pin_memory(), non_blocking=True)
        if self.graph is None:
            _warm_up(self.device, self._token)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
                self.output = self._token()
            self.graph = graph
        self.graph.replay()
        return self.output
