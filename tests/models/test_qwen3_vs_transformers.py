"""Our model code against Hugging Face transformers on the same random checkpoint."""

from __future__ import annotations

import pytest
import torch
import transformers

from specserve.core import SamplingParams
from specserve.engine.model_runner import BatchSeq, ModelRunner
from specserve.llm import LLM
from specserve.models.attention import CausalAttention
from specserve.models.loader import load_model


def _hf(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("which", ["tiny_model_path", "tiny_llama_path"])
def test_prefill_logits_match(which, request):
    path = request.getfixturevalue(which)
    ours, _ = load_model(path)
    ref = _hf(path)
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        out = ours(ids.reshape(-1), torch.arange(37).repeat(2), CausalAttention(2, 37))
        got = ours.compute_logits(out.hidden).view(2, 37, -1)
    assert (got - want).abs().max().item() <= 1e-4


def test_paged_decode_logits_match(tiny_model_path):
    """Chunked prefill then one-token decode steps through the paged cache equal HF's logits."""
    ours, _ = load_model(tiny_model_path)
    ours.fuse()
    ref = _hf(tiny_model_path)
    runner = ModelRunner(ours, num_blocks=16, page_size=4, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    blocks = list(range(8))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = []
    # prefill in chunks of 7 (crossing page boundaries), then decode one token at a time
    pos = 0
    for chunk in (7, 7, 6):
        r = runner.forward([BatchSeq(ids[pos : pos + chunk], pos, blocks, 0)])
        got.append(r.logits)
        pos += chunk
    while pos < len(ids):
        got.append(runner.forward([BatchSeq(ids[pos : pos + 1], pos, blocks, 0)]).logits)
        pos += 1
    assert (torch.cat(got) - want).abs().max().item() <= 1e-4


def test_hidden_state_capture_matches_hf(tiny_model_path):
    ours, cfg = load_model(tiny_model_path)
    ref = _hf(tiny_model_path)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    layers = (-1, 0, cfg.num_hidden_layers - 1)
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states
        out = ours(ids[0], torch.arange(12), CausalAttention(1, 12), capture=layers)
    want = torch.cat([hs[i + 1] for i in layers], dim=-1)[0]
    assert (out.captured - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("which", ["tiny_model_path", "tiny_llama_path"])
def test_greedy_generation_is_token_identical(which, request):
    path = request.getfixturevalue(which)
    ref = _hf(path)
    llm = LLM(path, max_total_tokens=4096, page_size=8)
    prompts = [[5, 17, 300, 42], list(range(100, 133))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(prompt)
        with torch.no_grad():  # plain greedy loop on the reference (no EOS handling)
            for _ in range(64):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.outputs[0].token_ids == ids[len(prompt) :]
