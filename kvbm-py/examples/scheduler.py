"""A toy continuous-batching scheduler over a synthetic multi-turn chat workload.

Each request is a ``kvbm.RequestSequence``. Each step admits waiting requests while KV blocks
allow (prefix match, then allocate the rest all-or-nothing) and prefills them (``commit``
registers every full block at once, so that the next request can share it), then decodes one
token for every running request (``push``, ``allocate(1)``, ``commit(1)``). When a decode step
finds no free block, the request is preempted (its blocks released, its tokens kept) and
resumed later from its cached prefix. A finished request releases its blocks (they stay
cached until evicted) and its conversation's next turn joins the queue with the whole history
as its prompt.

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
    def __init__(self, m, conv, turn, history, user, out_len):
        self.conv, self.turn, self.out_len = conv, turn, out_len
        self.seq = kvbm.RequestSequence(m, history + user, reserve_tokens=out_len)
        self.prompt_len = self.seq.prompt_len


def admit(r, stats):
    """Prefix match, allocate the rest, prefill. False (holding nothing) if blocks are short."""
    seq = r.seq
    matched = seq.match_prefix()
    try:
        seq.allocate(seq.num_pending_tokens)
    except kvbm.AllocationError:
        seq.preempt()  # give the matched blocks back: retry after some requests finish
        return False
    stats["hit"] += matched
    stats["blocks"] += len(seq.sequence_hashes)
    seq.commit(seq.num_pending_tokens)  # the engine computed the prompt (or its remainder)
    return True


def run(args):
    m = kvbm.BlockManager(block_count=args.blocks, block_size=args.block_size,
                          eviction=args.eviction)
    rng = random.Random(args.seed)
    convs = workload(args.requests, args.seed)
    waiting = deque(Request(m, c, 0, sys, turns[0][0], turns[0][1]) for c, sys, turns in convs)
    running, done = [], 0
    stats = {"hit": 0, "blocks": 0, "preempted": 0}
    start = time.perf_counter()
    while (waiting or running) and done < args.requests:
        # Admit.
        while waiting and len(running) < args.max_running and admit(waiting[0], stats):
            running.append(waiting.popleft())
        if not running:
            break  # the head of the queue does not fit even in an empty cache
        # Decode one token for every running request.
        still = []
        for r in running:
            seq = r.seq
            seq.push(rng.randrange(32000))
            try:
                seq.allocate(1)  # a new block at each block boundary
            except kvbm.AllocationError:
                seq.preempt()  # out of blocks: resume later from the cached prefix
                stats["preempted"] += 1
                waiting.appendleft(r)
                continue
            seq.commit(1)
            if seq.num_tokens - r.prompt_len >= r.out_len:
                tokens = seq.tokens
                seq.release()
                done += 1
                _, sys, turns = convs[r.conv]
                if r.turn + 1 < len(turns):
                    user, out_len = turns[r.turn + 1]
                    waiting.append(Request(m, r.conv, r.turn + 1, tokens, user, out_len))
            else:
                still.append(r)
        running = still
    elapsed = time.perf_counter() - start
    for r in running + list(waiting):
        r.seq.release()
    m.check_invariants()
    rate = stats["hit"] / stats["blocks"] if stats["blocks"] else 0.0
    print(f"{done} requests in {elapsed:.2f} s: {done / elapsed:.0f} requests/s, "
          f"prefix hit rate {rate:.3f} ({stats['hit']}/{stats['blocks']} blocks), "
          f"{stats['preempted']} preemptions, eviction={m.eviction}")
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
