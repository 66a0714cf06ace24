"""Hostile operation sequences (hypothesis, stateful): the lifecycle against a reference model
of which handles are live, with wrong types, bad numbers, released, duplicated and foreign
handles mixed in. After every step the pool's invariants hold and its counts match the model;
at the end, releasing everything returns every block (no leak)."""

import gc

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvbm

TOTAL = 8
HASHES = st.integers(0, 12)


def pick(data, pool):
    """One element of `pool`, drawn by position (hypothesis keeps what it draws: drawing
    handles themselves would keep garbage-collected ones alive)."""
    return pool[data.draw(st.integers(0, len(pool) - 1))]


def pick_some(data, pool, min_size=0, max_size=None):
    at = data.draw(
        st.lists(st.integers(0, len(pool) - 1), min_size=min_size, max_size=max_size, unique=True)
    )
    return [pool[i] for i in at]


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = None
        self.other = kvbm.BlockManager(block_count=4, block_size=4)
        self.foreign = self.other.allocate(1)[0]
        self.muts = []  # live MutableBlocks
        self.completes = []  # live CompleteBlocks
        self.imms = []  # live ImmutableBlocks
        self.stale = []  # released or consumed handles of any kind

    @rule(backend=st.sampled_from(kvbm.EVICTION_BACKENDS))
    @precondition(lambda self: self.m is None)
    def build(self, backend):
        self.m = kvbm.BlockManager(block_count=TOTAL, block_size=4, eviction=backend)

    def live(self):
        return self.muts + self.completes + self.imms

    def counts(self):
        return self.m.counts()

    @precondition(lambda self: self.m is not None)
    @rule(n=st.integers(-3, TOTAL + 3))
    def allocate(self, n):
        before = self.counts()
        if n < 0:
            with pytest.raises(OverflowError):
                self.m.allocate(n)
        elif n > before["reset"] + before["inactive"]:
            with pytest.raises(kvbm.AllocationError) as info:
                self.m.allocate(n)
            assert info.value.available == before["reset"] + before["inactive"]
            assert self.counts() == before
        else:
            self.muts += self.m.allocate(n)

    @precondition(lambda self: self.m is not None and self.muts)
    @rule(data=st.data(), h=HASHES, parent=st.none() | HASHES)
    def stage(self, data, h, parent):
        b = pick(data, self.muts)
        self.muts.remove(b)
        self.completes.append(b.stage(h, parent=parent))
        self.stale.append(b)

    @precondition(lambda self: self.m is not None and self.completes)
    @rule(data=st.data())
    def register_complete(self, data):
        picked = pick_some(data, self.completes, min_size=1)
        out = self.m.register(picked)
        assert len(out) == len(picked)
        for b in picked:
            self.completes.remove(b)
            self.stale.append(b)
        self.imms += out

    @precondition(lambda self: self.m is not None and self.muts)
    @rule(data=st.data())
    def register_fused(self, data):
        picked = pick_some(data, self.muts, min_size=1)
        hashes = data.draw(st.lists(HASHES, min_size=len(picked), max_size=len(picked)))
        out = self.m.register(picked, hashes=hashes)
        assert [b.sequence_hash for b in out] == hashes
        for b in picked:
            self.muts.remove(b)
            self.stale.append(b)
        self.imms += out

    @precondition(lambda self: self.m is not None and self.live())
    @rule(data=st.data())
    def hostile_batch(self, data):
        """A batch with one bad element: nothing may change."""
        before = self.counts()
        good = pick_some(data, self.live(), max_size=3)
        kind = data.draw(st.sampled_from(["dup", "foreign", "type", "stale"]))
        if kind == "dup" and good:
            batch, error = good + [good[0]], kvbm.InvalidBlockError
        elif kind == "foreign":
            batch, error = good + [self.foreign], kvbm.ForeignBlockError
        elif kind == "stale" and self.stale:
            bad = pick(data, self.stale)
            batch, error = good + [bad], (kvbm.ReleasedError, TypeError)
        else:
            batch, error = good + [object()], TypeError
        op = data.draw(st.sampled_from(["release", "register"]))
        if op == "release":
            if kind == "stale" and self.stale:
                return  # releasing a released handle is allowed (skipped)
            with pytest.raises(error):
                self.m.release(batch)
        else:
            with pytest.raises((kvbm.Error, TypeError, ValueError)):
                self.m.register(batch)
        assert self.counts() == before
        assert all(not b.released for b in good)

    @precondition(lambda self: self.m is not None and self.stale)
    @rule(data=st.data())
    def use_stale(self, data):
        b = pick(data, self.stale)
        with pytest.raises(kvbm.ReleasedError):
            if isinstance(b, kvbm.MutableBlock):
                b.stage(1)
            elif isinstance(b, kvbm.CompleteBlock):
                b.reset()
            else:
                b.clone()
        b.release()  # idempotent

    @precondition(lambda self: self.m is not None)
    @rule(hashes=st.lists(HASHES, max_size=5))
    def match(self, hashes):
        self.imms += self.m.match(hashes)

    @precondition(lambda self: self.m is not None and self.imms)
    @rule(data=st.data())
    def clone(self, data):
        self.imms.append(pick(data, self.imms).clone())

    @precondition(lambda self: self.m is not None and self.live())
    @rule(data=st.data(), how=st.sampled_from(["release", "batch", "gc", "with"]))
    def drop(self, data, how):
        picked = pick_some(data, self.live(), min_size=1)
        for b in picked:
            for pool in (self.muts, self.completes, self.imms):
                if b in pool:
                    pool.remove(b)
        if how == "release":
            for b in picked:
                b.release()
            self.stale += picked
        elif how == "batch":
            assert self.m.release(picked) == len(picked)
            self.stale += picked
        elif how == "with":
            for b in picked:
                with b:
                    pass
            self.stale += picked
        else:
            del picked
            gc.collect()

    @precondition(lambda self: self.m is not None)
    @rule(hashes=st.lists(HASHES, max_size=4))
    def invalidate_and_touch(self, hashes):
        self.m.touch(hashes)
        self.m.invalidate(hashes)

    @precondition(lambda self: self.m is not None)
    @rule(n=st.sampled_from([-1, 2**64, "x", None, 1.5]))
    def bad_numbers(self, n):
        before = self.counts()
        with pytest.raises((TypeError, OverflowError, kvbm.Error)):
            self.m.allocate(n)
        with pytest.raises((TypeError, OverflowError)):
            self.m.match([n])
        assert self.counts() == before

    @invariant()
    def pool_matches_model(self):
        if self.m is None:
            return
        c = self.m.check_invariants()
        assert c["mutable"] == len(self.muts) + len(self.completes)
        assert c["active"] == len({b.block_id for b in self.imms})
        assert c["reset"] + c["inactive"] + c["mutable"] + c["active"] == TOTAL

    def teardown(self):
        if self.m is not None:
            self.m.release(self.live())
            gc.collect()
            c = self.m.check_invariants()
            assert (c["mutable"], c["active"]) == (0, 0)
            assert self.m.available_blocks == TOTAL


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
