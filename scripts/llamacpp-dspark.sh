#!/usr/bin/env bash
# The demo bundle's DSpark drafter in llama.cpp, next to ours (run by hand; not part of any test).
#
#   nice -n 10 scripts/llamacpp-dspark.sh LLAMA_SRC [WORK_DIR]
#
# LLAMA_SRC  a llama.cpp source tree with DSpark support (2026-10-01 or later), or an unpacked
#            llama-cpp-python sdist (0.3.36 vendors one under vendor/llama.cpp)
# WORK_DIR   the build and the .gguf files (default: build/llamacpp; an existing build is
#            reused), prompts and logs in WORK_DIR/ctx$CONTEXT
#
# 1. builds llama-speculative-simple only (cmake, CPU, Release, -j$JOBS);
# 2. converts the bundle's target and DSpark drafter with llama.cpp's convert_hf_to_gguf.py
#    (f32; the drafter with --target-model-dir, from which it takes the tokenizer; our
#    tokenizer's pre-tokenizer hash is mapped to gpt-2, see benchmarks/vs_llamacpp.py);
# 3. decodes N_PROMPTS held-out prompts greedily with `--spec-type draft-dspark`, N_PREDICT
#    tokens each, drafting the whole trained block (--spec-draft-n-max = block size), with
#    --no-escape (the prompt files hold code with backslashes) and -fa off (llama.cpp's CPU
#    flash attention moves logits by ~0.03 when a batch attends to cached keys, which flips
#    near-ties, so its greedy text would part from ours and transformers');
# 4. decodes the same prompts with specserve (DSPARK, every drafted token verified) and prints
#    both accept lengths and whether the greedy texts agree (scripts/llamacpp_dspark.py).
#
# Environment: PYTHON (default .venv/bin/python, else python3; it needs torch and specserve's
# dependencies), BUNDLE (models/demo), CONTEXT (prompt tokens: 64, or 2048 for whole held-out
# files; default 64), N_PROMPTS (8), N_PREDICT (128), THREADS (1), JOBS (build jobs, 1),
# LLAMA_ARGS (more llama-speculative-simple flags, after ours, so they win; e.g. "-fa on").
set -euo pipefail

die() { echo "llamacpp-dspark: $*" >&2; exit 2; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: scripts/llamacpp-dspark.sh LLAMA_SRC [WORK_DIR]"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[[ -d $1 ]] || die "LLAMA_SRC $1 is not a folder"
SRC=$(cd "$1" && pwd)
[[ ! -d $SRC/vendor/llama.cpp ]] || SRC=$SRC/vendor/llama.cpp  # an unpacked llama-cpp-python
for f in CMakeLists.txt convert_hf_to_gguf.py examples/speculative-simple/CMakeLists.txt; do
  [[ -f $SRC/$f ]] || die "$SRC is not a llama.cpp source tree (no $f)"
done
grep -q draft-dspark "$SRC/common/speculative.cpp" 2>/dev/null \
  || die "$SRC has no --spec-type draft-dspark (llama.cpp of 2026-10-01 or later needed)"
mkdir -p "${2:-build/llamacpp}" || die "cannot create WORK_DIR ${2:-build/llamacpp}"
WORK=$(cd "${2:-build/llamacpp}" && pwd)

cd "$ROOT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
BUNDLE=${BUNDLE:-models/demo}
CONTEXT=${CONTEXT:-64}
N_PROMPTS=${N_PROMPTS:-8}
N_PREDICT=${N_PREDICT:-128}
THREADS=${THREADS:-1}
JOBS=${JOBS:-1}
for v in CONTEXT N_PROMPTS N_PREDICT THREADS JOBS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number (got '${!v}')"
done
HELPER=(env OMP_NUM_THREADS="$THREADS" "$PYTHON" scripts/llamacpp_dspark.py)

for f in target/config.json target/model.safetensors dspark/config.json dspark/model.safetensors; do
  [[ -f $BUNDLE/$f ]] || die "$BUNDLE is not a demo bundle (no $f)"
done
"$PYTHON" -c "import torch, specserve" 2>/dev/null \
  || die "$PYTHON cannot import torch and specserve (set PYTHON to the project's venv)"
"${HELPER[@]}" check "$BUNDLE"

BIN=$WORK/llama.cpp-build/bin/llama-speculative-simple
echo "== building llama-speculative-simple in $WORK/llama.cpp-build (-j$JOBS; log: build.log)"
if [[ ! -f $WORK/llama.cpp-build/CMakeCache.txt ]]; then
  cmake -S "$SRC" -B "$WORK/llama.cpp-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF > "$WORK/cmake.log" 2>&1 \
    || { tail -20 "$WORK/cmake.log"; die "cmake configure failed (log: $WORK/cmake.log)"; }
fi
SECONDS=0
cmake --build "$WORK/llama.cpp-build" --target llama-speculative-simple -j "$JOBS" \
  > "$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; die "build failed"; }
echo "   done in ${SECONDS}s"

convert() {  # model folder, output, converter arguments...
  local model=$1 out=$2
  shift 2
  if [[ ! -f $out || $model/model.safetensors -nt $out || $model/config.json -nt $out ]]; then
    "$PYTHON" -c "from benchmarks.vs_llamacpp import CONVERT; exec(CONVERT)" "$SRC" "$model" \
      --outtype f32 --outfile "$out" "$@" > "$out.log" 2>&1 \
      || { tail -20 "$out.log"; rm -f "$out"; die "converting $model failed (log: $out.log)"; }
  fi
}
echo "== converting $BUNDLE/target and $BUNDLE/dspark to GGUF f32"
convert "$BUNDLE/target" "$WORK/target.gguf"
convert "$BUNDLE/dspark" "$WORK/dspark.gguf" --target-model-dir "$BUNDLE/target"

RUN=$WORK/ctx$CONTEXT
mkdir -p "$RUN"
"${HELPER[@]}" prompts "$BUNDLE" "$RUN" "$CONTEXT" "$N_PROMPTS"
block=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['block_size'])" \
  "$BUNDLE/dspark/config.json")
read -ra extra <<< "${LLAMA_ARGS:-}"
echo "== llama.cpp: $N_PROMPTS prompts of $CONTEXT tokens, $N_PREDICT greedy tokens each"
for i in $(seq 1 "$N_PROMPTS"); do
  cmd=("$BIN" -m "$WORK/target.gguf" -md "$WORK/dspark.gguf" --spec-type draft-dspark
       --spec-draft-n-max "$block" -f "$RUN/prompt_$i.txt" -n "$N_PREDICT" --temp 0 --top-k 1
       --seed 0 -c $((CONTEXT + N_PREDICT + 64)) -b 4096 -ub 4096 -t "$THREADS" -lv 4
       --no-escape -fa off "${extra[@]}")
  [[ $i -gt 1 ]] || echo "   ${cmd[*]}"
  # Greedy, so a rerun decodes the same: llama.cpp's log thread now and then loses the tail of
  # the log (its statistics) at exit.
  for _ in 1 2 3; do
    "${cmd[@]}" > "$RUN/decode_$i.out" 2> "$RUN/decode_$i.log" \
      || { tail -20 "$RUN/decode_$i.log"; die "llama.cpp failed on prompt $i (above)"; }
    grep -q "#mean acc len" "$RUN/decode_$i.log" && break
  done
  grep -o "#gen drafts.*#acc rate/pos = ([^)]*)" "$RUN/decode_$i.log" | sed "s/^/   $i: /" \
    || die "no statistics in $RUN/decode_$i.log after 3 runs"
done
echo "== specserve on the same prompts, and both accept lengths (summary: $RUN/summary.json)"
"${HELPER[@]}" report "$BUNDLE" "$RUN" "$N_PREDICT" "$THREADS"
