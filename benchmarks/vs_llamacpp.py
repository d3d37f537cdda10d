"""Batch-1 greedy decode, specserve vs llama.cpp, on the same model (run by hand).

    .venv/bin/python benchmarks/vs_llamacpp.py [--model models/demo/target] [--threads 1]
        [--tokens 256] [--rounds 3] [--work /tmp/specserve-llamacpp] [--attention-backend cpp]
        [--outtype auto|f32|f16|bf16]

The first run builds `llama-cpp-python==0.3.36` from source into its own venv under `--work`
(about 11 minutes of two quiet cores; later runs reuse it) and converts the model folder to
GGUF with the converter that release vendors (llama.cpp of 2026-10-01), run by this
project's Python (it needs torch and transformers, which the llama venv must not install
again). `--outtype auto` keeps the checkpoint's dtype (`torch_dtype` in config.json): both
engines then read the weights as saved (specserve widens 16-bit weights to float32 exactly
and sums in float32; llama.cpp's f16 / bf16 dot products round the activations to 16 bits). Our demo tokenizer is a plain byte-level BPE with the GPT-2 split regex whose hash the
converter does not know; the converter is told it is `gpt-2`. Then, alternating the two
engines `--rounds` times, each decodes `--tokens` tokens greedily after a 16-token prompt on
`--threads` threads; it prints tok/s of both (best and median over rounds) and the ratio.
Each round also measures the copy bandwidth (`engine_decode.copy_bandwidth`, over the weights'
footprint); the floor is that bandwidth over the bytes a decode step reads (every weight as
saved, less the embedding table, of which a step reads one row), and both engines' tok/s are
given as a fraction of the floor's tok/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"
PROMPT = [(7 * j) % 1000 + 3 for j in range(16)]

# Runs inside the llama venv: greedy decode with llama.cpp's low-level eval loop (EOS ignored,
# as on our side); prints tokens per second. `logits_all`: `scores` then has a row per context
# position (else only n_batch rows, and decoding past 64 tokens indexes out of range).
LLAMA_DECODE = """
import sys, time, numpy as np
from llama_cpp import Llama
path, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ids = [int(t) for t in prompt.split(",")]
llm = Llama(model_path=path, n_ctx=len(ids) + tokens + 8, n_threads=threads,
            n_threads_batch=threads, n_batch=64, logits_all=True, verbose=False)
t = time.perf_counter()
llm.eval(ids)
for _ in range(tokens - 1):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
print(tokens / (time.perf_counter() - t))
"""

# Runs the vendored converter (argv: its folder, then the converter's own arguments) with this
# project's Python, mapping an unknown pre-tokenizer hash to gpt-2 (the demo tokenizer's split
# regex is GPT-2's). Qwen's converter imports sentencepiece before it looks for a
# tokenizer.model; ours has only tokenizer.json, so the missing file is reported first and the
# converter takes its GPT-2 vocabulary path. scripts/llamacpp-dspark.sh runs it too.
CONVERT = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import convert_hf_to_gguf as conv

def gpt2_if_unknown(original):
    def patched(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"
    return patched

def no_sentencepiece_without_model(original):
    def patched(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError("no tokenizer.model")
        return original(self)
    return patched

for module in list(sys.modules.values()):
    for cls in list(vars(module).values()) if module else ():
        if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
            cls.get_vocab_base_pre = gpt2_if_unknown(cls.get_vocab_base_pre)
        if isinstance(cls, type) and "_create_vocab_sentencepiece" in vars(cls):
            cls._create_vocab_sentencepiece = no_sentencepiece_without_model(
                cls._create_vocab_sentencepiece)
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
conv.main()
"""


def run(cmd: list[str], **kw) -> str:
    shown = ["<script>" if "\n" in a else a for a in cmd]  # not the inline scripts' text
    print("+", " ".join(shown), flush=True)
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def llama_env(work: Path) -> tuple[Path, Path]:
    """The venv with llama-cpp-python built from source, and the unpacked source."""
    venv, src = work / "venv", work / f"llama_cpp_python-{VERSION}"
    python = venv / "bin" / "python"
    if not src.is_dir():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", str(work), f"llama-cpp-python=={VERSION}"])  # fmt: skip
        with tarfile.open(work / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
        # llama-cpp-python's runtime imports (installed below with --no-deps)
        run([str(python), "-m", "pip", "install", "--quiet", "numpy", "typing_extensions",
             "diskcache", "jinja2"])  # fmt: skip
        start = time.perf_counter()
        env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON", CMAKE_BUILD_PARALLEL_LEVEL="2")
        run([str(python), "-m", "pip", "install", "--no-deps", str(src)], env=env)
        print(f"built llama-cpp-python in {time.perf_counter() - start:.0f} s")
    return python, src


GGUF_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def to_gguf(model: Path, src: Path, work: Path, outtype: str = "f32") -> Path:
    """The model folder as GGUF `outtype`, converted once per folder and version of its weights
    (the name carries the path, config.json and each weight file's size and mtime)."""
    key = [str(model.resolve()), (model / "config.json").read_text()]
    key += [
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in sorted(model.glob("*.safetensors"))
    ]
    tag = hashlib.sha1("\n".join(key).encode()).hexdigest()[:8]
    out = work / f"{model.resolve().name}-{tag}-{outtype}.gguf"
    if not out.exists():
        converter = src / "vendor" / "llama.cpp"
        args = [str(model), "--outfile", str(out), "--outtype", outtype]
        run([sys.executable, "-c", CONVERT, str(converter), *args])
    return out


def ours_tok_s(model: Path, threads: int, tokens: int, backend: str) -> float:
    import torch

    from specserve.core import SamplingParams
    from specserve.llm import LLM

    llm = LLM(
        str(model),
        max_total_tokens=len(PROMPT) + tokens + 64,
        num_threads=threads,
        attention_backend=backend,
    )
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    t = time.perf_counter()
    llm.generate([PROMPT], params)
    dt = time.perf_counter() - t
    assert torch.get_num_threads() == threads
    return tokens / dt


def step_bytes(model: Path) -> int:
    """Bytes of weight a batch-1 decode step reads, as saved: every tensor but the input
    embedding (one row of it is read), which a tied output head reads whole."""
    from safetensors import safe_open

    config = json.loads((model / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    total = 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name.endswith("embed_tokens.weight") and not tied:
                    continue
                part = st.get_slice(name)
                n = 1
                for d in part.get_shape():
                    n *= d
                total += n * sizes[part.get_dtype()]
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/demo/target")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/specserve-llamacpp")
    ap.add_argument(
        "--attention-backend", default="cpp", help="ours: cpp (the C++ kernels) or torch"
    )
    ap.add_argument(
        "--outtype",
        choices=("auto", *GGUF_TYPES.values()),
        default="auto",
        help="GGUF weight type; auto: the checkpoint's dtype",
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    python, src = llama_env(work)
    outtype = args.outtype
    if outtype == "auto":
        saved = json.loads((Path(args.model) / "config.json").read_text()).get("torch_dtype")
        outtype = GGUF_TYPES.get(saved or "float32", "f32")
    gguf = to_gguf(Path(args.model), src, work, outtype)
    prompt = ",".join(map(str, PROMPT))
    import torch
    from engine_decode import copy_bandwidth

    torch.set_num_threads(args.threads)
    nbytes = step_bytes(Path(args.model))
    ours, theirs, bws = [], [], []
    for _ in range(args.rounds):  # alternate the engines
        cmd = [str(python), "-c", LLAMA_DECODE, str(gguf), str(args.threads), str(args.tokens)]
        theirs.append(float(run([*cmd, prompt]).strip().splitlines()[-1]))
        ours.append(ours_tok_s(Path(args.model), args.threads, args.tokens, args.attention_backend))
        bws.append(copy_bandwidth(nbytes))
    floor = max(bws) / nbytes  # tok/s if a step only read its weights at the copy bandwidth
    result = {
        "model": args.model,
        "gguf": outtype,
        "threads": args.threads,
        "tokens": args.tokens,
        "specserve_tok_s": {"best": max(ours), "median": statistics.median(ours)},
        "llamacpp_tok_s": {"best": max(theirs), "median": statistics.median(theirs)},
        "ratio_median": statistics.median(ours) / statistics.median(theirs),
        "step_weight_mb": nbytes / 1e6,
        "copy_gb_s": {"best": max(bws) / 1e9, "median": statistics.median(bws) / 1e9},
        "floor_tok_s": floor,
        "specserve_of_floor": statistics.median(ours) / floor,
        "llamacpp_of_floor": statistics.median(theirs) / floor,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
