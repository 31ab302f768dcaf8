"""Qwen3 (q/k RMSNorm per head, an explicit head_dim, tied embeddings) from a Hugging Face folder:
parity with transformers' Qwen3 and greedy generation through the engine.

tests/fixtures/tiny_qwen3 was written by transformers' Qwen3ForCausalLM (experiments/record_model_fixture.py
--only tiny_qwen3): random float16 weights, the logits of two rows and the greedy continuations of two
prompts from ``model.generate``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from models_conftest import FIXTURES

import jaxauction as ja
import jaxauction.models as jm

FOLDER = FIXTURES / "tiny_qwen3"


@pytest.fixture(scope="module")
def qwen3():
    return jm.load(FOLDER)


@pytest.fixture(scope="module")
def reference():
    with np.load(FOLDER / "reference.npz") as data:
        return {key: data[key] for key in data.files}


def test_config_is_qwen3_with_its_own_head_dim(qwen3):
    config = qwen3[0].config
    assert config.architecture == "qwen3" and config.qk_norm
    assert config.head_dim == 16 != config.hidden_size // config.num_heads
    assert config.tie_word_embeddings and not config.qkv_bias and not config.out_bias
    assert config.rope_theta == 1e6 and config.rms_norm_eps == 1e-5 and config.eos_token_ids == (256,)
    norms = qwen3[0].layers.attention
    assert norms.q_norm.weight[...].shape == norms.k_norm.weight[...].shape == (2, 16)  # [L, hd]
    assert config.num_parameters() == sum(np.asarray(w).size for _, w in jm.params.hf_state_dict(qwen3[0]))


def test_logits_match_transformers(qwen3, reference):
    logits = np.asarray(jm.jit_forward(qwen3[0], reference["input_ids"]))
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-3, rtol=1e-3)


def test_without_the_qk_norms_the_logits_differ(qwen3, reference):
    """The parity above depends on the q/k norms (their recorded weights are not ones)."""
    model = jm.load(FOLDER)[0]
    for norm in (model.layers.attention.q_norm, model.layers.attention.k_norm):
        norm.weight[...] = np.ones_like(norm.weight[...])
    logits = np.asarray(jm.jit_forward(model, reference["input_ids"]))
    assert np.abs(logits - reference["logits"]).max() > 0.05


def test_generate_greedy_equals_transformers(qwen3, reference):
    """End to end: the folder's model and tokenizer through jaxauction.generate (one agent per
    auction: the linear rule's q is the model's distribution) give transformers' greedy tokens."""
    prompts = [[int(t) for t in row if t >= 0] for row in reference["greedy_prompts"]]
    auctions = [ja.Auction([prompt], [1.0]) for prompt in prompts]
    expected = reference["greedy_tokens"]
    result = ja.generate(auctions, decoding="greedy", payment=None, max_new_tokens=expected.shape[1], model=qwen3)
    assert np.asarray(result.lengths).tolist() == [expected.shape[1]] * len(prompts)  # no EOS (256) in them
    np.testing.assert_array_equal(np.asarray(result.tokens), expected)


def test_export_round_trip(qwen3, reference, tmp_path):
    model, tokenizer = qwen3
    folder = jm.export_hf(model, tokenizer, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == 16 and config["attention_bias"] is False and config["tie_word_embeddings"]
    again, _ = jm.load(folder)
    assert again.config == model.config
    logits = np.asarray(jm.jit_forward(again, reference["input_ids"]))
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_sliding_window": True}, "qwen3 with use_sliding_window=true is not supported"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "every layer must be 'full_attention'"),
    ],
)
def test_unsupported_qwen3_settings_are_refused(tmp_path, change, message):
    folder = tmp_path / "qwen3"
    shutil.copytree(FOLDER, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        jm.load(folder)


def test_missing_qk_norm_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "qwen3"
    shutil.copytree(FOLDER, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight.* missing"):
        jm.load(folder)
