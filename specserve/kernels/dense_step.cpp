// The decoder layers of a dense Qwen3 / Llama model for one step (decode steps, verify windows
// and prefill chunks, mixed), in one call: no per-op dispatch, no Python between the products.
// A prefill chunk's row loops (norms, rotary, K/V writes, SiLU) are split across threads.
//
// Weights are "tiled": a [N, K] weight stored as [ceil(N / 64), K, 64], so that the 64 output
// columns of one tile are read as one contiguous stream (`tile_weight` in
// specserve/models/layers.py writes them). The product of a few rows with such a weight
// (`linear_tiled`) keeps up to 8 rows x 64 columns of accumulators in registers and reads each
// weight byte once per 8 rows: at one row it streams the weight at the copy bandwidth, with no
// horizontal sums. Each output row is summed over k in the same order whatever the number of
// rows, so a token's result does not depend on how many tokens share its step.
//
// `dense_layers` runs, per layer: RMSNorm, the fused qkv product, q/k RMSNorm, the rotary
// embedding, the K/V write into the paged cache, paged attention (kernels.h), the o product
// added to the residual, RMSNorm, the fused gate-up product, SiLU * up and the down product
// added to the residual; then the final norm. Float32 activations; the cache float32 or 16-bit
// (`--kv-cache-dtype`: the new keys and values rounded as they are written, every key and value
// widened as attention loads it, so a token's K/V reads the same whichever step wrote it).

#include "kernels.h"
#include "ops.h"

namespace specserve_kernels {

void linear_tiled(at::Tensor out, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0),
              "linear_tiled: x [M, K] and out [M, N]");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "linear_tiled: x and out must be contiguous float32");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  check_tiled(w, K, N, "linear_tiled");
  gemm_tiled(x.data_ptr<float>(), K, M, w, K, N, out.data_ptr<float>(), N,
             false);
}

constexpr int64_t kPerLayer = 8;  // in_norm, qkv, q_norm, k_norm, o, post_norm, gate_up, down

void dense_layers(at::Tensor x, const std::vector<at::Tensor>& weights,
                  const at::Tensor& final_norm, const at::Tensor& cos, const at::Tensor& sin,
                  const std::vector<at::Tensor>& caches, const at::Tensor& slots,
                  const at::Tensor& block_tables, const at::Tensor& q_starts,
                  const at::Tensor& q_lens, const at::Tensor& kv_lens, int64_t num_heads,
                  int64_t intermediate, double eps, std::vector<int64_t> capture,
                  at::Tensor captured) {
  const int64_t layers = static_cast<int64_t>(caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kPerLayer,
              "dense_layers: ", kPerLayer, " weights per layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "dense_layers: x must be a contiguous float32 [N, H]");
  const int64_t M = x.size(0), H = x.size(1);
  const int64_t kvh = caches[0].size(1), blocks = caches[0].size(2), page = caches[0].size(3);
  const int64_t d = caches[0].size(4), h = num_heads, I = intermediate;
  const int64_t qkv_n = (h + 2 * kvh) * d, half = d / 2;
  TORCH_CHECK(cos.size(0) == M && cos.size(1) == half && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == at::kFloat,
              "dense_layers: cos, sin [N, d / 2] float32");
  TORCH_CHECK(slots.size(0) == M && slots.scalar_type() == at::kLong,
              "dense_layers: slots [N] int64");
  const float feps = static_cast<float>(eps);
  const auto opts = x.options();
  at::Tensor xn = empty({M, H}, opts), qkv = empty({M, qkv_n}, opts);
  at::Tensor q = empty({M, h, d}, opts), attn = empty({M, h, d}, opts);
  at::Tensor gu = empty({M, 2 * I}, opts), act = empty({M, I}, opts);
  float *xp = x.data_ptr<float>(), *xnp = xn.data_ptr<float>(), *qkvp = qkv.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *ap = attn.data_ptr<float>();
  float *gup = gu.data_ptr<float>(), *actp = act.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t width = captured.defined() && captured.dim() == 2 ? captured.size(1) : 0;
  auto keep = [&](int64_t layer, const float* src) {  // hidden states of a captured layer
    for (size_t c = 0; c < capture.size(); ++c) {
      if (capture[c] != layer) continue;
      float* dst = captured.data_ptr<float>() + static_cast<int64_t>(c) * H;
      for (int64_t m = 0; m < M; ++m) std::memcpy(dst + m * width, src + m * H, H * sizeof(float));
    }
  };
  // Row loops (norms, rotary, K/V writes, SiLU) split across threads for a prefill chunk's
  // thousands of rows; a decode step's few rows stay on the calling thread.
  auto rows = [&](int64_t work_per_row, const auto& body) {
    at::parallel_for(0, M, grain_for(work_per_row), body);
  };
  auto norm_rows = [&](const float* src, const float* weight, float* dst) {
    rows(8 * H, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) rms_norm(src + m * H, weight, H, feps, dst + m * H);
    });
  };
  keep(-1, xp);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[l * kPerLayer];
    const bool qk_norm = w[2].numel() == d && w[3].numel() == d;
    check_tiled(w[1], H, qkv_n, "dense_layers qkv");
    check_tiled(w[4], h * d, H, "dense_layers o_proj");
    check_tiled(w[6], H, 2 * I, "dense_layers gate_up");
    check_tiled(w[7], I, H, "dense_layers down_proj");
    TORCH_CHECK(w[0].numel() == H && w[5].numel() == H && caches[l].is_contiguous() &&
                    caches[l].scalar_type() == caches[0].scalar_type() &&
                    caches[l].sizes() == caches[0].sizes(),
                "dense_layers: layer ", l, ": norms [H] and a cache like layer 0's");
    norm_rows(xp, w[0].data_ptr<float>(), xnp);
    gemm_tiled(xnp, H, M, w[1], H, qkv_n, qkvp, qkv_n, false);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    auto attend_layer = [&](auto tag) {  // the cache's type: write the new K/V, attend
      using CT = decltype(tag);
      CT* kp = caches[l].data_ptr<CT>();
      rows(16 * (h + kvh) * d, [&](int64_t b, int64_t e) {
        std::vector<float> tmp(d), knew(kvh * d);  // a normed head; the new keys of one token
        for (int64_t m = b; m < e; ++m) {
          float* row = qkvp + m * qkv_n;
          const float *c = cp + m * half, *s = sp + m * half;
          for (int64_t head = 0; head < h + kvh; ++head) {
            const float* src = row + head * d;
            if (qk_norm) {
              rms_norm(src, w[head < h ? 2 : 3].data_ptr<float>(), d, feps, tmp.data());
              src = tmp.data();
            }
            float* dst = head < h ? qp + (m * h + head) * d : knew.data() + (head - h) * d;
            rotate(src, c, s, d, dst);
          }
          store_kv(kp, kvh, blocks, page, d, knew.data(), row + (h + kvh) * d, 0, slot + m, 1);
        }
      });
      if (d == 64) {
        attend<float, CT, 64>(attn, q, caches[l], block_tables, q_starts, q_lens, kv_lens, scale);
      } else if (d == 128) {
        attend<float, CT, 128>(attn, q, caches[l], block_tables, q_starts, q_lens, kv_lens, scale);
      } else {
        attend<float, CT, 0>(attn, q, caches[l], block_tables, q_starts, q_lens, kv_lens, scale);
      }
    };
    switch (caches[l].scalar_type()) {
      case at::kFloat: attend_layer(float{}); break;
      case at::kBFloat16: attend_layer(c10::BFloat16{}); break;
      case at::kHalf: attend_layer(c10::Half{}); break;
      default: TORCH_CHECK(false, "dense_layers: a ", caches[l].scalar_type(), " cache");
    }
    gemm_tiled(ap, h * d, M, w[4], h * d, H, xp, H, true);
    norm_rows(xp, w[5].data_ptr<float>(), xnp);
    gemm_tiled(xnp, H, M, w[6], H, 2 * I, gup, 2 * I, false);
    rows(32 * I, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) silu_mul(gup + m * 2 * I, gup + m * 2 * I + I, I, actp + m * I);
    });
    gemm_tiled(actp, I, M, w[7], I, H, xp, H, true);
    if (l != layers - 1) keep(l, xp);
  }
  norm_rows(xp, final_norm.data_ptr<float>(), xp);
  keep(layers - 1, xp);
}

}  // namespace specserve_kernels
