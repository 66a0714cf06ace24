"""Python-side cost of the block cycle: allocate + register + release, per block, at several
batch sizes, and the per-call overhead of a trivial method.

    python kvbm-py/bench/cycle.py [--runs 7] [--blocks 200000]

Each figure is the median of --runs runs; each run cycles about --blocks blocks through a
manager big enough that nothing is evicted (hashes are fresh per run, so registration always
inserts). GC disabled during a run. --clock wall (time.perf_counter_ns, default) or thread
(time.thread_time_ns: CPU time of this thread only, which a loaded machine inflates less).
"""

import argparse
import gc
import statistics
import time

import kvbm

CLOCK = time.perf_counter_ns


def cycle_ns_per_block(batch, blocks, seed):
    m = kvbm.BlockManager(block_count=max(4096, 4 * batch), block_size=16)
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


def staged_ns_per_block(batch, blocks, seed):
    """The same cycle through the three handle classes: stage() per block, then register."""
    m = kvbm.BlockManager(block_count=max(4096, 4 * batch), block_size=16)
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
    args = p.parse_args()
    global CLOCK
    CLOCK = time.perf_counter_ns if args.clock == "wall" else time.thread_time_ns
    rows = []
    for batch in (1, 16, 256):
        # Interleave the two variants run by run, so machine load hits both alike.
        fused, staged = [], []
        for run in range(args.runs):
            fused.append(cycle_ns_per_block(batch, args.blocks, 2 * run))
            staged.append(staged_ns_per_block(batch, args.blocks, 2 * run + 1))
        rows.append((batch, statistics.median(fused), statistics.median(staged)))
    overhead = statistics.median(call_overhead_ns(200_000) for _ in range(args.runs))
    print(f"clock: {args.clock}")
    print("batch  allocate+register(hashes=)+release  allocate+stage+register+release  (ns/block, median)")
    for batch, fused, staged in rows:
        print(f"{batch:5d}  {fused:33.0f}  {staged:31.0f}")
    print(f"per-call overhead (BlockManager.contains): {overhead:.0f} ns")


if __name__ == "__main__":
    main()
