"""kvbm: a KV cache block manager for LLM inference servers.

Python bindings of the kvbm Rust crates (``kvbm-logical``, ``kvbm-physical``). The cache logic
is Rust; this package translates:

* :class:`BlockManager` -- allocate, register (by sequence hash), match prefixes, release,
  pins, counts, invariant checks, Prometheus text, cache events (:meth:`BlockManager.subscribe`).
* Block handles, one class per state: :class:`MutableBlock` (allocated) ->
  :class:`CompleteBlock` (staged with its hash) -> :class:`ImmutableBlock` (registered,
  matchable, shareable). A transition consumes the handle it is called on. Release is
  explicit (``release()``, ``with``) and also happens when a handle is garbage collected.
  Distinct classes rather than one class with a state field: each class has only the methods
  valid in its state, a type checker sees ``register(List[CompleteBlock])`` misuse, and the
  Rust type-state maps one to one; what only a run can know (a handle already consumed or
  released) raises :class:`ReleasedError`.
* :class:`BlockBatch` -- many blocks in one object (``allocate_batch``, ``register`` of a
  batch, ``match_batch``): the fast path for large batches, with the same release rules as
  the handles; ``block_ids`` is one list, and ``batch[i]`` makes a handle only when asked.
* :class:`RequestSequence` -- one request's tokens and block table: prefix match, all-or-
  nothing allocation, commit (registers every filled block), truncate, preempt and resume.
* :func:`hash_tokens` -- the sequence hashing specification (same values as the Rust crate).
* :class:`TierStack` -- G1 over G2, then optional store tiers (:class:`DiskStore`,
  :class:`RedisStore`), with asynchronous offload and plan-then-commit onboarding; G1 blocks
  expose their host memory as zero-copy ``memoryview`` s.

Every failure of kvbm's own (a pool exhausted, a released or foreign handle, a copy, a store
tier) is an :class:`Error` subclass carrying the Rust message. Arguments of the wrong type or
out of Python's range raise Python's own ``TypeError``, ``ValueError``, ``IndexError`` or
``OverflowError`` (a hash list whose length is not the block count, an index past the end, a
negative count); a refused call changes nothing either way.

>>> import kvbm
>>> m = kvbm.BlockManager(block_count=8, block_size=4)
>>> hashes = kvbm.hash_tokens(list(range(10)), 4)  # two complete blocks
>>> blocks = m.register(m.allocate(len(hashes)), hashes=hashes)
>>> m.release(blocks)
2
>>> len(m.match(hashes))
2
"""

from contextlib import contextmanager
from typing import Iterable, Iterator, List, TypeVar

from ._kvbm import (
    EVICTION_BACKENDS,
    HASH_SEED,
    HASH_SPEC_VERSION,
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    MAX_RESERVE_TOKENS,
    AllocationError,
    BlockBatch,
    BlockManager,
    CompleteBlock,
    Committed,
    ConfigError,
    CudaUnavailableError,
    DiskStore,
    DiskTierError,
    Error,
    Event,
    EventStream,
    ForeignBlockError,
    ImmutableBlock,
    InvalidBlockError,
    InvariantError,
    MutableBlock,
    NoRoomError,
    Onboarded,
    Pending,
    PinError,
    Plan,
    RedisStore,
    RedisUnavailableError,
    ReleasedError,
    RequestError,
    RequestSequence,
    StoreError,
    TierStack,
    TransferError,
    Truncated,
    hash_tokens,
    salt_hash,
)

_H = TypeVar("_H", MutableBlock, CompleteBlock, ImmutableBlock)


@contextmanager
def holding(blocks: Iterable[_H]) -> Iterator[List[_H]]:
    """Releases every handle of ``blocks`` when the ``with`` block ends (even on error).

    >>> import kvbm
    >>> m = kvbm.BlockManager(block_count=4, block_size=4)
    >>> with kvbm.holding(m.allocate(3)) as blocks:
    ...     m.available_blocks
    1
    >>> m.available_blocks
    4
    """
    held = list(blocks)
    try:
        yield held
    finally:
        for block in held:
            block.release()


__all__ = [
    "EVICTION_BACKENDS",
    "HASH_SEED",
    "HASH_SPEC_VERSION",
    "MAX_BLOCK_SIZE",
    "MAX_BLOCKS",
    "MAX_RESERVE_TOKENS",
    "AllocationError",
    "BlockBatch",
    "BlockManager",
    "CompleteBlock",
    "Committed",
    "ConfigError",
    "CudaUnavailableError",
    "DiskStore",
    "DiskTierError",
    "Error",
    "Event",
    "EventStream",
    "ForeignBlockError",
    "ImmutableBlock",
    "InvalidBlockError",
    "InvariantError",
    "MutableBlock",
    "NoRoomError",
    "Onboarded",
    "Pending",
    "PinError",
    "Plan",
    "RedisStore",
    "RedisUnavailableError",
    "ReleasedError",
    "RequestError",
    "RequestSequence",
    "StoreError",
    "TierStack",
    "TransferError",
    "Truncated",
    "hash_tokens",
    "holding",
    "salt_hash",
]
