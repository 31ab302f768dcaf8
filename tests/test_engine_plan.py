"""engine/plan.py: the memory plan and the batch layout of a generation (host-side arithmetic)."""

import dataclasses

import jax
import numpy as np
import pytest
from tiny_llm import PROMPTS, TinyTokenizer, gqa_config, tiny_llama

from jaxauction import prompts as prompts_lib
from jaxauction.engine import generate, parse_memory_budget, plan, plan_chunks
from jaxauction.engine.request import EncodedAuction, GenerateOptions, Request

VOCAB = 16


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB, seed=0), TinyTokenizer(VOCAB)


def test_bucket_pads_less_than_an_eighth_with_eight_sizes_per_octave():
    sizes = range(1, 5000)
    buckets = [plan.bucket(s) for s in sizes]
    assert buckets[:16] == list(range(1, 17))  # exact up to 16
    assert plan.bucket(17) == 18 and plan.bucket(100) == 104
    for size, b in zip(sizes, buckets):
        assert size <= b and (b - size) * 8 < size or size <= 16, (size, b)
        assert plan.bucket(b) == b  # a bucket is its own bucket
    assert all(a <= b for a, b in zip(buckets, buckets[1:]))
    for k in range(5, 12):  # the octave [2^k, 2^(k+1)) holds 8 buckets
        assert len({plan.bucket(s) for s in range(2**k + 1, 2 ** (k + 1) + 1)}) == 8


def test_token_slots_round_up_to_a_multiple_of_eight():
    for tokens in range(1, 200):
        slots = plan.token_slots(tokens)
        assert slots % 8 == 0 and tokens <= slots < tokens + 8


def test_plan_chunks_respects_the_budget():
    for num, each, budget, devices in [(20_000, 10**6, 4 * 1024**3, 1), (21, 50_000, 300_000, 1), (7, 1, 10**9, 4)]:
        size, chunks = plan_chunks(num, each, budget, devices)
        assert size * chunks >= num and size * (chunks - 1) < num
        assert size % devices == 0
        assert size * each <= max(budget, devices * each)
    assert plan_chunks(20_000, 10**6, 4 * 1024**3) == (4096, 5)  # 4294 fit: 5 chunks of 4000 -> bucket 4096


def test_plan_chunks_counts_the_bucketed_row_count():
    """A chunk's cache rows are bucketed (21 rows -> 22): planned on ``size * auction_bytes`` alone,
    seven three-row auctions of 1,000 bytes per row fill a 21,000-byte budget and their 22 rows
    exceed it; with ``chunk_bytes`` the plan takes two chunks of four (12 rows each)."""
    from jaxauction.engine.plan import bucket

    def chunk_bytes(size):
        return bucket(3 * size) * 1000

    assert chunk_bytes(7) > 21_000, "precondition: the bucketed rows of a chunk of 7 exceed the budget"
    assert plan_chunks(7, 3000, 21_000) == (7, 1)
    size, chunks = plan_chunks(7, 3000, 21_000, chunk_bytes=chunk_bytes)
    assert (size, chunks) == (4, 2)  # 2 chunks of ceil(7 / 2) = 4 auctions (12 rows)
    for num, budget, devices in [(1000, 170_000, 1), (1000, 170_000, 4), (33, 10**5, 2), (5, 1000, 1)]:
        size, chunks = plan_chunks(num, 3000, budget, devices, chunk_bytes=chunk_bytes)
        assert size * chunks >= num and size * (chunks - 1) < num and size % devices == 0
        assert chunk_bytes(size) <= budget or size == devices, (num, budget, devices, size)


def test_memory_budget_strings_and_environment(tiny, monkeypatch):
    assert parse_memory_budget("4GB") == 4 * 1024**3 and parse_memory_budget("512 MiB") == 512 * 1024**2
    assert parse_memory_budget(2e9) == 2 * 10**9
    for bad in ("lots", "-1GB", 0, True):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_memory_budget(bad)
    monkeypatch.setenv("JAXAUCTION_MEMORY_BUDGET", "plenty")
    with pytest.raises(ValueError, match="JAXAUCTION_MEMORY_BUDGET: expected a positive size"):
        generate(PROMPTS, [1.0, 1.0, 1.0], max_new_tokens=1, model=tiny)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1.5k", 1536),
        (" 4 gib ", 4 * 1024**3),
        ("1TB", 1024**4),
        ("100", 100),
        ("100b", 100),
        ("2e9", 2 * 10**9),
        (np.int64(5), 5),
        (1.9, 1),  # whole bytes
    ],
)
def test_parse_memory_budget_accepts(value, expected):
    assert parse_memory_budget(value) == expected


@pytest.mark.parametrize(
    "value", ["", "0", "0KB", "inf", "nan", "1e400", "4 GBs", "1e3KB", float("nan"), float("inf"), -5, None, "4GB" * 2]
)
def test_parse_memory_budget_refuses_with_the_argument_named(value):
    with pytest.raises(ValueError, match=r"^budget: expected a positive"):
        parse_memory_budget(value, argument="budget")


def test_default_memory_budget(monkeypatch):
    monkeypatch.setenv("JAXAUCTION_MEMORY_BUDGET", "3MB")
    assert plan.default_memory_budget() == 3 * 1024**2
    monkeypatch.delenv("JAXAUCTION_MEMORY_BUDGET")
    assert 64 * 1024**2 <= plan.default_memory_budget() <= plan.DEFAULT_MEMORY_BUDGET


# ---------------------------------------------------------------------------------------------- make_plan


def _request(*auctions: EncodedAuction) -> Request:
    return Request(list(auctions), single=False, keys=jax.random.split(jax.random.key(0), len(auctions)))


def _auction(*agents, bids=None, base=None, base_bid=0.0) -> EncodedAuction:
    bids = np.ones(len(agents)) if bids is None else np.asarray(bids, float)
    return EncodedAuction(tuple(map(tuple, agents)), bids, None if base is None else tuple(base), base_bid)


def test_make_plan_refuses_prompts_that_leave_no_room_in_the_context(tiny):
    request = _request(_auction([3] * 120, [4] * 5))
    with pytest.raises(
        ValueError,
        match=r"longest prompt has 120 tokens; with max_new_tokens = 9 that is 129 > the model's context of 128",
    ):
        plan.make_plan(request, tiny[0], GenerateOptions.create(max_new_tokens=9), budget=10**9)
    fits = plan.make_plan(request, tiny[0], GenerateOptions.create(max_new_tokens=8), budget=10**9)
    assert fits.max_length == 128 and fits.token_slots == 8


def test_make_plan_geometry_near_the_context(tiny):
    """The token slots are rounded up only as far as the context allows; the prompt width is the
    longest prompt bucketed to PROMPT_BUCKET, cut back to what the slots leave."""
    short = plan.make_plan(
        _request(_auction([3] * 40, [4] * 5)), tiny[0], GenerateOptions.create(max_new_tokens=3), 10**9
    )
    assert (short.width, short.token_slots, short.max_length) == (64, 8, 72)
    assert short.width % prompts_lib.PROMPT_BUCKET == 0
    tight = plan.make_plan(
        _request(_auction([3] * 121, [4] * 5)), tiny[0], GenerateOptions.create(max_new_tokens=3), 10**9
    )
    assert (tight.width, tight.token_slots, tight.max_length) == (121, 7, 128)
    assert tight.max_new_tokens == 3


def test_make_plan_layout_prefills_each_distinct_sequence_once(tiny):
    """Slots are the agents, then the base prompt in slot n_max; equal sequences (within and across
    auctions of a chunk) share one prefilled row; absent slots are not real and bid 0."""
    a = _auction([3, 4], [5], bids=[1.0, 2.0], base=[6, 7], base_bid=0.5)
    b = _auction([5], bids=[3.0])  # one agent, no base prompt: its sequence [5] is a's second agent's
    the_plan = plan.make_plan(_request(a, b), tiny[0], GenerateOptions.create(max_new_tokens=2), 10**9)
    assert (the_plan.chunk_size, the_plan.num_chunks) == (2, 1)
    (layout,) = the_plan.layouts
    assert layout.unique == [(3, 4), (5,), (6, 7)]
    np.testing.assert_array_equal(layout.source, [[0, 1, 2], [1, 0, 0]])
    np.testing.assert_array_equal(layout.real, [[True, True, True], [True, False, False]])
    np.testing.assert_array_equal(layout.bids, [[1.0, 2.0, 0.5], [3.0, 0.0, 0.0]])
    assert the_plan.prefill_rows == plan.bucket(3) and the_plan.num_rows == plan.device_rows(4)


@pytest.mark.parametrize("devices", [1, 2])
def test_make_plan_chunks_cover_the_batch_and_pad_with_the_last_auction(tiny, devices):
    auctions = [_auction([3 + a % 5], [9], bids=[1.0, float(a)]) for a in range(7)]
    options = GenerateOptions.create(max_new_tokens=2)
    whole = plan.make_plan(_request(*auctions), tiny[0], options, 10**9, devices)
    assert whole.devices == devices and whole.num_chunks == 1
    assert whole.chunk_size == -(-7 // devices) * devices  # one chunk, a multiple of the devices
    one = plan.make_plan(_request(*auctions), tiny[0], options, budget=1, devices=devices)
    assert one.chunk_size == devices and one.num_chunks == -(-7 // devices)  # at least one auction per device
    for the_plan in (whole, one):
        bids = np.concatenate([layout.bids for layout in the_plan.layouts])
        assert len(bids) == the_plan.chunk_size * the_plan.num_chunks
        np.testing.assert_array_equal(bids[:7, 1], np.arange(7.0))
        assert np.all(bids[7:, 1] == 6.0)  # padding: copies of the last auction
        # Every device's part of every chunk fits the cache rows of one device.
        for layout in the_plan.layouts:
            assert layout.real.reshape(devices, -1).sum(axis=1).max() <= the_plan.num_rows


def test_plan_is_frozen_and_max_length_derived(tiny):
    the_plan = plan.make_plan(_request(_auction([3, 4])), tiny[0], GenerateOptions.create(max_new_tokens=5), 10**9)
    assert the_plan.max_length == the_plan.width + the_plan.token_slots
    with pytest.raises(dataclasses.FrozenInstanceError):
        the_plan.width = 1


# ------------------------------------------------------------------------------------- per-device memory


class _Device:
    """A device as ``default_memory_budget`` sees it: ``memory_stats()`` and ``process_index``."""

    process_index = 0

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_default_budget_from_device_memory_or_host_ram(monkeypatch):
    """An accelerator that reports its memory gives a share of its free bytes (the least free device
    of the mesh); a CPU device (``memory_stats()`` None) shares the host's budget with the other
    devices of this process."""
    monkeypatch.delenv("JAXAUCTION_MEMORY_BUDGET", raising=False)
    gpus = [_Device({"bytes_limit": 16 * 2**30, "bytes_in_use": 6 * 2**30}), _Device({"bytes_limit": 16 * 2**30})]
    assert plan.default_memory_budget(gpus) == int(plan.DEVICE_MEMORY_FRACTION * 10 * 2**30)
    assert plan.default_memory_budget(gpus[1:]) == int(plan.DEVICE_MEMORY_FRACTION * 16 * 2**30)
    host = plan.default_memory_budget([_Device(None)])
    assert 64 * 1024**2 <= host <= plan.DEFAULT_MEMORY_BUDGET
    assert plan.default_memory_budget([_Device(None)] * 4) == host // 4
    assert plan.default_memory_budget([gpus[0], _Device({})]) == host // 2  # not every device reports its memory
    assert plan.default_memory_budget(jax.devices()[:1]) == host  # this machine's CPU reports none
    remote = _Device(None)
    remote.process_index = 1  # another host's device: its memory is that host's to count
    assert plan.default_memory_budget([gpus[1], remote]) == int(plan.DEVICE_MEMORY_FRACTION * 16 * 2**30)
    monkeypatch.setenv("JAXAUCTION_MEMORY_BUDGET", "3MB")
    assert plan.default_memory_budget(gpus) == 3 * 1024**2


def _split_llama(kv_heads: int):
    from flax import nnx

    from jaxauction.models import Llama

    return Llama(gqa_config(kv_heads), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_device_memory_on_a_2x4_mesh_against_one_device(kv_heads):
    """Eight two-agent auctions with the same two prompts, counted on one device of a (2, 4) mesh and
    on one device alone: weights / 4 (the norms replicated, and q|k|v with 2 heads), the cache / 4 when the key/value heads
    split (4 heads: yes; 2 heads: replicated), half the auctions and rows per device, each device
    prefilling only its two distinct prompts."""
    L, D, F, H, K, hd, V = 2, 64, 64, 8, kv_heads, 8, 32
    llm = _split_llama(kv_heads)
    auctions = [_auction([3, 4, 5], [6, 7], bids=[1.0, 0.1 * a]) for a in range(8)]
    options = GenerateOptions.create(max_new_tokens=8)
    one = plan.make_plan(_request(*auctions), llm, options, 10**9)
    mesh = plan.make_plan(_request(*auctions), llm, options, 10**9, devices=2, model_devices=4)
    # Replicated over "model": the norms, and the q|k|v projection when the K heads do not split.
    replicated = 4 * (2 * L * D + D) + (4 * L * D * (H + 2 * K) * hd if K % 4 else 0)
    total = 4 * (llm.config.num_parameters() + D * V)  # float32 parameters and the [D, V] head copy
    S, W, T = one.max_length, one.suffix_width, one.token_slots
    assert (mesh.max_length, mesh.suffix_width, T) == (S, W, 8)
    for the_plan, a, t, rows in ((one, 1, 1, 16), (mesh, 2, 4, 8)):
        assert (the_plan.chunk_size, the_plan.num_chunks, the_plan.num_rows, the_plan.prefill_rows) == (8, 1, rows, 2)
        kv = 2 * L * S * K * hd * 4 // (t if K % t == 0 else 1)
        decode_row = kv + 4 * (8 * D + (3 * F + H * S) // t)
        prefill_row = kv + 4 * W * (8 * D + (3 * F + H * S) // t)
        auction = 2 * 4 * V * (8 + 2 * 2) + 4 * T * (2 + 2)
        expected = plan.DeviceMemory(
            weights=total if t == 1 else (total - replicated) // t + replicated,
            cache=rows * decode_row,
            prefill=2 * prefill_row,
            logits=4 * V * (rows + 2),
            auctions=8 // a * auction,
        )
        assert the_plan.memory == expected
    assert mesh.memory.working < one.memory.working
    # A per-device budget that one (2, 4) device's part fits splits the batch on one device.
    tight = plan.make_plan(_request(*auctions), llm, options, mesh.memory.working, devices=2, model_devices=4)
    assert (tight.chunk_size, tight.num_chunks) == (8, 1)
    assert plan.make_plan(_request(*auctions), llm, options, mesh.memory.working).num_chunks > 1


def test_each_device_prefills_its_own_distinct_sequences():
    """Two devices: the first device's auctions hold sequences 0, 1; the second's 1, 2, 3."""
    auctions = [_auction([3], [4]), _auction([4], [3]), _auction([4], [5]), _auction([6], [5])]
    llm = _split_llama(4)
    the_plan = plan.make_plan(_request(*auctions), llm, GenerateOptions.create(max_new_tokens=2), 10**9, devices=2)
    (layout,) = the_plan.layouts
    assert [d.tolist() for d in layout.device_sequences(2)] == [[0, 1], [1, 2, 3]]
    assert the_plan.prefill_rows == 3 and the_plan.num_rows == plan.device_rows(4)
    from jaxauction.engine import chunk

    prefilled, gather, slot_rows = chunk.device_rows_of(layout, the_plan)
    assert prefilled.tolist() == [0, 1, 0, 1, 2, 3]  # each device's distinct sequences, padded by repeating
    assert gather.reshape(2, -1)[:, :3].tolist() == [[0, 1, 0], [0, 1, 2]]
    np.testing.assert_array_equal(slot_rows, [[0, 1], [1, 0], [0, 1], [2, 1]])
    for d in range(2):  # every slot's row holds its own sequence
        for a in range(2 * d, 2 * d + 2):
            for slot in range(2):
                row = slot_rows[a, slot]
                local = gather.reshape(2, -1)[d, row]
                assert prefilled.reshape(2, -1)[d, local] == layout.source[a, slot]
