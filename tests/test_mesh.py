"""Meshes with a ``"model"`` axis: ``make_mesh(auctions=a, model=t)`` on 8 forced host devices gives
what one device gives, and meshes with other axes are refused with the fix.

The 8-device checks run in one subprocess (``--xla_force_host_platform_device_count`` must be set
before JAX starts); the refusals run here on one device.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from tiny_llm import TinyTokenizer, gqa_config, tiny_llama

from jaxauction import sharding, simulation

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))

SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxauction import sharding, simulation
    from jaxauction.engine import generate, loop, runtime
    from jaxauction.models import Llama, LlamaConfig

    assert len(jax.devices()) == 8, jax.devices()
    MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))

    class Tok:
      pad_token_id, eos_token_id = 0, 1
      def __len__(self): return 32
      def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids))

    def tiny(kv_heads, dtype=jnp.float32):
      config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=8,
                           num_kv_heads=kv_heads, head_dim=8, max_position_embeddings=64, eos_token_ids=(1,),
                           pad_token_id=0)
      return Llama(config, dtype=dtype, rngs=nnx.Rngs(kv_heads)), Tok()

    rng = np.random.default_rng(0)
    bids = rng.exponential(size=(6, 2))
    out = {}

    def run(model, mesh):
      r = generate([[3, 4, 5], [6, 7]], bids, key=jax.random.key(1), max_new_tokens=8, model=model, mesh=mesh,
                   decoding="greedy")
      return [r.tokens.tolist(), r.token_payments.tolist()]

    def shard_bytes(model, mesh):
      # Bytes of one layer's weights on one device (the stacked layers' shards over L) and in all.
      _, weights = loop.shard_weights(nnx.split(model[0]), mesh)
      layers = jax.tree.leaves(weights["layers"])
      local = sum(x.addressable_shards[0].data.nbytes for x in layers)
      return [local, sum(x.nbytes for x in layers)]

    def collectives(mesh):
      # The collectives of the compiled model program of the last generation (one layer's scan body).
      texts = runtime.program_texts("_model_program")
      ops = re.findall(r"= (\S+) (all-gather|all-reduce|all-to-all|reduce-scatter)[\.\d]*\(", texts[-1])
      return [[op, shape] for shape, op in ops]

    for kv_heads, meshes in ((4, MESHES), (2, ((2, 4),))):
      model = tiny(kv_heads)
      out[f"gen{kv_heads}_none"] = run(model, None)
      for a, t in meshes:
        mesh = sharding.make_mesh(auctions=a, model=t)
        with runtime.empty_program_table():  # the model program of this mesh only
          out[f"gen{kv_heads}_{a}x{t}"] = run(model, mesh)
          out[f"ops{kv_heads}_{a}x{t}"] = collectives(mesh)
        out[f"bytes{kv_heads}_{a}x{t}"] = shard_bytes(model, mesh)

    # The prefill per device: spy on the engine's compiled programs (runtime.compiled, public).
    seen = []
    compiled = runtime.compiled
    def summary(args, cache):
      ids = args[2]  # (weights, prefix, input_ids, attention_mask, rows, cache)
      return {
          "ids_spec": str(getattr(ids.sharding, "spec", None)),
          "ids_rows": sorted({s.data.shape[0] for s in ids.addressable_shards}),
          "devices": len(ids.sharding.device_set),
          "cache_spec": str(getattr(cache.k.sharding, "spec", None)),
          "cache_rows": sorted({s.data.shape[1] for s in cache.k.addressable_shards}),
          "prefix": None if args[1] is None else list(args[1].shape),
      }
    def spy(function, static, args, **options):
      program = compiled(function, static, args, **options)
      if function.__name__ == "_prefill_program":
        def call(*call_args):
          result = program(*call_args)
          seen.append(summary(call_args, result[1]))  # before the decode loop donates the cache
          return result
        return call
      return program
    runtime.compiled = spy
    shared = [[2] * 16 + [3, 4, 5], [2] * 16 + [6, 7]]  # a 16-token shared prefix, prefilled once
    for name, mesh in (("none", None), ("4x2", sharding.make_mesh(auctions=4, model=2))):
      seen.clear()
      r = generate([[3, 4, 5], [6, 7]], bids, key=jax.random.key(1), max_new_tokens=8, model=tiny(4), mesh=mesh,
                   decoding="greedy")
      out[f"prefill_{name}"] = dict(seen[0], tokens=r.tokens.tolist())
      p = generate(shared, bids, key=jax.random.key(1), max_new_tokens=8, model=tiny(4), mesh=mesh, decoding="greedy")
      out[f"prefix_{name}"] = [p.tokens.tolist(), p.token_payments.tolist(), seen[-1]["prefix"]]
    runtime.compiled = compiled

    half = tiny(4, jnp.bfloat16)
    out["half_none"] = run(half, None)
    out["half_4x2"] = run(half, jax.make_mesh((4, 2), ("auctions", "model")))  # Explicit axes

    out["gen4_2x3"] = run(tiny(4), sharding.make_mesh(auctions=2, model=3))  # 3 does not divide 8 heads

    logits = rng.normal(size=(3, 2, 50)) * 2
    sim_bids = rng.exponential(size=(10, 2))
    for name, mesh in (("none", None), ("4x2", sharding.make_mesh(auctions=4, model=2))):
      r = simulation.simulate(logits, sim_bids, chunk_size=4, mesh=mesh, progress=False)
      out[f"sim_{name}"] = r.payments.tolist()
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


CASES = [(4, shape) for shape in MESHES] + [(2, (2, 4))]


@pytest.mark.parametrize(("kv_heads", "shape"), CASES)
def test_model_axis_meshes_give_one_device_results(eight_devices, kv_heads, shape):
    """Greedy tokens equal to mesh=None's, payments within 1e-5 of the largest (8 query heads; 4 or 2
    key/value heads, which do not divide by t = 4 and are then replicated)."""
    tokens, payments = eight_devices[f"gen{kv_heads}_none"]
    got_tokens, got_payments = eight_devices["gen{}_{}x{}".format(kv_heads, *shape)]
    assert got_tokens == tokens
    largest = np.abs(np.asarray(payments)).max()
    assert largest > 0
    np.testing.assert_allclose(got_payments, payments, rtol=0, atol=1e-5 * largest)


@pytest.mark.parametrize("shape", MESHES)
def test_each_device_holds_its_share_of_the_layers(eight_devices, shape):
    """With 4 key/value heads and t = 1, 2, 4 every layer weight but the norms splits: a device holds
    1/t of a layer's bytes (norms excepted); at t = 8 the q|k|v projection is replicated."""
    t = shape[1]
    local, total = eight_devices["bytes4_{}x{}".format(*shape)]
    D, L = 64, 2
    norms = 2 * D * 4 * L  # two [D] float32 norms per layer, replicated
    qkv = D * (8 + 2 * 4) * 8 * 4 * L
    expected = (total - norms) / t + norms if t < 8 else (total - norms - qkv) / t + norms + qkv
    assert local == expected


@pytest.mark.parametrize("shape", [(4, 2), (2, 4)])
def test_the_model_program_gathers_no_weight(eight_devices, shape):
    """Megatron's collectives: one all-reduce for the vocabulary-split embedding, two per layer (o_proj
    and down, in the layer scan's body) of ``[R, 1, D]`` activations, one all-gather of the ``[R, V]``
    logits; no weight (shape with the layer axis, or D x anything) is gathered."""
    ops = eight_devices["ops4_{}x{}".format(*shape)]
    reduces = [shape for op, shape in ops if op == "all-reduce"]
    gathers = [shape for op, shape in ops if op == "all-gather"]
    assert len(reduces) == 3 and all(re.match(r"f32\[\d+,1,64\]", s) for s in reduces), ops
    assert len(gathers) == 1 and re.match(r"f32\[\d+,32\]", gathers[0]), ops
    assert not [op for op, _ in ops if op not in ("all-reduce", "all-gather")], ops


def test_bytes_and_mesh_sizes_of_the_2_kv_head_model(eight_devices):
    local, total = eight_devices["bytes2_2x4"]
    assert local < total / 2  # the MLP, o_proj and the vocabulary still split; q|k|v replicated


def test_each_device_prefills_its_own_rows(eight_devices):
    """On (4, 2) the compiled prefill takes the prompts split over "auctions" (each device its two
    distinct prompts, not all of the chunk's) and gives each device its own cache rows; the tokens
    equal mesh=None's, with and without a shared prefix (prefilled once per device)."""
    one, split = eight_devices["prefill_none"], eight_devices["prefill_4x2"]
    assert split["tokens"] == one["tokens"]
    assert split["ids_spec"] == "P('auctions', None)" and split["devices"] == 8
    assert split["ids_rows"] == [2]  # 2 distinct prompts per device (8 auctions of the same 2 prompts)
    assert split["cache_spec"].startswith("P(None, 'auctions'")
    assert split["cache_rows"] == [4]  # the device's rows: 2 auctions x 2 slots (the same 2 prompts)
    tokens, payments, prefix_shape = eight_devices["prefix_none"]
    got_tokens, got_payments, got_prefix_shape = eight_devices["prefix_4x2"]
    assert got_tokens == tokens and prefix_shape == got_prefix_shape == [1, 16]
    largest = np.abs(np.asarray(payments)).max()
    np.testing.assert_allclose(got_payments, payments, rtol=0, atol=1e-5 * largest)


def test_bfloat16_model_split_over_the_model_axis(eight_devices):
    """A bfloat16 model on (4, 2) (a ``jax.make_mesh`` mesh, Explicit axes): its projections accumulate and all-reduce in float32 and round
    once, so only the float32 summation order differs from one device: the same greedy tokens and
    payments within 1% of the largest (measured 0.5%; summing bfloat16 partial products instead
    changed tokens)."""
    tokens, payments = eight_devices["half_none"]
    got_tokens, got_payments = eight_devices["half_4x2"]
    assert got_tokens == tokens
    largest = np.abs(np.asarray(payments)).max()
    np.testing.assert_allclose(got_payments, payments, rtol=0, atol=1e-2 * largest)


def test_simulation_on_a_model_axis_mesh(eight_devices):
    np.testing.assert_allclose(eight_devices["sim_4x2"], eight_devices["sim_none"], rtol=1e-6, atol=1e-9)


def test_make_mesh_axes_and_sizes():
    mesh = sharding.make_mesh(auctions=1, model=1)
    assert mesh.axis_names == ("auctions", "model") and mesh.devices.shape == (1, 1)
    assert sharding.auction_devices(mesh) == 1 and sharding.model_devices(mesh) == 1
    assert sharding.auction_devices(None) == sharding.model_devices(None) == 1
    assert sharding.model_devices(sharding.auction_mesh(jax.devices()[:1])) == 1
    with pytest.raises(ValueError, match=r"auctions \* model = 2 \* 1 = 2 devices, but only 1"):
        sharding.make_mesh(auctions=2, model=1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="model: expected a positive integer"):
        sharding.make_mesh(model=0)


def test_meshes_with_other_axes_are_refused():
    from jaxauction.engine import generate

    device = np.asarray(jax.devices()[:1])
    wrong = Mesh(device.reshape(1, 1), ("batch", "model"))
    extra = Mesh(device.reshape(1, 1, 1), ("auctions", "model", "data"))
    swapped = Mesh(device.reshape(1, 1), ("model", "auctions"))
    for mesh in (wrong, extra, swapped):
        with pytest.raises(
            ValueError, match=r"mesh: expected a mesh with axes \('auctions',\) or \('auctions', 'model'\)"
        ):
            sharding.check_mesh(mesh)
        with pytest.raises(ValueError, match=r"make_mesh\(auctions=a, model=t\)"):
            simulation.simulate(np.zeros((1, 2, 4)), np.ones((2, 2)), mesh=mesh, progress=False)
        with pytest.raises(ValueError, match="got axes"):
            generate([[3], [4]], [1.0, 1.0], mesh=mesh, model=(tiny_llama(16), TinyTokenizer(16)))
    with pytest.raises(ValueError, match="expected None or a jax.sharding.Mesh"):
        sharding.check_mesh("auctions")


def test_a_model_axis_the_heads_do_not_divide_replicates_attention(eight_devices):
    """t = 3 does not divide the 8 query heads (the bundled model's 9 do not divide by 2 or 8): q|k|v and
    the cache are replicated over "model", the MLP and the vocabulary still split; one device's
    greedy tokens, payments within 1e-5 of the largest. A model axis larger than the heads is refused."""
    tokens, payments = eight_devices["gen4_none"]
    got_tokens, got_payments = eight_devices["gen4_2x3"]
    assert got_tokens == tokens
    np.testing.assert_allclose(got_payments, payments, rtol=0, atol=1e-5 * np.max(np.abs(payments)))
    specs, _ = tiny_llama(16).partition_specs("auctions", "model", 3)
    paths = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    qkv = [spec for path, spec in paths if "qkv_proj" in jax.tree_util.keystr(path)]
    assert qkv and all(spec == PartitionSpec() for spec in qkv)
    heads = tiny_llama(16).config.num_heads
    with pytest.raises(ValueError, match=f"larger than the model's {heads} query heads"):
        tiny_llama(16).partition_specs("auctions", "model", heads + 1)


def _config(kv_heads=4):
    return gqa_config(kv_heads, qkv_bias=True, out_bias=True)


def test_the_tensor_parallel_specs_of_each_weight():
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from jaxauction.models import KVCache, Llama

    model = Llama(_config(), rngs=nnx.Rngs(0))
    specs, cache = model.partition_specs("auctions", "model", 2)
    attention, mlp = specs["layers"]["attention"], specs["layers"]["mlp"]
    assert attention["qkv_proj"]["kernel"].get_value() == P(None, None, "model")  # [L, D, K (G + 2) hd] by group
    assert attention["qkv_proj"]["bias"].get_value() == P(None, "model")
    assert attention["o_proj"]["kernel"].get_value() == P(None, "model", None)  # [L, H hd, D] by input rows
    assert attention["o_proj"]["bias"].get_value() == P()
    assert mlp["gate_up_proj"]["kernel"].get_value() == P(None, None, "model")
    assert mlp["down_proj"]["kernel"].get_value() == P(None, "model", None)
    assert specs["embedding"].get_value() == P("model", None) and specs["head_transposed"].get_value() == P(
        None, "model"
    )
    assert (
        specs["final_norm"]["weight"].get_value() == P() and specs["layers"]["input_norm"]["weight"].get_value() == P()
    )
    assert cache.k == P(None, "auctions", "model") and cache.valid == P("auctions")
    # 2 key/value heads over t = 4: q|k|v and the cache replicated over "model", the rest split.
    specs, cache = Llama(_config(2), rngs=nnx.Rngs(0)).partition_specs("auctions", "model", 4)
    assert specs["layers"]["attention"]["qkv_proj"]["kernel"].get_value() == P()
    assert specs["layers"]["attention"]["o_proj"]["kernel"].get_value() == P(None, "model", None)
    assert cache == KVCache.partition_specs("auctions")


def test_quantized_kernels_split_their_blocks_or_replicate_them():
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from jaxauction.models import Llama

    model = Llama(_config(), rngs=nnx.Rngs(0), quantization="q4_1")
    for t, scale in ((2, P(None, "model", None)), (4, P())):  # o_proj's 64 input rows are 2 blocks of 32
        o_proj = model.partition_specs("auctions", "model", t)[0]["layers"]["attention"]["o_proj"]
        assert o_proj["packed"].get_value() == P(None, "model", None)
        assert o_proj["scale"].get_value() == o_proj["minimum"].get_value() == scale


def test_fused_layouts_against_a_loop():
    from jaxauction.models import modeling

    config = _config(2)  # H = 8, K = 2, G = 4, hd = 8
    H, K, hd = 8, 2, 8
    expected = []
    for k in range(K):
        heads = [k * 4 + g for g in range(4)] + [H + k, H + K + k]  # in [q | k | v] head units
        expected += [h * hd + i for h in heads for i in range(hd)]
    np.testing.assert_array_equal(modeling.fused_qkv_columns(config), expected)
    np.testing.assert_array_equal(modeling.fused_gate_up_columns(3), [0, 3, 1, 4, 2, 5])


def test_explicit_meshes_are_used_with_auto_axes():
    """``jax.make_mesh`` makes Explicit axes by default (where a gather on a split axis needs an
    ``out_sharding``: generate and simulate failed on one of (4, 2)): the same devices with Auto axes."""
    from jax.sharding import AxisType

    explicit = jax.make_mesh((1, 1), ("auctions", "model"), axis_types=(AxisType.Explicit,) * 2)
    mesh = sharding.check_mesh(explicit)
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto) and mesh.axis_names == explicit.axis_names
    assert np.array_equal(mesh.devices, explicit.devices)
    auto = sharding.make_mesh(auctions=1)
    assert sharding.check_mesh(auto) is auto


BUNDLED_SCRIPT = textwrap.dedent(r"""
    import json
    import jax
    import jaxauction as ja
    import jaxauction.models as jm
    from jaxauction import sharding

    model = jm.load()  # the bundled SmolLM2-135M-Instruct: 9 query heads, 3 key/value heads
    prompts = ["Write a one-line ad for Alpha Airlines.", "Write a one-line ad for Beta Resort."]
    out = {}
    for name, mesh in (("none", None), ("4x2", sharding.make_mesh(auctions=4, model=2)),
                       ("1x8", sharding.make_mesh(auctions=1, model=8))):
      r = ja.generate(prompts, [[1.0, 2.0], [3.0, 1.0]], key=jax.random.key(0), max_new_tokens=6, model=model,
                      mesh=mesh, decoding="greedy", progress=False)
      out[name] = [r.tokens.tolist(), r.payments.tolist(), r.text]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_the_bundled_model_on_model_axes_gives_one_device_ads():
    """The bundled model (9 query heads: attention replicated over t = 2 or 8, the MLP and vocabulary
    split) on (4, 2) and (1, 8): one device's greedy ads, payments within 1e-5 of the largest."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    completed = subprocess.run(
        [sys.executable, "-c", BUNDLED_SCRIPT], capture_output=True, text=True, env=env, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    tokens, payments, text = out["none"]
    largest = np.abs(np.asarray(payments)).max()
    assert largest > 0 and all(text)
    for name in ("4x2", "1x8"):
        got_tokens, got_payments, got_text = out[name]
        assert got_tokens == tokens and got_text == text, name
        np.testing.assert_allclose(got_payments, payments, rtol=0, atol=1e-5 * largest, err_msg=name)
