"""bench compare end to end: fake-server arms started from the YAML, report, JSONL, plots."""

import json
import sys
import time

import httpx
import pytest
import yaml

from specserve.bench.compare import (
    CompareError,
    ServerProcess,
    parse_config,
)
from specserve.bench.report import gain, identity_line, workload_table
from specserve.cli import main

from .conftest import FAKE_SERVER

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_arm(name: str, *args: str) -> dict:
    return {"name": name, "command": [sys.executable, str(FAKE_SERVER), *args]}


def workload(name: str, **options) -> dict:
    base = dict(dataset_name="random-ids", random_input_len=16, num_prompts=6, disable_tqdm=True)
    return {"name": name, **base, **options}


def write_yaml(tmp_path, data: dict):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_two_arms_report_jsonl_and_plots(tmp_path):
    cfg = {
        "notes": "Workloads scaled down 64x for a laptop CPU.",
        "baseline": "plain",
        "arms": [
            fake_arm("plain", "--chunk-tokens", "1", "--itl-ms", "4"),
            fake_arm("dspark", "--chunk-tokens", "4", "--spec-k", "3", "--itl-ms", "4"),
        ],
        "workloads": [
            workload("short", random_output_len=9, max_concurrency=2, output_details=True),
            workload("long", random_output_len=17, num_prompts=4, warmup_requests=0),
        ],
    }
    out = tmp_path / "out"
    assert (
        main(["bench", "compare", "--config", str(write_yaml(tmp_path, cfg)), "--out", str(out)])
        == 0
    )

    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by = {(r["arm"], r["workload"]): r for r in lines}
    assert set(by) == {(a, w) for a in ("plain", "dspark") for w in ("short", "long")}
    assert by["plain", "short"]["accept_length"] == pytest.approx(1.0)
    assert by["dspark", "short"]["accept_length"] == pytest.approx(8 / 2)  # 8 tokens, 2 steps
    assert by["dspark", "long"]["accept_length"] == pytest.approx(16 / 4)
    assert by["dspark", "long"]["spec_accept_rate_per_pos"] == pytest.approx([1.0, 1.0, 1.0])
    assert by["plain", "long"]["total_output_tokens"] == 4 * 17
    assert (
        by["dspark", "short"]["completed"] == 6 and by["dspark", "short"]["tag"] == "dspark/short"
    )

    report = (out / "report.md").read_text()
    assert "Workloads scaled down 64x" in report
    assert "| Metric | plain | dspark | Gain (dspark vs plain) |" in report
    assert "| Accept length | 1.00 | 4.00 | 4.00x |" in report
    short = report.split("## Workload `short`")[1].split("## Workload `long`")[0]
    p, d = by["plain", "short"], by["dspark", "short"]
    thr_gain = d["output_throughput"] / p["output_throughput"]
    row = f"| Output token throughput (tok/s) | {p['output_throughput']:.2f} | "
    assert row + f"{d['output_throughput']:.2f} | {thr_gain:.2f}x |" in short
    ttft_gain = p["mean_ttft_ms"] / d["mean_ttft_ms"]
    assert f"{d['mean_ttft_ms']:.2f} | {ttft_gain:.2f}x |" in short
    assert "* dspark: 1.000 1.000 1.000" in report
    # the texts were kept for `short` only: its greedy outputs are compared, `long`'s are not
    assert "Greedy outputs against plain, request by request: dspark 6/6 identical." in short
    assert report.count("Greedy outputs against") == 1

    import matplotlib.image

    for name in ("throughput", "ttft", "accept_length", "accept_per_position"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        h, w, _ = matplotlib.image.imread(png).shape
        assert h > 100 and w > 100
        assert f"![{name}]({name}.png)" in report
    for arm in ("plain", "dspark"):  # servers are gone: their ports refuse connections
        with pytest.raises(httpx.ConnectError):
            httpx.get(by[arm, "short"]["base_url"] + "/health", timeout=2)
        assert (out / f"server-{arm}.log").exists()


def test_failed_arm_is_reported_and_others_still_run(start_fake, tmp_path, capsys):
    good = start_fake("--chunk-tokens", "2")
    cfg = {
        "arms": [
            {"name": "broken", "command": [sys.executable, "-c", "import sys; sys.exit(3)"]},
            {"name": "good", "url": good.url},
        ],
        "workloads": [workload("w", random_output_len=5, num_prompts=3)],
    }
    out = tmp_path / "out"
    assert (
        main(["bench", "compare", "--config", str(write_yaml(tmp_path, cfg)), "--out", str(out)])
        == 1
    )
    report = (out / "report.md").read_text()
    assert "## Failures" in report and "arm broken: server exited with code 3" in report
    assert "| Successful requests | — | 3 | — |" in report
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["arm"] for x in lines] == ["good"]


def test_yaml_typos_name_the_key_and_the_allowed_keys(tmp_path, capsys):
    cfg = {
        "arms": [{"name": "a", "url": "http://127.0.0.1:1"}],
        "workloads": [workload("w", num_promts=3)],
    }
    assert main(["bench", "compare", "--config", str(write_yaml(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'num_promts'" in err and "did you mean 'num_prompts'" in err
    assert "allowed keys:" in err and "max_concurrency" in err
    with pytest.raises(CompareError, match="unknown key 'workload'.*allowed keys: arms, workloads"):
        parse_config({"arms": [], "workload": []})
    with pytest.raises(CompareError, match="exactly one of serve, command, url"):
        parse_config({"arms": [{"name": "x", "url": "http://h", "serve": "--model-path m"}]})
    with pytest.raises(CompareError, match="baseline 'z' is not an arm"):
        parse_config({"arms": [{"url": "http://h"}], "workloads": [workload("w")], "baseline": "z"})
    with pytest.raises(CompareError, match="random_range_ratio"):
        parse_config(
            {"arms": [{"url": "http://h"}], "workloads": [workload("w", random_range_ratio=2)]}
        )


def test_arm_command_lines():
    cfg = parse_config(
        {
            "arms": [
                {"name": "s", "serve": "--model-path models/tiny --spec dspark"},
                {"name": "c", "command": ["srv", "--listen", "127.0.0.1:{port}"]},
            ],
            "workloads": [workload("w")],
        }
    )
    s, c = cfg.arms
    assert s.argv(8001) == [
        sys.executable,
        "-m",
        "specserve",
        "serve",
        "--model-path",
        "models/tiny",
        "--spec",
        "dspark",
        "--port",
        "8001",
    ]
    assert c.argv(8002) == ["srv", "--listen", "127.0.0.1:8002"]


def test_gain_pair_and_direction():
    cfg = parse_config(
        {
            "arms": [{"name": n, "url": "http://h"} for n in "abc"],
            "workloads": [workload("w")],
            "baseline": "b",
        }
    )
    assert cfg.gain_pair() == ("b", "c")
    assert gain(100.0, 150.0, +1) == pytest.approx(1.5)
    assert gain(100.0, 50.0, -1) == pytest.approx(2.0)  # half the latency: 2x better
    assert gain(None, 50.0, -1) is None and gain(1.0, 2.0, 0) is None
    table = workload_table(["a", "b"], {"a": {"completed": 3}}, ("a", "b"))
    assert "| Successful requests | 3 | — | — |" in table
    assert "Accept length" not in table  # no arm reported one


def test_server_that_ignores_sigterm_is_killed(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    server = ServerProcess([sys.executable, "-c", code], tmp_path / "log", "http://127.0.0.1:1")
    server.start()
    time.sleep(0.5)  # let it install the handler
    t0 = time.monotonic()
    server.stop(timeout=0.5)
    assert server.proc.returncode == -9
    assert time.monotonic() - t0 < 5


def test_identity_line_names_an_arm_whose_greedy_outputs_differ():
    by_arm = {
        "NONE": {"generated_texts": ["a b", "c d", "e"]},
        "MTP": {"generated_texts": ["a b", "c d", "e"]},
        "DSPARK": {"generated_texts": ["a b", "c x", "e"]},
        "OLD": {},  # run without output_details: left out
    }
    arms = ["NONE", "MTP", "DSPARK", "OLD"]
    assert identity_line(arms, by_arm, {"temperature": 0.0}) == (
        "Greedy outputs against NONE, request by request: MTP 3/3 identical; "
        "DSPARK 2/3 **DIFFERENT**."
    )
    assert identity_line(arms, by_arm, {}) is not None  # bench serve's default is greedy
    assert identity_line(arms, by_arm, {"temperature": 1.0}) is None  # sampled: no claim
    assert identity_line(["OLD", "NONE"], by_arm, {}) is None  # no reference texts
    short = {"NONE": by_arm["NONE"], "MTP": {"generated_texts": ["a b", "c d"]}}
    assert "MTP 2/3 **DIFFERENT**" in identity_line(["NONE", "MTP"], short, {})


def test_reverse_starts_the_arms_in_reverse_and_keeps_the_report_columns(tmp_path, capsys):
    from specserve.bench.compare import run_compare

    cfg = {
        "arms": [
            fake_arm("first", "--chunk-tokens", "1"),
            fake_arm("second", "--chunk-tokens", "2"),
        ],
        "workloads": [workload("w", random_output_len=5, num_prompts=2, warmup_requests=0)],
    }
    out = tmp_path / "out"
    assert run_compare(write_yaml(tmp_path, cfg), out, reverse=True) == 0
    printed = capsys.readouterr().out
    assert printed.index("== arm second") < printed.index("== arm first")
    assert "| Metric | first | second | Gain (second vs first) |" in (out / "report.md").read_text()
