"""Pure parts of the transfer: block ids and block sizes."""

from __future__ import annotations

import hashlib

from agent.storage.azure_blob import block_id
from agent.transfer import MAX_BLOCKS, block_size_for


def test_block_ids_are_deterministic_equal_length_and_content_bound():
    a = block_id(0, hashlib.md5(b"a").digest())  # noqa: S324
    assert a == block_id(0, hashlib.md5(b"a").digest())  # noqa: S324
    assert a != block_id(0, hashlib.md5(b"b").digest())  # noqa: S324
    assert a != block_id(1, hashlib.md5(b"a").digest())  # noqa: S324
    assert len({len(block_id(i, hashlib.md5(bytes([i % 256])).digest())) for i in range(0, MAX_BLOCKS, 997)}) == 1  # noqa: S324


def test_block_size_grows_only_past_the_block_limit():
    eight = 8 * 1024 * 1024
    assert block_size_for(10 * 1024**3, eight) == eight
    grown = block_size_for(500 * 1024**3, eight)
    assert grown % (1024 * 1024) == 0
    assert -(-500 * 1024**3 // grown) <= MAX_BLOCKS
