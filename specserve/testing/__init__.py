"""Helpers for tests, benchmarks and the fallback demo: small random checkpoints written in
Hugging Face format, nothing downloaded."""
