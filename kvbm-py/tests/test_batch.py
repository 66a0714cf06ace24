"""BlockBatch: many blocks in one Python object, with the single handles' safety rules
(explicit release, context manager, release on GC, use after release raises, another manager's
batch refused, a refused call changes nothing), and a hypothesis model of its lifecycle."""

import gc
import random

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvbm
from _util import conserved, run_threads


def make(n=16, bs=4, **kw):
    return kvbm.BlockManager(block_count=n, block_size=bs, **kw)


def test_allocate_register_release_cycle():
    m = make()
    events = m.subscribe()
    b = m.allocate_batch(3)
    assert isinstance(b, kvbm.BlockBatch) and b.kind == "mutable"
    assert len(b) == 3 and len(set(b.block_ids)) == 3 and not b.released
    assert conserved(m)["mutable"] == 3
    hashes = kvbm.hash_tokens(list(range(12)), 4)
    ids = b.block_ids
    reg = m.register(b, hashes=hashes)
    assert isinstance(reg, kvbm.BlockBatch) and reg.kind == "immutable"
    assert reg.block_ids == ids
    assert reg.sequence_hashes == hashes
    assert b.released
    with pytest.raises(kvbm.ReleasedError, match="consumed by register"):
        len(b)
    (ev,) = list(events)
    assert ev.kind == "stored" and ev.block_hashes == hashes and ev.parent is None
    assert conserved(m)["active"] == 3
    assert m.release(reg) == 3
    assert m.release(reg) == 0  # already released: nothing
    c = conserved(m)
    assert (c["active"], c["inactive"]) == (0, 3)
    # Matchable, as one batch or as handles.
    found = m.match_batch(hashes + [1])
    assert found.sequence_hashes == hashes and found.kind == "immutable"
    found.release()
    assert [h.sequence_hash for h in m.match(hashes)] == hashes


def test_batch_and_handle_paths_agree():
    """The same registrations through batches and through handles leave the same cache."""
    hashes = kvbm.hash_tokens(list(range(40)), 4)
    a, b = make(32), make(32)
    ra = a.register(a.allocate_batch(6), hashes=hashes[:6])
    ra2 = a.register(a.allocate_batch(4), hashes=hashes[6:], parent=hashes[5])
    rb = b.register(b.allocate(6), hashes=hashes[:6])
    rb2 = b.register(b.allocate(4), hashes=hashes[6:], parent=hashes[5])
    assert ra.sequence_hashes + ra2.sequence_hashes == [h.sequence_hash for h in rb + rb2]
    a.release(ra)
    a.release(ra2)
    b.release(rb + rb2)
    assert conserved(a) == conserved(b)
    assert len(a.match(hashes)) == len(b.match(hashes)) == 10


def test_getitem_gives_a_handle_only_when_asked():
    m = make()
    reg = m.register(m.allocate_batch(3), hashes=[10, 11, 12])
    first, last = reg[0], reg[-1]
    assert isinstance(first, kvbm.ImmutableBlock)
    assert (first.sequence_hash, last.sequence_hash) == (10, 12)
    assert first.block_id == reg.block_ids[0]
    with pytest.raises(IndexError):
        reg[3]
    with pytest.raises(IndexError):
        reg[-4]
    # The handle is another owner: the block stays active after the batch goes.
    reg.release()
    c = conserved(m)
    assert (c["active"], c["inactive"]) == (2, 1)
    first.release()
    last.release()
    assert conserved(m)["inactive"] == 3
    # An allocated block has one owner, the batch.
    mb = m.allocate_batch(2)
    with pytest.raises(TypeError, match="handles"):
        mb[0]
    assert conserved(m)["mutable"] == 2
    mb.release()


def test_handles_splits_the_batch():
    m = make()
    mb = m.allocate_batch(3)
    ids = mb.block_ids
    hs = mb.handles()
    assert [type(h) for h in hs] == [kvbm.MutableBlock] * 3
    assert [h.block_id for h in hs] == ids
    with pytest.raises(kvbm.ReleasedError, match="handles"):
        mb.block_ids
    assert mb.release() == 0  # nothing left to release
    assert conserved(m)["mutable"] == 3
    reg = m.register(hs, hashes=[1, 2, 3])
    assert conserved(m)["active"] == 3
    m.release(reg)
    rb = m.match_batch([1, 2, 3])
    imms = rb.handles()
    assert [h.sequence_hash for h in imms] == [1, 2, 3]
    assert conserved(m)["active"] == 3
    m.release(imms)
    assert conserved(m)["active"] == 0


def test_release_paths():
    m = make(8)
    with m.allocate_batch(5) as b:
        assert m.available_blocks == 3
    assert b.released and m.available_blocks == 8
    # Garbage collection.
    b = m.allocate_batch(4)
    reg = m.register(m.allocate_batch(2), hashes=[1, 2])
    assert m.available_blocks == 2
    del b, reg
    gc.collect()
    c = conserved(m)
    assert (c["reset"], c["inactive"]) == (6, 2)
    # Explicit.
    b = m.allocate_batch(8)
    assert b.release() == 8 and b.release() == 0
    assert m.available_blocks == 8


def test_use_after_release_raises():
    m = make()
    b = m.allocate_batch(2)
    b.release()
    for use in (
        lambda: len(b),
        lambda: b.block_ids,
        lambda: b.handles(),
        lambda: m.register(b, hashes=[1, 2]),
        lambda: b.read(0),
    ):
        with pytest.raises(kvbm.ReleasedError, match="was released"):
            use()
    assert conserved(m)["reset"] == 16


def test_foreign_batches_are_refused_and_change_nothing():
    m, other = make(), make()
    b = other.allocate_batch(2)
    with pytest.raises(kvbm.ForeignBlockError):
        m.register(b, hashes=[1, 2])
    with pytest.raises(kvbm.ForeignBlockError):
        m.release(b)
    assert len(b) == 2 and not b.released
    assert conserved(other)["mutable"] == 2 and conserved(m)["mutable"] == 0
    assert not m.contains(1) and not other.contains(1)
    other.release(b)
    assert conserved(other)["reset"] == 16


def test_refused_calls_change_nothing():
    m = make(8)
    b = m.allocate_batch(3)
    ids = b.block_ids
    before = m.counts()
    with pytest.raises(ValueError, match="3 blocks but 2 hashes"):
        m.register(b, hashes=[1, 2])
    with pytest.raises(TypeError, match="hashes="):
        m.register(b)
    with pytest.raises(TypeError):
        m.register(b, hashes=["x", "y", "z"])
    with pytest.raises(OverflowError):
        m.register(b, hashes=[1, 2, -3])
    (h,) = m.allocate(1)
    with pytest.raises(TypeError, match="got BlockBatch"):
        m.release([h, b])  # a batch inside a list of handles: the whole call is refused
    with pytest.raises(TypeError, match="got BlockBatch"):
        m.register([b], hashes=[1])
    assert not h.released
    h.release()
    assert m.counts() == before and b.block_ids == ids and not b.released
    reg = m.register(b, hashes=[1, 2, 3])
    with pytest.raises(TypeError, match="already registered"):
        m.register(reg, hashes=[4, 5, 6])
    assert reg.sequence_hashes == [1, 2, 3]
    with pytest.raises(kvbm.AllocationError) as info:
        m.allocate_batch(6)
    assert info.value.available == 5
    with pytest.raises(OverflowError):
        m.allocate_batch(-1)
    assert conserved(m)["active"] == 3
    with pytest.raises(TypeError, match="read-only|mutable"):
        reg.write(0, b"")
    reg.release()


def test_duplicate_hash_in_batch_returns_the_cached_block():
    m = make()
    first = m.register(m.allocate_batch(1), hashes=[7])
    again = m.register(m.allocate_batch(1), hashes=[7])
    assert again.block_ids == first.block_ids  # policy "reject": the cached block
    assert conserved(m)["active"] == 1
    m.release(first)
    m.release(again)
    assert conserved(m)["inactive"] == 1


def test_repr():
    m = make()
    b = m.allocate_batch(2)
    assert repr(b).startswith('BlockBatch(kind="mutable", blocks=2')
    b.release()
    assert repr(b) == "BlockBatch(<released>)"


def test_tier_stack_batches_reach_g1_memory():
    rng = random.Random(3)
    stack = kvbm.TierStack(4, 16, 4, num_layers=2, inner_dim=8, g1_layout="fully_contiguous")
    b = stack.allocate_batch(3)
    images = [bytes(rng.getrandbits(8) for _ in range(stack.block_bytes)) for _ in range(3)]
    for i, image in enumerate(images):
        b.write(i, image)
    view = b.view(1)
    assert not view.readonly and bytes(view) == images[1]
    del view  # a writable view must go before the blocks are registered
    hashes = kvbm.hash_tokens(list(range(12)), 4)
    reg = stack.register(b, hashes=hashes)
    assert [reg.read(i) for i in range(3)] == images
    ro = reg.view(-1)
    assert ro.readonly and bytes(ro) == images[2]
    del ro
    stack.release(reg)
    stack.flush()
    assert stack.g2_contains(hashes) == [True] * 3
    other = kvbm.TierStack(4, 16, 4, num_layers=2, inner_dim=8)
    ob = other.allocate_batch(1)
    with pytest.raises(kvbm.ForeignBlockError):
        stack.register(ob, hashes=[1])
    assert not ob.released
    ob.release()
    stack.check_invariants()


# -- hypothesis: the batch lifecycle against a model of which blocks each batch holds -------

TOTAL = 12


class BatchLifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = make(TOTAL)
        self.other = make(4)
        self.foreign = self.other.allocate_batch(1)
        self.muts = []  # live mutable batches
        self.imms = []  # live registered batches
        self.extra = []  # ImmutableBlocks taken by indexing
        self.stale = []  # released or consumed batches
        self.next_hash = 1

    @rule(n=st.integers(0, TOTAL + 2))
    def allocate(self, n):
        before = self.m.counts()
        if n > before["reset"] + before["inactive"]:
            with pytest.raises(kvbm.AllocationError):
                self.m.allocate_batch(n)
            assert self.m.counts() == before
        else:
            self.muts.append(self.m.allocate_batch(n))

    @precondition(lambda self: self.muts)
    @rule(data=st.data(), short=st.booleans())
    def register(self, data, short):
        b = self.muts[data.draw(st.integers(0, len(self.muts) - 1))]
        n = len(b)
        if short and n:
            before = self.m.counts()
            with pytest.raises(ValueError):
                self.m.register(b, hashes=list(range(n - 1)))
            assert self.m.counts() == before and len(b) == n
            return
        hashes = list(range(self.next_hash, self.next_hash + n))
        self.next_hash += n
        reg = self.m.register(b, hashes=hashes)
        self.muts.remove(b)
        self.stale.append(b)
        self.imms.append(reg)
        assert reg.sequence_hashes == hashes

    @precondition(lambda self: self.muts or self.imms)
    @rule(data=st.data(), how=st.sampled_from(["method", "manager", "gc", "with"]))
    def release(self, data, how):
        pool = self.muts + self.imms
        b = pool[data.draw(st.integers(0, len(pool) - 1))]
        (self.muts if b in self.muts else self.imms).remove(b)
        if how == "method":
            b.release()
        elif how == "manager":
            self.m.release(b)
        elif how == "with":
            with b:
                pass
        else:
            del b
            gc.collect()
            return
        self.stale.append(b)

    @precondition(lambda self: any(len(b) for b in self.imms))
    @rule(data=st.data())
    def index(self, data):
        b = [b for b in self.imms if len(b)][0]
        i = data.draw(st.integers(-len(b), len(b) - 1))
        self.extra.append(b[i])

    @precondition(lambda self: self.extra)
    @rule()
    def release_extra(self):
        self.extra.pop().release()

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def use_stale(self, data):
        b = self.stale[data.draw(st.integers(0, len(self.stale) - 1))]
        with pytest.raises(kvbm.ReleasedError):
            b.block_ids
        assert b.release() == 0

    @rule()
    def foreign(self):
        before = self.m.counts()
        with pytest.raises(kvbm.ForeignBlockError):
            self.m.release(self.foreign)
        with pytest.raises(kvbm.ForeignBlockError):
            self.m.register(self.foreign, hashes=[1])
        assert self.m.counts() == before and len(self.foreign) == 1

    @invariant()
    def counts_match(self):
        c = conserved(self.m)
        assert c["mutable"] == sum(len(b) for b in self.muts)
        held = {i for b in self.imms for i in b.block_ids} | {h.block_id for h in self.extra}
        assert c["active"] == len(held)

    def teardown(self):
        for b in self.muts + self.imms:
            b.release()
        for h in self.extra:
            h.release()
        self.foreign.release()
        c = conserved(self.m)
        assert c["mutable"] == c["active"] == 0


TestBatchLifecycle = BatchLifecycle.TestCase


def test_threads_share_a_manager_and_a_batch():
    """Threads cycle batches of 128 (the GIL released inside Rust) on one manager, and race to
    release one shared batch: it is released exactly once, every block comes back."""
    m = make(4096, 16, eviction="lineage")
    shared = m.allocate_batch(100)
    released = []

    def worker(t):
        try:
            released.append(m.release(shared) if t % 2 else shared.release())
        except (kvbm.InvalidBlockError, RuntimeError):
            # Another thread held the batch at that moment (its release runs without
            # the GIL): the manager says InvalidBlockError, PyO3's borrow check on the
            # method RuntimeError. Nothing was released by this call.
            released.append(0)
        for r in range(40):
            base = t * 10**6 + r * 128
            got = m.match_batch(list(range(base, base + 128)))
            assert len(got) == 0
            reg = m.register(m.allocate_batch(128), hashes=list(range(base, base + 128)))
            assert reg.sequence_hashes == list(range(base, base + 128))
            m.release(reg)

    run_threads(worker)
    assert sorted(released)[-1] == 100 and sum(released) == 100
    c = conserved(m)
    assert (c["mutable"], c["active"]) == (0, 0)
