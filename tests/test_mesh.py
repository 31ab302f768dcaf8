"""Meshes with a ``"model"`` axis: ``make_mesh(auctions=a, model=t)`` on 8 forced host devices gives
what one device gives, and meshes with other axes are refused with the fix.

The 8-device checks run in one subprocess (``--xla_force_host_platform_device_count`` must be set
before JAX starts); the refusals run here on one device.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from tiny_llm import TinyTokenizer, tiny_llama

from jaxauction import sharding, simulation

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from jaxauction import sharding, simulation
    from jaxauction.engine import generate
    from jaxauction.models import Llama, LlamaConfig

    assert len(jax.devices()) == 8, jax.devices()
    MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))

    class Tok:
      pad_token_id, eos_token_id = 0, 1
      def __len__(self): return 32
      def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids))

    def tiny(kv_heads):
      config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=8,
                           num_kv_heads=kv_heads, head_dim=8, max_position_embeddings=64, eos_token_ids=(1,),
                           pad_token_id=0)
      return Llama(config, rngs=nnx.Rngs(kv_heads)), Tok()

    rng = np.random.default_rng(0)
    bids = rng.exponential(size=(6, 2))
    out = {}

    def run(model, mesh):
      r = generate([[3, 4, 5], [6, 7]], bids, key=jax.random.key(1), max_new_tokens=8, model=model, mesh=mesh,
                   decoding="greedy")
      return [r.tokens.tolist(), r.token_payments.tolist()]

    model = tiny(4)
    out["gen_none"] = run(model, None)
    for a, t in MESHES:
      out[f"gen_{a}x{t}"] = run(model, sharding.make_mesh(auctions=a, model=t))

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


@pytest.mark.parametrize("shape", MESHES)
def test_model_axis_meshes_give_one_device_results(eight_devices, shape):
    tokens, payments = eight_devices["gen_none"]
    got_tokens, got_payments = eight_devices["gen_{}x{}".format(*shape)]
    assert got_tokens == tokens
    largest = np.abs(np.asarray(payments)).max()
    assert largest > 0
    np.testing.assert_allclose(got_payments, payments, rtol=0, atol=1e-5 * largest)


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
