"""specserve: LLM serving built around DSpark speculative decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from specserve.core import SamplingParams
    from specserve.llm import LLM


def __getattr__(name: str):
    # Lazy, so that `specserve --help` and light submodules don't import torch.
    if name == "LLM":
        from specserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from specserve.core import SamplingParams

        return SamplingParams
    raise AttributeError(name)
