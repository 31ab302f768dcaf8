"""Sharding the auction axis over 4 (forced host) devices gives what one device gives.

The check runs in a subprocess, since ``--xla_force_host_platform_device_count`` must be set before
JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxauction import sharding, simulation

SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxauction import sharding, simulation
    from jaxauction.engine import generate
    from jaxauction.models import Llama, LlamaConfig

    assert len(jax.devices()) == 4, jax.devices()
    mesh = sharding.auction_mesh()
    out = {}

    # Mechanism-only simulation: 10 auctions (padded to a multiple of 4), chunks of 4.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 50)) * 2
    logits[1, 0, :5] = -np.inf
    bids = rng.exponential(size=(10, 2))
    index = rng.integers(0, 3, size=10)
    for name, m in (("one", None), ("four", mesh)):
      r = simulation.simulate(logits, bids, index=index, chunk_size=4, mesh=m, progress=False)
      out[f"sim_{name}"] = [r.payments.tolist(), r.values.tolist(), r.favoured.tolist()]
    program = simulation.chunk_program(logits, bids, index=index, chunk_size=8, mesh=mesh)
    out["sim_devices"] = len(program.output_shardings[0].device_set)
    out["sim_specs"] = [str(s.spec) for s in program.input_shardings[0]]
    # Auctions large enough that the payments walk them in a lax.map: still no collective.
    for name, m in (("4", mesh), ("2x2", sharding.make_mesh(auctions=2, model=2))):
      text = simulation.chunk_program(rng.normal(size=(3, 2, 5000)), rng.exponential(size=(64, 2)),
                                      index=rng.integers(0, 3, size=64), chunk_size=64, mesh=m,
                                      rule="log_linear", payment="kl").as_text()
      out[f"sim_collectives_{name}"] = re.findall(
          r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)[\.\d]*\(", text)

    # Generation on a tiny random Llama: 6 auctions (padded to 8) over 4 devices.
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
                         eos_token_ids=(1,), pad_token_id=0)

    class Tok:
      pad_token_id, eos_token_id = 0, 1
      def __len__(self): return 16
      def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids))

    model = (Llama(config, rngs=nnx.Rngs(0)), Tok())
    bids = rng.exponential(size=(6, 2))
    for name, m in (("one", None), ("four", mesh)):
      r = generate([[3, 4, 5], [6, 7]], bids, key=jax.random.key(1), max_new_tokens=8,
                   model=model, mesh=m)
      out[f"gen_{name}"] = [r.tokens.tolist(), r.token_payments.tolist(), r.lengths.tolist()]

    # A heterogeneous batch: 5 auctions with 1-3 agents, some with a base prompt (padded to 8 over 4 devices).
    from jaxauction import Auction
    mixed = [Auction([[3, 4, 5], [6, 7]], [1.0, 0.4]),
             Auction([[8, 9], [10, 11, 12], [5]], [0.2, 0.9, 1.5], base_prompt=[2, 3], base_bid=0.5),
             Auction([[13]], [2.0]),
             Auction([[6, 7, 8, 9]], [1.0], base_prompt=[2, 3], base_bid=1.0),
             Auction([[4, 4], [5, 5]], [0.3, 0.3])]
    for name, m in (("one", None), ("four", mesh)):
      r = generate(mixed, key=jax.random.key(2), max_new_tokens=6, model=model, mesh=m, payment="kl",
                   rule="log_linear")
      out[f"mixed_{name}"] = [r.tokens.tolist(), r.token_payments.tolist(), r.lengths.tolist(),
                              r.num_agents.tolist(), r.valid.tolist()]
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_sharded_simulation_equals_one_device(four_devices):
    one, four = four_devices["sim_one"], four_devices["sim_four"]
    np.testing.assert_allclose(four[0], one[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(four[1], one[1], rtol=1e-6, atol=1e-9)
    assert four[2] == one[2]
    assert four_devices["sim_devices"] == 4


def test_each_device_simulates_its_own_auctions(four_devices):
    """The compiled chunk program (``simulation.chunk_program``, what ``simulate`` runs) takes the bids
    and index split over "auctions" and the logits sets replicated, and holds no collective: no
    device gathers the batch, on a 1-D mesh or with a (replicated) "model" axis. The lax.map of the
    batch outside a shard_map all-gathered the [64, 2, 5000] logits here."""
    assert four_devices["sim_specs"] == ["P()", "P('auctions',)", "P('auctions', None)"]
    assert four_devices["sim_collectives_4"] == [] and four_devices["sim_collectives_2x2"] == []


def test_sharded_generation_equals_one_device(four_devices):
    one, four = four_devices["gen_one"], four_devices["gen_four"]
    assert four[0] == one[0] and four[2] == one[2]
    # Same tokens; payments equal up to float32 rounding (XLA tiles the per-device batch differently).
    np.testing.assert_allclose(four[1], one[1], rtol=1e-5, atol=1e-8)


def test_pad_and_shard_helpers_on_one_device():
    mesh = sharding.auction_mesh(jax.devices()[:1])
    x = np.arange(6.0).reshape(3, 2)
    padded = sharding.pad_batch(x, 5)
    np.testing.assert_array_equal(padded[3:], [[4.0, 5.0], [4.0, 5.0]])
    assert sharding.padded_size(3, mesh) == 3 and sharding.padded_size(3, None) == 3
    placed = sharding.shard_batch(padded, mesh)
    np.testing.assert_array_equal(np.asarray(placed), padded)
    with pytest.raises(ValueError, match="more than size"):
        sharding.pad_batch(x, 2)


def test_simulation_matches_core_mechanism_and_validates():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 20))
    bids = rng.exponential(size=(7, 3))
    index = rng.integers(0, 2, size=7)
    result = simulation.simulate(logits, bids, index=index, chunk_size=3, progress=False)
    from jaxauction import payments

    expected = payments.linear_closed_form(logits[index], bids)
    np.testing.assert_allclose(result.payments, expected, rtol=1e-3, atol=1e-6)
    p = np.exp(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[index]
    lam = bids / bids.sum(-1, keepdims=True)
    q = np.einsum("an,anv->av", lam, p)
    values = -np.sum(p * (np.log(p) - np.log(q[:, None])), axis=-1)
    np.testing.assert_allclose(result.values, values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.welfare, np.sum(bids * values, -1), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.favoured, values.argmax(-1))
    with pytest.raises(ValueError, match=r"bids: .* one bid per agent \(3\)"):
        simulation.simulate(logits, bids[:, :2], progress=False)
    with pytest.raises(ValueError, match="index: expected shape"):
        simulation.simulate(logits, bids, index=np.full(7, 5), progress=False)
    with pytest.raises(ValueError, match="rule: unknown rule"):
        simulation.simulate(logits, bids, rule="cubic", progress=False)


def test_compress_vocabulary_keeps_mass_and_linear_q():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 2, 400)) * 3
    compressed, kept = simulation.compress_vocabulary(logits, mass=0.95)
    assert compressed.shape == (3, 2, kept.shape[1] + 1) and kept.shape[1] < 400
    p = np.exp(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    p_small = np.exp(compressed - np.log(np.exp(compressed.astype(np.float64)).sum(-1, keepdims=True)))
    for s in range(3):
        np.testing.assert_allclose(p_small[s, :, :-1], p[s][:, kept[s]], rtol=1e-5)  # kept tokens exact
        assert np.all(p[s][:, kept[s]].sum(-1) >= 0.95 - 1e-9)  # each agent keeps at least `mass`
    bids = rng.exponential(size=(3, 2))
    from jaxauction import payments

    full = np.asarray(payments.linear_closed_form(logits, bids))
    small = np.asarray(payments.linear_closed_form(compressed, bids))
    # z_i = B TV(p_i, q_-i) f(r) with B f(r) <= b_i; lumping tokens only lowers TV, by at most agent i's
    # lumped mass (<= 1 - mass): so |z_full - z_small| <= (1 - mass) b_i for every agent.
    assert np.all(np.abs(full - small) <= (1 - 0.95) * bids + 1e-6)
    with pytest.raises(ValueError, match="mass"):
        simulation.compress_vocabulary(logits, mass=0.0)


def test_sharded_heterogeneous_batch_equals_one_device(four_devices):
    one, four = four_devices["mixed_one"], four_devices["mixed_four"]
    assert four[0] == one[0] and four[2] == one[2] and four[3] == one[3] == [2, 3, 1, 1, 2]
    assert four[4] == one[4] == [True] * 5
    np.testing.assert_allclose(four[1], one[1], rtol=1e-5, atol=1e-8)
