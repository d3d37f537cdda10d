"""`specserve serve` refuses bad flags and bad model folders with one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from specserve.cli import main


@dataclass
class Result:
    returncode: int
    stderr: str


@pytest.fixture
def serve(capsys):
    """In-process `specserve serve` (the engine never starts: every case fails earlier)."""

    def run(*args: str) -> Result:
        try:
            code = main(["serve", *args, "--port", "1"])
        except SystemExit as e:  # argparse errors
            code = e.code
        return Result(code, capsys.readouterr().err)

    return run


def _one_line_error(proc: Result, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert needle in lines[0], proc.stderr


def test_missing_folder_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "specserve", "serve", "--model-path", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _one_line_error(Result(proc.returncode, proc.stderr), "no such folder")


def test_folder_without_config(serve, tmp_path):
    _one_line_error(serve("--model-path", str(tmp_path)), "config.json")


@pytest.fixture
def model_copy(tiny_model_path, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_model_path, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_corrupt_config(serve, model_copy):
    (model_copy / "config.json").write_text("{not json")
    _one_line_error(serve("--model-path", str(model_copy)), "not valid JSON")


def test_corrupt_weights(serve, model_copy):
    (model_copy / "model.safetensors").write_bytes(b"garbage" * 10)
    _one_line_error(serve("--model-path", str(model_copy)), "safetensors")


def test_weights_that_do_not_fit_the_config(serve, model_copy):
    _edit_config(model_copy, hidden_size=96)
    _one_line_error(serve("--model-path", str(model_copy)), "shape")


def test_unknown_architecture(serve, model_copy):
    _edit_config(model_copy, architectures=["MysteryForCausalLM"])
    _one_line_error(serve("--model-path", str(model_copy)), "not supported")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--page-size", "3"], "--page-size"),
        (["--max-running-requests", "0"], "--max-running-requests"),
        (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
        (["--device", "tpu"], "--device"),
        (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
    ],
)
def test_bad_values(serve, tiny_model_path, flags, needle):
    _one_line_error(serve("--model-path", tiny_model_path, *flags), needle)


def test_argparse_errors_exit_2(serve, tiny_model_path):
    proc = serve("--model-path", tiny_model_path, "--dtype", "float8")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = serve(
        "--model-path", tiny_model_path, "--max-total-tokens", "64", "--mem-fraction-static", "0.5"
    )
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max-queued-requests", "0"], "--max-queued-requests"),
        (["--queue-timeout", "0"], "--queue-timeout"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--max-logprobs", "21"], "--max-logprobs"),
    ],
)
def test_bad_admission_and_shutdown_values(serve, tiny_model_path, flags, needle):
    _one_line_error(serve("--model-path", tiny_model_path, *flags), needle)
