"""A toy continuous-batching scheduler over a synthetic multi-turn chat workload.

Each step admits waiting requests while KV blocks allow (prefix match first, then allocate
the rest all-or-nothing), prefills them (registering every full block), then decodes one token
for every running request (a new block at each block boundary, registered when full). A
finished request releases its blocks (they stay cached until evicted) and its conversation's
next turn joins the queue with the whole history as its prompt.

    python kvbm-py/examples/scheduler.py --requests 2000 --blocks 4096 --eviction lineage
"""

import argparse
import random
import time
from collections import deque

import kvbm


def workload(requests, seed, vocab=32000):
    """(conversation, system prompt, [(user turn, reply length)]) with shared system prompts."""
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(rng.randint(64, 512))] for _ in range(8)]
    convs = []
    while sum(len(c[2]) for c in convs) < requests:
        turns = [([rng.randrange(vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 200))
                 for _ in range(rng.randint(1, 8))]
        convs.append((len(convs), rng.choice(systems), turns))
    return convs


class Request:
    def __init__(self, conv, turn, history, user, out_len):
        self.conv, self.turn, self.out_len = conv, turn, out_len
        self.tokens = history + user
        self.prompt_len = len(self.tokens)
        self.blocks = []  # ImmutableBlocks (full, registered) + at most one MutableBlock tail
        self.hashes = []  # sequence hashes of the full blocks


def run(args):
    bs = args.block_size
    m = kvbm.BlockManager(block_count=args.blocks, block_size=bs, eviction=args.eviction)
    convs = workload(args.requests, args.seed)
    waiting = deque(Request(c, 0, sys, turns[0][0], turns[0][1]) for c, sys, turns in convs)
    running, done, hit, total_blocks = [], 0, 0, 0
    start = time.perf_counter()
    while (waiting or running) and done < args.requests:
        # Admit.
        while waiting and len(running) < args.max_running:
            r = waiting[0]
            hashes = kvbm.hash_tokens(r.tokens, bs)
            cached = m.match(hashes)
            need = len(hashes) - len(cached) + 1  # + the tail block for decoding
            try:
                fresh = m.allocate(need)
            except kvbm.AllocationError:
                m.release(cached)
                break  # no room: retry after some requests finish
            waiting.popleft()
            hit += len(cached)
            total_blocks += len(hashes)
            r.hashes = hashes
            r.blocks = cached + m.register(fresh[:-1], hashes=hashes[len(cached):],
                                           parent=hashes[len(cached) - 1] if cached else None)
            r.blocks.append(fresh[-1])
            running.append(r)
        # Decode one token for every running request.
        still = []
        for r in running:
            r.tokens.append(random.randrange(32000))
            if len(r.tokens) % bs == 0:  # the tail block is full: register it, open another
                parent = r.hashes[-1] if r.hashes else None
                r.hashes += kvbm.hash_tokens(r.tokens[-bs:], bs, parent=parent)  # one block
                r.blocks[-1] = m.register([r.blocks[-1]], hashes=r.hashes[-1:], parent=parent)[0]
                try:
                    r.blocks.append(m.allocate(1)[0])
                except kvbm.AllocationError:
                    r.out_len = 0  # out of memory: finish early (a real server would preempt)
            if len(r.tokens) - r.prompt_len >= r.out_len:
                m.release(r.blocks)
                done += 1
                _, sys, turns = convs[r.conv]
                if r.turn + 1 < len(turns):
                    user, out_len = turns[r.turn + 1]
                    waiting.append(Request(r.conv, r.turn + 1, r.tokens, user, out_len))
            else:
                still.append(r)
        running = still
        if not running and waiting and not m.available_blocks:
            break
    elapsed = time.perf_counter() - start
    m.release([b for r in running for b in r.blocks])
    m.check_invariants()
    rate = hit / total_blocks if total_blocks else 0.0
    print(f"{done} requests in {elapsed:.2f} s: {done / elapsed:.0f} requests/s, "
          f"prefix hit rate {rate:.3f} ({hit}/{total_blocks} blocks), eviction={m.eviction}")
    return done, rate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--blocks", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--eviction", default="lineage", choices=kvbm.EVICTION_BACKENDS)
    p.add_argument("--seed", type=int, default=42)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
