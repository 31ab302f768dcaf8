"""The seam between the models and the engine: what the engine may ask of a language model.

:class:`LanguageModel` states it once; :class:`RowCache` is the part of a model's cache the engine
touches (rows, not layout). The engine imports nothing else from ``jaxauction.models``: this module
also holds the XLA options every compiled program uses (:func:`compiler_options`) and
:func:`default_model` (the bundled model, the loader imported on first use). Importing this module
imports JAX only, never transformers.

Notation: cache rows ``B``, rows decoded in a step ``R <= B``, new tokens ``T``, cache slots ``S``,
vocabulary ``V``.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

import jax

__all__ = ["LanguageModel", "ModelConfig", "RowCache", "compiler_options", "default_model", "missing_members"]


@runtime_checkable
class ModelConfig(Protocol):
    """The hyper-parameters the engine reads: the vocabulary ``V``, the context length and the stop
    tokens (e.g. :class:`jaxauction.models.LlamaConfig`)."""

    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]


@runtime_checkable
class RowCache(Protocol):
    """A fixed-size cache of ``B`` rows of ``S`` slots, a pytree (e.g. :class:`jaxauction.models.KVCache`).

    Padding is on the left, so one write slot ``index`` is shared by every row. The engine lays out,
    gathers and copies rows; it never reads what a row holds.
    """

    index: jax.Array  # int32 scalar, the next slot to write

    @property
    def batch_size(self) -> int:
        """``B``, the rows."""

    @property
    def max_length(self) -> int:
        """``S``, the slots of a row."""

    def replace(self, **changes) -> RowCache:
        """The cache with fields replaced (the engine sets ``index`` only)."""

    def take_rows(self, rows: jax.Array) -> RowCache:
        """The cache of rows ``rows: [R]`` (a row may repeat), same ``index``."""

    def copy_rows(self, sources: jax.Array, targets: jax.Array, count: jax.Array) -> RowCache:
        """Rows ``sources[i]`` copied onto ``targets[i]`` for ``i < count`` (in place when donated)."""


@runtime_checkable
class LanguageModel(Protocol):
    """A causal language model the engine can run (``jaxauction.models.Llama`` implements it).

    It is a Flax NNX module: the engine splits it once (``nnx.split``) and calls these methods on
    ``nnx.merge(graphdef, weights)`` inside its compiled programs, so they must trace under
    ``jax.jit`` without mutating NNX state. Token ids are left-padded; every method returns new arrays.
    """

    config: ModelConfig

    def decode_row_bytes(self, cache_length: int, model_size: int = 1, tokens: int = 1) -> int:
        """Bytes one cache row of ``cache_length`` slots needs on one device of a ``"model"`` axis of
        ``model_size`` devices while ``tokens`` new tokens run on it (1 when decoding, the prompt width
        when prefilling): its cache entries and activations (its logits excluded; the engine counts
        ``4 V`` for those)."""

    def weight_bytes(self, model_size: int = 1) -> int:
        """Bytes the model's arrays hold (weights and anything derived from them) on one device of a
        ``"model"`` axis of ``model_size`` devices, split as :meth:`partition_specs` declares."""

    def init_cache(self, batch_size: int, max_length: int) -> RowCache:
        """An empty cache of ``B = batch_size`` rows and ``S = max_length`` slots (index 0)."""

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The full forward pass without a cache (the engine's teacher-forced scorer).

        Args:
          input_ids: ``[B, T]`` int. attention_mask: ``[B, T]`` (1 = real token), or None for all ones.
        Returns:
          ``logits [B, T, V]`` at every position.
        """

    def prefill(self, input_ids: jax.Array, attention_mask: jax.Array | None, cache: RowCache) -> tuple[Any, Any]:
        """``T`` new tokens of every row written at slots ``index .. index + T - 1``.

        Args:
          input_ids: ``[B, T]`` int. attention_mask: ``[B, T]`` (1 = real token), or None for all ones.
          cache: ``B`` rows with ``index + T <= S``.
        Returns:
          ``(logits [B, V] of each row's last position, cache)`` with ``index + T``.
        """

    def decode(self, token_ids: jax.Array, cache: RowCache) -> tuple[Any, Any]:
        """One token for each of the cache's first ``R`` rows, written at slot ``index``.

        Args:
          token_ids: ``[R]`` int, ``R <= B``. cache: ``B`` rows with ``index < S``; rows ``R ..`` are
            neither read nor written.
        Returns:
          ``(logits [R, V], cache)`` with ``index + 1``. The write happens after every read of the
          cache, so a donated cache is updated in place.
        """

    def partition_specs(self, axis: str, model_axis: str | None = None, model_size: int = 1) -> tuple[Any, Any]:
        """``(weights, cache)``: ``PartitionSpec`` trees (or prefixes of them) for the model's split
        weights (``nnx.split(model)[1]``) and for its cache, with the cache rows split over mesh axis
        ``axis`` (never the weights) and, given ``model_axis`` of ``model_size`` devices, the model
        split over it as it chooses (tensor parallelism; the partitioner inserts the collectives).
        Raises ``ValueError`` with the reason when the model cannot split over ``model_size``."""


def missing_members(model: object) -> list[str]:
    """The :class:`LanguageModel` members ``model`` lacks, sorted (none when ``isinstance(model,
    LanguageModel)``): for error messages."""
    members = {name for name in vars(LanguageModel) if not name.startswith("_")} | set(LanguageModel.__annotations__)
    return sorted(name for name in members if not hasattr(model, name))


_XLA_CPU_OPTIONS = {
    # Small decode-step products and reductions run faster in XLA's own kernels than as YNNPACK fusions.
    "xla_cpu_experimental_ynn_fusion_type": "",
    # LLVM -O1 instead of -O2 for the elementwise fusions: ~40% less compile time, same step time
    # (the matrix products are library calls).
    "xla_backend_optimization_level": 1,
}


@functools.lru_cache(maxsize=1)
def compiler_options() -> dict:
    """XLA compiler options for the model's programs on CPU; pass them to your own
    ``jax.jit(..., compiler_options=...)`` (the engine compiles every program with them).

    Measured with experiments/bench_model.py on a 2-core x86 machine: decode steps about 1.3x faster
    at batch 22 (the same at batch 1), prefill unchanged, compilation about 1.4x faster. Empty on other
    backends; options this jaxlib rejects are left out.
    """
    if jax.default_backend() != "cpu":
        return {}
    accepted = {}
    for name, value in _XLA_CPU_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
        except Exception:  # an unknown option is rejected at compile time
            continue
        accepted[name] = value
    return accepted


def default_model() -> tuple[LanguageModel, Any]:
    """``(model, tokenizer)`` of the bundled SmolLM2-135M-Instruct, loaded once per process
    (:func:`jaxauction.models.default`). The loader, and with it transformers, is imported here on
    first use, so importing the engine stays fast."""
    from jaxauction.models.loader import default

    return default()
