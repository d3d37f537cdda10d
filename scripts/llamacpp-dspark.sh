#!/usr/bin/env bash
# Run the demo bundle's DSpark drafter in llama.cpp (by hand; not part of any test).
#
# Converts the bundle's target and DSpark drafter with llama.cpp's converter, then decodes
# greedily with `--spec-type draft-dspark` on held-out prompts and prints llama.cpp's accept
# figures next to the command line, so they can be put beside ours in docs/benchmarks.md
# (`specserve eval drafter --target models/demo/target --drafter models/demo/dspark ...`).
#
# What it needs (this script builds nothing and downloads nothing):
#   LLAMA_CPP   a llama.cpp checkout built with DSpark support (2026-10-01 or later), i.e.
#               $LLAMA_CPP/convert_hf_to_gguf.py and $LLAMA_CPP/build/bin/llama-speculative-simple
#               (build: cmake -B build && cmake --build build -j --target llama-speculative-simple)
#   PYTHON      a Python with llama.cpp's converter requirements
#               (pip install -r $LLAMA_CPP/requirements/requirements-convert_hf_to_gguf.txt)
#   BUNDLE      the bundle folder (default: models/demo)
#   OUT         where the .gguf files and logs go (default: build/llamacpp)
#   N_PROMPTS   held-out prompts to decode (default 4), N_PREDICT tokens each (default 256)
#   SPEC_BIN    the decoding binary (default: llama-speculative-simple); EXTRA_ARGS are appended
#
# A drafter whose target_layer_ids include the target's last layer aborts in llama.cpp with
# "layer input tensor is null"; the script refuses such a drafter up front.
set -euo pipefail

: "${LLAMA_CPP:?set LLAMA_CPP to a llama.cpp checkout built with DSpark support}"
PYTHON=${PYTHON:-python3}
BUNDLE=${BUNDLE:-models/demo}
OUT=${OUT:-build/llamacpp}
N_PROMPTS=${N_PROMPTS:-4}
N_PREDICT=${N_PREDICT:-256}
SPEC_BIN=${SPEC_BIN:-$LLAMA_CPP/build/bin/llama-speculative-simple}
CONVERT=$LLAMA_CPP/convert_hf_to_gguf.py

for need in "$CONVERT" "$SPEC_BIN" "$BUNDLE/target/config.json" "$BUNDLE/dspark/config.json"; do
  [[ -e $need ]] || { echo "llamacpp-dspark: missing $need" >&2; exit 2; }
done
if [[ -f $BUNDLE/prompts_long.jsonl ]]; then PROMPTS=$BUNDLE/prompts_long.jsonl
else PROMPTS=$BUNDLE/prompts_heldout.jsonl; fi

"$PYTHON" - "$BUNDLE" <<'PY'
import json, sys
bundle = sys.argv[1]
t = json.load(open(f"{bundle}/target/config.json"))
d = json.load(open(f"{bundle}/dspark/config.json"))
last = t["num_hidden_layers"] - 1
if last in d["target_layer_ids"]:
    sys.exit(f"llamacpp-dspark: the drafter reads layer {last}, the target's last "
             f"(target_layer_ids {d['target_layer_ids']}); llama.cpp aborts on it. "
             "Rebuild the bundle (make demo-model).")
PY

mkdir -p "$OUT"
echo "== converting (llama.cpp: $(git -C "$LLAMA_CPP" log -1 --format='%h %cs' 2>/dev/null || echo unknown))"
"$PYTHON" "$CONVERT" "$BUNDLE/target" --outtype f32 --outfile "$OUT/target.gguf"
"$PYTHON" "$CONVERT" "$BUNDLE/dspark" --outtype f32 --outfile "$OUT/dspark.gguf"

block=$("$PYTHON" -c "import json; print(json.load(open('$BUNDLE/dspark/config.json'))['block_size'])")
# The prompts as text files (held-out files the bundle never trained on), code and prose in turn.
n=$("$PYTHON" - "$PROMPTS" "$OUT" "$N_PROMPTS" <<'PY'
import json, sys
from itertools import chain, zip_longest
path, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
by = {}
for line in open(path):
    item = json.loads(line)
    by.setdefault(item["domain"], []).append(item["text"])
turns = [t for t in chain(*zip_longest(*by.values())) if t is not None][:n]
for i, text in enumerate(turns, 1):
    open(f"{out}/prompt_{i}.txt", "w").write(text)
print(len(turns))
PY
)
for i in $(seq 1 "$n"); do
  cmd=("$SPEC_BIN" -m "$OUT/target.gguf" -md "$OUT/dspark.gguf" --spec-type draft-dspark
       -f "$OUT/prompt_$i.txt" -n "$N_PREDICT" --temp 0 --top-k 1 --draft-max "$block"
       -c 4096 -t 1 ${EXTRA_ARGS:-})
  echo "== prompt $i: ${cmd[*]}"
  "${cmd[@]}" > "$OUT/decode_$i.log" 2>&1 || { tail -20 "$OUT/decode_$i.log"; exit 1; }
  grep -iE "accept|n_draft|n_predict|decoded" "$OUT/decode_$i.log" || tail -5 "$OUT/decode_$i.log"
done
echo "== accept length = accepted draft tokens / verify passes + 1 (the bonus token); compare with"
echo "   specserve eval drafter --target $BUNDLE/target --drafter $BUNDLE/dspark --data <held-out gen-data> --temperature 0"
