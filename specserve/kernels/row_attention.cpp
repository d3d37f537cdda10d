// Attention of new rows over per-request K/V rows, for all requests in one call: the MTP
// drafter's layer (`specserve/speculative/kv_rows.py`); and the MTP drafter's whole greedy
// chain (`mtp_chain`, below). Request r keeps its keys and values in
// its own buffers [kv, capacity, d] (head-major: one head's rows are one stream); its Q_r new
// rows (any number: a catch-up, a chain step) are written at rows starts[r] .. starts[r] + Q_r
// - 1, and new row j sees rows 0 .. starts[r] + j. The rows are read in place (no
// concatenation, no padded batch, no mask), an online softmax per tile of kTile keys through
// `attend_rows`, as `attend` reads pages. One work item is a (request, KV head) pair. Float32
// only.

#include "kernels.h"
#include "ops.h"

namespace specserve_kernels {
namespace {

struct Scratch {
  std::vector<float> q, acc, mx, sum, score;
  std::vector<const float*> krow = std::vector<const float*>(kTile);
  std::vector<const float*> vrow = std::vector<const float*>(kTile);
};

// The nq new rows of one request and KV head g: q, out [nq, h, d]; keys, values: the head's
// rows [>= nk, d], nk = start + nq of them live; query j sees rows 0 .. start + j.
template <int D>
void attend_group(const float* q, const float* keys, const float* values, int64_t start,
                  int64_t nq, int64_t h, int64_t kvh, int64_t g, int64_t d, float scale,
                  float* out, Scratch& w) {
  const int64_t group = h / kvh, rows = nq * group, nk = start + nq;
  w.q.resize(rows * d);
  w.acc.assign(rows * d, 0.f);
  w.mx.assign(rows, -std::numeric_limits<float>::infinity());
  w.sum.assign(rows, 0.f);
  w.score.resize(rows * kTile);
  for (int64_t r = 0; r < rows; ++r) {  // row r = j * group + i: query j, head g * group + i
    const float* src = q + ((r / group) * h + g * group + r % group) * d;
    for (int64_t c = 0; c < d; ++c) w.q[r * d + c] = src[c] * scale;
  }
  for (int64_t first = 0; first < nk; first += kTile) {
    const int64_t n = std::min(kTile, nk - first);
    for (int64_t t = 0; t < n; ++t) {
      w.krow[t] = keys + (first + t) * d;
      w.vrow[t] = values + (first + t) * d;
    }
    // keys first .. first + seen(row) - 1 of this tile are visible to query row / group
    auto seen = [&](int64_t row) { return std::min(n, start + row / group - first + 1); };
    for (int64_t r = 0; r < rows;) {
      const int64_t visible = seen(r);
      int64_t chunk = 1;  // rows that see the same keys share each key load
      while (chunk < kMaxRows<D> && r + chunk < rows && seen(r + chunk) == visible) ++chunk;
      if (visible > 0)
        attend_rows<D>(chunk, &w.q[r * d], w.krow.data(), w.vrow.data(), visible, d, kTile,
                       &w.score[r * kTile], &w.acc[r * d], &w.mx[r], &w.sum[r]);
      r += chunk;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + ((r / group) * h + g * group + r % group) * d;
    const float inv = 1.f / w.sum[r];
    for (int64_t c = 0; c < d; ++c) dst[c] = w.acc[r * d + c] * inv;
  }
}

}  // namespace

void row_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const std::vector<at::Tensor>& keys,
                   const std::vector<at::Tensor>& values, const at::Tensor& starts,
                   const at::Tensor& q_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && out.sizes() == q.sizes(),
              "row_attention: q, out [N, h, d] and k, v [N, kv, d]");
  for (const auto* t : {&out, &q, &k, &v}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "row_attention: q, k, v and out must be contiguous float32 CPU tensors");
  }
  const int64_t N = q.size(0), h = q.size(1), d = q.size(2), kvh = k.size(1), R = q_lens.numel();
  TORCH_CHECK(k.size(0) == N && k.size(2) == d && kvh > 0 && h % kvh == 0,
              "row_attention: heads must be a multiple of kv heads, head dims equal");
  for (const auto* t : {&starts, &q_lens}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == R && t->scalar_type() == at::kLong &&
                    t->is_contiguous() && t->device().is_cpu(),
                "row_attention: starts, q_lens [R] contiguous int64 on the CPU");
  }
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == R && static_cast<int64_t>(values.size()) == R,
              "row_attention: one key and one value buffer per request");
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* qlen = q_lens.data_ptr<int64_t>();
  std::vector<int64_t> offset(R + 1, 0);  // first new row of each request in q, k, v
  int64_t work = 0;  // multiply-adds: 2 per (query row, key, dim)
  for (int64_t r = 0; r < R; ++r) {
    const at::Tensor &kb = keys[r], &vb = values[r];
    TORCH_CHECK(start[r] >= 0 && qlen[r] >= 0, "row_attention: negative start or length");
    TORCH_CHECK(kb.dim() == 3 && vb.sizes() == kb.sizes() && kb.size(0) == kvh &&
                    kb.size(2) == d && kb.is_contiguous() && vb.is_contiguous() &&
                    kb.scalar_type() == at::kFloat && vb.scalar_type() == at::kFloat,
                "row_attention: request ", r, ": buffers must be contiguous float32 [", kvh,
                ", rows, ", d, "]");
    TORCH_CHECK(kb.size(1) >= start[r] + qlen[r], "row_attention: request ", r, ": ",
                start[r] + qlen[r], " rows do not fit its buffers of ", kb.size(1));
    offset[r + 1] = offset[r] + qlen[r];
    work += 2 * qlen[r] * h * (start[r] + qlen[r]) * d;
  }
  TORCH_CHECK(offset[R] == N, "row_attention: q_lens sum to ", offset[R], ", not ", N);
  for (int64_t r = 0; r < R; ++r) {  // the new rows into place first: a query sees its own
    const int64_t capacity = keys[r].size(1);
    float *kb = keys[r].data_ptr<float>(), *vb = values[r].data_ptr<float>();
    for (int64_t j = 0; j < qlen[r]; ++j) {
      for (int64_t g = 0; g < kvh; ++g) {
        const int64_t src = ((offset[r] + j) * kvh + g) * d;
        const int64_t dst = (g * capacity + start[r] + j) * d;
        std::memcpy(kb + dst, k.data_ptr<float>() + src, d * sizeof(float));
        std::memcpy(vb + dst, v.data_ptr<float>() + src, d * sizeof(float));
      }
    }
  }
  const float fscale = static_cast<float>(scale);
  auto run = d == 64 ? attend_group<64> : d == 128 ? attend_group<128> : attend_group<0>;
  at::parallel_for(0, R * kvh, grain_for(work / std::max<int64_t>(1, R * kvh)),
                   [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / kvh, g = item % kvh, head = g * keys[r].size(1) * d;
      if (qlen[r] == 0) continue;
      run(q.data_ptr<float>() + offset[r] * h * d, keys[r].data_ptr<float>() + head,
          values[r].data_ptr<float>() + head, start[r], qlen[r], h, kvh, g, d, fscale,
          out.data_ptr<float>() + offset[r] * h * d, w);
    }
  });
}

// --- The MTP drafter's greedy chain (`mtp_chain`) ------------------------------------------
//
// `MTPModule.draft` for R greedy requests in one call: `steps` times, the token after each
// request's anchor from the final norm and the LM head (argmax, and max softmax as the
// confidence proxy), then, but for the last step, the next layer input eh_proj([enorm(embed(t));
// hnorm(h)]) through the decoder layer at the next position. The layer writes each request's
// new K/V row into its buffers (rows starts[r] + s: scratch past the committed rows, as
// `RowAttention`) and attends over every row before it. The PyTorch path spends about 30 ops a
// step on the same work.

// layer weights: in_norm, q, k, v, q_norm, k_norm, o, post_norm, gate, up, down (tiled products)
constexpr int64_t kMtpLayer = 11;

std::tuple<at::Tensor, at::Tensor> mtp_chain(
    const at::Tensor& hidden, const at::Tensor& anchor_positions, int64_t steps,
    const std::vector<at::Tensor>& layer, const at::Tensor& enorm, const at::Tensor& hnorm,
    const at::Tensor& eh_proj, const at::Tensor& final_norm, const at::Tensor& lm_head,
    const at::Tensor& embed, const at::Tensor& cos, const at::Tensor& sin,
    const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
    const at::Tensor& starts, int64_t num_heads, int64_t intermediate, double eps) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && hidden.scalar_type() == at::kFloat,
              "mtp_chain: hidden must be a contiguous float32 [R, H]");
  const int64_t R = hidden.size(0), H = hidden.size(1), V = embed.size(0);
  TORCH_CHECK(static_cast<int64_t>(layer.size()) == kMtpLayer, "mtp_chain: ", kMtpLayer,
              " layer weights");
  TORCH_CHECK(steps >= 1, "mtp_chain: steps must be positive");
  TORCH_CHECK(embed.dim() == 2 && embed.size(1) == H && embed.is_contiguous() &&
                  embed.scalar_type() == at::kFloat,
              "mtp_chain: embed must be a contiguous float32 [V, H]");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == R && static_cast<int64_t>(values.size()) == R &&
                  starts.numel() == R && anchor_positions.numel() == R &&
                  starts.scalar_type() == at::kLong && anchor_positions.scalar_type() == at::kLong &&
                  starts.is_contiguous() && anchor_positions.is_contiguous(),
              "mtp_chain: one key and value buffer, start and anchor position per request");
  TORCH_CHECK(R > 0, "mtp_chain: no requests");
  const int64_t kvh = keys[0].size(0), d = keys[0].size(2), h = num_heads, I = intermediate;
  const int64_t qn = h * d, kn = kvh * d, half = d / 2, positions = cos.size(0);
  TORCH_CHECK(kvh > 0 && h % kvh == 0 && cos.dim() == 2 && cos.size(1) == half &&
                  sin.sizes() == cos.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "mtp_chain: heads a multiple of kv heads, cos and sin [positions, head_dim / 2]");
  check_tiled(eh_proj, 2 * H, H, "mtp_chain eh_proj");
  check_tiled(lm_head, H, V, "mtp_chain lm_head");
  const at::Tensor* w = layer.data();
  check_tiled(w[1], H, qn, "mtp_chain q_proj");
  check_tiled(w[2], H, kn, "mtp_chain k_proj");
  check_tiled(w[3], H, kn, "mtp_chain v_proj");
  check_tiled(w[6], qn, H, "mtp_chain o_proj");
  check_tiled(w[8], H, I, "mtp_chain gate_proj");
  check_tiled(w[9], H, I, "mtp_chain up_proj");
  check_tiled(w[10], I, H, "mtp_chain down_proj");
  TORCH_CHECK(w[0].numel() == H && w[7].numel() == H && w[4].numel() == d && w[5].numel() == d &&
                  enorm.numel() == H && hnorm.numel() == H && final_norm.numel() == H,
              "mtp_chain: norms [H] and q/k norms [head_dim]");
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* anchor = anchor_positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    const at::Tensor &kb = keys[r], &vb = values[r];
    TORCH_CHECK(kb.dim() == 3 && vb.sizes() == kb.sizes() && kb.size(0) == kvh &&
                    kb.size(2) == d && kb.is_contiguous() && vb.is_contiguous() &&
                    kb.scalar_type() == at::kFloat && vb.scalar_type() == at::kFloat,
                "mtp_chain: request ", r, ": buffers must be contiguous float32 [", kvh,
                ", rows, ", d, "]");
    TORCH_CHECK(start[r] >= 0 && kb.size(1) >= start[r] + steps - 1, "mtp_chain: request ", r,
                ": ", start[r] + steps - 1, " rows do not fit its buffers of ", kb.size(1));
  }
  const float feps = static_cast<float>(eps);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  at::Tensor tokens = empty({R, steps}, hidden.options().dtype(at::kLong));
  at::Tensor conf = empty({R, steps}, hidden.options());
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* cf = conf.data_ptr<float>();
  std::vector<float> x(hidden.data_ptr<float>(), hidden.data_ptr<float>() + R * H);
  std::vector<float> xn(R * H), cat(R * 2 * H), logits(R * V), q(R * qn), k(R * kn), v(R * kn);
  std::vector<float> attn(R * qn), gate(R * I), up(R * I), tmp(d);
  auto run = d == 64 ? attend_group<64> : d == 128 ? attend_group<128> : attend_group<0>;
  Scratch scratch;
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t r = 0; r < R; ++r)
      rms_norm(&x[r * H], final_norm.data_ptr<float>(), H, feps, &xn[r * H]);
    gemm_tiled(xn.data(), H, R, lm_head, H, V, logits.data(), V, false);
    for (int64_t r = 0; r < R; ++r) {
      const float* l = &logits[r * V];
      const int64_t best = argmax(l, V);
      tok[r * steps + s] = best;
      cf[r * steps + s] = top_prob(l, V, l[best]);
    }
    if (s == steps - 1) break;
    for (int64_t r = 0; r < R; ++r) {  // the next layer input
      const int64_t t = tok[r * steps + s];
      TORCH_CHECK(t >= 0 && t < V, "mtp_chain: token out of the vocabulary");
      rms_norm(embed.data_ptr<float>() + t * H, enorm.data_ptr<float>(), H, feps, &cat[r * 2 * H]);
      rms_norm(&x[r * H], hnorm.data_ptr<float>(), H, feps, &cat[r * 2 * H + H]);
    }
    gemm_tiled(cat.data(), 2 * H, R, eh_proj, 2 * H, H, x.data(), H, false);
    // the decoder layer at position anchor + s (past the RoPE table: its last row, as the
    // PyTorch path clamps a request's discarded lookahead)
    for (int64_t r = 0; r < R; ++r) rms_norm(&x[r * H], w[0].data_ptr<float>(), H, feps, &xn[r * H]);
    gemm_tiled(xn.data(), H, R, w[1], H, qn, q.data(), qn, false);
    gemm_tiled(xn.data(), H, R, w[2], H, kn, k.data(), kn, false);
    gemm_tiled(xn.data(), H, R, w[3], H, kn, v.data(), kn, false);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t p = std::min(anchor[r] + s, positions - 1);
      const float *c = cos.data_ptr<float>() + p * half, *sn = sin.data_ptr<float>() + p * half;
      for (int64_t head = 0; head < h + kvh; ++head) {
        float* row = head < h ? &q[r * qn + head * d] : &k[r * kn + (head - h) * d];
        rms_norm(row, w[head < h ? 4 : 5].data_ptr<float>(), d, feps, tmp.data());
        rotate(tmp.data(), c, sn, d, row);
      }
      const int64_t capacity = keys[r].size(1), at_row = start[r] + s;
      for (int64_t g = 0; g < kvh; ++g) {
        std::memcpy(keys[r].data_ptr<float>() + (g * capacity + at_row) * d, &k[(r * kvh + g) * d],
                    d * sizeof(float));
        std::memcpy(values[r].data_ptr<float>() + (g * capacity + at_row) * d,
                    &v[(r * kvh + g) * d], d * sizeof(float));
      }
      for (int64_t g = 0; g < kvh; ++g) {
        const int64_t head = g * capacity * d;
        run(&q[r * qn], keys[r].data_ptr<float>() + head, values[r].data_ptr<float>() + head,
            at_row, 1, h, kvh, g, d, scale, &attn[r * qn], scratch);
      }
    }
    gemm_tiled(attn.data(), qn, R, w[6], qn, H, x.data(), H, true);
    for (int64_t r = 0; r < R; ++r) rms_norm(&x[r * H], w[7].data_ptr<float>(), H, feps, &xn[r * H]);
    gemm_tiled(xn.data(), H, R, w[8], H, I, gate.data(), I, false);
    gemm_tiled(xn.data(), H, R, w[9], H, I, up.data(), I, false);
    silu_mul(gate.data(), up.data(), R * I, gate.data());
    gemm_tiled(gate.data(), I, R, w[10], I, H, x.data(), H, true);
  }
  return {tokens, conf};
}

}  // namespace specserve_kernels
