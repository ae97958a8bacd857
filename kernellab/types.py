"""Value types shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run on this machine or on these inputs; the message says why."""


@dataclass
class Permutation:
    """Tokens grouped by expert, as returned by `kernellab.moe_permute`.

    x:       [M, D] rows x[n] for every slot (n, j) with ids[n, j] >= 0, grouped by expert in ascending
             expert order and, within an expert, in ascending flat slot index n * top_k + j.
    offsets: int32 [E + 1]; rows offsets[e]:offsets[e + 1] belong to expert e.
    source:  int64 [M]; the flat slot index n * top_k + j of each row.
    num_tokens, top_k: the shape of the ids it was built from (N, top_k), checked by moe_unpermute.
    """

    x: torch.Tensor
    offsets: torch.Tensor
    source: torch.Tensor
    num_tokens: int
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.offsets.shape[0] - 1


class StateTrace(NamedTuple):
    """Recurrent states kept along the way by a linear attention called with output_intermediate_states=True (the
    state after every token, packed like the tokens) or chunk_states_every=C (the states after C, 2C, ... tokens of
    each sequence, in order of sequence then position). Not differentiable.

    states:   [M, Hv, K, V] in state_dtype.
    sequence: int64 [M], the sequence n each row belongs to (a batch row, or a sequence of cu_seqlens).
    position: int64 [M], the number of that sequence's tokens the state has consumed (1-based: the state after
              token position - 1).
    """

    states: torch.Tensor
    sequence: torch.Tensor
    position: torch.Tensor
