"""Hand-run: `sglang.bench_serving` (SGLang's own client) against a specserve server.

sglang pulls a GPU stack, so it is installed apart, without its dependencies, into a folder
under /tmp (never into the project's virtual environment):

    pip download --no-deps -d /tmp/sgl-dl sglang
    pip install --no-deps --target /tmp/sgl-site /tmp/sgl-dl/sglang-*.whl
    pip install --no-deps --target /tmp/sgl-site orjson pybase64 requests msgspec pyzmq \
        IPython traitlets aiohttp multidict yarl propcache aiohappyeyeballs aiosignal \
        frozenlist datasets multiprocess pandas pyarrow dill xxhash python-dateutil pytz six

Then, with a server running (e.g. `specserve serve --model-path models/demo/target
--speculative-algorithm DSPARK --speculative-draft-model-path models/demo/dspark`):

    PYTHONPATH=/tmp/sgl-site python benchmarks/sglang_bench_serving.py --backend sglang \
        --base-url http://127.0.0.1:30000 --tokenizer models/demo/target \
        --dataset-name random-ids --random-input-len 64 --random-output-len 64 \
        --num-prompts 16 --max-concurrency 4

`sglang.benchmark.serving` imports one constant from `sglang.srt.disaggregation.utils`, whose
package imports torchvision and the GPU runtime; that one module is replaced by the constant
so the client runs on a CPU-only machine. Everything else is sglang's code as published.
"""

from __future__ import annotations

import sys
import types


def main() -> None:
    stub = types.ModuleType("sglang.srt.disaggregation.utils")
    stub.FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # the value sglang defines there
    sys.modules[stub.__name__] = stub
    from sglang.bench_serving import cli_main

    cli_main()


if __name__ == "__main__":
    main()
