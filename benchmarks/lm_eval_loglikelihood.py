"""Hand-run: lm-eval's `local-completions` loglikelihood task against a specserve server, and
its scores checked against `transformers` on the same checkpoint.

lm-eval is installed apart (it does not pull torch, but brings 40-odd packages):

    pip install --no-deps --target /tmp/lmeval-site lm_eval==0.4.13 tenacity <its deps>

With a server running on the demo bundle (speculation on: scoring never drafts):

    PYTHONPATH=/tmp/lmeval-site:. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        python benchmarks/lm_eval_loglikelihood.py --base-url http://127.0.0.1:30000 \
        --model target --tokenizer models/demo/target

Runs `benchmarks/lm_eval_task/specserve_tiny_mc.yaml` (8 local rows, no download), prints
lm-eval's table, then each request's log-likelihood against transformers' log-softmax.
"""

from __future__ import annotations

import argparse

import torch
import transformers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:30000")
    ap.add_argument("--model", default="target")
    ap.add_argument("--tokenizer", default="models/demo/target")
    args = ap.parse_args()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    results = simple_evaluate(
        model="local-completions",
        model_args=(
            f"model={args.model},base_url={args.base_url}/v1/completions,"
            f"tokenizer_backend=huggingface,tokenizer={args.tokenizer},num_concurrent=2"
        ),
        tasks=["specserve_tiny_mc"],
        task_manager=TaskManager(include_path="benchmarks/lm_eval_task"),
        log_samples=True,
    )
    print(make_table(results))
    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(args.tokenizer, dtype=torch.float32)
    worst = 0.0
    for sample in results["samples"]["specserve_tiny_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            want = _loglikelihood(ref.eval(), tok, context, continuation)
            worst = max(worst, abs(resp[0][0] - want))
    print(f"max |lm-eval loglikelihood - transformers| over all requests: {worst:.2e}")


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of continuation token logprobs, tokenized as lm-eval's _encode_pair does."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tok(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


if __name__ == "__main__":
    main()
