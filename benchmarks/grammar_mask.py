"""Cost of structured output with llguidance on the demo tokenizer: building the tokenizer
index, compiling a JSON schema, and one allowed-token mask per generated token."""

from __future__ import annotations

import json
import time

from specserve.structured.grammar import GrammarBackend, GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z][a-z ]{0,11}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "language": {"enum": ["python", "c", "rust"]},
    },
    "required": ["name", "age", "language"],
    "additionalProperties": False,
}


def main() -> None:
    backend = GrammarBackend("models/demo/target", 2048, [0, 2])
    t = time.perf_counter()
    _ = backend.tokenizer  # built on first use
    t_tok = time.perf_counter() - t
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    t = time.perf_counter()
    backend.compile(spec)
    t_compile = time.perf_counter() - t
    matcher = backend.matcher(spec)
    ids = backend.tokenizer.tokenize_str(
        '{"name": "ada lovelace", "age": 36, "language": "python"}'
    )
    times = []
    for tok in ids:
        t = time.perf_counter()
        matcher.mask()
        times.append(time.perf_counter() - t)
        matcher.advance([tok])
    times.sort()
    print(
        f"tokenizer index {t_tok * 1e3:.1f} ms, compile {t_compile * 1e3:.1f} ms, "
        f"mask median {times[len(times) // 2] * 1e6:.0f} us, max {times[-1] * 1e6:.0f} us "
        f"over {len(ids)} tokens"
    )


if __name__ == "__main__":
    main()
