// The kernels' entry points, one per `torch.ops.specserve` op: defined in paged_attention.cpp,
// dense_step.cpp, draft_step.cpp and row_attention.cpp, registered with PyTorch in register.cpp
// (the one translation unit that parses torch/library.h). Schemas and argument meanings are
// with the registrations and the definitions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace specserve_kernels {

// paged_attention.cpp
void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache,
                     const at::Tensor& block_tables, const at::Tensor& q_starts,
                     const at::Tensor& q_lens, const at::Tensor& kv_lens, double scale);
void store_kv_op(at::Tensor cache, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& slots);

// dense_step.cpp
void linear_tiled(at::Tensor out, const at::Tensor& x, const at::Tensor& w);
void dense_layers(at::Tensor x, const std::vector<at::Tensor>& weights,
                  const at::Tensor& final_norm, const at::Tensor& cos, const at::Tensor& sin,
                  const std::vector<at::Tensor>& caches, const at::Tensor& slots,
                  const at::Tensor& block_tables, const at::Tensor& q_starts,
                  const at::Tensor& q_lens, const at::Tensor& kv_lens, int64_t num_heads,
                  int64_t intermediate, double eps, std::vector<int64_t> capture,
                  at::Tensor captured);

// draft_step.cpp
at::Tensor draft_hidden(const at::Tensor& anchors, const at::Tensor& positions,
                        const std::vector<at::Tensor>& contexts,
                        const std::vector<at::Tensor>& weights, const at::Tensor& embed,
                        const at::Tensor& final_norm, const at::Tensor& cos, const at::Tensor& sin,
                        int64_t block, int64_t mask_token, int64_t num_heads, int64_t num_kv_heads,
                        int64_t intermediate, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> draft_block(
    const at::Tensor& anchors, const at::Tensor& positions, const std::vector<at::Tensor>& contexts,
    const std::vector<at::Tensor>& weights, const at::Tensor& embed, const at::Tensor& final_norm,
    const at::Tensor& lm_head, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& markov_w1, const at::Tensor& markov_w2, const at::Tensor& conf_w,
    const at::Tensor& conf_b, int64_t block, int64_t mask_token, int64_t num_heads,
    int64_t num_kv_heads, int64_t intermediate, double eps);
std::vector<at::Tensor> draft_context(const at::Tensor& rows, const at::Tensor& positions,
                                      const std::vector<at::Tensor>& weights, const at::Tensor& fc,
                                      const at::Tensor& hidden_norm, const at::Tensor& cos,
                                      const at::Tensor& sin, int64_t num_kv_heads, double eps);

// row_attention.cpp
void row_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const std::vector<at::Tensor>& keys,
                   const std::vector<at::Tensor>& values, const at::Tensor& starts,
                   const at::Tensor& q_lens, double scale);
std::tuple<at::Tensor, at::Tensor> mtp_chain(
    const at::Tensor& hidden, const at::Tensor& anchor_positions, int64_t steps,
    const std::vector<at::Tensor>& layer, const at::Tensor& enorm, const at::Tensor& hnorm,
    const at::Tensor& eh_proj, const at::Tensor& final_norm, const at::Tensor& lm_head,
    const at::Tensor& embed, const at::Tensor& cos, const at::Tensor& sin,
    const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
    const at::Tensor& starts, int64_t num_heads, int64_t intermediate, double eps);

}  // namespace specserve_kernels
