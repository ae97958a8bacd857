"""The Qwen3.5-MoE text decoder: embeddings, the layer stack of `layer_types`, final norm, LM head;
a static cache (conv + recurrent state per Gated DeltaNet layer, KV buffers per attention layer, allocated once)
and decoding of batches of prompts of any lengths (greedy, or sampled: model/sampling.py); on one process, or
split over several by tensor and expert parallelism (model/parallel.py)."""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

import kernellab
from kernellab import guard, registry
from kernellab.validate import STORED_STATE_DTYPES
from model.cache import PrefixCache
from model.config import ModelConfig
from model import graph, parallel
from model.layers import DecoderLayer, LinearAttentionState, Linear, RMSNorm, Step
from model.parallel import Layout
from model.sampling import Sampler, draft_ngram
from model.weights import read_checkpoint, to_lab_state_dict

OPS = ("gated_delta_rule", "attention", "route", "moe")


def resolve_backends(backend: str | dict, device, ops: tuple[str, ...] = OPS) -> dict[str, str]:
    """Backend name per op of `ops`. A name applies to every op that has a backend of that name ("auto"
    elsewhere); a dict {op: name} picks per op. "auto" resolves to the name it stands for on `device`."""
    if isinstance(backend, dict):
        unknown = set(backend) - set(ops)
        if unknown:
            raise ValueError(f"backend: unknown op(s) {sorted(unknown)}; the model uses {ops}")
        names = {op: backend.get(op, "auto") for op in ops}
    else:
        if backend != "auto" and not any(backend in registry.registered(op) for op in ops):
            raise ValueError(f"backend {backend!r} is not registered for any of {ops}")
        names = {op: backend if backend in registry.registered(op) else "auto" for op in ops}
    return {op: registry.auto_backend(op, device) if name == "auto" else name for op, name in names.items()}


def trusted(op: str, name: str):
    """op's backend `name` for the model's own calls, every argument by keyword in the normalised form
    kernellab.validate returns (scale a float, mode "chunk" or "recurrent", state_dtype resolved, cu_seqlens and
    kv_lens given). Outside autograd (inference, decoding) the backend's implementation runs on them directly, in
    the layout it reads (kernellab.guard): without validate's value checks, a reduction and a host read per tensor
    (an attention call's read its whole KV buffers again), on tensors the model made itself from weights checked
    at load. A call that needs gradients (training) is kernellab.get's: checked, through the backend's backward."""
    checked, backend = kernellab.get(op, name), registry.registered(op)[name]

    def call(**arguments):
        if torch.is_grad_enabled():
            return checked(**arguments)
        return backend.impl(**guard.layout(backend, arguments))

    call.__name__ = f"{op}[{name}, trusted]"
    return call


class Cache:
    """A static cache in the gpt-fast manner: buffers for `batch` rows of up to `max_len` tokens each, allocated
    once by Qwen35Moe.new_cache and updated in place (per layer a LinearAttentionState or a KVState, in `states`).

    lengths: int32 [batch] on the model's device, the tokens each row holds (read inside a decode step, so that a
    CUDA graph replays it); host_lengths: the same on the host (bounds checks, the KV window). A forward call on
    B rows uses rows 0..B-1; `keep` moves the rows still decoding to the front. static: attention reads whole
    KV buffers (fixed shapes, for CUDA graphs) instead of the longest row's keys."""

    def __init__(self, states: list, lengths: torch.Tensor, max_len: int):
        self.states = states
        self.lengths = lengths
        self.host_lengths = [0] * lengths.shape[0]
        self.max_len = max_len
        self.static = False
        self.slots, self.host_slots, self.record, self.kept = None, None, None, []

    def use(self, slots: list[int] | None, record: str | int | None = None) -> None:
        """The pool rows that the next forward calls' rows (or packed sequences) are: a list of distinct rows, or
        None (rows 0..B-1). record (with slots): None; "verify" (a verify of draft tokens: the pool's states and
        lengths stay until commit); an int C (the Gated DeltaNet states every C tokens, for a prefix cache). What
        a recording call keeps is in `kept` (model.layers.Recorded, one per Gated DeltaNet layer)."""
        if slots is None and record is not None:
            raise ValueError(f"record {record!r} needs slots")
        self.host_slots = None if slots is None else list(slots)
        self.slots = None if slots is None else torch.tensor(slots, dtype=torch.int32, device=self.lengths.device)
        self.record, self.kept = record, []

    def reset(self, slots: list[int]) -> None:
        """Empty these pool rows (a request joins): their lengths, conv and recurrent states zero; nothing else
        written (their old keys and values lie beyond length 0, never read)."""
        index = torch.tensor(slots, device=self.lengths.device)
        for s in self.states:
            if isinstance(s, LinearAttentionState):
                s.conv.index_fill_(0, index, 0)
                s.recurrent.index_fill_(0, index, 0)
        self.lengths.index_fill_(0, index, 0)
        for r in slots:
            self.host_lengths[r] = 0

    def commit(self, accepted: list[int]) -> None:
        """After a verify call (use(slots, "verify")) of T tokens per row: row b keeps its first accepted[b] >= 1
        tokens: its recurrent states become those after them (kernellab.commit_states), its conv states the last
        kernel - 1 inputs before them, its length grows by accepted[b] (the keys and values after it are then
        past its length: overwritten by the next call, never read). Rollback is the choice of index."""
        if self.record != "verify" or len(accepted) != len(self.host_slots):
            raise ValueError(f"commit: needs a verify call's {len(self.host_slots or [])} rows, got {accepted!r}")
        device = self.lengths.device
        counts = torch.tensor(accepted, device=device)
        for kept in self.kept:
            window, conv = kept.window, kept.state.conv
            B, T = window.shape[0], window.shape[1] - conv.shape[-1]
            kernellab.commit_states(kept.state.recurrent, kept.trace.states, self.slots,
                                    torch.arange(0, B * T + 1, T, device=device), counts)
            taps = counts[:, None] + torch.arange(conv.shape[-1], device=device)  # [B, kernel - 1]
            taken = window[torch.arange(B, device=device)[:, None], taps]  # [B, kernel - 1, C]
            conv.index_copy_(0, self.slots.long(), taken.transpose(1, 2))
        self.lengths.index_add_(0, self.slots, counts.to(self.lengths.dtype))
        for r, n in zip(self.host_slots, accepted):
            self.host_lengths[r] += n
        self.kept = []

    @property
    def position(self) -> int:
        """Tokens seen by the longest row (every row's, when they were fed together)."""
        return max(self.host_lengths, default=0)

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer: conv and recurrent states, keys and values, lengths."""
        return [t for s in self.states for t in vars(s).values()] + [self.lengths]

    def nbytes(self) -> int:
        """Bytes of every cache tensor (conv and recurrent states, keys and values)."""
        return sum(t.numel() * t.element_size() for s in self.states for t in vars(s).values())

    def keep(self, rows: list[int]) -> None:
        """Move rows (in this order) to the front, in place: a batch whose other sequences stopped goes on with
        rows 0..len(rows)-1. Buffers are not reallocated."""
        if rows == list(range(len(rows))):
            return
        index = torch.tensor(rows, device=self.lengths.device)
        for t in self.tensors():
            t[:len(rows)] = t[index]
        self.host_lengths[:len(rows)] = [self.host_lengths[r] for r in rows]


class Qwen35Moe(nn.Module):
    """input_ids [B, T] -> logits [B, T, vocab].

    layout: None (the whole model here), or this rank's place in a split over several processes
    (model/parallel.py): its layers then hold its heads and experts, and every rank must make the same calls
    (forward, generate, stream) with the same arguments; they raise together when one rank's differ."""

    def __init__(self, cfg: ModelConfig, backends: dict[str, str], state_dtype: torch.dtype | None = None,
                 layout: Layout | None = None):
        super().__init__()
        self.config = cfg
        self.backends = backends
        self.layout = layout
        ops = SimpleNamespace(**{op: trusted(op, name) for op, name in backends.items()})
        if layout is not None and layout.ep > 1:  # the experts of the EP group, on the moe backend chosen
            from kernellab.distributed import moe_ep

            ops.moe = functools.partial(moe_ep, group=layout.ep_group, backend=backends["moe"],
                                        num_experts=cfg.num_experts)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind, ops, layout) for kind in cfg.layer_types)
        for layer in self.layers:
            if layer.kind == "linear_attention":
                layer.linear_attn.state_dtype = state_dtype
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def rope(self, positions: torch.Tensor):
        """cos, sin [..., rotary_dim] (float32) at positions int [...] (as transformers computes them)."""
        dim = self.config.rotary_dim
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float,
                                                                 device=positions.device) / dim)
        freqs = positions[..., None].float() * inv_freq
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()

    def new_cache(self, batch: int, max_len: int) -> Cache:
        """An empty static cache for `batch` sequences of up to `max_len` tokens each."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} is more than the model's max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        return Cache([layer.linear_attn.new_state(batch, dtype, device) if layer.kind == "linear_attention"
                      else layer.self_attn.new_state(batch, max_len, dtype, device) for layer in self.layers],
                     torch.zeros(batch, dtype=torch.int32, device=device), max_len)

    def step(self, B: int, T: int, cache: Cache | None, cu_seqlens: torch.Tensor | None) -> Step:
        """The Step of T new tokens in each of B rows (or N packed sequences, B = 1) continuing `cache`. With a
        layout, every rank checks with the others that they run the same shapes (raise_together)."""
        if self.layout is None:
            return self._step(B, T, cache, cu_seqlens)
        step, error = None, None
        try:
            step = self._step(B, T, cache, cu_seqlens)
        except ValueError as e:
            error = e
        packed = None if not isinstance(cu_seqlens, torch.Tensor) else cu_seqlens.tolist()
        parallel.raise_together(error, {"input_ids' shape": (B, T), "cu_seqlens": packed,
                                        "the cache's lengths": None if cache is None else cache.host_lengths[:B]})
        return step

    def _step(self, B: int, T: int, cache: Cache | None, cu_seqlens: torch.Tensor | None) -> Step:
        device = self.embed_tokens.weight.device
        arange = torch.arange(T, device=device)
        pool = {} if cache is None or cache.slots is None else dict(
            slots=cache.slots, record=cache.record, kept=cache.kept,
            first_slot=cache.host_slots[0] if cache.host_slots == list(range(cache.host_slots[0],
                                                                               cache.host_slots[0] + B)) else None)
        if cu_seqlens is not None:
            lengths = _check_packed(cu_seqlens, B, T, cache)
            cu = cu_seqlens.to(device=device, dtype=torch.int32)
            rows = torch.searchsorted(cu[1:], arange, right=True)  # the sequence of each token
            positions = (arange - cu[rows])[None]
            return Step(self.rope(positions), cu, positions, rows if not pool else cache.slots.long()[rows],
                        fresh=True, **pool,
                        kv_lens=None if cache is None else torch.tensor(lengths, dtype=torch.int32, device=device))
        if cache is None:
            return Step(self.rope(arange[None]), positions=arange[None])
        rows = _rows(cache, B)
        if pool and len(rows) != B:
            raise ValueError(f"input_ids has {B} rows, the cache's slots {len(rows)}")
        if B > len(cache.host_lengths):
            raise ValueError(f"input_ids has {B} rows, the cache {len(cache.host_lengths)}")
        longest = max(cache.host_lengths[r] for r in rows)
        if longest + T > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions per row; {T} more tokens after "
                             f"{longest} would need {longest + T}")
        lengths = cache.lengths[:B] if not pool else cache.lengths[cache.slots]
        positions = lengths[:, None] + arange
        fresh = not cache.static and longest == 0
        return Step(self.rope(positions), positions=positions, kv_lens=lengths + T, fresh=fresh,
                    window=cache.max_len if cache.static else longest + T, **pool)

    def hidden_states(self, input_ids, cache: Cache | None = None, cu_seqlens: torch.Tensor | None = None):
        """input_ids [B, T] -> final-norm hidden states [B, T, D]; continues and advances `cache` when given (each
        row from its own length). cu_seqlens int [N + 1] with B = 1: N packed sequences, each on its own (into
        cache rows 0..N-1, which must be empty)."""
        B, T = input_ids.shape
        step = self.step(B, T, cache, cu_seqlens)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, step, None if cache is None else cache.states[i])
        if cache is not None:
            _advance(cache, step, B, T)
        return self.norm(x)

    def forward(self, input_ids, cache: Cache | None = None, cu_seqlens: torch.Tensor | None = None):
        """input_ids [B, T] (or [1, T] of packed sequences with cu_seqlens) -> logits [B, T, vocab]. Without a
        cache it is differentiable (training: gradients through the ops' backends, which need a backward), on one
        process (with a layout it runs without gradients: the collectives are outside autograd); with one it
        decodes, under inference_mode."""
        if cache is not None:
            with torch.inference_mode():
                return self.lm_head(self.hidden_states(input_ids, cache, cu_seqlens))
        with torch.no_grad() if self.layout is not None else contextlib.nullcontext():
            return self.lm_head(self.hidden_states(input_ids, None, cu_seqlens))

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, eos_token_id=None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 cuda_graph: bool = False, max_batch: int | None = None, prefix_cache=False, speculative: int = 0,
                 draft: str = "ngram", stats: dict | None = None):
        """Decode: one prefill (packed when the prompts' lengths differ), then one token at a time per sequence.

        input_ids: a tensor [B, T] -> a tensor [B, T + max_new_tokens] (a row that stops at EOS is padded with
        eos_token_id after it); or a list of 1-D token sequences of any lengths -> a list of 1-D int64 tensors,
        each prompt followed by its new tokens (EOS included). max_new_tokens: an int, or one per sequence.
        Greedy unless temperature > 0 (then top_k, top_p and seed apply: model.sampling.sample). max_batch,
        prefix_cache, speculative, draft, stats: as stream's."""
        tensor_in = isinstance(input_ids, torch.Tensor)
        if tensor_in and input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T] or a list of 1-D sequences, got shape "
                             f"{tuple(input_ids.shape)}")
        prompts = list(input_ids)
        new = [[] for _ in prompts]
        for index, token in self.stream(prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, seed,
                                        cuda_graph, max_batch, prefix_cache, speculative, draft, stats):
            new[index].append(token)
        device = self.embed_tokens.weight.device
        out = [torch.cat([torch.as_tensor(p, dtype=torch.int64).to(device), torch.tensor(n, dtype=torch.int64,
                                                                                       device=device)])
               for p, n in zip(prompts, new)]
        if not tensor_in:
            return out
        width = max(len(o) for o in out)
        fill = _first(eos_token_id)
        return torch.stack([torch.cat([o, o.new_full((width - len(o),), fill)]) for o in out]).to(input_ids.dtype)

    @torch.inference_mode()
    def stream(self, prompts, max_new_tokens, eos_token_id=None, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, cuda_graph: bool = False,
               max_batch: int | None = None, prefix_cache=False, speculative: int = 0, draft: str = "ngram",
               stats: dict | None = None):
        """Yields (sequence index, token id) as each new token is chosen, for a batch of prompts of any lengths
        (a list of 1-D token sequences): a prefill, then decode steps on the sequences still going. A sequence
        stops after its own max_new_tokens (an int, or one per prompt) or at eos_token_id (an int or a list);
        the others go on in a batch without it. cuda_graph: the decode step replays a CUDA graph (model.graph).

        Requests live in a state pool (Cache.use): each sequence holds a slot (its rows of the conv, recurrent and
        KV buffers) from its prefill to its last token; the gated delta rule reads and writes the slots in place
        (state_indices), a sequence that stops frees its slot and no other row moves. (Without a gated_delta_rule
        backend that takes state_indices, or with cuda_graph, the sequences still going move to rows 0..n-1:
        Cache.keep.) max_batch: at most this many sequences decode at once; the others wait and join the running
        batch as slots free (None: all at once). prefix_cache: True (the model's own model.cache.PrefixCache,
        kept across calls: m.prefixes) or a PrefixCache: a prompt whose prefix was prefilled before starts from
        the states at the last chunk boundary inside the shared prefix and that prefix's keys and values, and
        prefills the rest. speculative: T > 0 drafts up to T tokens per sequence and step (draft "ngram": prompt
        lookup, model.sampling.draft_ngram), verifies them in one call and keeps the longest prefix that greedy
        decoding gives, plus the token after it (greedy only). Each gives plain greedy decoding's tokens.
        stats: a dict that receives counts: steps (model calls after the prefills), drafted and accepted (draft
        tokens), prefilled (prompt tokens prefilled) and reused (prompt tokens a prefix cache hit saved)."""
        serving = (max_batch, prefix_cache, speculative, draft)
        if self.layout is None:
            checked = self._check_stream(prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, seed,
                                         cuda_graph, *serving)
        else:  # every rank checks its arguments, then all raise if one rank's are bad or differ
            checked, error = None, None
            try:
                checked = self._check_stream(prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, seed,
                                             cuda_graph, *serving)
            except ValueError as e:
                error = e
            agreed = {} if checked is None else {"prompts": parallel.fingerprint(checked[0]),
                                                 "max_new_tokens": checked[1], "eos_token_id": sorted(checked[2]),
                                                 "sampling": (temperature, top_k, top_p, seed),
                                                 "serving": (max_batch, bool(prefix_cache), speculative, draft)}
            parallel.raise_together(error, agreed)
        prompts, budgets, stops, sampler, prefix = checked
        waiting = collections.deque(i for i in range(len(prompts)) if budgets[i] > 0)
        if not waiting:
            return
        width = len(waiting) if max_batch is None else min(max_batch, len(waiting))
        # + speculative: a row padded to another's longer draft feeds up to that many positions past its budget
        cache = self.new_cache(width, max(len(prompts[i]) + budgets[i] for i in waiting) + speculative)
        pooled = not cuda_graph and self._pool_backend()
        decode = graph.DecodeGraph(self, cache) if cuda_graph else None
        free, active = list(range(width)), []  # active: [sequence index, slot, the token to feed next]
        made = [0] * len(prompts)
        context = {i: prompts[i].tolist() for i in waiting} if speculative else None  # the drafts' source
        counts = {} if stats is None else stats
        counts.update(dict.fromkeys(("steps", "drafted", "accepted", "prefilled", "reused"), 0))
        while waiting or active:
            chosen = []  # (row of active, its new tokens)
            if active:
                chosen = list(enumerate(self._next_tokens(cache, active, sampler, pooled, decode, speculative,
                                                          budgets, made, context, counts)))
            if waiting and free:
                joining = []
                while waiting and free:
                    joining.append([waiting.popleft(), free.pop(0), None])
                logits = self._admit(cache, [prompts[i] for i, _, _ in joining], [s for _, s, _ in joining],
                                     pooled, prefix, counts)
                chosen += [(len(active) + r, [t]) for r, t in enumerate(self._sample(sampler, logits).tolist())]
                active += joining
            going = []
            for row, tokens in chosen:
                index = active[row][0]
                for token in tokens:
                    made[index] += 1
                    yield index, token
                    if made[index] == budgets[index] or token in stops:
                        free.append(active[row][1])
                        break
                else:
                    active[row][2] = tokens[-1]
                    if context is not None:
                        context[index] += tokens
                    going.append(row)
            if not pooled and len(going) < len(active):
                cache.keep(going)
                active = [[active[r][0], n, active[r][2]] for n, r in enumerate(going)]
            else:
                active = [active[r] for r in going]
            free.sort()

    def _sample(self, sampler, logits):
        """Tokens [n] from logits [n, vocab]; with a layout, rank 0's (the ranks' logits agree; its tokens make sure
        their decisions do)."""
        tokens = sampler(logits)
        if self.layout is not None:
            dist.broadcast(tokens, src=0)
        return tokens

    def _pool_backend(self) -> bool:
        """Whether the gated_delta_rule backend reads and writes a state pool in place (state_indices)."""
        return "state_indices" in registry.registered("gated_delta_rule")[self.backends["gated_delta_rule"]].serving

    def _admit(self, cache: Cache, prompts: list[torch.Tensor], slots: list[int], pooled: bool, prefix, counts):
        """Prefill prompts into these cache slots (emptied first): logits [N, vocab] of each one's last token."""
        counts["prefilled"] += sum(map(len, prompts))
        if pooled:
            cache.reset(slots)
        if prefix is not None:
            reused = prefix.hits
            logits = torch.cat([prefix.prefill(self, cache, p, s) for p, s in zip(prompts, slots)])
            counts["reused"] += prefix.hits - reused
            counts["prefilled"] -= prefix.hits - reused
            return logits
        cache.use(slots if pooled else None)
        return self.prefill_logits(prompts, cache)

    def _next_tokens(self, cache: Cache, active: list, sampler, pooled: bool, decode, speculative: int, budgets,
                     made, context, counts) -> list[list[int]]:
        """One step of the active sequences (active: [index, slot, token to feed]): the new tokens of each. A decode
        step gives one per sequence. With speculative T, drafts of up to T tokens (no more than a sequence may
        still make, less one) are fed after the token, verified in one call (the pool untouched), and each
        sequence keeps the tokens greedy decoding gives up to its first rejected draft: its states, conv states
        and length then commit to that many tokens (Cache.commit)."""
        feed = [token for _, _, token in active]
        drafts = [draft_ngram(context[i], min(speculative, budgets[i] - made[i] - 1)) for i, _, _ in active] \
            if speculative else []
        longest = max(map(len, drafts), default=0)
        counts["steps"] += 1
        device = self.embed_tokens.weight.device
        if longest == 0:
            cache.use([slot for _, slot, _ in active] if pooled else None)
            tokens = torch.tensor(feed, device=device)
            logits = decode(tokens) if decode else self.lm_head(self.hidden_states(tokens[:, None], cache)[:, -1])
            return [[t] for t in self._sample(sampler, logits).tolist()]
        # rows with shorter drafts are padded with their token: any draft is verified, the padding rarely kept
        ids = torch.tensor([[t, *d, *[t] * (longest - len(d))] for t, d in zip(feed, drafts)], device=device)
        cache.use([slot for _, slot, _ in active], record="verify")
        logits = self.lm_head(self.hidden_states(ids, cache))  # [B, longest + 1, vocab]
        greedy = self._sample(sampler, logits.flatten(0, 1)).view(len(active), -1).tolist()
        kept = []
        for g, d in zip(greedy, drafts):
            n = 0
            while n < len(d) and d[n] == g[n]:
                n += 1
            kept.append(g[:n + 1])
        cache.commit([len(k) for k in kept])
        counts["drafted"] += sum(map(len, drafts))
        counts["accepted"] += sum(len(k) - 1 for k in kept)
        return kept

    def _check_stream(self, prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, seed, cuda_graph,
                      max_batch=None, prefix_cache=False, speculative=0, draft="ngram"):
        """stream's arguments checked: (prompts, budgets, stop ids, Sampler, PrefixCache or None); ValueError naming
        the bad one."""
        prefix = self._check_serving(cuda_graph, temperature, max_batch, prefix_cache, speculative, draft)
        prompts = _check_prompts(prompts, self.config.vocab_size)
        budgets = _check_budgets(max_new_tokens, len(prompts))
        stops = _check_eos(eos_token_id, self.config.vocab_size)
        if cuda_graph and self.layout is not None:
            raise ValueError("cuda_graph: a decode step is captured on one process only (moe_ep reads its split "
                             "sizes on the host)")
        sampler = Sampler(temperature, top_k, top_p, seed, self.embed_tokens.weight.device)
        longest = max(len(p) + n for p, n in zip(prompts, budgets))
        if longest > self.config.max_position_embeddings:
            worst = max(range(len(prompts)), key=lambda i: len(prompts[i]) + budgets[i])
            raise ValueError(f"prompt {worst} has {len(prompts[worst])} tokens; with max_new_tokens "
                             f"{budgets[worst]} it needs {longest} positions, more than the model's "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        return prompts, budgets, stops, sampler, prefix

    def _check_serving(self, cuda_graph, temperature, max_batch, prefix_cache, speculative, draft):
        """The pool's, prefix cache's and speculative decoding's arguments: the PrefixCache to use (or None)."""
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
        if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0:
            raise ValueError(f"speculative must be an int >= 0 (draft tokens per step; 0: off), got {speculative!r}")
        if draft != "ngram":
            raise ValueError(f"draft: the drafts known are 'ngram' (prompt lookup), got {draft!r}")
        if not isinstance(prefix_cache, (bool, PrefixCache)):
            raise ValueError(f"prefix_cache must be a bool or a model.cache.PrefixCache, got {prefix_cache!r}")
        if speculative and temperature != 0:
            raise ValueError(f"speculative: verifies drafts against greedy decoding (temperature 0), got temperature "
                             f"{temperature}")
        backend = registry.registered("gated_delta_rule")[self.backends["gated_delta_rule"]]
        for keyword, value, needs in (("max_batch", max_batch, "state_indices"),
                                      ("prefix_cache", prefix_cache, "chunk_states_every"),
                                      ("speculative", speculative, "output_intermediate_states")):
            if value is not None and value is not False and value != 0:
                if cuda_graph:
                    raise ValueError(f"{keyword}: runs on the state pool, not with cuda_graph")
                if needs not in backend.serving:
                    raise ValueError(f"{keyword}: needs a gated_delta_rule backend that takes {needs} (reference, "
                                     f"torch, mkl); the model runs {backend.name!r}")
        if prefix_cache is True:
            if getattr(self, "prefixes", None) is None:
                self.prefixes = PrefixCache()
            return self.prefixes
        return prefix_cache or None

    @torch.inference_mode()
    def prefill_logits(self, prompts: list[torch.Tensor], cache: Cache) -> torch.Tensor:
        """Prefill prompts (1-D int64, of any lengths) into cache rows 0..N-1: logits [N, vocab] of each one's last
        token. Equal lengths run as a batch [N, T]; unequal ones packed [1, sum T] by cu_seqlens (no padding)."""
        device = self.embed_tokens.weight.device
        if len({len(p) for p in prompts}) == 1:
            return self.lm_head(self.hidden_states(torch.stack(prompts).to(device), cache)[:, -1])
        cu = torch.tensor([0, *itertools.accumulate(len(p) for p in prompts)], dtype=torch.int32, device=device)
        hidden = self.hidden_states(torch.cat(prompts).to(device)[None], cache, cu_seqlens=cu)
        return self.lm_head(hidden[0, cu[1:] - 1])


def _rows(cache: Cache, count: int) -> list[int]:
    """The cache rows of a call's `count` rows (or packed sequences): its slots, or rows 0..count-1."""
    return list(range(count)) if cache.slots is None else cache.host_slots


def _advance(cache: Cache, step: Step, B: int, T: int) -> None:
    if step.record == "verify":  # the lengths grow by the tokens accepted: Cache.commit
        return
    if step.cu_seqlens is not None:
        counts = step.kv_lens.tolist()
        rows = _rows(cache, len(counts))
        if step.slots is None:
            cache.lengths[:len(counts)] = step.kv_lens
        else:
            cache.lengths.index_copy_(0, step.slots.long(), step.kv_lens)
        for r, n in zip(rows, counts):
            cache.host_lengths[r] = n
        return
    if step.slots is None:
        cache.lengths[:B] += T
    else:
        cache.lengths.index_add_(0, step.slots, torch.full_like(step.slots, T, dtype=cache.lengths.dtype))
    for r in _rows(cache, B):
        cache.host_lengths[r] += T


def _check_packed(cu_seqlens, B: int, T: int, cache: Cache | None) -> list[int]:
    """The sequences' lengths; ValueError unless cu_seqlens packs T tokens (B = 1) into empty cache rows (0..N-1,
    or the cache's slots)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype not in (torch.int32,
                                                                                                      torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32 or int64 tensor [N + 1]")
    if B != 1:
        raise ValueError(f"cu_seqlens needs input_ids [1, T] (sequences packed along time), got {B} rows")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if cache is not None:
        if len(lengths) > len(cache.host_lengths):
            raise ValueError(f"cu_seqlens holds {len(lengths)} sequences, the cache {len(cache.host_lengths)} rows")
        if cache.slots is not None and len(cache.host_slots) != len(lengths):
            raise ValueError(f"cu_seqlens holds {len(lengths)} sequences, the cache's slots {len(cache.host_slots)}")
        held = [cache.host_lengths[r] for r in _rows(cache, len(lengths))]
        if any(held):
            raise ValueError(f"cu_seqlens: packed sequences go into empty cache rows (a prefill), but rows "
                             f"{_rows(cache, len(lengths))} hold {held} tokens")
        if max(lengths) > cache.max_len:
            raise ValueError(f"cu_seqlens: a sequence of {max(lengths)} tokens, the cache holds {cache.max_len}")
    return lengths


def _check_prompts(prompts, vocab_size: int) -> list[torch.Tensor]:
    """Each prompt as a 1-D int64 CPU tensor; ValueError naming the prompt when one is empty or holds ids outside
    [0, vocab_size)."""
    if isinstance(prompts, torch.Tensor) or not prompts:
        raise ValueError("prompts must be a non-empty list of 1-D token sequences")
    out = []
    for i, prompt in enumerate(prompts):
        t = torch.as_tensor(prompt).cpu()
        if t.ndim != 1 or (t.numel() and (t.is_floating_point() or t.is_complex())):
            raise ValueError(f"prompt {i} must be a 1-D sequence of token ids, got shape {tuple(t.shape)} of "
                             f"{t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i} holds token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")
        out.append(t.to(torch.int64))
    return out


def _check_budgets(max_new_tokens, count: int) -> list[int]:
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * count
    if len(budgets) != count:
        raise ValueError(f"max_new_tokens has {len(budgets)} entries for {count} prompts")
    for n in budgets:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0 (or one per prompt), got {n!r}")
    return budgets


def _check_eos(eos_token_id, vocab_size: int) -> set[int]:
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"eos_token_id must be token ids in [0, {vocab_size}), got {eos_token_id!r}")
    return set(ids)


def _first(eos_token_id) -> int:
    """The id that pads rows after their EOS in generate's tensor output (0 without one: no row stops early)."""
    if eos_token_id is None:
        return 0
    return eos_token_id if isinstance(eos_token_id, int) else list(eos_token_id)[0]


def from_pretrained(path: str | Path, backend: str | dict = "auto", dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None, state_dtype: torch.dtype | str | None = None,
                    fp8_experts: bool = False, tp: int = 1, ep: int = 1) -> Qwen35Moe:
    """Load a Hugging Face Qwen3.5-MoE text checkpoint folder (config.json + safetensors).

    backend: a backend name for every op that has it, or {op: name} (ops: gated_delta_rule, attention,
    route, moe; moe_fp8 with fp8_experts). dtype: None keeps the checkpoint's. device: default cpu.
    state_dtype: the Gated DeltaNet layers' recurrent state in the cache (float32, bfloat16, float16; None:
    float32), as the gated delta rule's state_dtype. fp8_experts: the routed experts' weights quantized to
    float8_e4m3fn with 128 x 128 block scales at load, run by moe_fp8 (with ep = 1: moe_ep runs moe).
    tp, ep: the tensor- and expert-parallel sizes over the processes of the initialised torch.distributed world
    (model/parallel.py; each divides the world size): every rank must call from_pretrained, reads only its shard
    of the checkpoint and gets a model holding its heads and experts. tp = ep = 1: the whole model, on this
    process alone. With tp or ep > 1, a bad argument or checkpoint on any rank raises on every rank."""
    if tp == 1 and ep == 1:
        return _load(path, backend, dtype, device, state_dtype, fp8_experts, None)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"tp = {tp}, ep = {ep}: needs torch.distributed initialised (init_process_group, or "
                           f"torchrun) on every rank first")
    error = None
    try:  # the arguments and the config, before any weight is read
        cfg = ModelConfig.from_folder(_folder(path))
        if (problem := parallel.layout_problem(cfg, tp, ep, dist.get_world_size())) is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        if fp8_experts and ep > 1:
            raise ValueError(f"fp8_experts: the experts of an EP group run moe (moe_ep), not moe_fp8; needs ep = 1, "
                             f"got ep = {ep}")
    except (ValueError, FileNotFoundError) as e:
        error = e
    parallel.raise_together(error, {"tp": tp, "ep": ep, "backend": backend, "dtype": str(dtype),
                                    "state_dtype": str(state_dtype), "fp8_experts": fp8_experts})
    layout = Layout.create(tp, ep)
    m, error = None, None
    try:
        m = _load(path, backend, dtype, device, state_dtype, fp8_experts, layout)
    except Exception as e:  # noqa: BLE001 (whatever stops one rank's load stops every rank's)
        error = e
    parallel.raise_together(error)
    return m


def _folder(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    return path


def _load(path, backend, dtype, device, state_dtype, fp8_experts: bool, layout: Layout | None) -> Qwen35Moe:
    """from_pretrained's load, of this rank's shard when a layout is given. Its tensors are never inference tensors,
    even when it is called under torch.inference_mode: they keep version counters (Linear's packed copies see
    writes) and can be trained."""
    with torch.inference_mode(False):
        return _load_weights(path, backend, dtype, device, state_dtype, fp8_experts, layout)


def _load_weights(path, backend, dtype, device, state_dtype, fp8_experts: bool, layout: Layout | None) -> Qwen35Moe:
    path = _folder(path)
    device = torch.device(device or "cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state_dtype = getattr(torch, state_dtype, state_dtype) if isinstance(state_dtype, str) else state_dtype
    if state_dtype is not None and state_dtype not in STORED_STATE_DTYPES:
        raise ValueError(f"state_dtype must be None or one of float32, bfloat16, float16, got {state_dtype!r}")
    cfg = ModelConfig.from_folder(path)
    tensors = read_checkpoint(path, cfg, dtype=dtype, device=device, layout=layout)
    if dtype is None:
        dtype = tensors["model.embed_tokens.weight"].dtype
    ops = OPS + (("moe_fp8",) if fp8_experts else ())
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        m = Qwen35Moe(cfg, resolve_backends(backend, device, ops), state_dtype, layout)
    m.load_state_dict({k: v.to(dtype) for k, v in to_lab_state_dict(tensors, cfg).items()}, strict=True, assign=True)
    if fp8_experts:
        for layer in m.layers:
            layer.mlp.experts.quantize_fp8()
    return m.eval()
