"""Llama-family language models in Flax NNX: the LLM behind every agent's next-token logits.

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

from jaxauction.models import _quiet  # noqa: F401  (first: silences transformers' "no PyTorch" advisory)
from jaxauction.models.config import LlamaConfig
from jaxauction.models.loader import (
    bundled_gguf_path,
    check_vocabulary,
    default,
    export_hf,
    load,
    load_folder,
    load_gguf,
)
from jaxauction.models.modeling import (
    CompiledLlama,
    KVCache,
    Llama,
    compiler_options,
    init_cache,
    jit_decode,
    jit_forward,
    jit_prefill,
)
from jaxauction.models.params import GGUFFile, llama_cpp_permute, llama_cpp_unpermute
from jaxauction.models.tokenizer import tokenizer_from_folder, tokenizer_from_gguf

__all__ = [
    "CompiledLlama",
    "GGUFFile",
    "KVCache",
    "Llama",
    "LlamaConfig",
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
