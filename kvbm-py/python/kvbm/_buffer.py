"""Zero-copy views of host block memory.

The extension is built for the stable ABI of CPython 3.9, which has no buffer-protocol slots
for classes, so views are made through ctypes: an array type laid over the block's address,
carrying a reference to an owner object that keeps the memory (and, for a read-only view of a
registered block, the block itself) alive as long as any view of it exists.
"""

import ctypes
from functools import lru_cache


@lru_cache(maxsize=64)
def _array_type(length: int) -> type:
    # A subclass so that instances have a __dict__ to hold the owner.
    return type(f"_KvbmBlockBytes{length}", (ctypes.c_ubyte * length,), {})


def make_view(addr: int, length: int, owner: object, readonly: bool) -> memoryview:
    array = _array_type(length).from_address(addr)
    array._kvbm_owner = owner  # keeps the memory alive while the array (and any view) lives
    view = memoryview(array).cast("B")
    return view.toreadonly() if readonly else view
