#!/usr/bin/env python3
"""A vLLM-style KV-event subscriber, driven by kvbm-events' tests (tests/python.rs).

It decodes every batch with msgspec structs written from vLLM's schema
(vllm/distributed/kv_events.py, v0.26 and later: an array-like batch of tagged-map events),
through ``msgspec.msgpack.Decoder(type=KVEventBatch)`` as vLLM's subscribers configure it,
checks that msgspec re-encodes each payload to exactly the bytes received, repairs gaps in
``seq`` through the replay socket, and rebuilds the cached set of each medium.

Protocol with the test, one line each way:
  stdout  READY                      sockets connected (and, in mode "late", caught up)
  stdin   END <seq>                  the last seq published so far
  stdout  STAT <name> <value> ...    then SET <medium> <hash> ... then DONE

Modes:
  live  reads the PUB socket while it waits for END
  slow  does not read the PUB socket until END (small buffers: the publisher drops messages)
  late  joins after the fact: replays from seq 0 before READY, then reads live
"""

import argparse
import select
import sys

import msgspec
import zmq


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the events: a map tagged by "type" (no array_like since vLLM PR #42892)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class MapEventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    """The batch of the later kv_events.py revision that drops array_like (layout "map")."""
    ts: float
    events: list
    data_parallel_rank: int | None = None


class KVEventMapBatch(MapEventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


END_SEQ = -1
TIMEOUT_MS = 20_000


class Subscriber:
    def __init__(self, args):
        self.args = args
        batch_type = KVEventMapBatch if args.layout == "map" else KVEventBatch
        self.decoder = msgspec.msgpack.Decoder(type=batch_type)
        self.encoder = msgspec.msgpack.Encoder()
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        if args.mode == "slow":
            self.sub.setsockopt(zmq.RCVHWM, 8)
            self.sub.setsockopt(zmq.RCVBUF, 4096)
        self.sub.setsockopt(zmq.SUBSCRIBE, args.topic.encode())
        self.sub.connect(args.endpoint)
        self.replay = self.ctx.socket(zmq.DEALER)
        self.replay.connect(args.replay)
        self.next = 0
        self.sets = {}
        self.stats = dict(batches=0, replayed=0, gaps=0, lost=0, mismatches=0,
                          rank_errors=0, size_errors=0, tokenized=0, clears=0, stored=0, removed=0)

    def apply(self, payload):
        batch = self.decoder.decode(payload)
        if self.encoder.encode(batch) != payload:
            self.stats["mismatches"] += 1
        if batch.data_parallel_rank != self.args.rank or not isinstance(batch.ts, float):
            self.stats["rank_errors"] += 1
        for event in batch.events:
            if isinstance(event, BlockStored):
                if event.block_size != self.args.block_size:
                    self.stats["size_errors"] += 1
                if event.token_ids:
                    self.stats["tokenized"] += 1
                    if len(event.token_ids) != event.block_size * len(event.block_hashes):
                        self.stats["size_errors"] += 1
                self.sets.setdefault(event.medium, set()).update(event.block_hashes)
                self.stats["stored"] += 1
            elif isinstance(event, BlockRemoved):
                self.sets.setdefault(event.medium, set()).difference_update(event.block_hashes)
                self.stats["removed"] += 1
            else:
                self.sets.clear()
                self.stats["clears"] += 1
        self.stats["batches"] += 1

    def accept(self, seq, payload):
        """Applies batch `seq` if it is the next one; earlier ones are duplicates."""
        if seq < self.next:
            return
        if seq > self.next:
            self.stats["lost"] += seq - self.next
            self.next = seq
        self.apply(payload)
        self.next += 1

    def replay_from(self, start):
        self.replay.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            if not self.replay.poll(TIMEOUT_MS):
                raise TimeoutError(f"no replay answer for start {start}")
            empty, seq_bytes, payload = self.replay.recv_multipart()
            assert empty == b""
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == END_SEQ:
                assert payload == b""
                return
            self.stats["replayed"] += 1
            self.accept(seq, payload)

    def live(self, seq, payload):
        if seq > self.next:
            # Missed messages (slow joiner or high-water mark): replay them first.
            self.stats["gaps"] += 1
            self.replay_from(self.next)
        self.accept(seq, payload)

    def read_live(self, timeout_ms):
        """Reads one live message if one comes within the timeout."""
        if not self.sub.poll(timeout_ms):
            return False
        topic, seq_bytes, payload = self.sub.recv_multipart()
        assert topic == self.args.topic.encode()
        self.live(int.from_bytes(seq_bytes, "big"), payload)
        return True

    def wait_end(self):
        if self.args.mode == "slow":
            return int(sys.stdin.readline().split()[1])
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(sys.stdin, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(TIMEOUT_MS))
            if self.sub in ready:
                self.read_live(0)
            if sys.stdin.fileno() in ready or sys.stdin in ready:
                return int(sys.stdin.readline().split()[1])

    def finish(self, last):
        # What is already here, then the replay socket for the rest.
        while self.next <= last and self.read_live(0):
            pass
        if self.next <= last:
            # Never arrived live (dropped at a high-water mark, or published before the
            # subscription reached the publisher: the slow joiner): a gap replay repairs.
            self.stats["gaps"] += 1
            self.replay_from(self.next)
        if self.next <= last:
            raise RuntimeError(f"replay ended at {self.next}, before {last}")
        for name, value in sorted(self.stats.items()):
            print(f"STAT {name} {value}")
        print(f"STAT next_seq {self.next}")
        for medium, hashes in sorted(self.sets.items()):
            for h in sorted(hashes):
                print(f"SET {medium} {h}")
        print("DONE", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--replay", required=True)
    parser.add_argument("--topic", default="")
    parser.add_argument("--mode", choices=["live", "slow", "late"], default="live")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--layout", choices=["array", "map"], default="array")
    args = parser.parse_args()
    sub = Subscriber(args)
    if args.mode == "late":
        sub.replay_from(0)
    print("READY", flush=True)
    last = sub.wait_end()
    sub.finish(last)


if __name__ == "__main__":
    main()
