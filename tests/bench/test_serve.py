"""bench serve end to end against the fake OpenAI-compatible server in fake_server.py."""

import io
import json
import math

import pytest

from specserve.bench.serve import BenchConfig, BenchError, arrival_gaps, config_from_options, run
from specserve.cli import main


def expected_accept_length(output_len: int, chunk_tokens: int) -> float:
    """What fake_server reports: the first token is prefill, then one verify step per chunk."""
    steps = math.ceil((output_len - 1) / chunk_tokens)
    return (output_len - 1) / steps


def bench(url: str, tmp_path, **options) -> dict:
    defaults = dict(
        base_url=url,
        dataset_name="random-ids",
        random_input_len=20,
        random_output_len=16,
        num_prompts=12,
        warmup_requests=0,
        disable_tqdm=True,
        output_file=str(tmp_path / "r.jsonl"),
    )
    out = io.StringIO()
    result = run(config_from_options(defaults | options), out=out)
    result["_printed"] = out.getvalue()
    return result


def test_counts_match_the_servers_own_counters(start_fake, tmp_path):
    server = start_fake("--chunk-tokens", "3", "--spec-k", "3", "--itl-ms", "3")
    before = server.counters()
    r = bench(server.url, tmp_path, max_concurrency=4, output_details=True)
    after = server.counters()

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert r["completed"] == 12 == delta("vllm:request_success_total")
    assert r["total_output_tokens"] == 12 * 16 == delta("vllm:generation_tokens_total")
    assert r["total_input_tokens"] == 12 * 20 == delta("vllm:prompt_tokens_total")
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    assert r["request_throughput"] == pytest.approx(12 / r["duration"])
    assert after["fake_max_inflight"] <= 4
    # 16 tokens = 1 prefill token + 15 in chunks of 3: 5 verify steps, 5 gaps, accept length 3
    assert r["accept_length"] == pytest.approx(expected_accept_length(16, 3)) == 3.0
    assert r["accept_length_source"] == "metrics"
    assert r["spec_accept_rate_per_pos"] == pytest.approx([1.0, 1.0, 0.0])
    assert all(len(itl) == 5 for itl in r["itls"])
    # the last chunk cannot arrive before the server sent it: 5 ms TTFT + 5 steps of 3 ms
    assert min(_latencies(r)) >= 0.020
    # every output has 16 tokens, so mean TPOT = (mean E2E - mean TTFT) / 15 exactly
    assert r["mean_tpot_ms"] == pytest.approx((r["mean_e2e_latency_ms"] - r["mean_ttft_ms"]) / 15)
    assert "Accept length:                           3.00" in r["_printed"]
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["completed"] == 12


def _latencies(r: dict) -> list[float]:
    # E2E is not in the per-request details; rebuild it from TTFT and the gaps.
    return [t + sum(itl) for t, itl in zip(r["ttfts"], r["itls"], strict=True)]


def test_text_prompts_are_checked_against_server_prompt_tokens(start_fake, tmp_path, tokenizer_dir):
    server = start_fake("--tokenizer", str(tokenizer_dir), "--stats", "server_info")
    r = bench(
        server.url,
        tmp_path,
        dataset_name="random",
        tokenizer=str(tokenizer_dir),
        random_input_len=40,
        num_prompts=6,
        warmup_requests=1,
    )
    assert r["completed"] == 6 and r["total_input_tokens"] == 6 * 40
    assert r["prompt_len_mismatches"] == 0
    assert r["total_output_tokens_retokenized"] is not None
    assert r["accept_length_source"] == "server_info" and r["accept_length"] == pytest.approx(1.0)
    chat = bench(
        server.url,
        tmp_path,
        backend="openai-chat",
        dataset_name="random",
        tokenizer=str(tokenizer_dir),
        random_input_len=40,
        num_prompts=3,
    )
    assert chat["completed"] == 3 and chat["total_output_tokens"] == 3 * 16
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2


def test_failed_requests_are_counted_with_their_errors(start_fake, tmp_path):
    http_fail = start_fake("--fail-every", "4")
    r = bench(http_fail.url, tmp_path)
    assert (r["completed"], r["failed"]) == (9, 3)
    assert r["error_counts"] == {
        f"HTTP 500: injected failure on request {n}": 1 for n in (4, 8, 12)
    }
    assert r["total_output_tokens"] == 9 * 16
    assert "Failed x1: HTTP 500: injected failure on request 4" in r["_printed"]
    mid = start_fake("--fail-every", "3", "--fail-mode", "stream", "--stats", "none")
    r = bench(mid.url, tmp_path)
    assert (r["completed"], r["failed"]) == (8, 4)
    assert r["error_counts"] == {"error in stream: injected mid-stream failure": 4}
    assert r["accept_length"] is None and "Accept length" not in r["_printed"]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2


def test_poisson_arrivals_and_rate(start_fake, tmp_path):
    gaps = arrival_gaps(4000, 20.0, seed=3)
    assert gaps == arrival_gaps(4000, 20.0, seed=3)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20.0, rel=0.06)
    assert arrival_gaps(3, math.inf, 0) == [0.0, 0.0, 0.0]
    server = start_fake()
    r = bench(server.url, tmp_path, num_prompts=8, request_rate=40.0, seed=5)
    assert r["completed"] == 8
    assert r["duration"] >= sum(arrival_gaps(8, 40.0, 5)[:-1])


def test_missing_usage_falls_back_and_warns(start_fake, tmp_path):
    server = start_fake("--no-usage")
    r = bench(server.url, tmp_path, num_prompts=2)
    assert r["usage_missing"] == 2 and r["total_output_tokens"] == 2 * 16
    assert "had no usage" in r["_printed"]


def test_cli_errors_are_one_line(start_fake, tmp_path, capsys):
    server = start_fake()
    common = [
        "bench",
        "serve",
        "--dataset-name",
        "random-ids",
        "--num-prompts",
        "2",
        "--output-file",
        str(tmp_path / "x.jsonl"),
        "--disable-tqdm",
    ]
    assert main([*common, "--base-url", server.url, "--model", "gpt-9"]) == 2
    err = capsys.readouterr().err
    assert "model 'gpt-9' is not served" in err and "fake-model" in err
    assert main([*common, "--base-url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["bench", "serve", "--dataset-name", "random"]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    assert main([*common, "--base-url", server.url, "--random-output-len", "4"]) == 0
    assert json.loads((tmp_path / "x.jsonl").read_text())["total_output_tokens"] == 8


def test_config_validation():
    with pytest.raises(BenchError, match="unknown option"):
        config_from_options({"num_promts": 3})
    with pytest.raises(BenchError, match="num_prompts"):
        config_from_options({"num_prompts": "many"})
    with pytest.raises(BenchError, match="chat completions"):
        BenchConfig(dataset_name="random-ids", backend="openai-chat")
    cfg = config_from_options({"num-prompts": "5", "dataset_name": "random-ids"})
    assert cfg.num_prompts == 5
