"""Loaders, config variants, the KV cache and bad input, on tiny models (fast to compile).

Tiny checkpoints in tests/fixtures/tiny_* were written by transformers (experiments/record_model_fixture.py)
with their logits; a tiny GGUF is written here with the ``gguf`` package, permuting q/k rows exactly as
llama.cpp's converter does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_conftest import FIXTURES, TINY_VARIANTS, left_pad

import jaxauction.models as jm

# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_models():
    return {name: jm.load(FIXTURES / f"tiny_{name}") for name in TINY_VARIANTS}


def _copy_fixture(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / f"tiny_{name}", target)
    return target


# ---------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_tiny_variant_matches_transformers(tiny_models, name):
    """Qwen2 (qkv bias, untied), Mistral (sliding window 4), Llama 3.1 rope scaling (bias, tied), Qwen3
    (q/k RMSNorm per head, head_dim 16 = 2 * hidden / heads, tied)."""
    model, _ = tiny_models[name]
    with np.load(FIXTURES / f"tiny_{name}" / "reference.npz") as ref:
        logits = np.asarray(jm.jit_forward(model, ref["input_ids"]))
        np.testing.assert_allclose(logits, ref["logits"], atol=1e-3, rtol=1e-3)


def test_tiny_configs_are_parsed(tiny_models):
    qwen2, mistral, llama3 = (tiny_models[n][0].config for n in ("qwen2", "mistral", "llama3"))
    assert qwen2.qkv_bias and not qwen2.out_bias and not qwen2.tie_word_embeddings and qwen2.rope_theta == 1e6
    assert mistral.sliding_window == 4 and not mistral.qkv_bias
    assert llama3.rope_type == "llama3" and llama3.qkv_bias and llama3.out_bias and llama3.tie_word_embeddings
    assert qwen2.eos_token_ids == (256,)


def test_cache_decode_equals_forward_with_sliding_window_and_left_padding(tiny_models):
    """Mistral with window 4: prefill a left-padded batch, decode 10 tokens (past the window), compare."""
    model, _ = tiny_models["mistral"]
    compiled = jm.CompiledLlama(model)
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 256, 7), rng.integers(0, 256, 3)]
    continuation = rng.integers(0, 256, (2, 10)).astype(np.int32)
    prompts, mask = left_pad(rows, 256)
    full = np.concatenate([prompts, continuation], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(continuation, bool)], axis=1)
    expected = np.asarray(compiled(full, full_mask))
    cache = compiled.init_cache(2, full.shape[1] + 3)
    logits, cache = compiled.prefill(prompts, mask, cache)
    got = [np.asarray(logits)]
    for t in range(continuation.shape[1]):
        logits, cache = compiled.decode(continuation[:, t], cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, 1), expected[:, prompts.shape[1] - 1 :], atol=1e-5, rtol=1e-5)
    # The padded row alone, unpadded, gives the same logits as in the batch.
    alone_ids = np.concatenate([rows[1], continuation[1]])[None].astype(np.int32)
    alone = np.asarray(compiled(alone_ids))[0]
    np.testing.assert_allclose(expected[1, full.shape[1] - alone.shape[0] :], alone, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_single_prefill(tiny_models):
    model = jm.CompiledLlama(tiny_models["qwen2"][0])
    rng = np.random.default_rng(2)
    prompts, mask = left_pad([rng.integers(0, 256, 9), rng.integers(0, 256, 5)], 256)
    whole, whole_cache = model.prefill(prompts, mask, model.init_cache(2, 16))
    cache = model.init_cache(2, 16)
    _, cache = model.prefill(prompts[:, :4], mask[:, :4], cache)
    chunked, cache = model.prefill(prompts[:, 4:], mask[:, 4:], cache)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-5, rtol=1e-5)
    for name in ("valid", "positions", "index"):
        np.testing.assert_array_equal(np.asarray(getattr(cache, name)), np.asarray(getattr(whole_cache, name)))
    valid = np.asarray(cache.valid)  # padding slots hold arbitrary (never attended) keys and values
    for name in ("k", "v"):
        # k [L, B, K, hd, S] and v [L, B, K, S, hd] -> [L, K, B, S, hd], so the valid [B, S] slots index axes 2 and 3
        arrays = [np.asarray(getattr(c, name)) for c in (cache, whole_cache)]
        if name == "k":
            arrays = [np.swapaxes(a, 3, 4) for a in arrays]
        got, expected = (np.swapaxes(a, 1, 2) for a in arrays)
        np.testing.assert_allclose(got[:, :, valid], expected[:, :, valid], atol=1e-5, rtol=1e-5)


def test_decode_is_pure_under_jit(tiny_models):
    """prefill/decode never mutate NNX state: graphdef/state can be closed over by jax.jit."""
    model, _ = tiny_models["llama3"]
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, t, c: nnx.merge(graphdef, state).decode(t, c), donate_argnums=2)
    cache = model.init_cache(3, 8)
    logits_jit, cache_jit = step(state, jnp.array([1, 2, 3]), cache)
    logits_eager, _ = jm.jit_decode(model, jnp.array([1, 2, 3]), model.init_cache(3, 8))
    np.testing.assert_allclose(np.asarray(logits_jit), np.asarray(logits_eager), atol=1e-5)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert int(cache_jit.index) == 1 and np.asarray(cache_jit.positions).tolist() == [1, 1, 1]


def test_decode_kv_and_append_equal_decode(tiny_models):
    """decode_kv reads the cache without writing it; appending its keys and values gives decode's cache,
    a slice of the rows decodes as those rows, and the next step equals the uncached forward pass."""
    model, _ = tiny_models["llama3"]
    rng = np.random.default_rng(3)
    prompts, mask = left_pad([rng.integers(0, 256, n) for n in (7, 4, 9, 5)], 256)
    _, cache = model.prefill(prompts, mask, model.init_cache(4, 16))
    tokens = jnp.array([5, 6, 5, 9])
    logits, keys, values = model.decode_kv(tokens, cache)
    decoded_logits, decoded = model.decode(tokens, cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(decoded_logits), atol=1e-5, rtol=1e-5)
    appended = cache.append(keys[:, :, None], values[:, :, None], jnp.ones((4, 1), bool))
    for name in ("k", "v", "valid", "positions", "index"):
        np.testing.assert_allclose(np.asarray(getattr(appended, name)), np.asarray(getattr(decoded, name)), atol=1e-6)
    some_logits, _, _ = model.decode_kv(tokens[:2], cache.take_rows(jnp.arange(2)))  # a cache of 2 rows
    np.testing.assert_allclose(np.asarray(some_logits), np.asarray(logits[:2]), atol=1e-5, rtol=1e-5)
    first_logits, first_keys, _ = model.decode_kv(tokens[:3], cache)  # the first 3 rows of the whole cache
    np.testing.assert_allclose(np.asarray(first_logits), np.asarray(logits[:3]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(first_keys), np.asarray(keys[:, :3]), atol=1e-6)
    with pytest.raises(ValueError, match="token_ids has 5 rows but the cache only 4"):
        model.decode_kv(jnp.arange(5), cache)
    next_tokens = jnp.array([7, 8, 1, 2])
    next_logits, _ = model.decode(next_tokens, appended)
    own_logits, _ = model.decode(next_tokens, decoded)
    np.testing.assert_allclose(np.asarray(next_logits), np.asarray(own_logits), atol=1e-5, rtol=1e-5)
    # Independent of the cache code: the uncached forward pass over prompt + both tokens.
    full_ids = jnp.concatenate([jnp.asarray(prompts), tokens[:, None], next_tokens[:, None]], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask, bool), jnp.ones((4, 2), bool)], axis=1)
    forward_logits = model(full_ids, full_mask)[:, -1]
    np.testing.assert_allclose(np.asarray(next_logits), np.asarray(forward_logits), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- folders


def test_export_round_trip_sharded(tiny_models, tmp_path):
    model, tokenizer = tiny_models["qwen2"]
    folder = jm.export_hf(model, tokenizer, tmp_path / "out", max_shard_bytes=20_000)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    loaded, loaded_tokenizer = jm.load(folder)
    assert loaded.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.arange(12, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(jm.jit_forward(loaded, ids)), np.asarray(jm.jit_forward(model, ids)))
    assert loaded_tokenizer.encode("héllo") == tokenizer.encode("héllo")
    messages = [{"role": "user", "content": "hi"}]
    assert loaded_tokenizer.apply_chat_template(messages, tokenize=False) == "user: hi\n"


def test_bfloat16_parameters(tmp_path):
    model, _ = jm.load(FIXTURES / "tiny_llama3", dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    with np.load(FIXTURES / "tiny_llama3" / "reference.npz") as ref:
        logits = np.asarray(jm.jit_forward(model, ref["input_ids"]), np.float32)
        # bfloat16 keeps 8 significant bits (relative rounding 2**-9 per operation), compounded over the
        # embeddings, 2 layers and the head: measured 0.10 of the largest logit here (float32: 1e-4 absolute,
        # test_models_io's parity tests). The bound leaves 1.5x room for that rounding, not for a wrong
        # weight mapping, whose errors are of the order of the logits themselves.
        assert np.abs(logits - ref["logits"]).max() < 0.15 * np.abs(ref["logits"]).max()
        assert np.mean(logits.argmax(-1) == ref["logits"].argmax(-1)) >= 0.9  # the same top token almost always


# ---------------------------------------------------------------------------------------- GGUF


def _random_weight(name: str, config: jm.LlamaConfig, rng: np.random.Generator) -> np.ndarray:
    """A random float32 tensor of the shape Hugging Face uses for ``name`` (``[out, in]``)."""
    D, F, hd = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {
        "embed_tokens": (config.vocab_size, D),
        "q_proj": (config.num_heads * hd, D),
        "k_proj": (config.num_kv_heads * hd, D),
        "v_proj": (config.num_kv_heads * hd, D),
        "o_proj": (D, config.num_heads * hd),
        "gate_proj": (F, D),
        "up_proj": (F, D),
        "down_proj": (D, F),
    }
    if "norm" in name:
        return (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    return (0.2 * rng.standard_normal(shapes[name.split(".")[-2]])).astype(np.float32)


def _tiny_gguf(path: Path, *, arch: str = "llama", tokenizer_model: str = "gpt2"):
    """Write a tiny Llama GGUF the way llama.cpp's converter does (q/k rows permuted per head).

    Returns the JAX model whose logits the file must reproduce (``ffn_down`` of layer 0 stored as
    Q8_0, so the expected model uses its dequantized values).
    """
    from jaxauction.models.tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "l l"]
    tokens = specials + alphabet + [m.replace(" ", "") for m in merges]
    config = jm.LlamaConfig(
        vocab_size=len(tokens) + 5,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        eos_token_ids=(2,),
        bos_token_id=1,
        pad_token_id=0,
    )
    rng = np.random.default_rng(0)
    hf = {name: _random_weight(name, config, rng) for name in jm.params.hf_weight_names(config)}
    down = hf["model.layers.0.mlp.down_proj.weight"]
    quantized = gguf.quants.quantize(down, gguf.GGMLQuantizationType.Q8_0)
    hf["model.layers.0.mlp.down_proj.weight"] = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
    expected = jm.params.build_model(config, hf.__getitem__)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens + [f"<unused{i}>" for i in range(5)])
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)) + [4] * 5)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, weight in hf.items():
        gguf_name = jm.params.gguf_tensor_name(name)
        if ".attn_q." in gguf_name:
            weight = jm.llama_cpp_permute(weight, config.num_heads)
        elif ".attn_k." in gguf_name:
            weight = jm.llama_cpp_permute(weight, config.num_kv_heads)
        if name == "model.layers.0.mlp.down_proj.weight":
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(weight, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected = _tiny_gguf(path)
    return path, expected


def test_gguf_header_parser_agrees_with_gguf_reader(tiny_gguf):
    path, _ = tiny_gguf
    ours = jm.GGUFFile(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = ours.metadata[key]
        if isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-7)
        else:
            assert got == expected, key
    assert set(ours.tensors) == {t.name for t in reader.tensors}
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert info.ggml_type == tensor.tensor_type and info.offset == tensor.data_offset
        stored = np.asarray(tensor.data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(ours.raw(tensor.name).reshape(-1), stored)
        np.testing.assert_array_equal(
            ours.tensor(tensor.name), gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(info.shape)
        )


def test_gguf_model_unpermutes_qk(tiny_gguf):
    path, expected = tiny_gguf
    model, _ = jm.load(path)
    assert model.config.num_kv_heads == 2 and model.config.tie_word_embeddings
    ids = np.array([[5, 17, 100, 3, 250, 42, 7]], np.int32)
    reference = np.asarray(jm.jit_forward(expected, ids))
    np.testing.assert_allclose(np.asarray(jm.jit_forward(model, ids)), reference, atol=1e-5, rtol=1e-5)
    skipped, _ = jm.load_gguf(path, unpermute=False)
    assert np.abs(np.asarray(jm.jit_forward(skipped, ids)) - np.asarray(jm.jit_forward(expected, ids))).max() > 1e-2


def test_gguf_tokenizer(tiny_gguf):
    path, _ = tiny_gguf
    _, tokenizer = jm.load(path)
    ids = tokenizer.encode(" the hell")
    assert tokenizer.convert_ids_to_tokens(ids) == ["Ġthe", "Ġ", "he", "ll"]
    for text in ["héllo wörld 🎉\n\t x", "<|im_start|>hi<|im_end|>"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>hi<|im_end|>")[0] == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert text == "<|im_start|>x<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<unused0>") == len(tokenizer) - 5


# ---------------------------------------------------------------------------------------- bad input


def test_gguf_errors_name_the_file(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        jm.load(tmp_path / "missing.gguf")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"truncated\.gguf is truncated"):
        jm.load(truncated)
    header_cut = tmp_path / "header_cut.gguf"
    header_cut.write_bytes(data[:300])
    with pytest.raises(ValueError, match="header_cut.gguf"):
        jm.load(header_cut)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        jm.load(not_gguf)
    cases = [("gpt2", "gpt2", "general.architecture='gpt2'"), ("llama", "llama", "tokenizer.ggml.model='llama'")]
    for arch, model_kind, message in cases:
        other = tmp_path / f"{arch}_{model_kind}.gguf"
        _tiny_gguf(other, arch=arch, tokenizer_model=model_kind)
        with pytest.raises(ValueError, match=message):
            jm.load(other)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        jm.load(tmp_path)
    folder = _copy_fixture("qwen2", tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        jm.load(folder)

    folder = _copy_fixture("llama3", tmp_path / "a")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        jm.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match="'yarn'"):
        jm.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 48, "head_dim": 12}))
    with pytest.raises(ValueError, match=r"embed_tokens\.weight has shape \(272, 32\), expected \(272, 48\)"):
        jm.load(folder)  # every tensor's shape is checked before any is read
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 2}))
    with pytest.raises(ValueError, match=r"q_proj\.weight has shape \(32, 32\), expected \(16, 32\)"):
        jm.load(folder)

    folder = _copy_fixture("mistral", tmp_path / "b")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        jm.load(folder)
    shutil.copy(FIXTURES / "tiny_mistral" / "tokenizer.json", folder)
    (folder / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json is corrupted"):
        jm.load(folder)
    shutil.copy(FIXTURES / "tiny_mistral" / "tokenizer.json", folder)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupted"):
        jm.load(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"No \*\.safetensors"):
        jm.load(folder)

    from safetensors.numpy import load_file, save_file

    weights.write_bytes(original)
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        jm.load(folder)


def test_sharded_index_errors(tiny_models, tmp_path):
    model, tokenizer = tiny_models["qwen2"]
    folder = jm.export_hf(model, tokenizer, tmp_path / "out", max_shard_bytes=20_000)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        jm.load(folder)
    (folder / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        jm.load(folder)


def test_tokenizer_vocabulary_must_fit_the_model(tmp_path):
    folder = _copy_fixture("qwen2", tmp_path)
    _, tokenizer = jm.load(FIXTURES / "tiny_qwen2")
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(40)])  # 257 + 40 > vocab_size 272
    tokenizer.save_pretrained(str(folder))
    with pytest.raises(ValueError, match="297 tokens but the model's vocab_size is 272"):
        jm.load(folder)


def test_prompt_longer_than_context_and_bad_shapes(tiny_models):
    model, _ = tiny_models["llama3"]  # max_position_embeddings = 64
    with pytest.raises(ValueError, match="65 tokens.*max_position_embeddings=64"):
        model(np.zeros((1, 65), np.int32))
    with pytest.raises(ValueError, match="max_length=65 exceeds.*max_position_embeddings=64"):
        model.init_cache(1, 65)
    cache = model.init_cache(2, 8)
    with pytest.raises(ValueError, match="10 tokens but the cache holds max_length=8"):
        model.prefill(np.zeros((2, 10), np.int32), None, cache)
    _, cache = jm.jit_prefill(model, np.zeros((2, 6), np.int32), None, cache)
    with pytest.raises(ValueError, match="cache.index=6 plus 3 new tokens exceeds max_length=8"):
        jm.CompiledLlama(model).prefill(np.zeros((2, 3), np.int32), None, cache)
    with pytest.raises(ValueError, match=r"3 rows but the cache only 2; create it with model\.init_cache\(3"):
        model.decode(np.zeros((3,), np.int32), cache)
    other = jm.init_cache(dataclasses.replace(model.config, num_kv_heads=4), 2, 8)  # another model's layout
    with pytest.raises(ValueError, match=r"cache\.k has shape .* create it with model\.init_cache\(2"):
        model.decode(np.zeros((2,), np.int32), other)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        model(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(np.zeros((1, 4), np.int32), np.ones((1, 5)))


def test_unsupported_sources(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        jm.load(tmp_path / "does-not-exist")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="huggingface-cli download someone/no-such-model"):
        jm.load("someone/no-such-model")


def test_config_validation():
    base = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=2,
        max_position_embeddings=16,
    )
    jm.LlamaConfig(**base)
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        jm.LlamaConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="head_dim=3 must be even"):
        jm.LlamaConfig(**{**base, "head_dim": 3})
    with pytest.raises(ValueError, match="architecture='phi3'"):
        jm.LlamaConfig(**base, architecture="phi3")
    with pytest.raises(ValueError, match="mlp_bias"):
        jm.LlamaConfig.from_hf_dict({"model_type": "llama", "mlp_bias": True})
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        jm.LlamaConfig.from_hf_dict({"model_type": "llama", "vocab_size": 10})
    config = jm.LlamaConfig(**base, rope_type="llama3", rope_factor=8.0, qkv_bias=True, out_bias=True)
    assert jm.LlamaConfig.from_hf_dict(config.to_hf_dict()) == config


# ---------------------------------------------------------------------------------------- bad arguments, bad weights


def test_load_rejects_a_source_that_is_not_a_path_and_a_non_floating_dtype():
    with pytest.raises(ValueError, match=r"source must be None .* got int 5"):
        jm.load(5)
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype .*int32"):
        jm.load(FIXTURES / "tiny_llama3", dtype=jnp.int32)
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        jm.load_folder(FIXTURES / "tiny_llama3", dtype="not-a-dtype")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_safetensors_weights_with_non_finite_values_are_refused(tmp_path, bad):
    from safetensors.numpy import load_file, save_file

    folder = _copy_fixture("llama3", tmp_path)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = bad
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' .* non-finite .* \(3, 5\)"):
        jm.load(folder)


def test_gguf_weights_with_non_finite_values_are_refused(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    name = "blk.1.attn_v.weight"
    info = jm.GGUFFile(path).tensors[name]
    assert info.ggml_type == gguf.GGMLQuantizationType.F32
    data = bytearray(path.read_bytes())
    data[info.offset + 4 * 7 : info.offset + 4 * 8] = np.float32(np.nan).tobytes()
    broken = tmp_path / "nan.gguf"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"nan\.gguf: tensor '{name}' .* non-finite"):
        jm.load(broken)


def test_config_json_that_is_not_an_object(tmp_path):
    folder = _copy_fixture("llama3", tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object .* got a JSON list"):
        jm.load(folder)


def test_import_prints_no_pytorch_advisory():
    import subprocess
    import sys

    code = "import jaxauction, jaxauction.models, transformers; transformers.logging.get_logger('transformers').warning('kept')"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "PyTorch was not found" not in completed.stderr
    assert "kept" in completed.stderr  # only that advisory is silenced


@pytest.mark.parametrize("slots", [5, 25, 176, 700])
def test_decode_attention_equals_softmax_over_all_keys(dtype, slots):
    """One decoding query per row against NumPy float64 softmax attention over the cached keys and
    its own key; the cache lengths cover one slice, slices of unequal width, eight slices of 22 and
    the most slices, 16 of 44 (700 slots)."""
    from jaxauction.models.modeling import attend

    rng = np.random.default_rng(slots)
    B, K, G, hd = 3, 2, 3, 64
    q, k_new, v_new = (rng.standard_normal(s) for s in ((B, 1, K, G, hd), (B, 1, K, hd), (B, 1, K, hd)))
    k_old, v_old = rng.standard_normal((B, K, hd, slots)), rng.standard_normal((B, K, slots, hd))
    old_mask = rng.random((B, 1, slots)) < 0.7
    old_mask[0] = False  # a row whose only allowed key is its own
    self_allowed = np.ones((B, 1, 1), bool)
    out = attend(
        *(jnp.asarray(x, dtype) for x in (q, k_new, v_new)),
        jnp.asarray(self_allowed),
        (jnp.asarray(k_old, dtype), jnp.asarray(v_old, dtype), jnp.asarray(old_mask)),
    )
    keys = np.concatenate([np.swapaxes(k_old, 2, 3), k_new[:, 0, :, None]], axis=2)  # [B, K, S + 1, hd]
    values = np.concatenate([v_old, v_new[:, 0, :, None]], axis=2)
    allowed = np.concatenate([old_mask[:, 0], np.ones((B, 1), bool)], axis=1)  # [B, S + 1]
    scores = np.einsum("bkgd,bksd->bkgs", q[:, 0], keys) / np.sqrt(hd)
    scores = np.where(allowed[:, None, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bkgs,bksd->bkgd", weights, values).reshape(B, 1, -1)
    assert out.dtype == dtype
    # The scores and the softmax are float32 at any parameter dtype, so float64 agrees to about 1e-7.
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-5 if dtype == jnp.float32 else 1e-6)
