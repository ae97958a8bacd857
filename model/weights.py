"""Loading a Hugging Face Qwen3.5-MoE checkpoint: safetensors only (no pickle), one file or shards with
model.safetensors.index.json. Tensors are checked by name and shape against the config, then renamed to
the lab model's parameters (a few projections fused so each runs as one GEMM). On several processes each rank
reads only its shard (model.parallel.checkpoint_slice) through safetensors' lazy slices. A checkpoint that cannot
be loaded (a truncated or garbled safetensors file, a missing tensor, a wrong shape) raises CheckpointError naming
the file; `check_files` finds it from the files' headers alone, before any tensor is read."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open as _safe_open

from model import parallel
from model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Prefixes of the checkpoint's tensors, mapped to transformers' text model (Qwen3_5MoeForCausalLM) names.
PREFIXES = (("model.language_model.", "model."),)  # the multimodal Qwen3_5MoeForConditionalGeneration
IGNORED = re.compile(r"^(mtp\.|model\.visual\.)")  # multi-token-prediction head and vision tower: unused here
# Tensors are given memory of their own at this alignment (torch's allocator's): safetensors returns them at any
# offset of the file, and MKL's GEMMs round differently (last bits) on unaligned operands, so that a model saved
# and loaded back would not give its logits bit for bit.
ALIGNMENT = 64
PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: the message names the file and what is wrong with it."""


def safe_open(path, **kwargs):
    """safetensors' safe_open, its errors (a truncated file, a garbled header) as CheckpointError naming the file."""
    try:
        return _safe_open(path, **kwargs)
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a whole safetensors file ({exc})") from None


def _stored_tensors(files: dict[str, Path], device: str | torch.device = "cpu"):
    """(path, open file, stored name, transformers' name) of every tensor of files ({stored name: its file}), each
    file opened once; CheckpointError where a file lacks a tensor the index lists."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as f:
            stored = set(f.keys())
            for name in names:
                if name not in stored:
                    raise CheckpointError(f"{path.name} does not hold tensor {name!r} (listed in {INDEX_FILE})")
                target = name
                for old, new in PREFIXES:
                    if target.startswith(old):
                        target = new + target[len(old):]
                yield path, f, name, target


def check_files(folder: str | Path, cfg: ModelConfig) -> None:
    """CheckpointError unless every safetensors file of folder opens (headers whole: safetensors checks that the
    data covers the file) and holds the text model's tensors with the config's shapes. Reads headers only."""
    folder = Path(folder)
    expected = checkpoint_shapes(cfg)
    found = {target: (tuple(f.get_slice(name).get_shape()), path.name)
             for path, f, name, target in _stored_tensors(_shard_files(folder))}
    stacked = {m.group(1) for m in map(PER_EXPERT.match, found) if m}  # per-expert tensors, fused when read
    for name, shape in expected.items():
        if name in found and found[name][0] != shape:
            raise CheckpointError(f"tensor {name!r} in {found[name][1]} has shape {found[name][0]}, expected {shape} "
                                  f"from config.json")
        if name not in found and name.rpartition(".")[0] not in stacked:
            raise CheckpointError(f"checkpoint {folder} has no tensor {name!r}")


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the text model, by transformers' name, with its shape."""
    D, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    key_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    value_dim = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    Hv, Hq, Hkv, Dh = cfg.linear_num_value_heads, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        layer = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
                 "mlp.gate.weight": (E, D), "mlp.experts.gate_up_proj": (E, 2 * I, D),
                 "mlp.experts.down_proj": (E, D, I),
                 "mlp.shared_expert.gate_proj.weight": (cfg.shared_expert_intermediate_size, D),
                 "mlp.shared_expert.up_proj.weight": (cfg.shared_expert_intermediate_size, D),
                 "mlp.shared_expert.down_proj.weight": (D, cfg.shared_expert_intermediate_size),
                 "mlp.shared_expert_gate.weight": (1, D)}
        if kind == "linear_attention":
            layer.update({"linear_attn.in_proj_qkv.weight": (2 * key_dim + value_dim, D),
                          "linear_attn.in_proj_z.weight": (value_dim, D),
                          "linear_attn.in_proj_b.weight": (Hv, D), "linear_attn.in_proj_a.weight": (Hv, D),
                          "linear_attn.conv1d.weight": (2 * key_dim + value_dim, 1, cfg.linear_conv_kernel_dim),
                          "linear_attn.dt_bias": (Hv,), "linear_attn.A_log": (Hv,),
                          "linear_attn.norm.weight": (cfg.linear_value_head_dim,),
                          "linear_attn.out_proj.weight": (D, value_dim)})
        else:
            layer.update({"self_attn.q_proj.weight": (2 * Hq * Dh, D), "self_attn.k_proj.weight": (Hkv * Dh, D),
                          "self_attn.v_proj.weight": (Hkv * Dh, D), "self_attn.o_proj.weight": (D, Hq * Dh),
                          "self_attn.q_norm.weight": (Dh,), "self_attn.k_norm.weight": (Dh,)})
            if cfg.attention_bias:
                layer.update({"self_attn.q_proj.bias": (2 * Hq * Dh,), "self_attn.k_proj.bias": (Hkv * Dh,),
                              "self_attn.v_proj.bias": (Hkv * Dh,), "self_attn.o_proj.bias": (D,)})
        shapes.update({p + name: shape for name, shape in layer.items()})
    return shapes


def _shard_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: folder / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in {index}) does not exist")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f"; found {others} without {INDEX_FILE}" if others else ""
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            hint += "; pickled weights (*.bin, *.pt) are not loaded, only safetensors"
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}{hint}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def read_checkpoint(folder: str | Path, cfg: ModelConfig, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", layout: parallel.Layout | None = None
                    ) -> dict[str, torch.Tensor]:
    """The text model's tensors by transformers' name, checked against `checkpoint_shapes(cfg)`.

    Per-expert tensors (experts.{e}.gate_proj/up_proj/down_proj) are stacked into the fused
    gate_up_proj [E, 2I, D] and down_proj [E, D, I] that transformers uses. With a layout, this rank's part of
    each tensor (model.parallel.checkpoint_slice: its heads' rows or columns, its experts), read from the file
    through get_slice: nothing else leaves it; the file's full shapes are checked first."""
    folder = Path(folder)
    files = _shard_files(folder)
    expected = checkpoint_shapes(cfg)
    tensors, origin = {}, {}
    for path, f, name, target in _stored_tensors(files, device):
        if IGNORED.match(target) or (layout is not None and cfg.tie_word_embeddings
                                     and target == "lm_head.weight"):  # a tied copy: not read on ranks
            continue
        if layout is None:
            t = f.get_tensor(name)
        else:
            t = _read_shard(f, name, target, expected, cfg, layout)
            if t is None:
                continue
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        elif t.data_ptr() % ALIGNMENT:
            t = t.clone()
        tensors[target] = t
        origin[target] = path.name
    _stack_experts(tensors, cfg, range(cfg.num_experts) if layout is None else layout.experts(cfg.num_experts))
    if layout is not None:  # this rank's shapes
        expected = {name: parallel.local_shape(shape, parallel.checkpoint_slice(name, cfg, layout))
                    for name, shape in expected.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied copy, when saved
    mine = "" if layout is None else " (this rank's shard)"
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint {folder} has no tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} in {origin.get(name, folder)} has shape {tuple(tensors[name].shape)},"
                             f" expected {shape} from config.json{mine}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint {folder} holds tensors this config does not use: {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    return tensors


def _read_shard(f, name: str, target: str, expected: dict, cfg: ModelConfig, layout: parallel.Layout):
    """This rank's part of tensor `name` (`target` once renamed) of the open file f, or None when it holds none;
    ValueError when the file's full shape is not the config's."""
    part = f.get_slice(name)
    shape = tuple(part.get_shape())
    if target in expected and shape != expected[target]:
        raise CheckpointError(f"tensor {target!r} has shape {shape}, expected {expected[target]} from config.json")
    selection = parallel.checkpoint_slice(target, cfg, layout)
    if selection is None:
        return f.get_tensor(name)
    return parallel.read_slice(part, selection) if selection[1] else None


def _stack_experts(tensors: dict[str, torch.Tensor], cfg: ModelConfig, experts: range) -> None:
    """Per-expert tensors of `experts` (all of them, or a rank's) stacked, in place."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name in [n for n in tensors if PER_EXPERT.match(n)]:
        prefix, expert, kind = PER_EXPERT.match(name).groups()
        groups.setdefault(prefix, {}).setdefault(kind, {})[int(expert)] = tensors.pop(name)
    for prefix, kinds in groups.items():
        def stack(kind):
            found = kinds.get(kind, {})
            missing = [e for e in experts if e not in found]
            if missing:
                raise CheckpointError(f"checkpoint has no tensor {prefix}.{missing[0]}.{kind}.weight")
            return torch.stack([found[e] for e in experts])
        tensors[prefix + ".gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
        tensors[prefix + ".down_proj"] = stack("down_proj")


def to_lab_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' names -> the lab model's parameters (model/model.py): drop the 'model.' prefix, fuse
    the Gated DeltaNet input projections [qkv | z | b | a] and the shared expert's [gate | up]."""
    out = {name.removeprefix("model."): t for name, t in tensors.items()}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    for i, kind in enumerate(cfg.layer_types):
        p = f"layers.{i}."
        if kind == "linear_attention":
            parts = [out.pop(f"{p}linear_attn.in_proj_{x}.weight") for x in ("qkv", "z", "b", "a")]
            out[f"{p}linear_attn.in_proj.weight"] = torch.cat(parts)
        parts = [out.pop(f"{p}mlp.shared_expert.{x}_proj.weight") for x in ("gate", "up")]
        out[f"{p}mlp.shared_expert.gate_up_proj.weight"] = torch.cat(parts)
    return out


def to_checkpoint_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The lab model's parameters -> transformers' names (the inverse of to_lab_state_dict): 'model.' prefixed,
    the Gated DeltaNet input projection split back into [qkv | z | b | a], the shared expert's [gate | up] into
    gate and up; the LM head left out when tied to the embeddings. Contiguous copies, ready for safetensors."""
    out = {}
    key_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    value_dim = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    Hv, shared = cfg.linear_num_value_heads, cfg.shared_expert_intermediate_size
    for name, t in state.items():
        p = name.rsplit("linear_attn.in_proj.weight", 1)[0] if name.endswith("linear_attn.in_proj.weight") else None
        if p is not None:
            parts = t.split([2 * key_dim + value_dim, value_dim, Hv, Hv])
            out.update({f"model.{p}linear_attn.in_proj_{x}.weight": part for x, part in zip(("qkv", "z", "b", "a"),
                                                                                           parts)})
        elif name.endswith("mlp.shared_expert.gate_up_proj.weight"):
            p = name.removesuffix("gate_up_proj.weight")
            out.update({f"model.{p}{x}_proj.weight": part for x, part in zip(("gate", "up"), t.split(shared))})
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[name] = t
        else:
            out["model." + name] = t
    return {name: t.detach().contiguous().clone() for name, t in out.items()}
