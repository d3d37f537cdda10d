"""`specserve bench`: sglang.bench_serving-compatible load generator and arm comparison."""
