"""RequestSequence: one request's tokens and block table (kvbm_logical::RequestSequence),
and a hypothesis state machine that drives it (appends, allocations, commits, truncations,
preemptions, resumptions) against a small Python reference, checking the pool's invariants
after every step."""

import gc

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvbm
from _util import conserved, run_threads


def make(n=64, bs=4, **kw):
    return kvbm.BlockManager(block_count=n, block_size=bs, **kw)


def test_prefill_decode_preempt_resume():
    m = make()
    prompt = list(range(10))
    req = kvbm.RequestSequence(m, prompt)
    assert (req.num_tokens, req.prompt_len, req.num_computed_tokens) == (10, 10, 0)
    assert req.match_prefix() == 0
    assert req.blocks_needed(6) == 2
    assert req.allocate(6) == 2 and len(req.block_table) == 2
    done = req.commit(6)  # tokens 0..6: block 0 is full
    assert done.registered == range(0, 1) and done.changed == []
    assert req.allocate(4) == 1
    req.commit(4)
    assert (req.num_computed_tokens, req.num_blocks, req.num_registered_blocks) == (10, 3, 2)
    assert req.sequence_hashes == kvbm.hash_tokens(prompt, 4)
    # Decode.
    req.push(99)
    assert req.allocate(1) == 0  # block 2 has room
    assert req.commit(1).registered == range(2, 2)
    req.extend([100, 101])
    req.allocate(2)
    assert req.commit(2).registered == range(2, 3)
    assert req.tokens == prompt + [99, 100, 101]
    c = conserved(m)
    assert (c["active"], c["mutable"]) == (3, 1)
    # Preempted: blocks released, tokens kept; resumed.
    table = req.block_table
    assert req.preempt() == 4
    assert req.block_table == [] and req.num_computed_tokens == 0 and req.num_tokens == 13
    c = conserved(m)
    assert (c["active"], c["mutable"], c["inactive"]) == (0, 0, 3)
    assert req.match_prefix() == 3
    assert req.block_table == table[:3]
    req.allocate(req.num_pending_tokens)
    req.commit(req.num_pending_tokens)
    # Another request with the same prompt shares the prefix (minus the last token's block).
    other = kvbm.RequestSequence(m, prompt)
    assert other.match_prefix() == 2
    assert other.block_table == req.block_table[:2]
    req.release()
    other.release()
    assert conserved(m)["active"] == 0


def test_errors_are_typed_and_change_nothing():
    m = make(8)
    req = kvbm.RequestSequence(m, [1, 2, 3, 4, 5])
    with pytest.raises(kvbm.RequestError) as info:
        req.commit(2)
    assert (info.value.needed, info.value.allocated) == (1, 0)
    assert isinstance(info.value, kvbm.Error)
    req.allocate(5)
    with pytest.raises(kvbm.RequestError) as info:
        req.commit(6)
    assert (info.value.requested, info.value.uncomputed) == (6, 5)
    with pytest.raises(kvbm.RequestError) as info:
        req.match_prefix()
    assert info.value.blocks == 2
    assert req.num_computed_tokens == 0 and req.num_blocks == 2
    before = m.counts()
    with pytest.raises(kvbm.AllocationError) as info:
        req.allocate(100)
    assert info.value.requested == 23 and m.counts() == before and req.num_blocks == 2
    huge = 2**64 - 1
    with pytest.raises(kvbm.AllocationError):
        req.allocate(huge)
    with pytest.raises(kvbm.RequestError):
        req.commit(huge)
    assert req.truncate(huge).changed_from is None
    assert req.blocks_needed(huge) > 0
    with pytest.raises(OverflowError):
        req.allocate(2**64)
    with pytest.raises(OverflowError):
        req.push(-1)
    with pytest.raises(OverflowError):
        req.push(1 << 32)
    with pytest.raises(OverflowError):
        req.allocate(-1)
    with pytest.raises(TypeError):
        req.extend(["a"])
    assert req.num_tokens == 5
    with pytest.raises(kvbm.ConfigError):
        kvbm.RequestSequence(m, [1], reserve_tokens=kvbm.MAX_RESERVE_TOKENS + 1)
    with pytest.raises(TypeError):
        kvbm.RequestSequence("not a manager", [1])
    with pytest.raises(OverflowError):
        kvbm.RequestSequence(m, [1], extra_keys=[(-1, 5)])
    with pytest.raises(TypeError):
        kvbm.RequestSequence(m, [1], salt=3.5)
    assert m.counts() == before


def test_release_paths_and_use_after_release():
    m = make(16)
    with kvbm.RequestSequence(m, list(range(8))) as req:
        req.allocate(8)
        req.commit(8)
        assert conserved(m)["active"] == 2
    assert req.released
    assert conserved(m)["inactive"] == 2
    with pytest.raises(kvbm.ReleasedError):
        req.num_tokens
    with pytest.raises(kvbm.ReleasedError):
        req.allocate(1)
    assert req.release() == 0
    # Garbage collection.
    r = kvbm.RequestSequence(m, list(range(100, 108)))
    r.allocate(9)
    assert conserved(m)["mutable"] == 3
    del r
    gc.collect()
    assert conserved(m)["mutable"] == 0


def test_commit_reports_changed_entries():
    """Two requests compute the same prompt without sharing: the second's commit finds the
    hashes cached, its entries change to the first's slots, its own go back."""
    m = make(16)
    prompt = list(range(9))
    a = kvbm.RequestSequence(m, prompt)
    b = kvbm.RequestSequence(m, prompt)
    a.allocate(9)
    b.allocate(9)
    table_b = b.block_table
    a.commit(9)
    done = b.commit(9)
    assert done.registered == range(0, 2)
    assert [c[0] for c in done.changed] == [0, 1]
    assert [c[1] for c in done.changed] == table_b[:2]
    assert [c[2] for c in done.changed] == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] == table_b[2]
    c = conserved(m)
    assert c["active"] == 2 and c["mutable"] == 2
    a.release()
    b.release()


def test_truncate_into_registered_blocks():
    m = make(16)
    req = kvbm.RequestSequence(m, list(range(12)))
    req.allocate(12)
    req.commit(12)
    t = req.truncate(13)  # not shorter: nothing
    assert (t.computed, t.changed_from) == (12, None)
    t = req.truncate(11)  # cuts block 2: released, tokens 8..11 to compute again
    assert (t.computed, t.changed_from) == (8, 2)
    assert req.num_blocks == 2 and req.num_pending_tokens == 3
    req.allocate(3)
    req.commit(3)
    t = req.truncate(10)
    assert (t.computed, t.changed_from) == (10, None)  # block 2 not registered: only tokens
    req.release()
    conserved(m)


def test_cache_false_salt_and_extra_keys():
    m = make(16)
    prompt = list(range(9))
    r = kvbm.RequestSequence(m, prompt, cache=False)
    assert not r.cached
    r.allocate(9)
    r.commit(9)
    r.release()
    c = conserved(m)
    assert c["inactive"] == 0 and c["reset"] == 16  # not kept
    assert m.metrics()["removed_released"] == 2  # the two full blocks it had registered
    salted = kvbm.RequestSequence(m, prompt, salt="tenant-a", lora_id=3)
    assert salted.sequence_hashes == kvbm.hash_tokens(prompt, 4, "tenant-a", lora_id=3)
    keyed = kvbm.RequestSequence(m, prompt, extra_keys=[(5, 0xFEED)])
    assert keyed.sequence_hashes == kvbm.hash_tokens(prompt, 4, extra_keys={1: [0xFEED]})
    whole = kvbm.RequestSequence(m, prompt[:8], match_whole_prompt=True)
    plain = kvbm.RequestSequence(m, prompt[:8])
    seed = kvbm.RequestSequence(m, prompt[:8])
    seed.allocate(8)
    seed.commit(8)
    assert (whole.match_prefix(), plain.match_prefix()) == (2, 1)
    held = seed.registered_blocks()
    assert held.sequence_hashes == seed.sequence_hashes
    for r in (salted, keyed, whole, plain, seed):
        r.release()
    assert conserved(m)["active"] == 2  # the batch still holds them
    held.release()
    assert conserved(m)["active"] == 0


# -- hypothesis: the request against a reference ---------------------------------------------

BS = 4
MAX_TOKENS = 40
TOKENS = st.integers(0, 2)  # a small alphabet: prefixes repeat, so resumptions hit


class Reference:
    """What the request should hold: tokens, computed tokens, table length; and every hash
    ever registered (the manager is big enough that nothing is evicted)."""

    def __init__(self, prompt, cached):
        self.tokens = list(prompt)
        self.computed = 0
        self.table = 0
        self.cached = cached  # the manager's: outlives the request

    def hashes(self):
        return kvbm.hash_tokens(self.tokens, BS)

    @property
    def registered(self):
        return self.computed // BS

    def blocks_needed(self, n):
        return max(0, -(-(self.computed + n) // BS) - self.table)


class RequestMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # 40 steps register at most 40 * 10 blocks: 512 never evicts.
        self.m = make(512, BS)
        self.req = None
        self.ref = None
        self.cached = set()

    @precondition(lambda self: self.req is None)
    @rule(prompt=st.lists(TOKENS, max_size=MAX_TOKENS // 2))
    def build(self, prompt):
        self.req = kvbm.RequestSequence(self.m, prompt)
        self.ref = Reference(prompt, self.cached)

    @precondition(lambda self: self.req is not None and self.ref.table == 0)
    @rule()
    def match_prefix(self):
        ref = self.ref
        limit = max(len(ref.tokens) - 1, 0) // BS
        matched = 0
        for h in ref.hashes()[:limit]:
            if h not in ref.cached:
                break
            matched += 1
        assert self.req.match_prefix() == matched
        ref.computed, ref.table = matched * BS, matched

    @precondition(lambda self: self.req is not None and self.ref.table > 0)
    @rule()
    def match_refused(self):
        with pytest.raises(kvbm.RequestError):
            self.req.match_prefix()

    @precondition(lambda self: self.req is not None)
    @rule(tokens=st.lists(TOKENS, min_size=1, max_size=6))
    def append(self, tokens):
        tokens = tokens[: MAX_TOKENS - len(self.ref.tokens)]
        if len(tokens) == 1:
            self.req.push(tokens[0])
        else:
            self.req.extend(tokens)
        self.ref.tokens += tokens

    @precondition(lambda self: self.req is not None)
    @rule(n=st.integers(0, MAX_TOKENS))
    def allocate(self, n):
        self._allocate(n)

    @precondition(lambda self: self.req is not None)
    @rule(n=st.integers(0, MAX_TOKENS))
    def commit(self, n):
        self._commit(n)

    @precondition(lambda self: self.req is not None)
    @rule(chunk=st.sampled_from([None, 1, 3, 4, 8]))
    def engine_step(self, chunk):
        """What a scheduler does each step: allocate for the next chunk, then commit it."""
        pending = len(self.ref.tokens) - self.ref.computed
        n = pending if chunk is None else min(chunk, pending)
        self._allocate(n)
        self._commit(n)

    def _allocate(self, n):
        need = self.ref.blocks_needed(n)
        assert self.req.blocks_needed(n) == need
        assert self.req.allocate(n) == need
        self.ref.table += need

    def _commit(self, n):
        ref = self.ref
        before = self.req.block_table
        if n > len(ref.tokens) - ref.computed or -(-(ref.computed + n) // BS) > ref.table:
            with pytest.raises(kvbm.RequestError):
                self.req.commit(n)
            assert self.req.block_table == before
            return
        first = ref.registered
        ref.computed += n
        done = self.req.commit(n)
        assert done.registered == range(first, ref.registered)
        hashes = ref.hashes()
        expected_changed = [i for i in done.registered if hashes[i] in ref.cached]
        assert [c[0] for c in done.changed] == expected_changed
        after = self.req.block_table
        for index, old, new in done.changed:
            assert before[index] == old and after[index] == new and old != new
        moved = {c[0] for c in done.changed}
        assert all(after[i] == before[i] for i in range(len(after)) if i not in moved)
        ref.cached.update(hashes[i] for i in done.registered)

    @precondition(lambda self: self.req is not None)
    @rule(back=st.integers(0, 2 * BS + 1))
    def truncate(self, back):
        cut = max(len(self.ref.tokens) - back, 0)
        ref = self.ref
        t = self.req.truncate(cut)
        changed = None
        if cut < len(ref.tokens):
            ref.tokens = ref.tokens[:cut]
            if ref.computed > cut:
                keep = cut // BS
                if ref.registered > keep:
                    ref.table -= ref.registered - keep
                    ref.computed = keep * BS
                    changed = keep
                else:
                    ref.computed = cut
        assert (t.computed, t.changed_from) == (ref.computed, changed)

    @precondition(lambda self: self.req is not None)
    @rule()
    def preempt(self):
        assert self.req.preempt() == self.ref.table
        self.ref.table = self.ref.computed = 0

    @precondition(lambda self: self.req is not None)
    @rule()
    def preempt_and_resume(self):
        """Preempted, then resumed at once: match the cached prefix, compute the rest."""
        self.preempt()
        self.match_prefix()
        self.engine_step(None)

    @precondition(lambda self: self.req is not None)
    @rule()
    def finish(self):
        assert self.req.release() == self.ref.table
        self.req = None

    @invariant()
    def matches_reference(self):
        c = conserved(self.m)
        assert c["registered_hashes"] == len(self.cached)
        if self.req is None:
            assert c["mutable"] == c["active"] == 0
            return
        ref = self.ref
        assert self.req.tokens == ref.tokens
        assert self.req.num_computed_tokens == ref.computed
        assert self.req.num_pending_tokens == len(ref.tokens) - ref.computed
        assert self.req.num_registered_blocks == ref.registered
        table = self.req.block_table
        assert len(table) == ref.table and len(set(table)) == len(table)
        assert self.req.sequence_hashes == ref.hashes()
        assert (c["active"], c["mutable"]) == (ref.registered, ref.table - ref.registered)
        assert all(self.m.contains(h) for h in ref.cached)

    def teardown(self):
        if self.req is not None:
            self.req.release()
        c = conserved(self.m)
        assert c["mutable"] == c["active"] == 0


TestRequestMachine = RequestMachine.TestCase


def test_threads_run_requests_on_one_manager():
    """Four threads run requests with shared prompts on one manager (commits of 2048 tokens
    release the GIL): they share prefixes, swap duplicate blocks, and every block comes back."""
    m = make(4096, 16, eviction="lineage")
    prompts = [list(range(p * 7, p * 7 + 2048)) for p in range(3)]
    hits = []

    def worker(t):
        for r in range(12):
            with kvbm.RequestSequence(m, prompts[(t + r) % 3] + [t, r]) as req:
                hits.append(req.match_prefix())
                req.allocate(req.num_pending_tokens)
                done = req.commit(req.num_pending_tokens)
                assert len(set(req.block_table)) == len(req.block_table)
                for index, old, new in done.changed:
                    assert req.block_table[index] == new != old
                req.push(1)
                req.allocate(1)
                req.commit(1)

    run_threads(worker)
    assert max(hits) == 128  # a whole 2048-token prompt prefix was shared
    c = conserved(m)
    assert (c["mutable"], c["active"]) == (0, 0)


def test_a_request_sets_its_blocks_eviction_priority():
    """Under the priority backend, a request's block kept at priority 90 outlasts its other
    (default-priority) block, though the latter was released later."""
    m = make(4, eviction="priority")
    r = kvbm.RequestSequence(m, list(range(9)), priority_ranges=[(1, 2, 90)])
    r.allocate(9)
    r.commit(9)
    first, second = r.sequence_hashes[:2]
    r.release()  # tail first: block 1 goes inactive before block 0
    taken = m.allocate_batch(3)  # two free, one evicted
    assert m.contains(second) and not m.contains(first)
    taken.release()
    for bad in (dict(priority=101), dict(priority_ranges=[(2, 2, 50)]), dict(priority=5, priority_seconds=0)):
        with pytest.raises(kvbm.ConfigError):
            kvbm.RequestSequence(m, [1, 2, 3], **bad)
