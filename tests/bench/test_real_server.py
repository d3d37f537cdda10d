"""bench serve and bench compare against the real `specserve serve` with a tiny random model.

Only the public surface is used: the OpenAI API, /metrics and /get_server_info.
"""

import json
import sys

import httpx
import pytest
import yaml

from specserve.bench.compare import ServerProcess, free_port
from specserve.bench.serve import config_from_options, run
from specserve.bench.server_stats import parse_prometheus
from specserve.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from specserve.testing.tiny import make_checkpoint

    return str(make_checkpoint(tmp_path_factory.mktemp("bench-tiny") / "qwen3", seed=0))


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {name: value for name, _labels, value in parse_prometheus(text)}


def test_bench_serve_counts_match_engine_counters(tiny_model, tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "specserve", "serve", "--model-path", tiny_model]
    server = ServerProcess(
        [*argv, "--port", str(port)], tmp_path / "log", f"http://127.0.0.1:{port}"
    )
    try:
        server.start()
        server.wait_healthy(120)
        before = counters(server.base_url)
        options = dict(
            base_url=server.base_url,
            dataset_name="random",
            tokenizer=tiny_model,
            random_input_len=24,
            random_output_len=6,
            num_prompts=6,
            max_concurrency=3,
            ignore_eos=True,
            warmup_requests=0,
            disable_tqdm=True,
            output_file=str(tmp_path / "r.jsonl"),
        )
        r = run(config_from_options(options))
        after = counters(server.base_url)
    finally:
        server.stop(10)
    assert r["model"] == "qwen3" and (r["completed"], r["failed"]) == (6, 0)
    assert r["total_input_tokens"] == 6 * 24
    assert r["total_output_tokens"] == 6 * 6
    assert r["prompt_len_mismatches"] == 0  # random prompts are exactly 24 tokens to the engine
    gen = "specserve:generation_tokens_total"
    prompt = "specserve:prompt_tokens_total"
    assert after[gen] - before[gen] == r["total_output_tokens"]
    assert after[prompt] - before[prompt] == r["total_input_tokens"]
    assert r["output_throughput"] == pytest.approx(36 / r["duration"])


def test_bench_compare_with_a_serve_arm(tiny_model, tmp_path):
    cfg = {
        "arms": [{"name": "engine", "serve": ["--model-path", tiny_model]}],
        "workloads": [
            {
                "name": "w",
                "dataset_name": "random-ids",
                "random_input_len": 16,
                "random_output_len": 4,
                "num_prompts": 4,
                "ignore_eos": True,
                "disable_tqdm": True,
            }
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["bench", "compare", "--config", str(path), "--out", str(out)]) == 0
    [line] = (out / "results.jsonl").read_text().splitlines()
    result = json.loads(line)
    assert (result["arm"], result["completed"], result["total_output_tokens"]) == ("engine", 4, 16)
    report = (out / "report.md").read_text()
    assert "| Successful requests | 4 |" in report
    assert " --ignore-eos " in report and "True" not in report
    with pytest.raises(httpx.ConnectError):  # the engine was stopped
        httpx.get(result["base_url"] + "/health", timeout=2)
