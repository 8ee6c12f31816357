"""Block hashes: what makes two KV blocks the same content, so prefix caching may share them.

Block hash i chains hash i-1 with block i's content, so equal hashes mean equal prefixes. They
are Python hashes of tuples of ints: unlike str/bytes these are not salted, so every process
computes the same values. Three families, kept apart by a tag: token ids (the engine), trace
hash ids at the trace's own block size (Mooncake), a shared system prompt (synthetic).
"""

from __future__ import annotations

from collections.abc import Sequence

BlockHash = int
ROOT_HASH: BlockHash = 0x5EED  # the parent of block 0
_TOKENS, _TRACE, _TRACE_BLOCK, _SHARED, _UNIQUE = 1, 2, 3, 4, 5  # hash family tags


def token_block_hashes(token_ids: Sequence[int], block_size: int,
                       parent: BlockHash = ROOT_HASH) -> list[BlockHash]:
    """vLLM's chain: hash(parent hash, the block's token ids) for every full block. To extend a
    request's hashes with later tokens, pass them from a block boundary with the last hash."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((_TOKENS, parent, tuple(int(t) for t in token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


def trace_block_hashes(hash_ids: Sequence[int], trace_block_size: int, num_tokens: int,
                       block_size: int) -> list[BlockHash]:
    """Pool block hashes from a trace's per-block ids (Mooncake: one per 512 tokens).

    Pool block i covers tokens [i*bs, (i+1)*bs); its identity is the chain of trace ids up to the
    one holding token (i+1)*bs - 1, plus i, so two requests share it iff they share every trace
    block up to that one. Blocks past the trace's ids get no hash (they are never shared)."""
    if trace_block_size < 1 or block_size < 1:
        raise ValueError("block sizes must be >= 1")
    chain: list[BlockHash] = []
    parent = ROOT_HASH
    for trace_id in hash_ids:
        parent = hash((_TRACE, parent, int(trace_id)))
        chain.append(parent)
    hashes: list[BlockHash] = []
    for i in range(num_tokens // block_size):
        k = ((i + 1) * block_size - 1) // trace_block_size
        if k >= len(chain):
            break
        hashes.append(hash((_TRACE_BLOCK, chain[k], i)))
    return hashes


def unique_block_hashes(request_key: int, first_block: int, end_block: int) -> list[BlockHash]:
    """Hashes of blocks [first_block, end_block) that only this request has (a question, or
    output tokens): its own recompute after preemption can still hit them."""
    return [hash((_UNIQUE, request_key, i)) for i in range(first_block, end_block)]


def shared_prefix_block_hashes(num_tokens: int, block_size: int, system_prompt_id: int,
                               system_prompt_len: int, request_key: int) -> list[BlockHash]:
    """A synthetic shared-prefix prompt: blocks wholly inside system prompt `system_prompt_id`
    are shared by every request with that prompt, the rest are the request's own."""
    num_shared = min(system_prompt_len, num_tokens) // block_size
    return ([hash((_SHARED, system_prompt_id, i)) for i in range(num_shared)]
            + unique_block_hashes(request_key, num_shared, num_tokens // block_size))
