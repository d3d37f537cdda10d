"""Tensor and expert parallelism: rank layout, process groups and the layers that split across them.

Layout. `world = max(tp, ep)` ranks. Attention, dense MLPs, the embedding and the LM head are
split over a tensor-parallel group of `tp` consecutive ranks (replicated across groups when
ep > tp). Experts are split over `ep` expert groups; the `world / ep` ranks of one expert group
split each of its experts' intermediate dim. Activations between blocks are replicated on every
rank, so an MoE layer's combine is one all-reduce of partial expert outputs over the world.

At tp = 1 every factory here returns the plain single-process layer: nothing extra per call.
The loader narrows a checkpoint tensor to a rank's part by the `shard` attribute a factory puts
on the owning module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from specserve.config import ConfigError, ModelConfig
from specserve.models.layers import GatedMLP, Linear, linear


@dataclass(frozen=True)
class ParallelConfig:
    """`--tp-size`, `--ep-size` and the multi-node rendezvous flags, validated."""

    tp_size: int = 1
    ep_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of rank 0; None = a free local port
    timeout_s: float = 300.0  # process-group init and every collective

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.ep_size < 1:
            raise ConfigError("--tp-size and --ep-size must be positive")
        if self.world_size % self.tp_size or self.world_size % self.ep_size:
            raise ConfigError(
                f"--tp-size {self.tp_size} and --ep-size {self.ep_size}: the smaller must "
                "divide the larger"
            )
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError("--node-rank must be in [0, --nnodes)")
        if self.world_size % self.nnodes:
            raise ConfigError(
                f"{self.world_size} ranks (max of --tp-size, --ep-size) do not split evenly "
                f"over --nnodes {self.nnodes}"
            )
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ConfigError("--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's node)")
        if self.timeout_s <= 0:
            raise ConfigError("--dist-timeout must be positive")

    @property
    def world_size(self) -> int:
        return max(self.tp_size, self.ep_size)

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def check_model(self, cfg: ModelConfig, mxfp4: bool = False) -> None:
        """Refuse a split the model cannot take, naming the flag and the numbers. `mxfp4`:
        experts are served in MXFP4, whose blocks of 32 inputs cannot be cut."""
        from specserve.models.registry import MODEL_REGISTRY

        own = getattr(MODEL_REGISTRY.get(cfg.architecture), "check_parallel", None)
        if own is not None:  # a model with its own split rules
            return own(cfg, self.tp_size, self.ep_size, mxfp4)
        tp = self.tp_size
        for name in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
            if getattr(cfg, name) % tp:
                raise ConfigError(
                    f"--tp-size {tp} does not divide the model's {name} ({getattr(cfg, name)})"
                )
        if cfg.intermediate_size % tp and _has_dense_layer(cfg):
            raise ConfigError(
                f"--tp-size {tp} does not divide intermediate_size ({cfg.intermediate_size})"
            )
        if cfg.num_experts:
            if cfg.num_experts % self.ep_size:
                raise ConfigError(
                    f"--ep-size {self.ep_size} does not divide num_experts ({cfg.num_experts})"
                )
            split = self.world_size // self.ep_size
            if cfg.moe_intermediate_size % split:
                raise ConfigError(
                    f"{split} ranks per expert group do not divide moe_intermediate_size "
                    f"({cfg.moe_intermediate_size}); raise --ep-size"
                )
            if mxfp4 and cfg.moe_intermediate_size // split % 32:
                raise ConfigError(
                    f"MXFP4 experts split over {split} ranks need moe_intermediate_size / {split} "
                    f"to be a multiple of 32 (it is {cfg.moe_intermediate_size}); raise --ep-size"
                )
        elif self.ep_size > 1:
            raise ConfigError(f"--ep-size {self.ep_size} needs an MoE model (num_experts > 0)")


def _has_dense_layer(cfg: ModelConfig) -> bool:
    return any(not cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers))


@dataclass(frozen=True, eq=False)
class Parallel:
    """This rank's place in the layout and its process groups (None = the default group)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    tp_group: dist.ProcessGroup | None
    ep_rank: int
    ep_size: int
    expert_split_rank: int  # this rank's slice of each local expert's intermediate dim
    expert_split: int  # world / ep ranks share one expert

    @classmethod
    def create(cls, config: ParallelConfig, rank: int) -> Parallel:
        """After init_process_group; every rank must call it (new_group is collective)."""
        world, tp, ep = config.world_size, config.tp_size, config.ep_size
        tp_group = None
        if 1 < tp < world:
            for start in range(0, world, tp):
                group = dist.new_group(list(range(start, start + tp)))
                if start <= rank < start + tp:
                    tp_group = group
        split = world // ep
        return cls(rank, world, rank % tp, tp, tp_group, rank // split, ep, rank % split, split)

    @classmethod
    def single(cls) -> Parallel:
        return cls(0, 1, 0, 1, None, 0, 1, 0, 1)

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.tp_group)
        return x

    def world_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def tp_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., tp * n], rank order."""
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Shard:
    """A rank's part of a checkpoint tensor: slice `rank` of `parts` along `dim`."""

    dim: int
    rank: int
    parts: int

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() <= self.dim:  # e.g. the bias of a row-parallel linear: not split
            return t
        return t.chunk(self.parts, dim=self.dim)[self.rank]


def mark(module: nn.Module, dim: int, rank: int, parts: int) -> nn.Module:
    if parts > 1:
        module.shard = Shard(dim, rank, parts)
    return module


class RowParallelLinear(Linear):
    """Input dim split over ranks; the partial products are summed by an all-reduce (bias after)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, par: Parallel) -> None:
        super().__init__(in_features, out_features, bias)
        self.par = par
        mark(self, 1, par.tp_rank, par.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.par.tp_all_reduce(linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


def column_linear(in_f: int, out_f: int, bias: bool, par: Parallel | None) -> Linear:
    """Output dim split over the tp group (`out_f` is the full size); no communication."""
    if par is None or par.tp_size == 1:
        return Linear(in_f, out_f, bias)
    return mark(Linear(in_f, out_f // par.tp_size, bias), 0, par.tp_rank, par.tp_size)


def row_linear(in_f: int, out_f: int, bias: bool, par: Parallel | None) -> Linear:
    """Input dim split over the tp group (`in_f` is the full size), all-reduced output."""
    if par is None or par.tp_size == 1:
        return Linear(in_f, out_f, bias)
    return RowParallelLinear(in_f // par.tp_size, out_f, bias, par)


def gated_mlp(hidden: int, intermediate: int, bias: bool, par: Parallel | None) -> GatedMLP:
    """SwiGLU MLP with gate/up split by columns and down by rows over the tp group."""
    if par is None or par.tp_size == 1:
        return GatedMLP(hidden, intermediate, bias)
    mlp = GatedMLP(hidden, intermediate // par.tp_size, bias)
    mark(mlp.gate_proj, 0, par.tp_rank, par.tp_size)
    mark(mlp.up_proj, 0, par.tp_rank, par.tp_size)
    mlp.down_proj = RowParallelLinear(intermediate // par.tp_size, hidden, bias, par)
    return mlp


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * V/tp, (rank + 1) * V/tp) of the embedding; other ids give zeros, summed."""

    def __init__(self, vocab: int, hidden: int, par: Parallel) -> None:
        super().__init__()
        n = vocab // par.tp_size
        self.weight = nn.Parameter(torch.empty(n, hidden))
        self.start, self.num, self.par = par.tp_rank * n, n, par
        mark(self, 0, par.tp_rank, par.tp_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.par.tp_all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """LM head split by vocab rows; logits gathered so every rank holds all V columns."""

    def __init__(self, hidden: int, vocab: int, par: Parallel) -> None:
        super().__init__(hidden, vocab // par.tp_size)
        self.par = par
        mark(self, 0, par.tp_rank, par.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.par.tp_all_gather(linear(x, self.weight))


def embedding(vocab: int, hidden: int, par: Parallel | None) -> nn.Module:
    if par is None or par.tp_size == 1:
        return nn.Embedding(vocab, hidden)
    return VocabParallelEmbedding(vocab, hidden, par)


def lm_head(hidden: int, vocab: int, par: Parallel | None) -> Linear:
    if par is None or par.tp_size == 1:
        return Linear(hidden, vocab)
    return ParallelLMHead(hidden, vocab, par)


def shard_of(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The part of checkpoint tensor `name` that this rank's `model` holds."""
    owner = model.get_submodule(name.rpartition(".")[0])
    shard: Shard | None = getattr(owner, "shard", None)
    return shard.take(tensor) if shard is not None else tensor
