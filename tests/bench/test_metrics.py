import math

import pytest

from specserve.bench.metrics import RequestTrace, compute_metrics, format_summary, result_fields


def traces() -> list[RequestTrace]:
    """Hand-made: A streams 5 tokens in chunks of 1, 2, 2 (speculation); B one token;
    C failed; D 3 tokens in chunks of 1, 2."""
    return [
        RequestTrace(True, 10, 5, ttft=0.1, itl=[0.05, 0.05], latency=0.3),
        RequestTrace(True, 20, 1, ttft=0.2, itl=[], latency=0.2),
        RequestTrace(False, 30, 0, error="HTTP 500: boom"),
        RequestTrace(True, 6, 3, ttft=0.4, itl=[0.2], latency=0.6),
    ]


def test_counts_and_throughputs():
    m = compute_metrics(traces(), duration_s=1.0, retokenized_output_lens=[5, 1, 99, 4])
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input, m.total_output) == (36, 9)
    assert m.total_output_retokenized == 10  # the failed request's 99 is not counted
    assert m.request_throughput == pytest.approx(3.0)
    assert m.input_throughput == pytest.approx(36.0)
    assert m.output_throughput == pytest.approx(9.0)
    assert m.total_throughput == pytest.approx(45.0)
    assert m.concurrency == pytest.approx(1.1)  # (0.3 + 0.2 + 0.6) / 1.0
    assert m.errors == {"HTTP 500: boom": 1}


def test_latency_statistics_by_hand():
    m = compute_metrics(traces(), duration_s=2.0)
    # TTFT 100, 200, 400 ms
    assert m.ttft.mean == pytest.approx(700 / 3)
    assert m.ttft.median == pytest.approx(200)
    assert m.ttft.std == pytest.approx(
        math.sqrt(((-400 / 3) ** 2 + (-100 / 3) ** 2 + (500 / 3) ** 2) / 3)
    )
    assert m.ttft.p99 == pytest.approx(200 + 0.98 * 200)
    # TPOT only for outputs longer than one token: (300-100)/4 = 50, (600-400)/2 = 100
    assert (m.tpot.mean, m.tpot.median, m.tpot.std) == pytest.approx((75, 75, 25))
    assert m.tpot.p99 == pytest.approx(99.5)
    # ITL: every gap between chunks, multi-token chunks count once: 50, 50, 200
    assert (m.itl.mean, m.itl.median) == pytest.approx((100, 50))
    assert m.itl.std == pytest.approx(math.sqrt(5000))
    assert m.itl.p95 == pytest.approx(50 + 0.9 * 150)
    assert m.itl.p99 == pytest.approx(50 + 0.98 * 150)
    assert m.max_itl_ms == pytest.approx(200)
    # E2E 300, 200, 600
    assert (m.e2e.mean, m.e2e.median) == pytest.approx((1100 / 3, 300))
    assert m.e2e.p99 == pytest.approx(300 + 0.98 * 300)
    assert m.concurrency == pytest.approx(0.55)


def test_single_token_outputs_have_no_tpot_or_itl():
    m = compute_metrics([RequestTrace(True, 4, 1, ttft=0.25, latency=0.25)], duration_s=0.5)
    assert m.ttft.mean == pytest.approx(250)
    assert (m.tpot.mean, m.itl.mean, m.max_itl_ms) == (0.0, 0.0, 0.0)
    assert m.e2e.mean == pytest.approx(250)
    assert m.request_throughput == pytest.approx(2.0)


def test_all_failed_reports_errors_and_zeros():
    t = [
        RequestTrace(False, 5, error="HTTP 404: no model"),
        RequestTrace(False, 5, error="HTTP 404: no model"),
    ]
    m = compute_metrics(t, duration_s=1.0)
    assert (m.completed, m.failed, m.total_output) == (0, 2, 0)
    assert m.errors == {"HTTP 404: no model": 2}
    assert m.e2e.mean == 0.0 and m.concurrency == 0.0


def test_bad_duration_rejected():
    with pytest.raises(ValueError, match="duration"):
        compute_metrics(traces(), duration_s=0.0)


def test_result_fields_use_sglang_names():
    fields = result_fields(compute_metrics(traces(), duration_s=1.0))
    for name in (
        "duration completed total_input_tokens total_output_tokens request_throughput "
        "input_throughput output_throughput total_throughput mean_e2e_latency_ms "
        "median_e2e_latency_ms std_e2e_latency_ms p99_e2e_latency_ms mean_ttft_ms "
        "median_ttft_ms std_ttft_ms p99_ttft_ms mean_tpot_ms median_tpot_ms std_tpot_ms "
        "p99_tpot_ms mean_itl_ms median_itl_ms std_itl_ms p95_itl_ms p99_itl_ms concurrency"
    ).split():
        assert name in fields, name
    assert fields["mean_tpot_ms"] == pytest.approx(75)
    assert fields["failed"] == 1


def test_summary_layout_matches_sglang():
    m = compute_metrics(traces(), duration_s=1.0)
    text = format_summary(m, "openai", float("inf"), 4, accept_length=2.5)
    lines = text.splitlines()
    assert lines[0] == "=" * 12 + " Serving Benchmark Result " + "=" * 12
    assert "Successful requests:".ljust(40) + " " + "3".ljust(10) in lines
    assert "Output token throughput (tok/s):".ljust(40) + " " + "9.00".ljust(10) in lines
    assert "Accept length:".ljust(40) + " " + "2.50".ljust(10) in lines
    assert "Mean TPOT (ms):".ljust(40) + " " + "75.00".ljust(10) in lines
    assert "{:-^50}".format("Time to First Token") in lines
    assert lines[-1] == "=" * 50
    no_spec = format_summary(m, "openai", float("inf"), None)
    assert "Accept length" not in no_spec and "not set" in no_spec
