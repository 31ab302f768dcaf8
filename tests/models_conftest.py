"""Shared helpers for tests/test_models*.py: the bundled model is loaded once per test session.

Import from the test modules (``from models_conftest import ...``); this is not a pytest conftest, so
it does not interfere with tests/conftest.py.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_VARIANTS = ("qwen2", "mistral", "llama3", "qwen3")


@functools.lru_cache(maxsize=1)
def bundled():
    """``(model, tokenizer, compiled)`` of the bundled SmolLM2-135M-Instruct, loaded once."""
    import jaxauction.models as jm

    model, tokenizer = jm.load()
    return model, tokenizer, jm.CompiledLlama(model)


@functools.lru_cache(maxsize=1)
def reference() -> dict[str, np.ndarray]:
    """Logit slices and greedy continuations recorded by experiments/record_model_fixture.py."""
    with np.load(FIXTURES / "smollm2_reference.npz") as data:
        return {key: data[key] for key in data.files}


@functools.lru_cache(maxsize=1)
def tokenizer_reference() -> dict:
    return json.loads((FIXTURES / "smollm2_tokenizer.json").read_text())


def reference_prompts() -> list[np.ndarray]:
    ref = reference()
    return [ref[f"prompt{n}_ids"] for n in range(int(ref["num_prompts"]))]


def left_pad(rows: list, pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [B, T], mask [B, T])`` with every row right-aligned (left padding)."""
    length = max(len(r) for r in rows) if length is None else length
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = True
    return ids, mask
