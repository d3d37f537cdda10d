// The `torch.ops.specserve` library: every op's schema and its CPU implementation (ops.h).
// The only translation unit that parses torch/library.h, so the kernels' own files compile
// without the dispatcher's headers.

#include <torch/library.h>

#include "ops.h"

using namespace specserve_kernels;

TORCH_LIBRARY(specserve, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_tables, "
      "Tensor q_starts, Tensor q_lens, Tensor kv_lens, float scale) -> ()");
  m.def("store_kv(Tensor(a!) cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("linear_tiled(Tensor(a!) out, Tensor x, Tensor w) -> ()");
  m.def(
      "dense_layers(Tensor(a!) x, Tensor[] weights, Tensor final_norm, Tensor cos, Tensor sin, "
      "Tensor[] caches, Tensor slots, Tensor block_tables, Tensor q_starts, Tensor q_lens, "
      "Tensor kv_lens, int num_heads, int intermediate, float eps, int[] capture, "
      "Tensor(b!) captured) -> ()");
  m.def(
      "draft_block(Tensor anchors, Tensor positions, Tensor[] contexts, Tensor[] weights, "
      "Tensor embed, Tensor final_norm, Tensor lm_head, Tensor cos, Tensor sin, "
      "Tensor markov_w1, Tensor markov_w2, Tensor conf_w, Tensor conf_b, int block, "
      "int mask_token, int num_heads, int num_kv_heads, int intermediate, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "draft_hidden(Tensor anchors, Tensor positions, Tensor[] contexts, Tensor[] weights, "
      "Tensor embed, Tensor final_norm, Tensor cos, Tensor sin, int block, int mask_token, "
      "int num_heads, int num_kv_heads, int intermediate, float eps) -> Tensor");
  m.def(
      "draft_context(Tensor rows, Tensor positions, Tensor[] weights, Tensor fc, "
      "Tensor hidden_norm, Tensor cos, Tensor sin, int num_kv_heads, float eps) -> Tensor[]");
  m.def(
      "row_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor(b!)[] keys, "
      "Tensor(c!)[] values, Tensor starts, Tensor q_lens, float scale) -> ()");
  m.def(
      "mtp_chain(Tensor hidden, Tensor anchor_positions, int steps, Tensor[] layer, "
      "Tensor enorm, Tensor hnorm, Tensor eh_proj, Tensor final_norm, Tensor lm_head, "
      "Tensor embed, Tensor cos, Tensor sin, Tensor(a!)[] keys, Tensor(b!)[] values, "
      "Tensor starts, int num_heads, int intermediate, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specserve, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("store_kv", &store_kv_op);
  m.impl("linear_tiled", &linear_tiled);
  m.impl("dense_layers", &dense_layers);
  m.impl("draft_block", &draft_block);
  m.impl("draft_hidden", &draft_hidden);
  m.impl("draft_context", &draft_context);
  m.impl("row_attention", &row_attention);
  m.impl("mtp_chain", &mtp_chain);
}
