"""How flat the target's next-token distributions are along its own continuations, by domain.

    python benchmarks/target_entropy.py --target models/demo/target --data build/demo/data_heldout

For each evaluation temperature, the held-out prompts are continued by the target (as
`specserve eval drafter` does) and the mean entropy (nats) and mean top probability of the
target's distribution over the generated positions are printed per domain, with the share of
generated tokens that close a 4-gram already seen earlier in the same sequence (repetition,
which a drafter predicts easily). Flat distributions are what make a parallel draft slot
(DFlash) lose acceptance at temperature 1.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from specserve.models.loader import load_model
from specserve.train.drafter import target_states
from specserve.train.evaluate import continuations


def repeated_ngram_share(seq: list[int], start: int, n: int = 4) -> float:
    """Share of positions >= start whose n-gram ending there occurred earlier in `seq`."""
    seen = {tuple(seq[j - n + 1 : j + 1]) for j in range(n - 1, start)}
    hits = 0
    for i in range(start, len(seq)):
        gram = tuple(seq[i - n + 1 : i + 1])
        hits += gram in seen
        seen.add(gram)
    return hits / max(1, len(seq) - start)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--data", required=True, help="a gen-data folder of held-out prompts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    target, cfg = load_model(args.target)
    last_layer = cfg.num_hidden_layers - 1
    for temp in (0.0, 1.0):
        seqs, p, domains = continuations(target, args.data, temp)
        _, last = target_states(target, seqs, (last_layer,))
        logits = target.compute_logits(last[:, p - 1 : -1].reshape(-1, last.shape[-1]))
        logp = F.log_softmax(logits.float(), -1).view(len(seqs), -1, logits.shape[-1])
        entropy = -(logp.exp() * logp).sum(-1)
        top = logp.exp().amax(-1)
        rep = torch.tensor([repeated_ngram_share(row.tolist(), p) for row in seqs])
        for d in sorted(set(domains)):
            idx = torch.tensor([i for i, x in enumerate(domains) if x == d])
            print(
                f"t={temp:g} {d:<6} mean entropy {entropy[idx].mean():.3f} nats, "
                f"mean top probability {top[idx].mean():.3f}, "
                f"repeated 4-grams {rep[idx].mean():.3f}"
            )


if __name__ == "__main__":
    main()
