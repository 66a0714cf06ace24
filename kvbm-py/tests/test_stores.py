"""Store tiers in the TierStack: a disk tier (G3) in a temporary directory and a Redis tier
(started here on a free loopback port): offload down, onboard back, every byte checked; typed
errors for an unwritable path and an unreachable Redis.

Redis tests skip when `redis-server` is not on PATH, unless KVBM_REQUIRE_REDIS=1 (CI sets it,
as for the Rust remote-tier tests): then a missing server is a failure."""

import os
import random
import shutil
import socket
import subprocess
import threading

import pytest

import kvbm

BS = 4


def make_stack(stores, g1=4, g2=4, **kw):
    return kvbm.TierStack(g1, g2, BS, num_layers=2, inner_dim=8, stores=stores, **kw)


def write_prefix(stack, hashes, rng):
    """Registers len(hashes) G1 blocks of random bytes under `hashes`; returns the images."""
    images = []
    blocks = stack.allocate_batch(len(hashes))
    for i in range(len(hashes)):
        image = bytes(rng.getrandbits(8) for _ in range(stack.block_bytes))
        blocks.write(i, image)
        images.append(image)
    stack.release(stack.register(blocks, hashes=hashes))
    return images


def push_out(stack, count, first=10_000):
    """Registers `count` other blocks, one G1-full at a time, so that earlier blocks leave G1
    and G2 (both hold 4)."""
    for start in range(0, count, 4):
        hashes = list(range(first + start, first + start + 4))
        stack.release(stack.register(stack.allocate_batch(4), hashes=hashes))
        stack.flush()


def round_trip(stack, store_index, tier_name):
    rng = random.Random(11)
    hashes = kvbm.hash_tokens(list(range(16)), BS)
    images = write_prefix(stack, hashes, rng)
    stack.flush()  # G1 -> G2 -> store
    assert stack.store_contains(store_index, hashes) == [True] * 4
    push_out(stack, 8)
    assert stack.g2_contains(hashes) == [False] * 4
    plan = stack.lookup(hashes)
    assert plan.g1_hits == 0 and plan.tiers == [tier_name] * 4
    done = stack.onboard(plan).wait()
    assert done.lost == [] and done.end is None and done.onboarded == 4
    assert [b.sequence_hash for b in done.blocks] == hashes
    assert [b.read() for b in done.blocks] == images
    stack.release(done.blocks)
    tiers = {t["tier"]: t for t in stack.stats()["tiers"]}
    assert tiers[tier_name]["offloaded"] >= 4 and tiers[tier_name]["onboarded"] == 4
    stack.check_invariants()


def test_disk_tier_round_trip(tmp_path):
    stack = make_stack([kvbm.DiskStore(tmp_path / "g3.kvbm", 64, model="m")])
    assert stack.store_count == 1
    round_trip(stack, 0, "G3")
    with pytest.raises(IndexError):
        stack.store_contains(1, [1])


def test_disk_tier_survives_a_restart(tmp_path):
    """The blocks a closed stack left on disk are found by the next one (recovery)."""
    path = tmp_path / "g3.kvbm"
    rng = random.Random(5)
    hashes = kvbm.hash_tokens(list(range(8)), BS)
    stack = make_stack([kvbm.DiskStore(path, 64, model="m")])
    images = write_prefix(stack, hashes, rng)
    stack.flush()
    del stack
    import gc

    gc.collect()
    again = make_stack([kvbm.DiskStore(path, 64, model="m")])
    assert again.store_contains(0, hashes) == [True, True]
    done = again.onboard(again.lookup(hashes)).wait()
    assert [b.read() for b in done.blocks] == images
    again.release(done.blocks)


def test_disk_tier_errors_are_typed(tmp_path):
    a_file = tmp_path / "not-a-directory"
    a_file.write_bytes(b"x")
    with pytest.raises(kvbm.DiskTierError) as info:
        make_stack([kvbm.DiskStore(a_file / "g3.kvbm", 64, model="m")])  # its directory is a file
    assert isinstance(info.value, kvbm.StoreError) and isinstance(info.value, kvbm.Error)
    assert str(info.value.path).endswith("g3.kvbm")
    other = tmp_path / "other.bin"
    other.write_bytes(b"not a kvbm tier file" * 1000)
    with pytest.raises(kvbm.DiskTierError, match="not a kvbm disk tier file"):
        make_stack([kvbm.DiskStore(other, 64, model="m")])
    assert other.read_bytes() == b"not a kvbm tier file" * 1000  # never overwritten
    with pytest.raises(kvbm.ConfigError):
        kvbm.DiskStore(tmp_path / "x", 64, capacity_bytes=1 << 20, model="m")  # both
    with pytest.raises(kvbm.ConfigError):
        kvbm.DiskStore(tmp_path / "x", model="m")  # neither
    with pytest.raises(kvbm.ConfigError):
        kvbm.DiskStore(tmp_path / "x", 64, recovery="maybe", model="m")
    with pytest.raises(kvbm.ConfigError):
        make_stack([kvbm.DiskStore(tmp_path / "g3.kvbm", 0, model="m")])
    with pytest.raises(TypeError):
        make_stack(["g3.kvbm"])
    with pytest.raises(OverflowError):
        kvbm.DiskStore(tmp_path / "x", -1, model="m")


# -- Redis --------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server")
    if server is None:
        msg = "redis-server not found (install the redis-server package)"
        if os.environ.get("KVBM_REQUIRE_REDIS") == "1":
            pytest.fail(f"{msg}, and KVBM_REQUIRE_REDIS=1 forbids skipping")
        pytest.skip(msg)
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Wait for the server to say it is ready (its log line), with a deadline.
    ready = threading.Event()

    def watch():
        for line in proc.stdout:
            if "Ready to accept connections" in line:
                ready.set()
        # Drain until exit so that the server never blocks on a full pipe.

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not ready.wait(20):
            pytest.fail("redis-server did not become ready within 20 s")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def test_redis_tier_round_trip(redis_url):
    stack = make_stack([kvbm.RedisStore(redis_url, namespace="pytest", model="m")])
    round_trip(stack, 0, "G3")


def test_disk_then_redis(tmp_path, redis_url):
    """G3 on disk, G4 on Redis: both receive the offloads and the onboard comes from G3 (the
    nearer); another stack sharing only the Redis tier then onboards the same bytes from it."""
    stack = make_stack(
        [
            kvbm.DiskStore(tmp_path / "g3.kvbm", 64, model="m"),
            kvbm.RedisStore(redis_url, namespace="two", model="m"),
        ]
    )
    assert stack.store_count == 2
    rng = random.Random(2)
    hashes = kvbm.hash_tokens(list(range(8)), BS)
    images = write_prefix(stack, hashes, rng)
    stack.flush()
    assert stack.store_contains(0, hashes) == [True, True]
    assert stack.store_contains(1, hashes) == [True, True]
    push_out(stack, 8)
    plan = stack.lookup(hashes)
    assert plan.tiers == ["G3", "G3"]
    done = stack.onboard(plan).wait()
    assert [b.read() for b in done.blocks] == images
    stack.release(done.blocks)
    shared = make_stack([kvbm.RedisStore(redis_url, namespace="two", model="m")])
    plan = shared.lookup(hashes)
    assert plan.tiers == ["G3", "G3"]  # its first store tier: the Redis one
    done = shared.onboard(plan).wait()
    assert done.lost == [] and [b.read() for b in done.blocks] == images
    shared.release(done.blocks)


def test_two_redis_tiers_need_one_probed_on_lookup(redis_url):
    """Two remote tiers, both deferred, would read only the first: refused, and the second
    probed on lookup works (its blocks come up when the first lacks them)."""
    with pytest.raises(kvbm.ConfigError, match="Deferred"):
        make_stack(
            [
                kvbm.RedisStore(redis_url, namespace="a", model="m"),
                kvbm.RedisStore(redis_url, namespace="b", model="m"),
            ]
        )
    with pytest.raises(kvbm.ConfigError, match="probe"):
        kvbm.RedisStore(redis_url, model="m", probe="sometimes")
    stack = make_stack(
        [
            kvbm.RedisStore(redis_url, namespace="near", model="m", probe="on_lookup"),
            kvbm.RedisStore(redis_url, namespace="far", model="m"),
        ]
    )
    assert stack.store_count == 2
    round_trip(stack, 0, "G3")


def test_unreachable_redis_is_a_typed_error():
    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(kvbm.RedisUnavailableError) as info:
        make_stack([kvbm.RedisStore(url, connect_timeout=0.5, response_timeout=0.5, model="m")])
    assert info.value.url == url and isinstance(info.value, kvbm.StoreError)
    # A password never shows: not in the error, its `url`, nor the store's repr.
    secret = f"redis://:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(kvbm.RedisUnavailableError) as info:
        make_stack([kvbm.RedisStore(secret, model="m", connect_timeout=0.5)])
    store = kvbm.RedisStore(secret, model="m")
    for shown in (str(info.value), info.value.url, repr(store), store.url):
        assert "s3cret" not in shown and "127.0.0.1" in shown, shown
    # Nor when the password holds a character that ends a URL's authority (unparseable).
    with pytest.raises(kvbm.ConfigError) as bad:
        make_stack([kvbm.RedisStore("redis://:s3cret/pw@127.0.0.1:1", model="m")])
    assert "s3cret" not in str(bad.value) and "pw@" not in str(bad.value), str(bad.value)
    # Without the check the stack builds; the tier is then a miss, never an error.
    stack = make_stack([kvbm.RedisStore(url, check=False, connect_timeout=0.5, model="m")])
    assert stack.store_count == 1
    for bad in (-1, 0, float("nan"), 1e300):
        with pytest.raises(kvbm.ConfigError):
            kvbm.RedisStore(url, ttl=bad, model="m")
    with pytest.raises(kvbm.ConfigError):
        make_stack([kvbm.RedisStore("http://nowhere", model="m")])


def test_a_deferred_miss_hands_back_its_fresh_g1_blocks_as_spare(redis_url):
    """Redis is probed on demand: blocks nobody stored are planned from it unverified, and the
    fetch's miss ends the prefix at 0. The G1 blocks the commit allocated for them come back
    as `spare`, to compute into, and are registered like freshly allocated ones."""
    stack = make_stack([kvbm.RedisStore(redis_url, namespace="spare", model="nobody")])
    hashes = kvbm.hash_tokens(list(range(12)), BS)
    plan = stack.lookup(hashes)
    assert plan.tiers == ["G3"] * 3
    done = stack.onboard(plan).wait()
    assert done.blocks == [] and done.onboarded == 0 and done.lost == []
    assert done.end is not None and done.end[0] == 0 and done.end[1] == hashes[0]
    assert len(done.spare) == 3
    rng = random.Random(5)
    images = [bytes(rng.getrandbits(8) for _ in range(stack.block_bytes)) for _ in hashes]
    for block, image in zip(done.spare, images):
        block.write(image)
    registered = stack.register(done.spare, hashes=hashes)
    assert [b.sequence_hash for b in registered] == hashes
    assert [b.read() for b in registered] == images
    stack.release(registered)
    stack.flush()
    assert stack.g2_contains(hashes) == [True] * 3


def test_a_store_tier_needs_a_model_id_and_checks_the_shard(tmp_path):
    """The model id is what tells other weights' blocks apart: no default to share by mistake."""
    with pytest.raises(TypeError):
        kvbm.DiskStore(tmp_path / "g3.kvbm", 64)
    with pytest.raises(TypeError):
        kvbm.RedisStore("redis://127.0.0.1:1")
    for rank, size in ((2, 2), (0, 0)):
        with pytest.raises(kvbm.ConfigError):
            kvbm.DiskStore(tmp_path / "x", 64, model="m", tp_rank=rank, tp_size=size)
        with pytest.raises(kvbm.ConfigError):
            kvbm.RedisStore("redis://127.0.0.1:1", model="m", tp_rank=rank, tp_size=size)
    with pytest.raises(kvbm.ConfigError):
        kvbm.DiskStore(tmp_path / "x", 64, model="")


def test_other_weights_dtype_or_shard_never_read_a_disk_tiers_blocks(tmp_path):
    """A file written for one model, element type and rank is not read back by a stack
    that differs in any of them (same layout: the fingerprint alone would match)."""
    path = tmp_path / "g3.kvbm"
    rng = random.Random(9)
    hashes = kvbm.hash_tokens(list(range(8)), BS)
    import gc

    stack = make_stack([kvbm.DiskStore(path, 64, model="a", dtype="bf16")])
    write_prefix(stack, hashes, rng)
    stack.flush()
    del stack
    gc.collect()
    for other in (
        dict(model="b", dtype="bf16"),
        dict(model="a", dtype="fp16"),
        dict(model="a", dtype="bf16", tp_rank=1, tp_size=2),
    ):
        again = make_stack([kvbm.DiskStore(path, 64, **other)])
        assert again.store_contains(0, hashes) == [False, False], other
        del again
        gc.collect()


def test_other_weights_dtype_or_shard_never_read_a_redis_tiers_blocks(redis_url):
    rng = random.Random(10)
    hashes = kvbm.hash_tokens(list(range(8)), BS)
    base = dict(namespace="ids", model="a", dtype="bf16", tp_rank=0, tp_size=2)
    stack = make_stack([kvbm.RedisStore(redis_url, **base)])
    images = write_prefix(stack, hashes, rng)
    stack.flush()
    same = make_stack([kvbm.RedisStore(redis_url, **base)])
    done = same.onboard(same.lookup(hashes)).wait()
    assert [b.read() for b in done.blocks] == images
    same.release(done.blocks)
    for change in (dict(model="b"), dict(dtype="fp16"), dict(tp_rank=1)):
        other = make_stack([kvbm.RedisStore(redis_url, **{**base, **change})])
        done = other.onboard(other.lookup(hashes)).wait()
        assert done.blocks == [] and done.lost == [], change
        other.release(done.spare)
