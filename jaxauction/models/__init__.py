"""Llama-family language models in Flax NNX (Llama, Mistral, Qwen2, Qwen3): the LLM behind every
agent's next-token logits. :class:`LanguageModel` (``jaxauction.models.base``) is what the engine asks
of a model.

Example::

    import jaxauction.models as jm

    model, tokenizer = jm.load()                      # bundled SmolLM2-135M-Instruct (GGUF), float32
    batch = tokenizer(["Hello", "The capital of France is"], padding=True, return_tensors="np")
    compiled = jm.CompiledLlama(model)                # jit-compiled, weights split once
    cache = compiled.init_cache(batch_size=2, max_length=64)
    logits, cache = compiled.prefill(batch["input_ids"], batch["attention_mask"], cache)   # [B, V]
    for _ in range(8):
        logits, cache = compiled.decode(logits.argmax(-1), cache)                          # [B, V]

Inside your own ``jax.jit``/``lax.while_loop``: ``graphdef, state = nnx.split(model)`` once, then
``nnx.merge(graphdef, state).decode(token_ids, cache)``; the methods never mutate NNX state. Pass
``compiler_options=compiler_options()`` to that ``jax.jit`` for faster decoding on CPU.
"""

import importlib

from jaxauction.models import _quiet  # noqa: F401  (cheap; before any submodule imports transformers)
from jaxauction.models.base import LanguageModel, ModelConfig, RowCache, compiler_options

# Everything else is imported on first use (PEP 562): the loader and tokenizer import transformers
# (seconds), and the engine imports only jaxauction.models.base.
_LAZY = {
    "LlamaConfig": "config",
    "bundled_gguf_path": "loader",
    "check_vocabulary": "loader",
    "default": "loader",
    "export_hf": "loader",
    "load": "loader",
    "load_folder": "loader",
    "load_gguf": "loader",
    "CompiledLlama": "modeling",
    "KVCache": "kv_cache",
    "Llama": "modeling",
    "init_cache": "kv_cache",
    "jit_decode": "modeling",
    "jit_forward": "modeling",
    "jit_prefill": "modeling",
    "GGUFFile": "params",
    "llama_cpp_permute": "params",
    "llama_cpp_unpermute": "params",
    "tokenizer_from_folder": "tokenizer",
    "tokenizer_from_gguf": "tokenizer",
}


_SUBMODULES = ("config", "kv_cache", "loader", "modeling", "params", "tokenizer")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxauction.models.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(f"jaxauction.models.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxauction.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = [
    "CompiledLlama",
    "GGUFFile",
    "KVCache",
    "LanguageModel",
    "Llama",
    "LlamaConfig",
    "ModelConfig",
    "RowCache",
    "bundled_gguf_path",
    "check_vocabulary",
    "compiler_options",
    "default",
    "export_hf",
    "init_cache",
    "jit_decode",
    "jit_forward",
    "jit_prefill",
    "llama_cpp_permute",
    "llama_cpp_unpermute",
    "load",
    "load_folder",
    "load_gguf",
    "tokenizer_from_folder",
    "tokenizer_from_gguf",
]
