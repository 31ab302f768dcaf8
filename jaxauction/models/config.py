"""`LlamaConfig`: the hyper-parameters of a Llama-family decoder.

One frozen (hashable) dataclass describes every supported variant: Llama (1/2/3, SmolLM, TinyLlama),
Mistral-style checkpoints (optionally with a sliding attention window), Qwen2 (bias on the q, k and v
projections) and Qwen3 (RMSNorm of every query and key head, an explicit ``head_dim``). It is built
from a Hugging Face ``config.json`` dictionary or from GGUF metadata, and written back to a
``config.json`` dictionary for export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_HF_ARCHITECTURE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder-only transformer.

    Shapes used throughout the model: ``hidden_size = D``, ``num_heads = H``, ``num_kv_heads = K``
    (grouped-query attention: each key/value head serves ``H // K`` query heads), ``head_dim = hd``,
    ``intermediate_size = F`` (SwiGLU width), ``vocab_size = V``, ``num_layers = L``.

    RoPE: rotary frequencies ``theta ** (-2 i / hd)`` for ``i < hd / 2`` in the rotate-half layout of
    Hugging Face checkpoints, optionally rescaled (``rope_type`` "linear": divided by ``rope_factor``;
    "llama3": Llama 3.1's piecewise long-context rescaling).

    Qwen3 (``architecture="qwen3"``, :attr:`qk_norm`) RMS-normalises queries and keys per head over
    ``hd`` before RoPE.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)."
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"LlamaConfig.architecture={self.architecture!r} is not supported; "
                f"supported: {SUPPORTED_ARCHITECTURES}."
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"LlamaConfig.rope_type={self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}."
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"LlamaConfig.sliding_window must be None or positive, got {self.sliding_window}.")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0 or self.rope_factor <= 0:
            raise ValueError("LlamaConfig.rms_norm_eps, rope_theta and rope_factor must be positive.")
        if not isinstance(self.eos_token_ids, tuple):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def qk_norm(self) -> bool:
        """Queries and keys are RMS-normalised per head before RoPE (Qwen3)."""
        return self.architecture == "qwen3"

    @property
    def qkv_size(self) -> int:
        """Width of the fused q|k|v projection, ``(H + 2 K) * hd``."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def num_parameters(self) -> int:
        """Number of scalar weights (the tied embedding counted once)."""
        D, F, hd = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = D * self.qkv_size + self.num_heads * hd * D + 3 * D * F + 2 * D
        per_layer += self.qkv_size * self.qkv_bias + D * self.out_bias + 2 * hd * self.qk_norm
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        return self.vocab_size * D + self.num_layers * per_layer + D + head

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any], *, source: str = "config.json") -> LlamaConfig:
        """Parse a Hugging Face ``config.json`` dictionary; unsupported models raise ``ValueError``.

        ``source`` names the file in error messages.
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: model_type={model_type!r} (architectures={config.get('architectures')}) is not "
                f"supported. jaxauction.models loads Llama-family decoders: {SUPPORTED_ARCHITECTURES}."
            )
        if config.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported (no Llama-family checkpoint we load uses it).")
        if config.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"{source}: hidden_act={config['hidden_act']!r} is not supported; only 'silu' (SwiGLU).")
        if config.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"{source}: pretraining_tp={config['pretraining_tp']} is not supported; expected 1.")
        try:
            hidden_size = int(config["hidden_size"])
            num_heads = int(config["num_attention_heads"])
            fields: dict[str, Any] = dict(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=int(config.get("head_dim") or hidden_size // num_heads),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            )
        except KeyError as missing:
            raise ValueError(f"{source}: missing required key {missing.args[0]!r}.") from None
        qwen = model_type in ("qwen2", "qwen3")
        fields["rms_norm_eps"] = float(config.get("rms_norm_eps", 1e-6 if qwen else 1e-5))
        fields.update(_rope_fields(config, source))
        fields["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", model_type == "qwen2"))
        if qwen and config.get("use_sliding_window"):
            raise ValueError(f"{source}: {model_type} with use_sliding_window=true is not supported.")
        if any(kind != "full_attention" for kind in config.get("layer_types") or ()):
            raise ValueError(
                f"{source}: layer_types={config['layer_types']} is not supported; every layer must be 'full_attention'."
            )
        if model_type == "qwen2":
            fields["qkv_bias"] = True
        else:
            attention_bias = bool(config.get("attention_bias", False))
            fields["qkv_bias"] = fields["out_bias"] = attention_bias
        if model_type == "mistral" and config.get("sliding_window") is not None:
            window = int(config["sliding_window"])
            if window < fields["max_position_embeddings"]:
                fields["sliding_window"] = window
        fields["architecture"] = model_type
        fields["bos_token_id"] = config.get("bos_token_id")
        eos = config.get("eos_token_id")
        fields["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        fields["pad_token_id"] = config.get("pad_token_id")
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dictionary transformers understands for this model."""
        config: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURE_CLASSES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) > 1
            else (self.eos_token_ids[0] if self.eos_token_ids else None),
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_type != "default":
            scaling: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.rope_factor}
            if self.rope_type == "llama3":
                scaling.update(
                    low_freq_factor=self.rope_low_freq_factor,
                    high_freq_factor=self.rope_high_freq_factor,
                    original_max_position_embeddings=self.rope_original_max_position_embeddings,
                )
            config["rope_scaling"] = scaling
        if self.architecture == "qwen2":
            config["use_sliding_window"] = False
        else:
            if self.architecture == "qwen3":
                config["use_sliding_window"] = False
            config["attention_bias"] = self.qkv_bias
            config["mlp_bias"] = False
            if self.qkv_bias != self.out_bias:
                raise ValueError(
                    f"A {self.architecture} config.json cannot express qkv_bias={self.qkv_bias} with "
                    f"out_bias={self.out_bias}."
                )
        if self.architecture == "mistral":
            config["sliding_window"] = self.sliding_window
        return config

    # ------------------------------------------------------------------ GGUF metadata

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], tensor_names: Collection[str], *, source: str = "GGUF file"
    ) -> LlamaConfig:
        """Build the config from GGUF key/value metadata (llama.cpp's ``{arch}.*`` keys).

        ``tensor_names`` tells tied from untied embeddings (an untied model has ``output.weight``).
        """
        arch = metadata.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ValueError(
                f"{source}: general.architecture={arch!r} is not supported; supported GGUF architectures: "
                "('llama', 'qwen2')."
            )

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise ValueError(f"{source}: missing metadata key {arch}.{name!r}.")
            return value

        hidden_size = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        vocab = metadata.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ValueError(f"{source}: cannot tell the vocabulary size ({arch}.vocab_size missing).")
            vocab = len(tokens)
        rope_scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        if rope_scaling_type not in ("none", "linear"):
            raise ValueError(f"{source}: {arch}.rope.scaling.type={rope_scaling_type!r} is not supported.")
        head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden_size // num_heads))
        rope_dims = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ValueError(f"{source}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported.")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden_size,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(key("context_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10_000.0)),
            rope_type="linear" if rope_scaling_type == "linear" else "default",
            rope_factor=float(
                metadata.get(f"{arch}.rope.scaling.factor", 1.0) if rope_scaling_type == "linear" else 1.0
            ),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias=arch == "qwen2",
            architecture=arch,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        )


def _rope_fields(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """RoPE base and scaling from ``rope_theta``/``rope_scaling`` or transformers 5's ``rope_parameters``."""
    parameters = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**parameters, **scaling}
    theta = merged.get("rope_theta", config.get("rope_theta", 10_000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}."
        )
    fields: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type != "default":
        fields["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        fields["rope_low_freq_factor"] = float(merged["low_freq_factor"])
        fields["rope_high_freq_factor"] = float(merged["high_freq_factor"])
        fields["rope_original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return fields
