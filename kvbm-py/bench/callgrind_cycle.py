"""Instruction counts of the block cycle at one batch size, for callgrind (deterministic where
wall-clock timings on a shared machine are not):

    valgrind --tool=callgrind python kvbm-py/bench/callgrind_cycle.py MODE ROUNDS [EVICTION] [BATCH]

MODE: "handles" (allocate -> register(hashes=) -> release, one handle object per block) or
"batch" (the same through one BlockBatch per call). The hash lists of 100 rounds are built
in every run and only ROUNDS of them are cycled, so the difference between ROUNDS=100 and
ROUNDS=0, divided by 100 * BATCH, is the cycle's cost per block.
"""

import sys

import kvbm

mode, rounds = sys.argv[1], int(sys.argv[2])
eviction = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "default" else None
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 256
m = kvbm.BlockManager(block_count=4096, block_size=16, eviction=eviction)
hashes = [list(range(r * batch + 1, (r + 1) * batch + 1)) for r in range(100)]
if mode == "batch":
    for hs in hashes[:rounds]:
        m.release(m.register(m.allocate_batch(batch), hashes=hs))
elif mode == "handles":
    for hs in hashes[:rounds]:
        m.release(m.register(m.allocate(batch), hashes=hs))
else:
    sys.exit(f"unknown mode {mode!r}: handles or batch")
m.check_invariants()
