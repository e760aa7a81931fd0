"""CUDA graphs of a decoded token's dense work: the projections, norms and MLP between two layers' attention.

A decoded token on a GPU is bound by launches, not arithmetic: about 54 operators per layer, each launched from
Python, and, when it retrieves (one token in `decode_chunk`), one wait for the device per layer (retrieval's block
ids reach the host for the device cache), after which the device idles until the host launches again. Twenty of
those operators are the same every token and touch no memory state: layer i's o projection, residual, norm and
MLP, then layer i+1's norm and q/k/v projections.
`DecodeGraphs` captures that stretch once per layer boundary and replays it with one launch (54 -> 34 launches per
layer); the attention between (`LayerMemory.attend`, which retrieves, gathers and decides on the host) stays eager.

Graphs replay the kernels they captured on the same addresses: inputs are copied into static buffers, outputs
are the captured tensors, valid until the next replay of the same graph. Graph i reads the hidden state graph
i - 1 wrote, so one token is: embed into `hidden`, replay 0 (qkv of layer 0), then per layer attend, copy its output
into `attn`, replay i + 1 (finish of layer i and qkv of layer i + 1; the last replay finishes the last layer).
"""

from __future__ import annotations

import torch

from infllm.engine.adapter import DecoderAdapter


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
        # Warm-up on a side stream first, as CUDA graphs ask: cuBLAS creates its handles and workspaces then.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for i in range(len(self.adapter.layers) + 1):
                self._boundary(i, self.hidden)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()  # replayed strictly in capture order: one pool serves them all
        hidden = self.hidden
        for i in range(len(self.adapter.layers) + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._boundary(i, hidden)
            self.graphs.append(graph)
            self.outputs.append(out)
            hidden = out[0]

    def replay(self, i: int) -> tuple[torch.Tensor, ...]:
        """Run boundary i on the current `hidden` chain and `attn`; returns its outputs (static tensors)."""
        self.graphs[i].replay()
        return self.outputs[i]
