"""The text-model configuration of a Qwen3.5-MoE checkpoint (config.json), as transformers reads it."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

TEXT_MODEL_TYPES = ("qwen3_5_moe_text",)
MULTIMODAL_MODEL_TYPES = ("qwen3_5_moe",)  # the text part lives under "text_config"
LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass
class ModelConfig:
    """Hyper-parameters of the decoder (transformers' Qwen3_5MoeTextConfig names and defaults)."""

    vocab_size: int = 248320
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    partial_rotary_factor: float = 0.25
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 8
    num_experts: int = 256
    hidden_act: str = "silu"
    layer_types: tuple[str, ...] = ()
    dtype: str | None = None  # the dtype the checkpoint was saved in, when config.json says

    def __post_init__(self):
        if not self.layer_types:  # transformers' default: every fourth layer is full attention
            self.layer_types = tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                     for i in range(self.num_hidden_layers))
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"config: layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers = {self.num_hidden_layers}")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"config: unknown layer_types {sorted(unknown)}; known: {LAYER_TYPES}")
        if self.hidden_act != "silu":
            raise ValueError(f"config: hidden_act {self.hidden_act!r} is not supported (Qwen3.5 uses 'silu')")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """From a config.json dict: model_type qwen3_5_moe_text, or qwen3_5_moe with its text_config."""
        model_type = raw.get("model_type")
        text = raw
        if model_type in MULTIMODAL_MODEL_TYPES:
            text = dict(raw.get("text_config") or {})
            text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
            text.setdefault("dtype", raw.get("dtype") or raw.get("torch_dtype"))
        elif model_type not in TEXT_MODEL_TYPES:
            raise ValueError(f"config.json: model_type {model_type!r} is not a Qwen3.5-MoE model "
                             f"(expected one of {TEXT_MODEL_TYPES + MULTIMODAL_MODEL_TYPES})")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config.json: rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in text.items() if key in known and value is not None}
        values["dtype"] = text.get("dtype") or text.get("torch_dtype")
        values["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", cls.rope_theta))
        values["partial_rotary_factor"] = rope.get("partial_rotary_factor",
                                                   text.get("partial_rotary_factor", cls.partial_rotary_factor))
        return cls(**values)

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint folder {folder}")
        return cls.from_dict(json.loads(path.read_text()))
