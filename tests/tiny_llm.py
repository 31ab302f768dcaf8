"""One home for the tests' tiny random Llama and the minimal tokenizer protocol `generate` uses."""

from __future__ import annotations

from flax import nnx

from jaxauction.engine import Auction
from jaxauction.models import Llama, LlamaConfig

EOS, PAD = 1, 0

PROMPTS = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
"""Three agents' prompts (token ids of the 16-token tiny model), for ``generate(PROMPTS, bids, ...)``."""

MIXED = [
    Auction([[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]], [1.0, 0.5, 2.0]),
    Auction([[5, 6], [7, 8, 9, 10, 11, 12]], [0.3, 1.2], base_prompt=[2, 2, 3], base_bid=0.7),
    Auction([[13, 12, 11]], [2.0]),
    Auction([[4, 4, 4, 4], [9, 8]], [0.0, 0.0]),
    Auction([[3, 4, 5, 6, 7], [8, 9, 10]], [0.2, 3.0], base_prompt=[2, 2, 3], base_bid=0.1),
]
"""A heterogeneous batch: one to three agents, with and without a base prompt, zero bids."""


class TinyTokenizer:
    """Chat template, decode, pad and EOS ids, length: characters map to ids ``2 .. vocab - 1``."""

    pad_token_id, eos_token_id = PAD, EOS

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "|".join(m["content"] for m in messages)
        return [2 + ord(c) % (self.vocab - 2) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{int(i)}" for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


def tiny_llama(vocab: int, *, seed: int = 0, sharpness: float = 1.0) -> Llama:
    """A random 2-layer Llama (GQA 4/2 heads, untied head); ``sharpness`` scales the LM head."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_ids=(EOS,),
        pad_token_id=PAD,
    )
    model = Llama(config, rngs=nnx.Rngs(seed))
    if sharpness != 1.0:
        model.lm_head[...] = model.lm_head[...] * sharpness
        model.refresh_derived_weights()
    return model


def gqa_config(kv_heads: int = 4, **changes) -> LlamaConfig:
    """A 2-layer Llama with 8 query heads and ``kv_heads`` key/value heads (hd = 8, V = 32): the shape the
    tensor-parallel tests split over a "model" axis."""
    fields = dict(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_layers=2,
        num_heads=8,
        num_kv_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=64,
        eos_token_ids=(1,),
        pad_token_id=0,
    )
    return LlamaConfig(**{**fields, **changes})
