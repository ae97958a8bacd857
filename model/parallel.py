"""The model on several processes: tensor parallelism (TP) of its token mixers, expert parallelism (EP) of its MoE
layers, on the ranks of a torch.distributed world (NCCL on GPUs, gloo on CPU). README, "The model on several
processes".

W ranks hold the same tokens (one batch: no data parallelism); tp and ep each divide W.
- Gated DeltaNet and attention layers: the heads split over tensor-parallel groups of tp consecutive ranks (rank r
  is member r % tp of group r // tp; W / tp groups compute the same thing). A member holds H / tp consecutive
  heads (value heads, query heads) and the heads they read (key heads, KV heads), replicated over tp / Hg ranks
  when there are fewer of those (Hg) than members: the q, k, v, z, b, a projections by output rows, the conv and
  recurrent states and the KV cache with their heads, the output projection by input columns, one all_reduce
  (sum) of its output in the group.
- MoE layers: of the N tokens, rank r takes rows r * n .. (r + 1) * n - 1, n = ceil(N / W) (fewer at the end,
  maybe none), routes them with the replicated router, runs them on experts split over expert-parallel groups of
  ep consecutive ranks (`kernellab.distributed.moe_ep`; member r % ep holds experts (r % ep) E / ep ..; with ep = 1
  every rank holds all E and runs `kernellab.moe`) and on the replicated shared expert; one all_gather gives every
  rank all N rows.
- Embeddings, norms and the LM head: replicated. Every rank ends each layer with the same hidden states.

ep = tp = W splits every layer W ways; ep x tp = W is a mesh whose W / tp TP groups repeat the token mixers.
Bad input on one rank raises on every rank (`raise_together`): nothing waits in a collective.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernellab.registry import BackendUnavailable
from model.config import ModelConfig

# What raise_together re-raises by name on every rank (anything else: a RuntimeError naming its type).
_ERRORS = {error.__name__: error for error in (ValueError, FileNotFoundError, BackendUnavailable, RuntimeError)}


def split_heads(heads: int, shared: int, tp: int, member: int) -> tuple[range, range]:
    """Member `member` (0 .. tp - 1) of a tensor-parallel group: its `heads` / tp consecutive heads, and the
    shared heads they read, head h reading shared head h // (heads // shared) (a value head its key head, a query
    head its KV head). Needs tp | heads and tp | shared or shared | tp (`head_problem`): with shared < tp a shared
    head is held by tp / shared members."""
    per, group = heads // tp, heads // shared
    first = member * per
    return range(first, first + per), range(first // group, (first + per - 1) // group + 1)


def head_problem(heads: int, shared: int, tp: int, names: tuple[str, str] = ("heads", "shared heads")) -> str | None:
    """Why `split_heads(heads, shared, tp, ...)` cannot split (names: what the heads and shared heads are), or
    None."""
    if heads % tp:
        return f"does not divide the {heads} {names[0]}"
    if shared % tp and tp % shared:
        return f"neither divides nor is a multiple of the {shared} {names[1]}"
    return None


def layout_problem(cfg: ModelConfig, tp: int, ep: int, world: int | None) -> tuple[str, str] | None:
    """(argument, what is wrong; valid values) when tp / ep cannot split this model over `world` ranks (None: the
    model alone, for any world), else None. tp must divide world and split the linear-attention value heads over
    their key heads and the attention query heads over their KV heads (`head_problem`); ep must divide world and
    the expert count."""
    for name, value in (("tp", tp), ("ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return name, f"must be a positive int, got {value!r}"
    mixers = []  # (heads, shared heads, their names) of each kind of token mixer the model has
    if "linear_attention" in cfg.layer_types:
        mixers.append((cfg.linear_num_value_heads, cfg.linear_num_key_heads,
                       ("linear-attention value heads", "key heads")))
    if "full_attention" in cfg.layer_types:
        mixers.append((cfg.num_attention_heads, cfg.num_key_value_heads, ("attention query heads", "KV heads")))

    def tp_why(t):
        if world is not None and world % t:
            return f"does not divide the world size {world}"
        return next(filter(None, (head_problem(heads, shared, t, names) for heads, shared, names in mixers)), None)

    def ep_why(e):
        if world is not None and world % e:
            return f"does not divide the world size {world}"
        return f"does not divide the {cfg.num_experts} experts" if cfg.num_experts % e else None

    most = world or max([cfg.num_experts] + [heads for heads, _, _ in mixers])
    for name, value, why in (("tp", tp, tp_why), ("ep", ep, ep_why)):
        if (problem := why(value)) is not None:
            valid = ", ".join(str(v) for v in range(1, most + 1) if why(v) is None)
            return name, f"{name} = {value} {problem}; valid{f' with {world} processes' if world else ''}: {valid}"
    return None


@dataclass(frozen=True)
class Layout:
    """This rank's place in the split (module docstring): world W, rank, tp, ep and the process groups of its
    TP group (None when tp = 1: no all_reduce) and EP group (None when ep = 1: all experts here)."""

    world: int
    rank: int
    tp: int
    ep: int
    tp_group: object = None
    ep_group: object = None

    @classmethod
    def create(cls, tp: int, ep: int) -> Layout:
        """The layout of this process in the initialised default world; every rank must call it (it makes the
        groups, collectively)."""
        world, rank = dist.get_world_size(), dist.get_rank()

        def group_of(size):
            if size == 1:
                return None
            if size == world:
                return dist.group.WORLD
            mine = None
            for first in range(0, world, size):  # every rank makes every group, in the same order
                group = dist.new_group(list(range(first, first + size)))
                mine = group if first <= rank < first + size else mine
            return mine

        tp_group = group_of(tp)
        return cls(world, rank, tp, ep, tp_group, tp_group if ep == tp else group_of(ep))

    def heads(self, heads: int, shared: int) -> tuple[range, range]:
        """This rank's heads and the shared heads they read (split_heads in its TP group)."""
        return split_heads(heads, shared, self.tp, self.rank % self.tp)

    def experts(self, num_experts: int) -> range:
        """The experts this rank holds: E / ep consecutive ones, by its place in its EP group."""
        per = num_experts // self.ep
        return range(self.rank % self.ep * per, (self.rank % self.ep + 1) * per)

    def rows(self, tokens: int) -> slice:
        """This rank's rows of the N = tokens of a MoE layer: ceil(N / W) of them (fewer at the end, maybe 0)."""
        per = -(-tokens // self.world)
        return slice(min(self.rank * per, tokens), min((self.rank + 1) * per, tokens))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the TP group (in place; x itself when tp = 1): a row-parallel projection's output."""
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def gather(self, y: torch.Tensor, tokens: int) -> torch.Tensor:
        """Every rank's rows (y [rows(tokens) length, ...]) in rank order: [tokens, ...] on every rank. One
        all_gather of ceil(N / W) rows per rank (zero padded)."""
        per = -(-tokens // self.world)
        padded = y.new_zeros((per, *y.shape[1:]))
        padded[:y.shape[0]] = y
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:tokens]


def raise_together(error: BaseException | None, agreed: dict | None = None, group=None) -> None:
    """Every rank of `group` calls it with its own error (None if it has none) and the values that must be the
    same on every rank (name -> value); one all_gather_object. If any rank has an error, every rank raises the
    first one's (of its type for ValueError, FileNotFoundError, BackendUnavailable, RuntimeError; else a
    RuntimeError naming the type), naming that rank; else if a value differs, every rank raises a ValueError
    naming it with each rank's value. So a bad input on one rank stops all of them, and none is left waiting in a
    collective."""
    world = dist.get_world_size(group)
    mine = (None if error is None else (type(error).__name__, str(error)), agreed or {})
    gathered = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    for rank, (found, _) in enumerate(gathered):
        if found is not None:
            kind, message = found
            where, cause = f" (on rank {rank} of {world})", error if rank == dist.get_rank(group) else None
            if kind in _ERRORS:
                raise _ERRORS[kind](message + where) from cause
            raise RuntimeError(f"{kind}: {message}{where}") from cause
    for name in mine[1]:
        values = [repr(values.get(name)) for _, values in gathered]
        if len(set(values)) > 1:
            raise ValueError(f"{name} must be the same on every rank, got {', '.join(values)} on ranks "
                             f"0..{world - 1}")


def fingerprint(tensors) -> str:
    """A short digest of a list of tensors' shapes and values (for raise_together's agreement)."""
    digest = hashlib.sha256()
    for t in tensors:
        t = torch.as_tensor(t).cpu().contiguous()
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------- the checkpoint's shards
def checkpoint_slice(name: str, cfg: ModelConfig, layout: Layout | None) -> tuple[int, list[range]] | None:
    """The part of checkpoint tensor `name` (transformers' name) this rank holds: (dim, ranges along dim, read and
    concatenated in order), [] when it holds none of it (another rank's expert), None for all of it."""
    if layout is None:
        return None
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None  # embeddings, final norm, LM head: replicated
    kind, what = parts[3], ".".join(parts[4:])
    if kind == "linear_attn" and layout.tp > 1:
        values, keys = layout.heads(cfg.linear_num_value_heads, cfg.linear_num_key_heads)
        K, V = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        key_dim = cfg.linear_num_key_heads * K
        q, v = _scaled(keys, K), _scaled(values, V)
        qkv = [q, range(key_dim + q.start, key_dim + q.stop), range(2 * key_dim + v.start, 2 * key_dim + v.stop)]
        return {"in_proj_qkv.weight": (0, qkv), "conv1d.weight": (0, qkv), "in_proj_z.weight": (0, [v]),
                "in_proj_b.weight": (0, [values]), "in_proj_a.weight": (0, [values]), "dt_bias": (0, [values]),
                "A_log": (0, [values]), "out_proj.weight": (1, [v])}.get(what)
    if kind == "self_attn" and layout.tp > 1:
        queries, kv = layout.heads(cfg.num_attention_heads, cfg.num_key_value_heads)
        Dh = cfg.head_dim
        q, kv = [_scaled(queries, 2 * Dh)], [_scaled(kv, Dh)]  # q_proj: [q | gate] per head
        return {"q_proj.weight": (0, q), "q_proj.bias": (0, q), "k_proj.weight": (0, kv), "k_proj.bias": (0, kv),
                "v_proj.weight": (0, kv), "v_proj.bias": (0, kv), "o_proj.weight": (1, [_scaled(queries, Dh)]),
                }.get(what)  # o_proj.bias: whole (added once, after the all_reduce)
    if kind == "mlp" and parts[4] == "experts" and layout.ep > 1:
        mine = layout.experts(cfg.num_experts)
        if what in ("experts.gate_up_proj", "experts.down_proj"):
            return 0, [mine]
        if len(parts) > 5 and parts[5].isdigit():  # per-expert tensors: experts.{e}.gate_proj.weight
            return None if int(parts[5]) in mine else (0, [])
    return None


def _scaled(heads: range, size: int) -> range:
    return range(heads.start * size, heads.stop * size)


def local_shape(shape: tuple[int, ...], selection: tuple[int, list[range]] | None) -> tuple[int, ...]:
    """The shape of what `checkpoint_slice`'s selection reads of a tensor of `shape`."""
    if selection is None:
        return tuple(shape)
    dim, ranges = selection
    return (*shape[:dim], sum(len(r) for r in ranges), *shape[dim + 1:])


def read_slice(part, selection: tuple[int, list[range]]) -> torch.Tensor:
    """safetensors' lazy slice `part` (safe_open(...).get_slice(name)) read at the selection: only those rows or
    columns leave the file."""
    dim, ranges = selection
    lead = (slice(None),) * dim
    pieces = [part[lead + (slice(r.start, r.stop),)] for r in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
