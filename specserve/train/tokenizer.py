"""Byte-level BPE tokenizers: `save_tokenizer` (any texts; with no texts, Python's own sources,
so tests get a deterministic tokenizer offline) and `train_tokenizer` (a target's corpora)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from specserve.train.data import corpus_files, read_texts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A ChatML template as Qwen2.5/Qwen3 write it: tools in the system turn, assistant tool calls as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, tool results as <tool_response> in a
# user turn. Without tools it renders plain ChatML.
_TOOLS_HEADER = (
    "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>"
)
_TOOLS_FOOTER = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>'
    "<|im_end|>\\n"
)
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    '{{- "' + _TOOLS_HEADER + '" }}'
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    '{{- "' + _TOOLS_FOOTER + '" }}'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools and loop.first %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{- (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _training_text() -> list[str]:
    import argparse
    import collections
    import json as json_mod
    import textwrap

    return [inspect.getsource(m) for m in (argparse, collections, json_mod, textwrap)]


def save_tokenizer(
    out: str | Path,
    vocab_size: int,
    chat_template: str | None = CHATML_TEMPLATE,
    texts: list[str] | None = None,
) -> None:
    """Train a byte-level BPE of `vocab_size` tokens and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or _training_text(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>" if chat_template else "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 1 << 20,
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def train_tokenizer(
    corpora: list[str | Path], vocab_size: int, out: str | Path, max_bytes: int = 8 << 20
) -> Path:
    """Byte-level BPE over at most `max_bytes` of each corpus's train split, saved in Hugging
    Face format with the ChatML template. Held-out files are never read."""
    texts: list[str] = []
    for corpus in corpora:
        files = corpus_files(corpus, "train")
        if not files:
            raise ValueError(f"{corpus}: no .py or .txt files in the train split")
        texts += read_texts(files, max_bytes)
    save_tokenizer(out, vocab_size, texts=texts)
    return Path(out)


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` of a Hugging Face model or tokenizer folder."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{path}: no tokenizer.json")
    return Tokenizer.from_file(str(file))
