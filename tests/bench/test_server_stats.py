import pytest

from specserve.bench import server_stats
from specserve.bench.server_stats import SpecCounters, combine, spec_counters

PAGE = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 10.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 60.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 30.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 16.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="1"} 10.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="2"} 4.0
vllm:num_requests_running 3
"""


def test_counters_any_prefix_summed_over_labels():
    c = spec_counters(PAGE)
    assert (c.drafts, c.draft_tokens, c.accepted) == (20.0, 60.0, 30.0)
    assert c.accepted_per_pos == {0: 16.0, 1: 10.0, 2: 4.0}
    other = spec_counters(PAGE.replace("vllm:", "specserve:"))
    assert other == c
    assert spec_counters("up 1\n") is None


def test_counters_of_one_prefix_when_a_server_exports_two():
    """specserve exports its spec_decode counters as `specserve:` and again as `vllm:`: the
    totals are those of one prefix, not their sum, and `specserve:` wins where they differ."""
    ours = PAGE.replace("vllm:", "specserve:")
    assert spec_counters(ours + PAGE) == spec_counters(PAGE)
    doubled = PAGE.replace("} 10.0", "} 99.0")  # a vllm: series that disagrees
    c = spec_counters(doubled + ours)
    assert (c.drafts, c.accepted, c.accepted_per_pos[1]) == (20.0, 30.0, 10.0)


def test_accept_length_from_deltas():
    before = SpecCounters(drafts=10, accepted=5, draft_tokens=30, accepted_per_pos={0: 4, 1: 1})
    after = SpecCounters(
        drafts=30, accepted=45, draft_tokens=90, accepted_per_pos={0: 22, 1: 15, 2: 5}
    )
    s = combine(before, after, {"internal_states": [{"avg_spec_accept_length": 9.0}]})
    assert s.source == "metrics"
    assert s.accept_length == pytest.approx(1 + 40 / 20)
    assert s.accept_rate_per_pos == pytest.approx([18 / 20, 14 / 20, 5 / 20])


def test_server_info_used_when_no_counter_delta():
    c = SpecCounters(drafts=5, accepted=5)
    info = {"internal_states": [{"avg_spec_accept_length": 3.25}]}
    s = combine(c, c, info)  # no drafts during the run: counters say nothing
    assert (s.accept_length, s.source, s.accept_rate_per_pos) == (3.25, "server_info", [])
    pd = {"decode": [{"internal_states": [{"avg_spec_accept_length": 2.0}]}]}
    assert server_stats.server_info_accept_length(pd) == 2.0
    assert combine(None, None, {"internal_states": []}).source == "none"
    assert combine(None, None, None).accept_length is None
