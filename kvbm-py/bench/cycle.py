"""Python-side cost of the block cycle: allocate + register + release, per block, at several
batch sizes, and the per-call overhead of a trivial method.

    python kvbm-py/bench/cycle.py [--runs 7] [--blocks 200000] [--eviction lru] [--batches 1,16,256]

Three variants of the cycle, run interleaved: one handle object per block (list in, list
out), the same with stage() per block, and one BlockBatch object per call.

Each figure is the median of --runs runs; each run cycles about --blocks blocks through a
manager of max(4096, 4 x batch) blocks (hashes are fresh per run, so registration always
inserts): once released blocks fill the pool, every allocation evicts one, as in a server
whose cache is full. GC disabled during a run. --clock wall (time.perf_counter_ns, default) or thread
(time.thread_time_ns: CPU time of this thread only, which a loaded machine inflates less).
"""

import argparse
import gc
import statistics
import time

import kvbm

CLOCK = time.perf_counter_ns
EVICTION = None  # the manager's default policy


def cycle_ns_per_block(batch, blocks, seed):
    m = kvbm.BlockManager(block_count=max(4096, 4 * batch), block_size=16, eviction=EVICTION)
    rounds = max(1, blocks // batch)
    base = seed * (rounds * batch + 1)
    hashes = [list(range(base + r * batch, base + (r + 1) * batch)) for r in range(rounds)]
    gc.disable()
    t0 = CLOCK()
    for hs in hashes:
        m.release(m.register(m.allocate(batch), hashes=hs))
    t1 = CLOCK()
    gc.enable()
    m.check_invariants()
    return (t1 - t0) / (rounds * batch)


def batch_ns_per_block(batch, blocks, seed):
    """The same cycle through one BlockBatch object per call instead of one handle per block."""
    m = kvbm.BlockManager(block_count=max(4096, 4 * batch), block_size=16, eviction=EVICTION)
    rounds = max(1, blocks // batch)
    base = seed * (rounds * batch + 1)
    hashes = [list(range(base + r * batch, base + (r + 1) * batch)) for r in range(rounds)]
    gc.disable()
    t0 = CLOCK()
    for hs in hashes:
        m.release(m.register(m.allocate_batch(batch), hashes=hs))
    t1 = CLOCK()
    gc.enable()
    m.check_invariants()
    return (t1 - t0) / (rounds * batch)


def staged_ns_per_block(batch, blocks, seed):
    """The same cycle through the three handle classes: stage() per block, then register."""
    m = kvbm.BlockManager(block_count=max(4096, 4 * batch), block_size=16, eviction=EVICTION)
    rounds = max(1, blocks // batch)
    base = seed * (rounds * batch + 1)
    gc.disable()
    t0 = CLOCK()
    for r in range(rounds):
        first = base + r * batch
        staged = [b.stage(first + i) for i, b in enumerate(m.allocate(batch))]
        m.release(m.register(staged))
    t1 = CLOCK()
    gc.enable()
    return (t1 - t0) / (rounds * batch)


def call_overhead_ns(calls):
    m = kvbm.BlockManager(block_count=16, block_size=16)
    gc.disable()
    t0 = CLOCK()
    for _ in range(calls):
        m.contains(1)
    t1 = CLOCK()
    gc.enable()
    return (t1 - t0) / calls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--blocks", type=int, default=200_000)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall")
    p.add_argument("--eviction", choices=kvbm.EVICTION_BACKENDS, default=None,
                   help="eviction policy (default: the manager's default)")
    p.add_argument("--batches", default="1,16,256", help="comma-separated batch sizes")
    args = p.parse_args()
    global CLOCK, EVICTION
    EVICTION = args.eviction
    CLOCK = time.perf_counter_ns if args.clock == "wall" else time.thread_time_ns
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        # Interleave the two variants run by run, so machine load hits both alike.
        fused, staged, batched = [], [], []
        for run in range(args.runs):
            fused.append(cycle_ns_per_block(batch, args.blocks, 3 * run))
            staged.append(staged_ns_per_block(batch, args.blocks, 3 * run + 1))
            batched.append(batch_ns_per_block(batch, args.blocks, 3 * run + 2))
        rows.append((batch, statistics.median(fused), statistics.median(staged),
                     statistics.median(batched)))
    overhead = statistics.median(call_overhead_ns(200_000) for _ in range(args.runs))
    print(f"clock: {args.clock}, eviction: {args.eviction or 'default'}")
    print("ns/block, median: handles = allocate+register(hashes=)+release (one handle per block);"
          " staged = allocate+stage+register+release; BlockBatch = allocate_batch+register+release")
    print("batch  handles  staged  BlockBatch")
    for batch, fused, staged, batched in rows:
        print(f"{batch:5d}  {fused:7.0f}  {staged:6.0f}  {batched:10.0f}")
    print(f"per-call overhead (BlockManager.contains): {overhead:.0f} ns")


if __name__ == "__main__":
    main()
