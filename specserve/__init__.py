"""specserve: LLM serving built around DSpark speculative decoding."""

__version__ = "0.1.0"
