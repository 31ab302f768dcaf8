"""The bundled SmolLM2-135M-Instruct against transformers + PyTorch (recorded fixture), and its cache.

The reference was recorded by experiments/record_model_fixture.py from the same GGUF file with
transformers' own GGUF loader. The model is loaded once per session (models_conftest.bundled).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_conftest import bundled, left_pad, reference, reference_prompts, tokenizer_reference

import jaxauction.models as jm

pytestmark = pytest.mark.slow

ATOL = 1e-3  # float32 on both sides; observed differences are about 1e-4


@pytest.fixture(scope="module")
def smollm():
    return bundled()


@pytest.fixture(scope="module")
def teacher_forced(smollm):
    """Each prompt followed by the reference's greedy continuation, left-padded into one batch.

    Returns ``(ids [B, T], mask [B, T], logits [B, T, V])`` from the cache-free forward pass.
    """
    _, tokenizer, compiled = smollm
    ref = reference()
    rows = [np.concatenate([p, ref[f"prompt{n}_greedy"]]) for n, p in enumerate(reference_prompts())]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    return ids, mask, np.asarray(compiled(ids, mask))


def _prompt_logits(teacher_forced, n):
    """Logits of prompt ``n``'s own positions, ``[len(prompt), V]``."""
    ids, _, logits = teacher_forced
    ref = reference()
    prompt, new = len(ref[f"prompt{n}_ids"]), len(ref[f"prompt{n}_greedy"])
    end = ids.shape[1] - new
    return logits[n, end - prompt : end]


def test_logits_match_transformers_on_left_padded_batch(teacher_forced):
    ref = reference()
    for n in range(int(ref["num_prompts"])):
        logits = _prompt_logits(teacher_forced, n)
        np.testing.assert_allclose(logits[:, ref["probe_ids"]], ref[f"prompt{n}_probe_logits"], atol=ATOL, rtol=0)
        top = np.take_along_axis(logits, ref[f"prompt{n}_top_ids"].astype(np.int64), axis=-1)
        np.testing.assert_allclose(top, ref[f"prompt{n}_top_logits"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(jax.nn.logsumexp(logits, -1), ref[f"prompt{n}_logsumexp"], atol=ATOL, rtol=0)
        assert (logits.argmax(-1) == ref[f"prompt{n}_top_ids"][:, 0]).all()


def test_greedy_continuation_matches_transformers(teacher_forced):
    """Teacher-forced: at every step the argmax of our logits is the reference's next greedy token."""
    ids, _, logits = teacher_forced
    ref = reference()
    for n in range(int(ref["num_prompts"])):
        greedy = ref[f"prompt{n}_greedy"]
        steps = logits[n, ids.shape[1] - len(greedy) - 1 : -1]
        np.testing.assert_array_equal(steps.argmax(-1), greedy)


def test_left_padded_row_equals_prompt_alone(smollm, teacher_forced):
    _, _, compiled = smollm
    prompt = reference_prompts()[0]
    alone = np.asarray(compiled(prompt[None], np.ones((1, len(prompt)), bool)))[0]
    np.testing.assert_allclose(_prompt_logits(teacher_forced, 0), alone, atol=ATOL, rtol=0)


def _reference_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (written out independently of the library)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for heads, head_dim in [(9, 64), (3, 64), (4, 8)]:
        weight = rng.standard_normal((heads * head_dim, 5)).astype(np.float32)
        permuted = _reference_permute(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(jm.llama_cpp_unpermute(permuted, heads), weight)
        np.testing.assert_array_equal(jm.llama_cpp_permute(weight, heads), permuted)


def float_weights(model: jm.Llama) -> dict:
    """The model's weights as the pure dict of a float model (Q4_1 kernels dequantized)."""
    weights = nnx.to_pure_dict(nnx.state(model))
    for group, names in (("attention", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
        for name in names:
            linear = getattr(getattr(model.layers, group), name)
            weights["layers"][group][name] = {
                "kernel": linear.weight(),
                **({"bias": linear.bias[...]} if linear.bias is not None else {}),
            }
    return weights


def test_parity_breaks_without_qk_unpermutation(smollm):
    """Leaving q/k rows in llama.cpp's interleaved order (as a loader that skips the step would) breaks parity."""
    model, _, compiled = smollm
    config = model.config
    H, K, hd = config.num_heads, config.num_kv_heads, config.head_dim
    weights = float_weights(model)
    stacked = np.asarray(weights["layers"]["attention"]["qkv_proj"]["kernel"])  # [L, in, out]
    permuted = []
    columns = jm.modeling.fused_qkv_columns(config)  # the fused kernel's columns in [q | k | v] rows
    for i in range(config.num_layers):
        kernel = stacked[i].T[np.argsort(columns)]  # [out, in], [q | k | v] order
        kernel = np.concatenate(
            [
                _reference_permute(kernel[: H * hd], H),
                _reference_permute(kernel[H * hd : (H + K) * hd], K),
                kernel[(H + K) * hd :],
            ]
        )
        permuted.append(kernel[columns].T)
    weights["layers"]["attention"]["qkv_proj"]["kernel"] = jnp.asarray(np.stack(permuted))
    graphdef, broken = nnx.split(nnx.eval_shape(lambda: jm.Llama(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(broken, weights)
    prompt = reference_prompts()[0]
    mask = np.ones((1, len(prompt)), bool)
    good = np.asarray(compiled(prompt[None], mask))[0]
    bad = np.asarray(jm.CompiledLlama(nnx.merge(graphdef, broken))(prompt[None], mask))[0]
    ref = reference()
    probe = ref["probe_ids"]
    assert np.abs(good[:, probe] - ref["prompt0_probe_logits"]).max() < ATOL
    assert np.abs(bad[:, probe] - ref["prompt0_probe_logits"]).max() > 1.0


def test_cached_generation_in_jit_while_loop(smollm, teacher_forced):
    """The lead's pattern: ``nnx.split`` once, ``nnx.merge(...).prefill/decode`` inside ``jax.jit`` and
    ``lax.while_loop`` on a left-padded batch.

    Checks (1) the greedy tokens equal transformers' continuation, and (2) the KV-cache decode logits
    equal the cache-free forward pass at the same positions (the decode input is the reference token,
    i.e. teacher forcing, so both see identical sequences).
    """
    model, tokenizer, _ = smollm
    ids, _, forward_logits = teacher_forced
    ref = reference()
    prompts, mask = left_pad(reference_prompts(), tokenizer.pad_token_id)
    forced = np.stack([ref[f"prompt{n}_greedy"] for n in range(prompts.shape[0])]).astype(np.int32)  # [B, N]
    steps = forced.shape[1]
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=jm.compiler_options())
    def generate(state, prompts, mask, forced):
        B, N = forced.shape
        cache = nnx.merge(graphdef, state).init_cache(B, prompts.shape[1] + N)
        logits, cache = nnx.merge(graphdef, state).prefill(prompts, mask, cache)
        all_logits = jnp.zeros((B, N, logits.shape[-1]), logits.dtype).at[:, 0].set(logits)

        def body(carry):
            t, cache, all_logits = carry
            logits, cache = nnx.merge(graphdef, state).decode(forced[:, t - 1], cache)
            return t + 1, cache, all_logits.at[:, t].set(logits)

        _, cache, all_logits = jax.lax.while_loop(lambda c: c[0] < N, body, (1, cache, all_logits))
        return all_logits, cache

    cached_logits, cache = generate(state, prompts, mask, forced)
    cached_logits = np.asarray(cached_logits)
    np.testing.assert_array_equal(cached_logits.argmax(-1), forced)
    np.testing.assert_allclose(cached_logits, forward_logits[:, prompts.shape[1] - 1 : -1], atol=ATOL, rtol=0)
    assert int(cache.index) == ids.shape[1] - 1
    np.testing.assert_array_equal(np.asarray(cache.positions), mask.sum(1) + steps - 1)
    np.testing.assert_array_equal(np.asarray(cache.valid)[:, : prompts.shape[1]], mask)
    assert np.asarray(cache.valid)[:, prompts.shape[1] :].sum() == prompts.shape[0] * (steps - 1)


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm):
    _, tokenizer, _ = smollm
    expected = tokenizer_reference()
    for case in expected["strings"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert tokenizer.decode(case["ids"]) == case["text"]
    text = tokenizer.apply_chat_template(expected["chat_messages"], tokenize=False, add_generation_prompt=True)
    assert text == expected["chat_text"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected["chat_ids"]
    assert tokenizer.eos_token_id == expected["eos_token_id"] == 2
    assert tokenizer.pad_token_id == expected["pad_token_id"]
    assert len(tokenizer) == expected["vocab_size"] == 49152
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["Hi", "Hello there friend"], padding=True, return_tensors="np")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_config_of_bundled_model(smollm):
    model, _, _ = smollm
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (49152, 576, 30)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.max_position_embeddings == 8192 and config.rope_theta == 100_000.0
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    # The layers' projections stay Q4_1: two 4-bit weights per byte of ``packed``.
    assert model.quantization == "q4_1"
    packed = jax.tree.leaves(nnx.state(model, jm.modeling.QuantizedWeight))
    quantized_weights = sum(2 * leaf.size for leaf in packed if leaf.dtype == jnp.uint8)
    assert sum(leaf.size for leaf in leaves) + quantized_weights == config.num_parameters()


def test_export_round_trip_gives_identical_model(smollm, tmp_path):
    model, tokenizer, compiled = smollm
    folder = jm.export_hf(model, tokenizer, tmp_path / "smollm2", max_shard_bytes=200 * 2**20)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) == 3
    loaded, loaded_tokenizer = jm.load(folder)
    assert loaded.config == model.config
    assert loaded.quantization is None  # the export holds the dequantized float32 weights
    exported, reloaded = float_weights(model), nnx.to_pure_dict(nnx.state(loaded))
    assert jax.tree.structure(exported) == jax.tree.structure(reloaded)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(reloaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompt = reference_prompts()[0]
    mask = np.ones((1, len(prompt)), bool)
    np.testing.assert_array_equal(
        np.asarray(jm.CompiledLlama(loaded)(prompt[None], mask)), np.asarray(compiled(prompt[None], mask))
    )
    expected = tokenizer_reference()
    for case in expected["strings"]:
        assert loaded_tokenizer.encode(case["text"]) == case["ids"]
    text = loaded_tokenizer.apply_chat_template(expected["chat_messages"], tokenize=False, add_generation_prompt=True)
    assert text == expected["chat_text"]
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id


PEAK_MEMORY_SNIPPET = """
import json, resource, time
start = time.perf_counter()
import jaxauction.models as jm
model, tokenizer = jm.load()
seconds = time.perf_counter() - start
try:  # the high-water mark of this process's own address space (ru_maxrss also counts the parent's
    # resident memory at fork time on Linux, which would charge the test runner's memory to the load)
    status = open("/proc/self/status").read()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kb": peak_kb, "seconds": seconds}))
"""


def test_loading_the_default_model_stays_under_2_gb():
    out = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SNIPPET], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["peak_kb"] * 1024 < 2e9, f"peak RSS {stats['peak_kb'] / 1024:.0f} MB"


def random_q4_1_bytes(rng, rows: int, columns: int) -> np.ndarray:
    """``[rows, columns / 32 * 20]`` raw Q4_1 blocks: random codes, finite float16 scales and minima
    from 1e-4 to 8 in size (either sign)."""
    blocks = rng.integers(0, 256, size=(rows, columns // 32, 20), dtype=np.uint8)
    for start in (0, 2):
        values = rng.choice([-1, 1], size=(rows, columns // 32)) * 10.0 ** rng.uniform(-4, 0.9, (rows, columns // 32))
        blocks[..., start : start + 2] = values.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def test_q4_1_kernels_dequantize_bit_for_bit_like_gguf(dtype):
    """The loader's repacking (``q4_1_blocks``, ``q4_1_kernel``) and ``dequantize_q4_1`` give exactly
    ``gguf.quants.dequantize`` of the stored bytes (float32, then cast to the model dtype), also for
    a kernel fused from two tensors (q|k|v, gate|up)."""
    import gguf

    rng = np.random.default_rng(7)
    raws = [random_q4_1_bytes(rng, rows, 96) for rows in (5, 3)]  # two [out, in = 96] tensors
    parts = [jm.params.q4_1_blocks(raw) for raw in raws]
    kernel = jm.params.q4_1_kernel(parts)
    assert kernel["packed"].shape == (48, 8) and kernel["scale"].shape == (3, 8)
    got = np.asarray(jm.modeling.dequantize_q4_1(kernel["packed"], kernel["scale"], kernel["minimum"], dtype))
    expected = np.concatenate([gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1) for raw in raws]).T
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected.astype(np.float32).astype(dtype))


def test_bundled_model_held_quantized_gives_the_float_models_logits(smollm):
    """``load()`` keeps the bundled model's Q4_1 layers quantized; ``keep_quantized=False`` dequantizes
    them at load: the same logits bit for bit (prefill and cached decode), in under half the memory."""
    model, _, compiled = smollm
    float_model, _ = jm.load(keep_quantized=False)
    assert model.quantization == "q4_1" and float_model.quantization is None
    nbytes = [sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(m))) for m in (model, float_model)]
    assert nbytes[0] < 0.5 * nbytes[1], nbytes
    prompts = reference_prompts()
    ids, mask = left_pad(prompts[:2], model.config.pad_token_id)
    logits = [np.asarray(c(ids, mask)) for c in (compiled, jm.CompiledLlama(float_model))]
    np.testing.assert_array_equal(logits[0], logits[1])
    caches = [c.init_cache(2, ids.shape[1] + 2) for c in (compiled, jm.CompiledLlama(float_model))]
    steps = []
    for c, cache in zip((compiled, jm.CompiledLlama(float_model)), caches):
        last, cache = c.prefill(ids, mask, cache)
        last, cache = c.decode(np.argmax(np.asarray(last), -1).astype(np.int32), cache)
        steps.append(np.asarray(last))
    np.testing.assert_array_equal(steps[0], steps[1])
