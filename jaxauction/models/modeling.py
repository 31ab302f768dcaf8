"""A Llama-family decoder in Flax NNX with a fixed-size KV cache.

Notation: batch ``B``, new tokens ``T``, cache slots ``S`` (``max_length``), layers ``L``, model width
``D``, query heads ``H``, key/value heads ``K`` (``G = H // K`` query heads share one key/value head),
head width ``hd``, SwiGLU width ``F``, vocabulary ``V``.

Each layer computes, with ``RMSNorm(x) = w * x / sqrt(mean(x**2) + eps)``::

    h = x + W_o Attention(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm_1(x)
    y = h + W_down (silu(W_gate m) * (W_up m)),                 m = RMSNorm_2(h)

with ``W_q|W_k|W_v`` fused into one ``[D, (H + 2K) hd]`` kernel laid out per key/value group
(``[D, K, G + 2, hd]``: each group's ``G`` query heads, then its key head, then its value head;
:func:`fused_qkv_columns`) and ``W_gate|W_up`` into one ``[D, 2F]`` kernel with gate and up columns
interleaved (``[D, F, 2]``; :func:`fused_gate_up_columns`): a contiguous split of the columns over
devices then gives each device whole groups and matching gate/up pairs (tensor parallelism,
:meth:`Llama.partition_specs`). Logits are ``RMSNorm(x) @ E.T`` with ``E`` the tied embedding or the
LM head.

With a cache, every layer attends to its cached slots and to the new tokens (one softmax over both);
the new keys/values are written into the cache once, after the last layer, so a donated cache is
updated in place.

Padding is on the left. A token's rotary position is the number of real tokens before it in its row,
so a left-padded row gives the same logits as the unpadded prompt. Padded query positions produce
finite, meaningless outputs (they attend with a large negative finite mask, never ``-inf``).

The methods never mutate NNX state: the cache is a plain pytree passed in and returned, so
``nnx.merge(graphdef, state).decode(...)`` works inside ``jax.jit`` and ``lax.while_loop``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from jaxauction._validation import is_concrete
from jaxauction.models.base import compiler_options
from jaxauction.models.config import LlamaConfig
from jaxauction.models.kv_cache import KVCache, init_cache

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------- RoPE


@functools.lru_cache(maxsize=32)
def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """``[hd / 2]`` float32 inverse frequencies ``theta ** (-2 i / hd)``, rescaled per ``config.rope_type``.

    Computed in float32 exactly like transformers' ``_compute_default_rope_parameters`` (and its
    ``linear`` and ``llama3`` variants) so positions far into the context agree bit for bit.
    """
    hd = config.head_dim
    exponents = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if config.rope_type == "linear":
        inv_freq = (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    elif config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_context = config.rope_original_max_position_embeddings
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    inv_freq.setflags(write=False)
    return inv_freq


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``cos, sin: [..., hd / 2]`` of ``positions[..., None] * inv_freq`` (float32)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. ``x: [B, T, N, hd]``, ``cos, sin: [B, T, hd / 2]``.

    ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` with ``x1, x2`` the two halves of the head.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ---------------------------------------------------------------------------------------- fused layouts


def fused_qkv_columns(config: LlamaConfig) -> np.ndarray:
    """``[(H + 2K) hd]`` int: column ``j`` of the fused q|k|v kernel is column ``order[j]`` of the
    concatenation ``[W_q | W_k | W_v]`` (Hugging Face order). The fused kernel is grouped per key/value
    head ``[K, G + 2, hd]``: query heads ``k G .. k G + G - 1``, key head ``k``, value head ``k``."""
    H, K, hd = config.num_heads, config.num_kv_heads, config.head_dim
    G = H // K
    heads = np.arange(H).reshape(K, G)
    blocks = np.concatenate([heads, H + np.arange(K)[:, None], H + K + np.arange(K)[:, None]], axis=1)
    return (blocks.reshape(-1, 1) * hd + np.arange(hd)).reshape(-1)


def fused_gate_up_columns(intermediate_size: int) -> np.ndarray:
    """``[2F]`` int: column ``j`` of the fused gate|up kernel is column ``order[j]`` of ``[W_gate |
    W_up]``; gate and up columns alternate (``[F, 2]``)."""
    F = intermediate_size
    return np.stack([np.arange(F), F + np.arange(F)], axis=1).reshape(-1)


# ---------------------------------------------------------------------------------------- layers


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype scores and logits are accumulated in: float32, or ``dtype`` if wider (float64). A
    bfloat16 model's attention scores and logits are never rounded to bfloat16."""
    return jnp.promote_types(dtype, jnp.float32)


class DerivedWeight(nnx.Variable):
    """An array computed from parameters (not a parameter itself: never exported or counted)."""


class RMSNorm(nnx.Module):
    """``w * x / sqrt(mean(x**2, -1) + eps)``, the mean taken in float32."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


Q4_1_BLOCK = 32
"""Weights per Q4_1 block (llama.cpp's ``Q4_1``: one float16 scale and minimum per 32 weights)."""


class QuantizedWeight(nnx.Variable):
    """Part of a block-quantized weight (packed codes, scales, minima): stored, never trained."""


def dequantize_q4_1(packed: jax.Array, scale: jax.Array, minimum: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Q4_1 blocks to a ``[..., in, out]`` kernel: ``w[i, o] = d[i // 32, o] * q[i, o] + m[i // 32, o]``.

    Args:
      packed: ``[..., in / 2, out]`` uint8, the 4-bit codes ``q`` of input rows ``2r`` (low nibble) and
        ``2r + 1`` (high nibble).
      scale, minimum: ``[..., in / 32, out]`` float16, ``d`` and ``m`` of each block of 32 input rows.
      dtype: the kernel's dtype.
    Returns:
      The kernel, computed in float32 (``d * q`` is exact there, so the result is bit for bit what
      ``gguf.quants.dequantize`` gives), then cast to ``dtype``.
    """
    codes = jnp.stack([packed & 15, packed >> 4], axis=-2)  # [..., in / 2, 2, out]
    codes = codes.reshape(*packed.shape[:-2], -1, Q4_1_BLOCK, packed.shape[-1]).astype(jnp.float32)
    d = scale.astype(jnp.float32)[..., None, :]
    m = minimum.astype(jnp.float32)[..., None, :]
    kernel = d * codes + m  # [..., in / 32, 32, out]
    return kernel.reshape(*packed.shape[:-2], -1, packed.shape[-1]).astype(dtype)


class Linear(nnx.Module):
    """``x @ kernel (+ bias)``, ``kernel: [in, out]``.

    With ``quantization="q4_1"`` the kernel is held as Q4_1 blocks (``packed``, ``scale``, ``minimum``;
    :func:`dequantize_q4_1`), 0.625 bytes per weight instead of 4, and dequantized on every call: in
    the model's layer scan that replaces the copy of each layer's float32 weights out of the stack
    with reading about a sixth of the bytes (docs/performance.md). ``kernel`` is then None.
    """

    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs, quantization=None
    ):
        scale = 1.0 / math.sqrt(in_features)
        self.dtype = dtype
        if quantization is None:
            self.kernel = nnx.Param(scale * jax.random.normal(rngs.params(), (in_features, out_features), dtype))
        elif quantization == "q4_1":
            if in_features % Q4_1_BLOCK:
                raise ValueError(f"Q4_1 weights need in_features divisible by {Q4_1_BLOCK}, got {in_features}.")
            blocks = (in_features // Q4_1_BLOCK, out_features)
            self.kernel = None
            self.packed = QuantizedWeight(jax.random.bits(rngs.params(), (in_features // 2, out_features), jnp.uint8))
            self.scale = QuantizedWeight(jnp.full(blocks, scale / 4, jnp.float16))
            self.minimum = QuantizedWeight(jnp.full(blocks, -7.5 * scale / 4, jnp.float16))
        else:
            raise ValueError(f"quantization must be None or 'q4_1', got {quantization!r}.")
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def weight(self) -> jax.Array:
        """The ``[in, out]`` kernel (dequantized if held quantized)."""
        if self.kernel is not None:
            return self.kernel[...]
        return dequantize_q4_1(self.packed[...], self.scale[...], self.minimum[...], self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Accumulated (and, split over devices, summed) in float32 or wider, rounded once to x's dtype.
        y = jnp.dot(x, self.weight(), preferred_element_type=accumulation_dtype(x.dtype)).astype(x.dtype)
        return y if self.bias is None else y + self.bias[...]


def attend(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    new_mask: jax.Array,
    old: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Grouped-query softmax attention over cached keys (``old``) and the new tokens' own keys.

    ``softmax(q k^T / sqrt(hd))`` over the union of the allowed cached slots and the allowed new
    tokens, then the weighted sum of their values; one softmax, as if the keys were concatenated.

    Args:
      q: ``[B, T, K, G, hd]`` queries of the new tokens. k_new, v_new: ``[B, T, K, hd]``.
      new_mask: ``[B, T, T]`` bool, query ``t`` may attend to new token ``t'``.
      old: None, or ``(k_old, v_old, old_mask)`` with ``k_old: [B, K, hd, S]``, ``v_old: [B, K, S, hd]``
        (cache slots, see :class:`KVCache`) and ``old_mask: [B, T, S]``.
    Returns:
      ``[B, T, K * G * hd]``. A query with no allowed key gets the mean of the values (finite).
    """
    B, T = q.shape[:2]
    if T == 1 and old is not None:
        return _attend_one(q[:, 0], k_new[:, 0], v_new[:, 0], new_mask[:, 0, 0], *old)[:, None]
    scale, wide = q.shape[-1] ** -0.5, accumulation_dtype(q.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_new, preferred_element_type=wide) * scale
    scores = jnp.where(new_mask[:, None, None], scores, _MASK_VALUE)
    if old is None:
        weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v_new)
        return out.reshape(B, T, -1)
    k_old, v_old, old_mask = old
    old_scores = jnp.einsum("btkgd,bkds->bkgts", q, k_old.astype(q.dtype), preferred_element_type=wide) * scale
    old_scores = jnp.where(old_mask[:, None, None], old_scores, _MASK_VALUE)
    weights = jax.nn.softmax(jnp.concatenate([old_scores, scores], axis=-1), axis=-1).astype(q.dtype)
    S = v_old.shape[2]
    out = jnp.einsum("bkgts,bksd->btkgd", weights[..., :S], v_old.astype(q.dtype))
    out = out + jnp.einsum("bkgts,bskd->btkgd", weights[..., S:], v_new)
    return out.reshape(B, T, -1)


def _attend_one(q, k_new, v_new, self_allowed, k_old, v_old, old_mask) -> jax.Array:
    """Decoding: one query per row. ``q: [B, K, G, hd]``, ``k_new, v_new: [B, K, hd]``,
    ``self_allowed: [B]``, ``k_old: [B, K, hd, S]``, ``v_old: [B, K, S, hd]``, ``old_mask: [B, 1, S]``
    -> ``[B, K * G * hd]``.

    The new token's own key enters the softmax separately (so the cache is only read here and
    written once after all layers). The two cached products are batched matrix products over
    ``(B, K)``: ``[G, hd] @ [hd, S]`` and ``[G, S] @ [S, hd]``. On XLA:CPU they run about 1.8x faster
    than broadcast multiply-and-sums, which XLA rewrites into windowed tree reductions for sums of 32
    entries or more (docs/performance.md).
    """
    scale, wide = q.shape[-1] ** -0.5, accumulation_dtype(q.dtype)
    old_scores = jnp.einsum("bkgd,bkds->bkgs", q, k_old.astype(q.dtype), preferred_element_type=wide) * scale
    old_scores = jnp.where(old_mask[:, 0, None, None, :], old_scores, _MASK_VALUE)
    self_scores = jnp.sum(q.astype(wide) * k_new[:, :, None, :].astype(wide), axis=-1) * scale
    self_scores = jnp.where(self_allowed[:, None, None], self_scores, _MASK_VALUE)  # [B, K, G]
    peak = jnp.maximum(old_scores.max(axis=-1), self_scores)
    old_weights = jnp.exp(old_scores - peak[..., None])
    self_weights = jnp.exp(self_scores - peak)
    total = old_weights.sum(axis=-1) + self_weights
    out = jnp.einsum("bkgs,bksd->bkgd", old_weights.astype(q.dtype), v_old.astype(q.dtype))
    out = (out + self_weights.astype(q.dtype)[..., None] * v_new[:, :, None, :]) / total.astype(q.dtype)[..., None]
    return out.reshape(out.shape[0], -1)


class Attention(nnx.Module):
    """Grouped-query self-attention with fused q|k|v projection and RoPE.

    With ``config.qk_norm`` (Qwen3) every query and key head is RMS-normalised over its ``hd``
    entries (one ``[hd]`` weight for all query heads, one for all key heads) before RoPE.
    """

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, quantization=None):
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        linear = functools.partial(Linear, dtype=dtype, rngs=rngs, quantization=quantization)
        self.qkv_proj = linear(config.hidden_size, config.qkv_size, use_bias=config.qkv_bias)
        self.o_proj = linear(config.num_heads * config.head_dim, config.hidden_size, use_bias=config.out_bias)
        norm = functools.partial(RMSNorm, config.head_dim, config.rms_norm_eps, dtype=dtype)
        self.q_norm = norm() if config.qk_norm else None
        self.k_norm = norm() if config.qk_norm else None

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x: [B, T, D]`` -> ``q: [B, T, K, G, hd]``, ``k, v: [B, T, K, hd]`` (q and k normalised if
        ``qk_norm``, then rotated)."""
        B, T, _ = x.shape
        H, K, hd = self.num_heads, self.num_kv_heads, self.head_dim
        G = H // K
        qkv = self.qkv_proj(x).reshape(B, T, K, G + 2, hd)  # per group: G query heads, key, value
        q, k, v = qkv[..., :G, :].reshape(B, T, H, hd), qkv[..., G, :], qkv[..., G + 1, :]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.reshape(B, T, K, G, hd), k, v


class MLP(nnx.Module):
    """SwiGLU: ``W_down (silu(W_gate x) * W_up x)`` with ``W_gate|W_up`` fused as ``[D, 2F]``, gate
    and up columns alternating (:func:`fused_gate_up_columns`)."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, quantization=None):
        self.intermediate_size = config.intermediate_size
        linear = functools.partial(Linear, use_bias=False, dtype=dtype, rngs=rngs, quantization=quantization)
        self.gate_up_proj = linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = self.gate_up_proj(x).reshape(*x.shape[:-1], self.intermediate_size, 2)
        gate, up = gate_up[..., 0], gate_up[..., 1]
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: attention then SwiGLU, each with a residual connection."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, quantization=None):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.attention = Attention(config, dtype=dtype, rngs=rngs, quantization=quantization)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs, quantization=quantization)

    def __call__(self, x, cos, sin, new_mask, old=None):
        """One block.

        Args:
          x: ``[B, T, D]``. cos, sin: ``[B, T, hd / 2]``. new_mask: ``[B, T, T]`` bool.
          old: None or ``(k_old, v_old, old_mask)``, this layer's cache (``k_old: [B, K, hd, S]``,
            ``v_old: [B, K, S, hd]``) and ``[B, T, S]``.
        Returns:
          ``(y [B, T, D], k [B, T, K, hd], v [B, T, K, hd])``: the new tokens' keys/values to cache.
        """
        q, k, v = self.attention.project(self.input_norm(x), cos, sin)
        h = x + self.attention.o_proj(attend(q, k, v, new_mask, old))
        return h + self.mlp(self.post_attention_norm(h)), k, v


# ---------------------------------------------------------------------------------------- model


def _new_token_mask(mask: jax.Array, positions: jax.Array, window) -> jax.Array:
    """``[B, T, T]``: new token ``t'`` is real, not after ``t``, and inside the sliding window."""
    T = mask.shape[1]
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]
    if window is not None:
        allowed &= (positions[:, :, None] - positions[:, None, :]) < window
    return allowed


def _cached_slot_mask(valid: jax.Array, positions: jax.Array, window) -> jax.Array:
    """``[B, T, S]``: cached slot ``s`` holds a real token inside the query's sliding window.

    Cached slots all precede the new tokens, so causality holds; a slot's rotary position is the
    number of real tokens before it, ``cumsum(valid) - 1``.
    """
    allowed = jnp.broadcast_to(valid[:, None, :], (valid.shape[0], positions.shape[1], valid.shape[1]))
    if window is not None:
        slot_positions = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        allowed &= (positions[:, :, None] - slot_positions[:, None, :]) < window
    return allowed


def _stacked_layers(config: LlamaConfig, dtype, rngs: nnx.Rngs, quantization) -> DecoderLayer:
    """``L = config.num_layers`` decoder layers as one :class:`DecoderLayer` whose weights have a
    leading layer axis ``[L, ...]`` (each layer initialised from its own split of ``rngs``)."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, dtype=dtype, rngs=rngs, quantization=quantization)

    return create(rngs)


class Llama(nnx.Module):
    """Llama-family causal language model (Llama, Mistral-style, Qwen2, Qwen3); it implements
    :class:`jaxauction.models.base.LanguageModel`, the engine's view of a model.

    Called outside a JAX transformation, ``__call__``/``prefill``/``decode`` run jit-compiled (one
    compilation per shape; the cache is not donated). Inside ``jax.jit`` they are traced inline.

    Example::

        model, tokenizer = jaxauction.models.load()           # bundled SmolLM2-135M-Instruct
        batch = tokenizer(["Hello", "Hi there"], padding=True, return_tensors="np")  # left padding
        logits = model(batch["input_ids"], batch["attention_mask"])   # [B, T, V]

        cache = model.init_cache(batch_size=2, max_length=64)
        logits, cache = model.prefill(batch["input_ids"], batch["attention_mask"], cache)  # [B, V]
        for _ in range(8):
            logits, cache = model.decode(logits.argmax(-1), cache)    # [B, V]

    For hot loops use ``CompiledLlama(model)`` (weights split once, the cache donated) or your own
    ``jax.jit`` over ``nnx.merge(graphdef, state).decode``.

    ``quantization="q4_1"`` holds the layers' projection kernels as Q4_1 blocks (:class:`Linear`), as
    the loader does for a GGUF file whose layers are Q4_1 (the bundled model); the computation stays
    in ``dtype``. Pass :func:`compiler_options` to your own ``jax.jit`` of such a model: with XLA's
    default CPU options (YNNPACK fusions) its decode step measured 2.4x slower than a float32 model's,
    with them 1.35x faster at 4 rows (docs/performance.md).
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, quantization: str | None = None):
        self.config = config
        self.dtype = dtype
        self.quantization = quantization
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = _stacked_layers(config, dtype, rngs, quantization)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nnx.Param(jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), dtype) * 0.02)
        )
        self.head_transposed = DerivedWeight(jnp.zeros((config.hidden_size, config.vocab_size), dtype))
        self.refresh_derived_weights()

    def refresh_derived_weights(self) -> None:
        """Recompute ``head_transposed`` (``[D, V]``) from the LM head; call after editing the head/embedding."""
        head = self.embedding if self.lm_head is None else self.lm_head
        self.head_transposed[...] = jnp.asarray(head[...]).T

    # -------------------------------------------------------------- pieces

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """``[...]`` int -> ``[..., D]``."""
        return jnp.take(self.embedding[...], token_ids, axis=0)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[..., D]`` -> ``[..., V]`` float32 (float64 for a float64 model): final RMSNorm, then
        ``hidden @ head.T`` (head: the tied embedding or the LM head, ``[V, D]``) accumulated in float32
        whatever the model's dtype (the logits feed the mechanism, which runs in float32), computed
        with its ``[D, V]`` copy ``head_transposed``: on XLA:CPU (2-core x86, V = 49152, D = 576) the product with the transposed ``[V, D]`` operand measured 2-3x slower
        from 8 to 256 rows (24 against 10 ms at 8 rows) and 18-30x slower at 2 and 4 rows.
        """
        head = self.head_transposed[...]
        return jnp.dot(self.final_norm(hidden), head, preferred_element_type=accumulation_dtype(head.dtype))

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty ``KVCache`` for ``batch_size`` rows of up to ``max_length`` tokens (model dtype by default)."""
        return init_cache(self.config, batch_size, max_length, self.dtype if dtype is None else dtype)

    # -------------------------------------------------------------- forward passes

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits of every position without a cache.

        Args:
          input_ids: ``[B, T]`` int, left-padded. attention_mask: ``[B, T]`` (1 = real token); all ones if None.
        Returns:
          ``[B, T, V]`` logits (finite but meaningless at padded positions).
        """
        input_ids = jnp.asarray(input_ids)
        _check_tokens(input_ids, 2, "input_ids")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {T} tokens, more than the model's context max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate the prompt."
            )
        mask = _as_mask(attention_mask, input_ids.shape)
        if is_concrete(input_ids, mask, self.embedding[...]):  # eager: one compiled program, not op by op
            return _compiled("forward", False)(*nnx.split(self), input_ids, mask)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        x, _, _ = self._layers(input_ids, positions, mask, None)
        return self.logits(x)

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Run ``T`` new tokens through the model and write them into slots ``index .. index + T - 1``.

        Usually the cache is empty; a non-empty cache is continued (chunked prefill). Rotary positions
        continue from ``cache.positions`` and count only real tokens.

        Args:
          input_ids: ``[B, T]`` int, left-padded. attention_mask: ``[B, T]`` (1 = real); all ones if None.
          cache: a ``KVCache`` with ``index + T <= max_length``.
        Returns:
          ``(logits [B, V] of the last position, cache)``.
        Raises:
          ValueError if ``T`` exceeds the cache length, or (when the cache index is concrete, outside jit)
          if ``index + T`` does. Inside jit an overflowing write is clamped by ``dynamic_update_slice``
          (earlier slots get overwritten), so size the cache beforehand.
        """
        input_ids = jnp.asarray(input_ids)
        _check_tokens(input_ids, 2, "input_ids")
        B, T = input_ids.shape
        _check_cache(cache, B, self.config)
        if T > cache.max_length:
            raise ValueError(
                f"input_ids has {T} tokens but the cache holds max_length={cache.max_length}; "
                "truncate the prompt or allocate a longer cache with init_cache."
            )
        if is_concrete(cache.index) and int(cache.index) + T > cache.max_length:
            raise ValueError(
                f"cache.index={int(cache.index)} plus {T} new tokens exceeds max_length={cache.max_length}."
            )
        mask = _as_mask(attention_mask, input_ids.shape)
        if is_concrete(input_ids, mask, cache, self.embedding[...]):  # eager: one compiled program, not op by op
            return _compiled("prefill", False)(*nnx.split(self), input_ids, mask, cache)
        positions = cache.positions[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        return self._step(input_ids, positions, mask, cache)

    def decode(self, token_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One decoding step for the cache's first ``R`` rows: each token is written at slot ``index``
        with rope position ``positions``.

        Args:
          token_ids: ``[R]`` int, ``R <= B`` (usually every row). cache: a ``KVCache`` of ``B`` rows with
            ``index < max_length``; rows ``R ..`` are neither read nor written (their slot at ``index``
            stays invalid).
        Returns:
          ``(logits [R, V], cache)`` with ``index + 1``, ``positions[:R] + 1`` and the rows' slot marked
          valid. Inside jit a step at ``index == max_length`` is clamped to the last slot (it overwrites it).

        Each layer slices its first ``R`` rows inside the layer scan: slicing the cache beforehand was
        slower (docs/performance.md).
        """
        token_ids = jnp.asarray(token_ids)
        rows = self._check_rows(token_ids, cache)
        if is_concrete(token_ids, cache, self.embedding[...]):
            return _compiled("decode", False)(*nnx.split(self), token_ids, cache)
        mask = jnp.ones((rows, 1), bool)
        return self._step(token_ids[:, None], cache.positions[:rows, None], mask, cache, rows=rows)

    def decode_kv(self, token_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, jax.Array, jax.Array]:
        """:meth:`decode` without the write: one step for the cache's first ``R`` rows that reads
        ``cache`` only (for benchmarks and tests of the step; the engine calls :meth:`decode`).

        Args:
          token_ids: ``[R]`` int, ``R <= B``. cache: a ``KVCache`` of ``B`` rows; the new tokens belong
            at slot ``index``.
        Returns:
          ``(logits [R, V], keys [L, R, K, hd], values [L, R, K, hd])``: the new tokens' keys (after
          RoPE) and values, their rotary positions ``cache.positions[:R]``. :meth:`KVCache.append`
          (``keys[:, :, None]``, ``values[:, :, None]``, a mask of ones) writes them as ``decode`` does.
        """
        token_ids = jnp.asarray(token_ids)
        rows = self._check_rows(token_ids, cache)
        if is_concrete(token_ids, cache, self.embedding[...]):
            return _compiled("decode_kv", False)(*nnx.split(self), token_ids, cache)
        first = cache.replace(valid=cache.valid[:rows], positions=cache.positions[:rows])
        mask = jnp.ones((rows, 1), bool)
        x, keys, values = self._layers(token_ids[:, None], first.positions[:, None], mask, first, rows=rows)
        return self.logits(x[:, -1]), keys[:, :, 0], values[:, :, 0]

    def _check_rows(self, token_ids: jax.Array, cache: KVCache) -> int:
        """``R``, the rows of ``token_ids: [R]``; ValueError unless ``R <= B`` and the cache fits the model."""
        _check_tokens(token_ids, 1, "token_ids")
        rows = token_ids.shape[0]
        if rows > cache.batch_size:
            raise ValueError(
                f"token_ids has {rows} rows but the cache only {cache.batch_size}; create it with "
                f"model.init_cache({rows}, ...)."
            )
        _check_cache(cache, cache.batch_size, self.config)
        return rows

    def _layers(self, input_ids, positions, mask, cache: KVCache | None, rows: int | None = None):
        """All blocks, attending to the cache (if any). Returns ``(hidden [B, T, D], keys, values)``,
        keys/values ``[L, B, T, K, hd]``.

        The blocks run as one ``lax.scan`` over the stacked layer weights (and the cache's layer
        axis), so a program holds one block instead of ``L`` unrolled copies: XLA compiles the decode
        step of the bundled 30-layer model about 5x faster, and runs it no slower on CPU
        (docs/performance.md)."""
        window = self.config.sliding_window
        cos, sin = rope_tables(positions, rope_inverse_frequencies(self.config))
        new_mask = _new_token_mask(mask, positions, window)
        if cache is not None:
            old_mask = _cached_slot_mask(cache.valid, positions, window)
        layer_graphdef, layer_weights = nnx.split(self.layers)

        def block(x, layer_inputs):
            weights, cached = layer_inputs
            old = None if cached is None else (cached[0][:rows], cached[1][:rows], old_mask)
            x, k, v = nnx.merge(layer_graphdef, weights)(x, cos, sin, new_mask, old)
            return x, (k, v)

        cached = None if cache is None else (cache.k, cache.v)
        x, (keys, values) = jax.lax.scan(block, self.embed(input_ids), (layer_weights, cached))
        return x, keys, values

    def _step(self, input_ids, positions, mask, cache: KVCache, rows: int | None = None) -> tuple[jax.Array, KVCache]:
        """Shared body of prefill/decode: the first ``rows`` rows (all if None) attend to the cache and
        the new tokens, which are then written at ``index``.

        Every layer reads the cache first; the write comes once at the end, ordered after the last
        hidden state (:func:`jaxauction.models.kv_cache.index_after`), so a donated cache is updated
        in place (one ``dynamic_update_slice`` per array).
        """
        first = cache if rows is None else cache.replace(valid=cache.valid[:rows], positions=cache.positions[:rows])
        x, keys, values = self._layers(input_ids, positions, mask, first, rows=rows)
        return self.logits(x[:, -1]), cache.append(keys, values, mask, after=x)

    # -------------------------------------------------------------- what the engine asks (LanguageModel)

    def decode_row_bytes(self, cache_length: int, model_size: int = 1, tokens: int = 1) -> int:
        """Bytes of one cache row of ``cache_length = S`` slots on one of ``t = model_size`` devices
        while ``tokens = T`` new tokens run on it (1 when decoding; a prompt's width when prefilling):
        its keys and values ``2 L S K hd`` (model dtype; ``/ t`` when the ``K`` heads split over ``t``)
        and its float32 activations ``T (8 D + (3 F + H S) / t)`` (logits excluded)."""
        config = self.config
        itemsize = np.dtype(self.dtype).itemsize
        kv = 2 * config.num_layers * cache_length * config.num_kv_heads * config.head_dim * itemsize
        kv //= model_size if config.num_kv_heads % model_size == 0 else 1
        split = (3 * config.intermediate_size + config.num_heads * cache_length) // model_size
        return kv + 4 * tokens * (8 * config.hidden_size + split)

    def weight_bytes(self, model_size: int = 1) -> int:
        """Bytes of the model's arrays (parameters, quantized blocks and the derived ``[D, V]`` head
        copy) on one device of a ``"model"`` axis of ``model_size`` devices (:meth:`partition_specs`)."""
        leaves = jax.tree.leaves(nnx.state(self))
        if model_size == 1:
            return sum(int(leaf.nbytes) for leaf in leaves)
        specs = jax.tree.leaves(
            self.partition_specs("rows", "model", model_size)[0], is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
        return sum(int(leaf.nbytes) // (model_size if "model" in spec else 1) for leaf, spec in zip(leaves, specs))

    def partition_specs(
        self, axis: str, model_axis: str | None = None, model_size: int = 1
    ) -> tuple[PartitionSpec | nnx.State, KVCache]:
        """``(weights, cache)`` specs: the cache's rows split over mesh axis ``axis``; with a
        ``model_axis`` of ``model_size > 1`` devices the weights (a tree like ``nnx.split(self)[1]``)
        and the cache's key/value heads split over it as :data:`TENSOR_PARALLEL` says, else the
        weights replicated (``PartitionSpec()``).

        When the ``H`` query heads or the ``K`` key/value heads do not divide by ``model_size``, the
        q|k|v projection and the cache are replicated over ``model_axis`` (every device computes every
        head; ``o_proj``, the MLP and the vocabulary stay split); a weight axis that does not divide is
        replicated. Raises ``ValueError`` when ``model_size`` exceeds ``H`` (a device would hold no head).
        """
        config = self.config
        if model_axis is None or model_size == 1:
            return PartitionSpec(), KVCache.partition_specs(axis)
        if model_size > config.num_heads:
            raise ValueError(
                f"mesh: a {model_axis!r} axis of {model_size} devices is larger than the model's {config.num_heads} "
                f"query heads (tensor parallelism splits by head); use a {model_axis!r} axis of at most "
                f"{config.num_heads} devices, ideally one that divides {config.num_heads}."
            )
        split_heads = config.num_heads % model_size == 0 and config.num_kv_heads % model_size == 0

        def spec(path, leaf) -> PartitionSpec:
            names = [key.key for key in path if hasattr(key, "key")]
            dim = next((d for name, d in TENSOR_PARALLEL.items() if set(name.split("/")) <= set(names)), None)
            if dim is None or (dim == -2 and names[-1] == "bias") or (not split_heads and "qkv_proj" in names):
                return PartitionSpec()
            if leaf.ndim < -dim or leaf.shape[dim] % model_size:
                return PartitionSpec()
            entries = [None] * leaf.ndim
            entries[dim] = model_axis
            return PartitionSpec(*entries)

        weights = jax.tree_util.tree_map_with_path(spec, nnx.split(self)[1])
        return weights, KVCache.partition_specs(axis, model_axis if split_heads else None)


TENSOR_PARALLEL = {
    "embedding": -2,  # [V, D] by vocabulary: each device looks up its rows, one all-reduce joins them
    "lm_head": -2,  # [V, D] by vocabulary
    "head_transposed": -1,  # [D, V] by vocabulary: logits split by vocabulary, gathered for the auction
    "attention/qkv_proj": -1,  # [D, K (G + 2) hd] by key/value group (its query heads, key and value)
    "attention/o_proj": -2,  # [H hd, D] by input rows (head), then an all-reduce XLA inserts
    "mlp/gate_up_proj": -1,  # [D, F 2] by intermediate column (gate and up pairs)
    "mlp/down_proj": -2,  # [F, D] by input rows, then an all-reduce
}
"""Llama's tensor-parallel layout (Megatron-LM's): the axis of each weight (``"group/name"`` in the
model's state; from the end, so the layer axis of stacked layers does not count) split over the
``"model"`` mesh axis. It applies to the kernel and, for a quantized kernel, to its packed codes,
scales and minima (same axes), and to column-split biases; norms and row-split biases are replicated."""


# ---------------------------------------------------------------------------------------- checks


def _check_tokens(ids: jax.Array, ndim: int, name: str) -> None:
    if ids.ndim != ndim:
        shape = "[B, T]" if ndim == 2 else "[B]"
        raise ValueError(f"{name} must have shape {shape}, got shape {tuple(ids.shape)}.")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}.")
    if 0 in ids.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(ids.shape)}.")


def _as_mask(attention_mask, shape) -> jax.Array:
    if attention_mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(attention_mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(shape)}, got {tuple(mask.shape)}.")
    return mask.astype(bool)


def _check_cache(cache: KVCache, batch_size: int, config: LlamaConfig) -> None:
    expected = (config.num_layers, batch_size, config.num_kv_heads, cache.max_length, config.head_dim)
    for name, array, shape, axes in (
        (
            "k",
            cache.k,
            (*expected[:3], config.head_dim, cache.max_length),
            "[num_layers, batch, num_kv_heads, head_dim, max_length]",
        ),
        ("v", cache.v, expected, "[num_layers, batch, num_kv_heads, max_length, head_dim]"),
    ):
        if tuple(array.shape) != shape:
            raise ValueError(
                f"cache.{name} has shape {tuple(array.shape)}, expected {shape} ({axes}); create it with "
                f"model.init_cache({batch_size}, ...)."
            )


# ---------------------------------------------------------------------------------------- jit


def _jit(function, **kwargs):
    return jax.jit(function, static_argnums=0, compiler_options=compiler_options() or None, **kwargs)


def _forward_body(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def _prefill_body(graphdef, state, input_ids, attention_mask, cache):
    return nnx.merge(graphdef, state).prefill(input_ids, attention_mask, cache)


def _decode_body(graphdef, state, token_ids, cache):
    return nnx.merge(graphdef, state).decode(token_ids, cache)


def _decode_kv_body(graphdef, state, token_ids, cache):
    return nnx.merge(graphdef, state).decode_kv(token_ids, cache)


@functools.cache
def _compiled(name: str, donate: bool):
    """The jitted ``forward``/``prefill``/``decode``/``decode_kv`` (with or without donating the cache)."""
    bodies = {"forward": _forward_body, "prefill": _prefill_body, "decode": _decode_body, "decode_kv": _decode_kv_body}
    body = bodies[name]
    donated = {"prefill": 4, "decode": 3}.get(name) if donate else None
    return _jit(body, donate_argnums=donated)


class CompiledLlama:
    """Jit-compiled entry points bound to a snapshot of a model's weights (split once).

    Use this in hot loops: it avoids re-splitting the NNX graph on each call. The cache passed to
    ``prefill``/``decode`` is donated (its buffers are reused for the returned cache; do not reuse it).
    Shapes are static: each new ``(B, T)`` or cache length compiles once.
    """

    def __init__(self, model: Llama):
        self.config = model.config
        self.dtype = model.dtype
        self.graphdef, self.state = nnx.split(model)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        return init_cache(self.config, batch_size, max_length, self.dtype if dtype is None else dtype)

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        _check_tokens(input_ids, 2, "input_ids")
        mask = _as_mask(attention_mask, input_ids.shape)
        return _compiled("forward", False)(self.graphdef, self.state, input_ids, mask)

    def prefill(self, input_ids, attention_mask, cache: KVCache) -> tuple[jax.Array, KVCache]:
        input_ids = jnp.asarray(input_ids)
        _check_tokens(input_ids, 2, "input_ids")
        _check_cache(cache, input_ids.shape[0], self.config)
        if int(cache.index) + input_ids.shape[1] > cache.max_length:
            raise ValueError(
                f"cache.index={int(cache.index)} plus {input_ids.shape[1]} new tokens exceeds "
                f"max_length={cache.max_length}; truncate the prompt or allocate a longer cache."
            )
        mask = _as_mask(attention_mask, input_ids.shape)
        return _compiled("prefill", True)(self.graphdef, self.state, input_ids, mask, cache)

    def decode(self, token_ids, cache: KVCache) -> tuple[jax.Array, KVCache]:
        token_ids = jnp.asarray(token_ids)
        _check_tokens(token_ids, 1, "token_ids")
        return _compiled("decode", True)(self.graphdef, self.state, token_ids, cache)


def jit_forward(model: Llama, input_ids, attention_mask=None) -> jax.Array:
    """Jit-compiled ``model(input_ids, attention_mask)``: ``[B, T, V]`` logits."""
    return CompiledLlama(model)(input_ids, attention_mask)


def jit_prefill(model: Llama, input_ids, attention_mask, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Jit-compiled ``model.prefill`` (the cache is donated)."""
    return CompiledLlama(model).prefill(input_ids, attention_mask, cache)


def jit_decode(model: Llama, token_ids, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Jit-compiled ``model.decode`` (the cache is donated)."""
    return CompiledLlama(model).decode(token_ids, cache)
