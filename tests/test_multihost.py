"""Several hosts, run for real: two processes on localhost (``jax.distributed.initialize`` with gloo CPU
collectives, 4 CPU devices each) run ``generate`` and ``simulate`` on a mesh over all 8 devices and
get exactly what one process with 8 devices gets.

Every process holds the same inputs and runs the same programs; the arrays split over the mesh's
``"auctions"`` axis live half in each process, so the engine places them with ``sharding.put`` and
reads them back with ``sharding.host_value`` (which gathers the other process's shards). The three
processes (two of a distributed run and the single-process reference) start together, each writes its
results as JSON to a file, and all are killed if any runs past the timeout.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TIMEOUT_S = 300  # generous for a loaded 2-core machine (about 40 s when it is idle)

SCRIPT = textwrap.dedent(r"""
    import json, sys
    process_id, num_processes, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 8 // num_processes)
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id)
    import numpy as np
    from flax import nnx
    from jaxauction import sharding, simulation
    from jaxauction.engine import generate
    from jaxauction.models import Llama, LlamaConfig

    assert jax.process_count() == num_processes and len(jax.devices()) == 8, jax.devices()

    class Tok:
        pad_token_id, eos_token_id = 0, 1
        def __len__(self): return 32
        def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids))

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=64, eos_token_ids=(1,), pad_token_id=0)
    model = (Llama(config, rngs=nnx.Rngs(0)), Tok())
    rng = np.random.default_rng(0)
    bids = rng.exponential(size=(8, 2))
    out = {"processes": jax.process_count(), "local_devices": len(jax.local_devices())}
    meshes = {"8": sharding.auction_mesh(), "4x2": sharding.make_mesh(auctions=4, model=2)}
    for name, mesh in meshes.items():
        r = generate([[3, 4, 5], [6, 7]], bids, key=jax.random.key(1), max_new_tokens=5, model=model, mesh=mesh,
                     decoding="greedy")
        out[f"tokens_{name}"], out[f"payments_{name}"] = r.tokens.tolist(), r.token_payments.tolist()
    logits = rng.normal(size=(3, 2, 50)) * 2
    sim = simulation.simulate(logits, rng.exponential(size=(10, 2)), chunk_size=8, mesh=meshes["8"], progress=False)
    out["simulate"] = sim.payments.tolist()
    with open(path, "w") as f:
        json.dump(out, f)
""")


def _gloo_missing() -> str | None:
    """Why this jaxlib cannot run CPU collectives across processes (None when it can)."""
    from jax._src.lib import _jax

    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return "this jaxlib has no gloo CPU collectives (jax._src.lib._jax.make_gloo_tcp_collectives is missing)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(commands, tmp_path) -> list[dict]:
    """Starts every command at once; waits for all (killing all past ``TIMEOUT_S``); their JSON outputs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXAUCTION_CACHE_DIR="off")
    env.pop("XLA_FLAGS", None)
    logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(len(commands))]
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, args)], stdout=log, stderr=subprocess.STDOUT, env=env)
        for args, log in zip(commands, logs)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    tails = []
    for log in logs:
        log.seek(0)
        tails.append(log.read()[-3000:])
        log.close()
    for proc, tail in zip(procs, tails):
        assert proc.returncode == 0, f"a process ended with {proc.returncode} (killed after {TIMEOUT_S} s?):\n{tail}"
    return [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(len(commands))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reason = _gloo_missing()
    if reason:
        pytest.skip(reason)
    tmp_path = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    commands = [
        (0, 1, 0, tmp_path / "out0.json"),  # the reference: one process, 8 devices
        (0, 2, port, tmp_path / "out1.json"),
        (1, 2, port, tmp_path / "out2.json"),
    ]
    return _run_all(commands, tmp_path)


def test_the_distributed_run_spans_two_processes(runs):
    single, first, second = runs
    assert (single["processes"], single["local_devices"]) == (1, 8)
    assert (first["processes"], first["local_devices"]) == (second["processes"], second["local_devices"]) == (2, 4)


@pytest.mark.parametrize("mesh", ["8", "4x2"])
def test_generate_on_two_hosts_equals_one_host(runs, mesh):
    """Greedy tokens and payments equal to the single process's, on both processes (the same programs
    over the same 8 devices, the auctions split over both processes; on (4, 2) the model pairs)."""
    single, *distributed = runs
    for out in distributed:
        assert out[f"tokens_{mesh}"] == single[f"tokens_{mesh}"]
        np.testing.assert_allclose(out[f"payments_{mesh}"], single[f"payments_{mesh}"], rtol=1e-6, atol=1e-9)
    assert np.abs(np.asarray(single[f"payments_{mesh}"])).max() > 0


def test_simulate_on_two_hosts_equals_one_host(runs):
    single, *distributed = runs
    for out in distributed:
        np.testing.assert_allclose(out["simulate"], single["simulate"], rtol=1e-6, atol=1e-9)
    assert np.abs(np.asarray(single["simulate"])).max() > 0
