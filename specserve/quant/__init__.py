"""Weight quantisation: MXFP4 (OCP Microscaling) for MoE expert weights.

`mxfp4` holds the pure tensor functions, `convert` the checkpoint converter and
`cli` the `specserve quantize` command. This package imports nothing heavy so the
CLI can register itself cheaply; import the submodules directly.
"""
