"""One home for the tests' tiny random Llama and the minimal tokenizer protocol `generate` uses."""

from __future__ import annotations

from flax import nnx

from jaxauction.models import Llama, LlamaConfig

EOS, PAD = 1, 0


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
