"""BlockManager and the block handles: lifecycle, batches, errors, release paths, events,
metrics."""

import gc

import pytest

import kvbm
from _util import conserved, run_threads


def make(n=16, bs=4, **kw):
    return kvbm.BlockManager(block_count=n, block_size=bs, **kw)


def test_lifecycle_type_state():
    m = make()
    (b,) = m.allocate(1)
    assert isinstance(b, kvbm.MutableBlock)
    bid = b.block_id
    staged = b.stage(0xABC, parent=None)
    assert isinstance(staged, kvbm.CompleteBlock)
    assert staged.sequence_hash == 0xABC and staged.block_id == bid
    with pytest.raises(kvbm.ReleasedError, match="consumed by stage"):
        b.block_id
    (reg,) = m.register([staged])
    assert isinstance(reg, kvbm.ImmutableBlock) and reg.sequence_hash == 0xABC
    with pytest.raises(kvbm.ReleasedError, match="consumed by register"):
        staged.sequence_hash
    assert conserved(m)["active"] == 1
    reg.release()
    reg.release()  # idempotent
    c = conserved(m)
    assert (c["active"], c["inactive"]) == (0, 1)
    assert [h.sequence_hash for h in m.match([0xABC])] == [0xABC]


def test_fused_register_chains_parents():
    m = make()
    hashes = kvbm.hash_tokens(list(range(12)), 4)
    events = m.subscribe()
    blocks = m.register(m.allocate(3), hashes=hashes)
    assert [b.sequence_hash for b in blocks] == hashes
    (ev,) = list(events)
    assert ev.kind == "stored" and ev.block_hashes == hashes and ev.parent is None
    assert ev.tier == "device"
    assert m.release(blocks) == 3
    assert len(m.match(hashes + [12345])) == 3
    assert conserved(m)["inactive"] == 3


def test_reset_returns_a_mutable_block():
    m = make()
    staged = m.allocate(1)[0].stage(7)
    again = staged.reset()
    assert isinstance(again, kvbm.MutableBlock)
    with pytest.raises(kvbm.ReleasedError, match="reset"):
        staged.sequence_hash
    again.release()
    assert conserved(m)["reset"] == 16


def test_allocation_error_takes_nothing():
    m = make(4)
    held = m.allocate(3)
    with pytest.raises(kvbm.AllocationError) as info:
        m.allocate(2)
    assert (info.value.requested, info.value.available, info.value.total) == (2, 1, 4)
    assert "only 1 of 4" in str(info.value)
    assert isinstance(info.value, kvbm.Error)
    assert m.available_blocks == 1
    m.release(held)
    assert m.available_blocks == 4


@pytest.mark.parametrize("count", [-1, -(2**70), 2**64, 2**70])
def test_bad_counts_raise(count):
    m = make(4)
    with pytest.raises((OverflowError, kvbm.AllocationError)):
        m.allocate(count)
    assert conserved(m)["reset"] == 4


def test_huge_but_valid_count_is_an_allocation_error():
    m = make(4)
    with pytest.raises(kvbm.AllocationError):
        m.allocate(2**63)


def test_wrong_types_raise_type_errors():
    m = make(4)
    with pytest.raises(TypeError):
        m.allocate("3")
    with pytest.raises(TypeError):
        m.register([object()])
    with pytest.raises(TypeError):
        m.register(m.allocate(1))  # MutableBlocks without hashes
    with pytest.raises(TypeError):
        m.match(["a"])
    with pytest.raises(TypeError):
        m.release([1])
    with pytest.raises(TypeError):
        m.register(5)
    gc.collect()
    assert conserved(m)["reset"] == 4


def test_mismatched_hash_count_changes_nothing():
    m = make(4)
    blocks = m.allocate(2)
    with pytest.raises(ValueError):
        m.register(blocks, hashes=[1])
    assert all(not b.released for b in blocks)
    assert conserved(m)["mutable"] == 2


def test_block_listed_twice_changes_nothing():
    m = make(4)
    (b,) = m.allocate(1)
    with pytest.raises(kvbm.InvalidBlockError, match="twice"):
        m.register([b, b], hashes=[1, 2])
    assert not b.released
    staged = b.stage(1)
    with pytest.raises(kvbm.InvalidBlockError, match="twice"):
        m.register([staged, staged])
    with pytest.raises(kvbm.InvalidBlockError, match="twice"):
        m.release([staged, staged])
    assert not staged.released
    assert conserved(m)["mutable"] == 1


def test_foreign_blocks_are_refused_whole():
    m, other = make(4), make(4)
    mine = m.allocate(1)[0].stage(1)
    theirs = other.allocate(1)[0].stage(2)
    with pytest.raises(kvbm.ForeignBlockError):
        m.register([mine, theirs])
    assert not mine.released and not theirs.released
    with pytest.raises(kvbm.ForeignBlockError):
        m.release([mine, theirs])
    assert not mine.released
    assert m.release([mine]) == 1 and other.release([theirs]) == 1
    assert conserved(m)["reset"] == 4 and conserved(other)["reset"] == 4


def test_released_handles_raise_on_use():
    m = make(4)
    (b,) = m.allocate(1)
    b.release()
    assert b.released
    with pytest.raises(kvbm.ReleasedError):
        b.stage(1)
    with pytest.raises(kvbm.ReleasedError):
        m.register([b], hashes=[1])
    assert m.release([b]) == 0  # already released: skipped
    assert conserved(m)["reset"] == 4


def test_context_managers_and_holding():
    m = make(4)
    with m.allocate(1)[0] as b:
        assert m.available_blocks == 3
    assert b.released and m.available_blocks == 4
    with pytest.raises(RuntimeError):
        with kvbm.holding(m.allocate(2)):
            raise RuntimeError("boom")
    assert m.available_blocks == 4
    (reg,) = m.register(m.allocate(1), hashes=[9])
    with reg:
        assert conserved(m)["active"] == 1
    assert conserved(m)["inactive"] == 1


def test_garbage_collection_releases():
    m = make(8)
    blocks = m.allocate(4)
    staged = blocks[0].stage(1)
    registered = m.register([staged])
    assert conserved(m)["mutable"] == 3
    del blocks, staged
    gc.collect()
    assert conserved(m)["mutable"] == 0
    del registered
    gc.collect()
    c = conserved(m)
    assert (c["active"], c["inactive"], c["reset"]) == (0, 1, 7)


def test_handles_outlive_their_manager_object():
    m = make(4)
    blocks = m.allocate(2)
    del m
    gc.collect()
    for b in blocks:
        b.release()  # the store lives as long as a handle does


def test_clone_adds_an_owner():
    m = make(4)
    (a,) = m.register(m.allocate(1), hashes=[5])
    b = a.clone()
    a.release()
    assert conserved(m)["active"] == 1
    b.release()
    assert conserved(m)["inactive"] == 1


def test_duplicate_registration_returns_existing_block():
    m = make(4)
    (first,) = m.register(m.allocate(1), hashes=[5])
    (second,) = m.register(m.allocate(1), hashes=[5])
    assert second.block_id == first.block_id
    c = conserved(m)
    assert (c["active"], c["reset"]) == (1, 3)


@pytest.mark.parametrize("backend", kvbm.EVICTION_BACKENDS)
def test_every_backend_builds_and_evicts(backend):
    m = make(4, eviction=backend)
    assert m.eviction == backend
    m.release(m.register(m.allocate(4), hashes=[1, 2, 3, 4]))
    blocks, evicted = m.allocate_with_evictions(2)
    assert len(evicted) == 2 and set(evicted) <= {1, 2, 3, 4}
    m.release(blocks)
    conserved(m)


@pytest.mark.parametrize(
    "kw",
    [
        dict(block_count=0, block_size=4),
        dict(block_count=4, block_size=3),
        dict(block_count=4, block_size=0),
        dict(block_count=4, block_size=2**20),
        dict(block_count=4, block_size=4, eviction="nope"),
        dict(block_count=4, block_size=4, duplication="maybe"),
        dict(block_count=4, block_size=4, max_pinned_fraction=1.5),
        dict(block_count=4, block_size=4, eviction="multi_lru", frequency_tracking="disabled"),
    ],
)
def test_bad_configuration_raises_config_error(kw):
    with pytest.raises(kvbm.ConfigError):
        kvbm.BlockManager(**kw)


def test_pins_and_budget():
    m = make(4, max_pinned_fraction=0.5)
    m.release(m.register(m.allocate(3), hashes=[1, 2, 3]))
    assert m.pin([1, 2]) == 2
    with pytest.raises(kvbm.PinError):
        m.pin([3])
    with pytest.raises(kvbm.PinError):
        m.pin([99])
    assert m.available_blocks == 2
    assert m.unpin([1, 2]) == 2
    assert m.available_blocks == 4


def test_events_iterator_and_poll():
    m = make(2)
    events = m.subscribe(capacity=16)
    m.release(m.register(m.allocate(2), hashes=[1, 2]))
    m.release(m.allocate(2))  # evicts both
    got = list(events)
    assert [e.kind for e in got] == ["stored", "removed"]
    assert got[1].reason == "evicted" and sorted(got[1].block_hashes) == [1, 2]
    assert got[1].seq == got[0].seq + 1
    assert list(events) == []
    assert events.poll(timeout=0.01) == []
    m.release(m.register(m.allocate(1), hashes=[3]))
    assert [e.kind for e in events.poll(timeout=1.0)] == ["stored"]
    assert events.dropped_events == 0
    assert m.invalidate([3]) == 1
    (ev,) = list(events)
    assert ev.reason == "invalidated"


def test_scan_touch_contains():
    m = make(4)
    m.release(m.register(m.allocate(2), hashes=[1, 3]))
    assert m.contains(1) and not m.contains(2)
    assert [b.sequence_hash for b in m.scan([1, 2, 3])] == [1, 3]
    gc.collect()
    assert m.touch([1, 3, 5]) == 2
    assert m.reset_inactive_pool() == 2
    assert conserved(m)["reset"] == 4


def test_metrics_and_prometheus():
    m = make(4)
    m.release(m.register(m.allocate(2), hashes=[1, 2]))
    m.release(m.match([1, 2, 3]))
    snap = m.metrics()
    assert snap["registrations"] == 2
    assert (snap["match_requested"], snap["match_returned"]) == (3, 2)
    text = m.prometheus()
    assert "# TYPE" in text and "kvbm" in text


def test_repr():
    m = make(4)
    assert "BlockManager(block_count=4" in repr(m)
    (b,) = m.allocate(1)
    assert "MutableBlock(block_id=" in repr(b)
    b.release()
    assert "released" in repr(b)


def test_view_needs_memory():
    m = make(4)
    (b,) = m.allocate(1)
    with pytest.raises(kvbm.ConfigError):
        b.view()


def test_threads_share_a_manager_with_the_gil_released():
    """Batches of 128 release the GIL inside Rust: threads interleave their calls on one
    manager; every block comes back and the invariants hold."""
    m = make(4096, 16, eviction="lineage")

    def worker(t):
        for r in range(40):
            hashes = kvbm.hash_tokens(list(range(t * 10**6 + r * 2048, t * 10**6 + r * 2048 + 2048)), 16)
            got = m.match(hashes)
            fresh = m.allocate(len(hashes) - len(got))
            m.release(got + m.register(fresh, hashes=hashes[len(got) :], parent=hashes[len(got) - 1] if got else None))

    run_threads(worker)
    c = conserved(m)
    assert (c["mutable"], c["active"]) == (0, 0)


def test_reset_inactive_pool_with_held_blocks():
    m = make(4)
    held = m.register(m.allocate(2), hashes=[1, 2])
    m.release(held[:1])
    assert m.reset_inactive_pool() == 1  # the held one stays
    assert not m.contains(1) and m.contains(2)
    m.release(held)
    assert m.reset_inactive_pool() == 1
    assert conserved(m)["reset"] == 4


def test_purge_all_forgets_held_blocks_too():
    """After a weight update every cached block is stale: none may be matched again, even
    one a request still holds when the cache is purged."""
    m = make(4)
    held = m.register(m.allocate(2), hashes=[1, 2])
    m.release(held[:1])
    assert m.purge_all() == (1, 1)
    assert not m.contains(1) and not m.contains(2)
    m.release(held)
    assert m.match([2]) == []
    assert conserved(m)["reset"] == 4
