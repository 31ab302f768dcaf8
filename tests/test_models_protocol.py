"""The seam between models and engine: jaxauction.models.base.LanguageModel.

The engine imports nothing from jaxauction.models but the protocol module (checked on its source);
Llama implements the protocol; generate refuses a model that does not; what the engine asks of the
model (bytes per cache row, weight bytes, partition specs, decoding the first rows) is checked against
independent arithmetic and against the model's own full-cache step.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from tiny_llm import PROMPTS, TinyTokenizer, tiny_llama

import jaxauction as ja
from jaxauction.engine import plan
from jaxauction.models import KVCache, LlamaConfig
from jaxauction.models.base import LanguageModel, ModelConfig, RowCache, missing_members
from jaxauction.models.kv_cache import index_after

ENGINE = Path(ja.__file__).parent / "engine"
VOCAB = 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=0), TinyTokenizer(VOCAB)


def _models_imports(tree: ast.AST) -> list[str]:
    """Every module of jaxauction.models a parsed file imports, at any depth (``import``, ``from``,
    ``importlib.import_module("...")``), as dotted names (``from jaxauction.models import x`` gives
    ``jaxauction.models.x``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("jaxauction", "jaxauction.models"):
                found += [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            found += [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    return [name for name in found if name == "jaxauction.models" or name.startswith("jaxauction.models.")]


def test_the_engine_imports_only_the_protocol_module_from_models():
    files = sorted(ENGINE.glob("*.py"))
    assert len(files) >= 8
    imports = {path.name: _models_imports(ast.parse(path.read_text())) for path in files}
    stray = {name: [m for m in modules if m != "jaxauction.models.base"] for name, modules in imports.items()}
    assert {name: modules for name, modules in stray.items() if modules} == {}
    assert any(imports.values())  # the check sees the engine's imports of the protocol


def test_the_import_check_catches_other_models_imports():
    source = """
import jaxauction.models.loader
from jaxauction import models
from jaxauction.models import Llama, base
from jaxauction.models.kv_cache import KVCache
def f():
    importlib.import_module("jaxauction.models")
"""
    assert _models_imports(ast.parse(source)) == [
        "jaxauction.models.loader",
        "jaxauction.models",
        "jaxauction.models.Llama",
        "jaxauction.models.base",
        "jaxauction.models.kv_cache",
        "jaxauction.models",
    ]


def test_importing_the_engine_leaves_transformers_unloaded():
    """The protocol module imports JAX only: the engine (and jaxauction) import without transformers."""
    code = (
        "import sys, jaxauction.engine; print('transformers' in sys.modules, 'jaxauction.models.loader' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["False", "False"]


def test_llama_and_its_cache_and_config_implement_the_protocols(tiny):
    model = tiny[0]
    assert isinstance(model, LanguageModel) and missing_members(model) == []
    assert isinstance(model.config, ModelConfig)
    assert isinstance(model.init_cache(2, 8), RowCache)
    assert not isinstance(object(), LanguageModel)


class OldDuckTypedModel:
    """What the engine asked of a model before the protocol (config, init_cache, prefill, decode_kv)."""

    def __init__(self, model):
        self.config, self.init_cache, self.prefill, self.decode_kv = (
            model.config,
            model.init_cache,
            model.prefill,
            model.decode_kv,
        )


def test_generate_refuses_a_model_outside_the_protocol(tiny):
    model, tokenizer = tiny
    message = (
        r"model: the first element must be the language model \(a jaxauction.models.Llama, or any "
        r"jaxauction.models.base.LanguageModel\).* the model lacking decode, decode_row_bytes, "
        r"partition_specs, weight_bytes\."
    )
    with pytest.raises(ValueError, match=message):
        ja.generate(PROMPTS, [1.0, 1.0, 1.0], model=(OldDuckTypedModel(model), tokenizer), max_new_tokens=2)


def test_decode_row_bytes_and_memory_terms_match_the_arithmetic(tiny):
    """A row of S slots: keys and values 2 L S K hd float32, activations 4 (8 D + 3 F + H S) bytes; the
    plan adds the row's logits 4 V (the numbers the plan used before the protocol)."""
    model = tiny[0]
    L, K, hd, D, F, H = 2, 2, 8, 32, 64, 4  # tiny_llama's config
    for slots in (1, 40, 128):
        expected = 2 * L * slots * K * hd * 4 + 4 * (8 * D + 3 * F + H * slots)
        assert model.decode_row_bytes(slots) == expected
        row_bytes, _ = plan.memory_terms(model, 3, slots, 2, 8)
        assert row_bytes == expected + 4 * VOCAB


def test_weight_bytes_count_parameters_and_the_derived_head(tiny):
    model = tiny[0]
    config = model.config
    # float32: every parameter, plus the [D, V] copy of the head used for the logits.
    assert model.weight_bytes() == 4 * (config.num_parameters() + config.hidden_size * config.vocab_size)


def test_partition_specs_replicate_weights_and_split_cache_rows(tiny):
    weights, cache = tiny[0].partition_specs("auctions")
    assert weights == PartitionSpec()
    assert cache == KVCache.partition_specs("auctions")
    assert cache.k == PartitionSpec(None, "auctions") and cache.valid == PartitionSpec("auctions")


def test_decode_of_the_first_rows_equals_decoding_those_rows_alone(tiny):
    """The engine decodes the cache's first R of B rows: the same logits and new keys as a cache of
    just those rows, the other rows untouched, and every row's index advanced."""
    model = tiny[0]
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, VOCAB, (4, 5)), jnp.int32)
    _, cache = model.prefill(ids, None, model.init_cache(4, 8))
    tokens = jnp.array([3, 7, 9], jnp.int32)
    logits, after = model.decode(tokens, cache)
    alone_logits, alone = model.decode(tokens, cache.take_rows(jnp.arange(3)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(alone_logits), atol=1e-5, rtol=1e-5)
    assert logits.shape == (3, VOCAB) and int(after.index) == int(cache.index) + 1
    for name, axis in (("k", 1), ("v", 1), ("valid", 0), ("positions", 0)):
        got, before, expected = (np.asarray(getattr(c, name)) for c in (after, cache, alone))
        np.testing.assert_allclose(np.take(got, range(3), axis), expected, atol=1e-6)
        np.testing.assert_array_equal(np.take(got, [3], axis), np.take(before, [3], axis))


def test_index_after_keeps_the_index_whatever_the_value():
    for value in (jnp.zeros((2, 3)), jnp.full((4,), jnp.nan), jnp.array([jnp.inf, -jnp.inf])):
        index = index_after(jnp.int32(5), value)
        assert index.dtype == jnp.int32 and int(index) == 5
    traced = jax.jit(lambda i, x: index_after(i, x)).lower(jnp.int32(1), jnp.ones((3,))).as_text()
    assert "compare" in traced  # the dependency on the value survives tracing


def test_a_config_without_the_protocols_fields_is_not_a_model_config():
    assert isinstance(LlamaConfig(16, 32, 64, 2, 4, 2, 8, 64), ModelConfig)
    assert not isinstance(object(), ModelConfig)
