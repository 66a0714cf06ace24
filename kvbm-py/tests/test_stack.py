"""TierStack over system memory: zero-copy views, offload to G2, plan-then-commit onboarding
with every byte checked, back-pressure, and CUDA without a GPU."""

import gc
import random

import numpy as np
import pytest

import kvbm


def make_stack(g1=4, g2=16, **kw):
    kw.setdefault("num_layers", 2)
    kw.setdefault("inner_dim", 8)
    return kvbm.TierStack(g1, g2, 4, **kw)


def fill(stack, block, rng):
    data = bytes(rng.getrandbits(8) for _ in range(stack.block_bytes))
    block.write(data)
    return data


def test_view_is_zero_copy_and_numpy_reads_it():
    stack = make_stack(g1_layout="fully_contiguous")
    (b,) = stack.allocate(1)
    view = b.view()
    assert isinstance(view, memoryview) and not view.readonly
    assert len(view) == stack.block_bytes
    arr = np.asarray(view)
    arr[:] = np.arange(len(arr), dtype=np.uint8)
    assert b.read() == bytes(arr)  # written through the view, read by a copy
    view[0] = 255
    assert b.read()[0] == 255 and arr[0] == 255
    # Region views of a layer-separate layout.
    stack2 = make_stack()
    (c,) = stack2.allocate(1)
    with pytest.raises(kvbm.ConfigError):
        c.view()
    k = c.view(layer=1, outer=0)
    v = c.view(layer=1, outer=1)
    np.asarray(k)[:] = 1
    np.asarray(v)[:] = 2
    image = c.read()
    half = len(image) // 2  # layer 0 (K, V), then layer 1 (K, V) in block-image order
    assert image[:half] == bytes(half)
    assert set(image[half:]) == {1, 2}
    with pytest.raises(kvbm.TransferError):
        c.view(layer=2)


def test_registered_view_is_read_only_and_holds_the_block():
    stack = make_stack(g1_layout="fully_contiguous")
    rng = random.Random(1)
    (b,) = stack.allocate(1)
    data = fill(stack, b, rng)
    (reg,) = stack.register([b], hashes=[11])
    view = reg.view()
    assert view.readonly and bytes(view) == data
    with pytest.raises(TypeError):
        view[0] = 0
    reg.release()
    gc.collect()
    # The view still holds the block: it is active, not evictable.
    assert stack.counts()["g1"]["active"] == 1
    del view
    gc.collect()
    assert stack.counts()["g1"]["active"] == 0


def test_offload_then_onboard_round_trip_bytes():
    rng = random.Random(7)
    stack = make_stack(g1=4, g2=16)
    hashes = kvbm.hash_tokens(list(range(16)), 4)
    blocks = stack.allocate(4)
    images = [fill(stack, b, rng) for b in blocks]
    stack.release(stack.register(blocks, hashes=hashes))
    stack.flush()
    assert stack.g2_contains(hashes) == [True] * 4
    # Push the prefix out of G1.
    filler = stack.allocate(4)
    stack.release(stack.register(filler, hashes=[1000 + i for i in range(4)]))
    stack.flush()  # their offloads hold them until copied
    plan = stack.lookup(hashes)
    assert len(plan) == 4 and plan.g1_hits == 0 and plan.tiers == ["G2"] * 4
    pending = stack.onboard(plan)
    with pytest.raises(kvbm.ReleasedError):
        stack.onboard(plan)  # consumed
    done = pending.wait()
    assert done.onboarded == 4 and done.lost == [] and done.end is None
    assert [b.sequence_hash for b in done.blocks] == hashes
    assert [b.read() for b in done.blocks] == images
    stack.release(done.blocks)
    stats = stack.stats()
    g2 = stats["tiers"][1]
    assert g2["tier"] == "G2"
    assert (g2["offloaded"], g2["onboarded"], g2["lookup_hits"]) == (8, 4, 4)
    assert "# TYPE" in stack.prometheus()
    stack.check_invariants()


def test_no_room_keeps_the_plan():
    rng = random.Random(3)
    stack = make_stack(g1=2, g2=8)
    blocks = stack.allocate(2)
    for b in blocks:
        fill(stack, b, rng)
    stack.release(stack.register(blocks, hashes=[1, 2]))
    stack.flush()
    held = stack.register(stack.allocate(2), hashes=[3, 4])  # G1 full of held blocks
    plan = stack.lookup([1, 2])
    with pytest.raises(kvbm.NoRoomError) as info:
        stack.onboard(plan)
    assert info.value.needed == 2 and info.value.available == 0
    assert len(plan) == 2  # handed back: usable for a retry
    stack.release(held)
    stack.flush()
    done = stack.onboard(plan).wait()
    assert done.onboarded == 2
    stack.release(done.blocks)
    stack.check_invariants()


def test_cancel_and_try_complete():
    rng = random.Random(5)
    stack = make_stack(g1=4, g2=8)
    blocks = stack.allocate(2)
    for b in blocks:
        fill(stack, b, rng)
    stack.release(stack.register(blocks, hashes=[1, 2]))
    stack.flush()
    stack.release(stack.register(stack.allocate(4), hashes=[5, 6, 7, 8]))
    stack.flush()
    pending = stack.onboard(stack.lookup([1, 2]))
    pending.cancel()
    pending.cancel()
    stack.flush()
    c = stack.check_invariants()["g1"]
    assert c["mutable"] == 0
    pending = stack.onboard(stack.lookup([1, 2]))
    done = None
    while done is None:
        done = pending.try_complete()
    # The cancelled copy may have landed first (then its blocks are G1 hits now).
    assert [b.sequence_hash for b in done.blocks] == [1, 2]
    assert done.g1_hits + done.onboarded == 2
    with pytest.raises(kvbm.ReleasedError):
        pending.wait()


def test_foreign_and_wrong_blocks_refused():
    s1, s2 = make_stack(), make_stack()
    m = kvbm.BlockManager(block_count=4, block_size=4)
    (a,) = s1.allocate(1)
    with pytest.raises(kvbm.ForeignBlockError):
        s2.register([a], hashes=[1])
    with pytest.raises(kvbm.ForeignBlockError):
        m.register([a], hashes=[1])
    assert not a.released
    with pytest.raises(kvbm.ForeignBlockError):
        s2.onboard(s1.lookup([1]))


def test_cuda_without_a_gpu_is_a_typed_error():
    try:
        stack = make_stack(device="cuda")
    except kvbm.CudaUnavailableError as e:
        assert str(e)
    else:  # a GPU machine: G1 is device memory, reached by copies only
        assert "Device" in stack.g1_memory
        (b,) = stack.allocate(1)
        with pytest.raises(kvbm.TransferError):
            b.view()


@pytest.mark.parametrize(
    "kw",
    [
        dict(device="tpu"),
        dict(g1_layout="diagonal"),
        dict(write_mode="sometimes"),
        dict(outer_dim=3),
        dict(num_layers=0),
    ],
)
def test_bad_stack_configuration(kw):
    with pytest.raises(kvbm.ConfigError):
        make_stack(**kw)


def test_write_through_watermarks_keep_a_free_reserve():
    # G1 8 blocks, reserve 2..4: after 7 blocks are taken and released, a worker evicts
    # the coldest until 4 are free; without watermarks G1 keeps all 7 cached.
    for reserve in (False, True):
        kw = dict(low_watermark=2, high_watermark=4) if reserve else {}
        stack = make_stack(g1=8, g2=32, worker_linger=0.0005, **kw)
        stack.release(stack.register(stack.allocate(4), hashes=[1, 2, 3, 4]))
        stack.flush()
        stack.release(stack.register(stack.allocate(3), hashes=[11, 12, 13]))
        stack.flush()
        g1 = stack.counts()["g1"]
        assert g1["reset"] == (4 if reserve else 1), g1
        assert (stack.stats()["reclaim_runs"] > 0) == reserve
        # Every block is still served, from G1 or G2.
        plan = stack.lookup([1, 2, 3, 4])
        assert len(plan) == 4
        stack.release(stack.onboard(plan).wait().blocks)
        stack.check_invariants()


@pytest.mark.parametrize("linger", [-1.0, float("nan"), float("inf")])
def test_a_bad_worker_linger_is_a_config_error(linger):
    with pytest.raises(kvbm.ConfigError):
        make_stack(worker_linger=linger)


def test_write_back_mode_builds_and_serves():
    stack = make_stack(g1=8, g2=16, write_mode="write_back", low_watermark=2, high_watermark=4)
    for round_ in range(4):
        blocks = stack.allocate(4)
        stack.release(stack.register(blocks, hashes=[round_ * 10 + i for i in range(4)]))
    stack.flush()
    stack.check_invariants()


def d_slot_free(stack, view):
    """Whether every G1 block can be allocated now (False while a parked block holds one)."""
    try:
        batch = stack.allocate_batch(4)
    except kvbm.AllocationError:
        return False
    batch.release()
    return True


def test_a_writable_view_keeps_its_block_from_being_registered_or_reused():
    """Writes through a view of an allocated block would land in a registered (shared,
    offloaded) block, or in a slot given to another request: while a view (or an array made
    from it) lives, the block cannot be staged, registered or released, and a handle
    released or garbage collected meanwhile keeps its slot until the last view goes."""
    import gc

    stack = make_stack(g1_layout="fully_contiguous")
    (b,) = stack.allocate(1)
    arr = np.asarray(b.view())
    arr[:] = 7
    for call in (lambda: b.stage(1), lambda: stack.register([b], hashes=[1])):
        with pytest.raises(kvbm.InvalidBlockError, match="view"):
            call()
        assert not b.released  # nothing was changed
    del arr
    gc.collect()
    (reg,) = stack.register([b], hashes=[1])
    assert reg.read() == bytes([7]) * stack.block_bytes
    stack.release([reg])

    # A handle released (or dropped, or left by a `with`) while its view lives: the slot is
    # not handed out again until the view goes.
    (c,) = stack.allocate(1)
    slot = c.block_id
    view = c.view()
    with c:
        pass
    assert c.released
    del c
    gc.collect()
    taken = stack.allocate_batch(3)  # every other G1 block (G1 holds 4)
    assert slot not in taken.block_ids
    taken.release()
    del view
    gc.collect()
    again = stack.allocate_batch(4)
    assert slot in again.block_ids
    again.release()

    # A batch: the same rules.
    batch = stack.allocate_batch(2)
    v = batch.view(0)
    for call in (
        lambda: stack.register(batch, hashes=[5, 6]),
        lambda: batch.handles(),
    ):
        with pytest.raises(kvbm.InvalidBlockError, match="view"):
            call()
        assert not batch.released
    del v
    gc.collect()
    stack.release(stack.register(batch, hashes=[5, 6]))
    # Released through the manager while a view lives: parked until the view goes.
    (d,) = stack.allocate(1)
    dv = d.view()
    assert stack.release([d]) == 1 and d.released
    assert d_slot_free(stack, dv) is False
    del dv
    gc.collect()
    stack.check_invariants()


def test_write_takes_any_contiguous_buffer_in_one_copy():
    """numpy arrays of any dtype and shape, memoryviews and bytearrays are written as their
    bytes (one C-level copy, never element by element); a non-contiguous one is refused."""
    stack = make_stack(g1_layout="fully_contiguous")
    (b,) = stack.allocate(1)
    n = stack.block_bytes
    kv = np.arange(n // 2, dtype=np.uint16).reshape(2, -1)  # 2-D, 2-byte elements
    b.write(kv)
    assert b.read() == kv.tobytes()
    b.write(memoryview(bytes(range(256)) * (n // 256)))
    assert b.read() == bytes(range(256)) * (n // 256)
    b.write(bytearray(n))
    assert b.read() == bytes(n)
    wide = np.zeros((2, n), dtype=np.uint8)
    with pytest.raises(kvbm.TransferError):
        b.write(wide[:, ::2])  # every other byte: not contiguous
    with pytest.raises(TypeError):
        b.write(12345)
    with pytest.raises(kvbm.TransferError):
        b.write(np.zeros(n + 1, dtype=np.uint8))  # one byte too many
    cplx = np.zeros(n // 8, dtype=np.complex64)  # an element format `cast` refuses
    cplx.real = np.arange(n // 8)
    b.write(cplx)
    assert b.read() == cplx.tobytes()
    batch = stack.allocate_batch(1)
    batch.write(0, kv)
    assert batch.read(0) == kv.tobytes()
    batch.release()
    b.release()


def test_a_pending_and_an_event_stream_can_be_shared_between_threads():
    """One thread waits on an onboard (or polls events, GIL released) while another asks
    about it: no PyO3 'Already borrowed' RuntimeError."""
    import threading

    stack = make_stack()
    rng = random.Random(4)
    hashes = kvbm.hash_tokens(list(range(16)), 4)
    blocks = stack.allocate(4)
    for b in blocks:
        fill(stack, b, rng)
    stack.release(stack.register(blocks, hashes=hashes))
    stack.flush()
    stack.release(stack.register(stack.allocate_batch(4), hashes=list(range(900, 904))))
    stack.flush()
    pending = stack.onboard(stack.lookup(hashes))
    results = []
    waiter = threading.Thread(target=lambda: results.append(pending.wait()))
    waiter.start()
    for _ in range(100):
        pending.ready  # noqa: B018 (a read from another thread while it waits)
        len(pending)
    waiter.join()
    assert len(results) == 1
    stack.release(results[0].blocks)
    stack.release(results[0].spare)
    with pytest.raises(kvbm.ReleasedError):
        pending.wait()

    m = kvbm.BlockManager(8, 4)
    events = m.subscribe(16)
    got = []
    poller = threading.Thread(target=lambda: got.extend(events.poll(timeout=2.0)))
    poller.start()
    assert events.dropped_events == 0  # while the poll waits
    assert next(iter(events), None) is None
    m.release(m.register(m.allocate_batch(1), hashes=[5]))
    poller.join()
    assert [e.kind for e in got] == ["stored"]
