"""A decode step captured as a CUDA graph (gpt-fast's trick, without torch.compile): every launch of one step
recorded once per batch size, then replayed. Possible because the cache is static: KV buffers of fixed shape
(attention reads whole buffers, masked by kv_lens), states updated in place, each row's length a device tensor
advanced inside the step, rotary positions computed from it.

Needs a CUDA device and backends that never read a tensor on the host inside a step (the triton ones; the
inputs' value checks of kernellab.validate are skipped during a capture). Not run on the CPU machines of this lab.
"""
from __future__ import annotations

import torch


class DecodeGraph:
    """decode(tokens [n] int64) -> logits [n, vocab] of one decode step of cache rows 0..n-1, by graph replay.

    The first call at each n captures: warm-up runs on a side stream (the states of those rows are saved and
    restored around them, since a step writes them in place), then one recorded step. Host lengths are advanced
    here, as the replayed step advances the device ones."""

    def __init__(self, model, cache):
        device = model.embed_tokens.weight.device
        if device.type != "cuda":
            raise ValueError(f"cuda_graph needs the model on a CUDA device, it is on {device}")
        self.model, self.cache = model, cache
        cache.static = True  # whole-buffer KV windows: the shapes a graph can replay
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _step(self, tokens):
        return self.model.lm_head(self.model.hidden_states(tokens, self.cache)[:, -1])

    def _capture(self, n: int):
        cache = self.cache
        tokens = torch.zeros(n, 1, dtype=torch.int64, device=cache.lengths.device)
        saved = [t[:n].clone() for t in cache.tensors()]
        host = list(cache.host_lengths)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # autotuning and lazy initialisation happen here, outside the capture
                self._step(tokens)
                for t, s in zip(cache.tensors(), saved):
                    t[:n].copy_(s)
                cache.host_lengths[:] = host
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step(tokens)
        # recording ran nothing on the device, but the Python side advanced the host lengths
        cache.host_lengths[:] = host
        self.graphs[n] = graph, tokens, logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        n, cache = tokens.shape[0], self.cache
        longest = max(cache.host_lengths[:n])
        if longest + 1 > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions per row; a row already holds {longest}")
        if n not in self.graphs:
            self._capture(n)
        graph, inputs, logits = self.graphs[n]
        inputs.copy_(tokens[:, None])
        graph.replay()
        cache.host_lengths[:n] = [length + 1 for length in cache.host_lengths[:n]]
        return logits
