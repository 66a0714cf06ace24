"""kvbm.hash_tokens against the specification's test vectors (read from the spec itself)."""

import pathlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvbm

SPEC = pathlib.Path(__file__).resolve().parents[2] / "kvbm-logical" / "docs" / "hashing.md"


def _vectors():
    rows = []
    in_table = False
    for line in SPEC.read_text().splitlines():
        if line.startswith("| name | salt |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= {"-"}:
                continue
            rows.append(cells)
    assert rows, "no test vectors found in " + str(SPEC)
    return rows


def _salt(text):
    lora, salt = None, None
    if text != "none":
        for part in text.split(","):
            key, value = part.split("=", 1)
            if key == "lora":
                lora = int(value)
            elif key == "salt":
                salt = value.strip('"')
    return lora, salt


VECTORS = _vectors()


@pytest.mark.parametrize("row", VECTORS, ids=[r[0] for r in VECTORS])
def test_spec_vectors(row):
    name, salt_text, salt_hex, tokens_text, extra_text, hashes_text = row
    lora, salt = _salt(salt_text)
    a, b = (int(x) for x in tokens_text.split(".."))
    extra = None
    if extra_text != "-":
        extra = {}
        for pair in extra_text.split(";"):
            block, key = pair.split(":")
            extra.setdefault(int(block), []).append(int(key))
    expected = [int(h, 16) for h in hashes_text.split(",")]
    assert kvbm.salt_hash(salt, lora_id=lora) == int(salt_hex, 16), name
    assert kvbm.hash_tokens(list(range(a, b)), 4, salt, lora_id=lora, extra_keys=extra) == expected


def test_bytes_and_str_salts_agree():
    tokens = list(range(32))
    assert kvbm.hash_tokens(tokens, 8, "tenant-a") == kvbm.hash_tokens(tokens, 8, b"tenant-a")
    assert kvbm.hash_tokens(tokens, 8, "tenant-a") != kvbm.hash_tokens(tokens, 8)


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=200),
    block_size=st.sampled_from([1, 2, 4, 16, 64]),
    cut=st.integers(0, 200),
)
def test_prefix_property(tokens, block_size, cut):
    whole = kvbm.hash_tokens(tokens, block_size)
    assert len(whole) == len(tokens) // block_size
    part = kvbm.hash_tokens(tokens[:cut], block_size)
    assert whole[: len(part)] == part


@given(tokens=st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=64), cut=st.integers(1, 7))
def test_parent_continues_the_chain(tokens, cut):
    whole = kvbm.hash_tokens(tokens, 4, "s", lora_id=3)
    cut = min(cut, len(whole) - 1)
    rest = kvbm.hash_tokens(tokens[cut * 4 :], 4, "s", lora_id=3, parent=whole[cut - 1])
    assert whole[cut:] == rest


@pytest.mark.parametrize(
    "args, error",
    [
        (([1, 2, 3], 0), kvbm.ConfigError),
        (([-1], 1), OverflowError),
        (([2**32], 1), OverflowError),
        (("abc", 1), TypeError),
        (([1.5], 1), TypeError),
        (([1], -4), OverflowError),
    ],
)
def test_bad_arguments_raise(args, error):
    with pytest.raises(error):
        kvbm.hash_tokens(*args)
    with pytest.raises(TypeError):
        kvbm.hash_tokens([1, 2], 2, salt=3)
