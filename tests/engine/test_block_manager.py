from specserve.core import Request, SamplingParams
from specserve.engine.block_manager import BlockManager


def _req(tokens):
    return Request(prompt_token_ids=list(tokens), params=SamplingParams(), max_new_tokens=8)


def test_allocate_free_and_counts():
    bm = BlockManager(num_blocks=8, page_size=4)
    r = _req(range(10))
    assert bm.allocate(r, 10)
    assert len(r.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.allocate(r, 12) and len(r.block_table) == 3  # still fits
    assert bm.allocate(r, 13) and len(r.block_table) == 4
    assert not bm.allocate(_req(range(40)), 40)  # 10 blocks > 4 free
    bm.free_request(r)
    assert bm.num_free_blocks == 8 and r.block_table == []


def test_slot_mapping_follows_block_table():
    bm = BlockManager(num_blocks=8, page_size=4)
    r = _req(range(6))
    bm.allocate(_req(range(4)), 4)  # take block 0 so r's blocks are not 0, 1
    bm.allocate(r, 6)
    b0, b1 = r.block_table
    assert [bm.slot(r, p) for p in range(6)] == [b0 * 4 + i for i in range(4)] + [
        b1 * 4,
        b1 * 4 + 1,
    ]


def test_rollback_releases_trailing_blocks():
    bm = BlockManager(num_blocks=8, page_size=4)
    r = _req(range(5))
    bm.allocate(r, 5 + 7)  # prompt + room for drafts: 3 blocks
    assert bm.num_free_blocks == 5
    bm.rollback(r, 6)  # only 6 tokens committed: 2 blocks kept
    assert len(r.block_table) == 2 and bm.num_free_blocks == 6


def test_prefix_cache_shares_full_committed_blocks():
    bm = BlockManager(num_blocks=16, page_size=4)
    a = _req(range(11))
    assert bm.match_prefix(a) == 0
    bm.allocate(a, 11)
    bm.commit(a, 11)  # blocks [0..3], [4..7] are full and committed
    b = _req(list(range(8)) + [99, 98, 97])
    hit = bm.match_prefix(b)
    assert hit == 8 and b.block_table == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # a different first block breaks the chain even if the second block's tokens match
    c = _req([1000] + list(range(1, 11)))
    assert bm.match_prefix(c) == 0
    # the last token is always left to compute
    d = _req(range(8))
    assert bm.match_prefix(d) == 4
    for r in (a, b, c, d):
        bm.free_request(r)
    assert bm.num_free_blocks == 16
    # freed blocks keep their hashes: a later request still hits
    e = _req(range(9))
    assert bm.match_prefix(e) == 8
    bm.free_request(e)


def test_prefix_cache_disabled():
    bm = BlockManager(num_blocks=8, page_size=4, enable_prefix_caching=False)
    a = _req(range(9))
    bm.allocate(a, 9)
    bm.commit(a, 9)
    assert bm.match_prefix(_req(range(9))) == 0


def test_reused_free_block_loses_its_hash():
    bm = BlockManager(num_blocks=2, page_size=4)
    a = _req(range(5))
    bm.allocate(a, 5)
    bm.commit(a, 5)
    bm.free_request(a)
    # allocate both blocks to something else: the cached prefix must be gone
    other = _req(range(100, 108))
    bm.allocate(other, 8)
    bm.free_request(other)
    assert bm.match_prefix(_req(range(5))) == 0
