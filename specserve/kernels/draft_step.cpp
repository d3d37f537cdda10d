// The greedy draft step of the block drafters (DFlash, DSpark with a vanilla Markov head or
// none) in one call: for R requests, the block [anchor, mask x (K - 1)] through every draft
// layer (keys and values: the request's context rows, read in place, then the block's own),
// the final norm and the LM head, then the K tokens left to right (argmax of the base logits
// plus the Markov bias of the token before), then the confidence logits. No per-op dispatch and
// no padded batch of contexts. `draft_context` projects newly committed target hidden states
// into the draft layers' context rows (the catch-up before a round's draft).
//
// The products sum each row as `linear_tiled` does (`tile_rows`), so every logit is the same
// float sum as on the PyTorch path with tiled weights; norms, rotary and attention agree with
// it to float32 rounding. Ties pick the first maximum, as torch.argmax. Float32 only.

#include "kernels.h"
#include "ops.h"

namespace specserve_kernels {
namespace {

// in_norm, q, k, v, q_norm, k_norm, o, post_norm, gate, up, down
constexpr int64_t kDraftPerLayer = 11;

struct Shape {
  int64_t R, K, H, h, kvh, d, I, V;
  int64_t M() const { return R * K; }
};

// Attention of one request's K block rows, the query heads of KV head g: keys [context (L
// rows); block (K rows)], every block row sees all of them. q, out [K, h, d]; kb, vb [K, kvh,
// d]; ck, cv [L, kvh, d]. The KV head's K x group query rows share each key and value load
// (`rows_tile`, up to kMaxRows<D> rows at once, head sizes 64 and 128; `row_tile` one row at a
// time otherwise), an online softmax over tiles of kTile keys. Each (request, KV head) writes
// its own rows of out, so they run on any thread in any order with the same bits.
template <int D>
void block_attention(const Shape& s, const float* q, const float* kb, const float* vb,
                     const float* ck, const float* cv, int64_t L, int64_t g, float* out) {
  const int64_t group = s.h / s.kvh, d = D > 0 ? D : s.d, n = L + s.K, rows = s.K * group;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  std::vector<float> qbuf(rows * d), acc(rows * d), mx(rows), sum(rows), score(rows * kTile);
  std::vector<const float*> krow(kTile), vrow(kTile);
  for (int64_t r = 0; r < rows; ++r) {  // row r = j * group + i: slot j, head g * group + i
    const float* src = q + ((r / group) * s.h + g * group + r % group) * d;
    for (int64_t c = 0; c < d; ++c) qbuf[r * d + c] = src[c] * scale;
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
  std::fill(sum.begin(), sum.end(), 0.f);
  for (int64_t first = 0; first < n; first += kTile) {
    const int64_t cnt = std::min(kTile, n - first);
    for (int64_t t = 0; t < cnt; ++t) {
      const int64_t key = first + t;
      const int64_t off = key < L ? (key * s.kvh + g) * d : ((key - L) * s.kvh + g) * d;
      krow[t] = (key < L ? ck : kb) + off;
      vrow[t] = (key < L ? cv : vb) + off;
    }
    for (int64_t r = 0; r < rows; r += kMaxRows<D>)
      attend_rows<D>(std::min(kMaxRows<D>, rows - r), &qbuf[r * d], krow.data(), vrow.data(),
                     cnt, d, kTile, &score[r * kTile], &acc[r * d], &mx[r], &sum[r]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + ((r / group) * s.h + g * group + r % group) * d;
    for (int64_t c = 0; c < d; ++c) dst[c] = acc[r * d + c] / sum[r];
  }
}

// One draft layer over the M = R * K block rows of x [M, H], in place.
void draft_layer(const Shape& s, const at::Tensor* w, const std::vector<at::Tensor>& contexts,
                 int64_t layer, int64_t layers, const float* cos, const float* sin,
                 const int64_t* pos, int64_t half, float eps, float* x) {
  const int64_t M = s.M(), H = s.H, qn = s.h * s.d, kn = s.kvh * s.d;
  check_tiled(w[1], H, qn, "draft_block q_proj");
  check_tiled(w[2], H, kn, "draft_block k_proj");
  check_tiled(w[3], H, kn, "draft_block v_proj");
  check_tiled(w[6], qn, H, "draft_block o_proj");
  check_tiled(w[8], H, s.I, "draft_block gate_proj");
  check_tiled(w[9], H, s.I, "draft_block up_proj");
  check_tiled(w[10], s.I, H, "draft_block down_proj");
  TORCH_CHECK(w[0].numel() == H && w[7].numel() == H && w[4].numel() == s.d &&
                  w[5].numel() == s.d,
              "draft_block: layer ", layer, ": norms [H] and q/k norms [head_dim]");
  std::vector<float> xn(M * H), q(M * qn), k(M * kn), v(M * kn), attn(M * qn), tmp(s.d);
  for (int64_t m = 0; m < M; ++m) rms_norm(x + m * H, w[0].data_ptr<float>(), H, eps, &xn[m * H]);
  gemm_tiled(xn.data(), H, M, w[1], H, qn, q.data(), qn, false);
  gemm_tiled(xn.data(), H, M, w[2], H, kn, k.data(), kn, false);
  gemm_tiled(xn.data(), H, M, w[3], H, kn, v.data(), kn, false);
  for (int64_t m = 0; m < M; ++m) {
    const float *c = cos + pos[m] * half, *sn = sin + pos[m] * half;
    for (int64_t head = 0; head < s.h + s.kvh; ++head) {
      float* row = head < s.h ? &q[m * qn + head * s.d] : &k[m * kn + (head - s.h) * s.d];
      rms_norm(row, w[head < s.h ? 4 : 5].data_ptr<float>(), s.d, eps, tmp.data());
      rotate(tmp.data(), c, sn, s.d, row);
    }
  }
  int64_t keys = 0;  // over all requests: the work of the attention below
  for (int64_t r = 0; r < s.R; ++r) {
    const at::Tensor& ck = contexts[(r * layers + layer) * 2];
    const at::Tensor& cv = contexts[(r * layers + layer) * 2 + 1];
    const int64_t L = ck.size(0);
    TORCH_CHECK(ck.is_contiguous() && cv.is_contiguous() && ck.scalar_type() == at::kFloat &&
                    cv.scalar_type() == at::kFloat && cv.size(0) == L &&
                    ck.numel() == L * kn && cv.numel() == L * kn,
                "draft_block: request ", r, " layer ", layer,
                ": context k, v must be contiguous float32 [L, kv, head_dim]");
    keys += L + s.K;
  }
  // (request, KV head) items across threads: ten requests drafting over 2,048-token contexts
  // spend most of the step's attention here
  auto run = s.d == 64 ? block_attention<64> : s.d == 128 ? block_attention<128> : block_attention<0>;
  const int64_t items = s.R * s.kvh, work = 2 * s.K * s.h * keys * s.d;
  at::parallel_for(0, items, grain_for(work / std::max<int64_t>(1, items)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / s.kvh, g = item % s.kvh, b = r * s.K;
      const at::Tensor& ck = contexts[(r * layers + layer) * 2];
      const at::Tensor& cv = contexts[(r * layers + layer) * 2 + 1];
      run(s, &q[b * qn], &k[b * kn], &v[b * kn], ck.data_ptr<float>(), cv.data_ptr<float>(),
          ck.size(0), g, &attn[b * qn]);
    }
  });
  gemm_tiled(attn.data(), qn, M, w[6], qn, H, x, H, true);
  for (int64_t m = 0; m < M; ++m) rms_norm(x + m * H, w[7].data_ptr<float>(), H, eps, &xn[m * H]);
  std::vector<float> gate(M * s.I), up(M * s.I);
  gemm_tiled(xn.data(), H, M, w[8], H, s.I, gate.data(), s.I, false);
  gemm_tiled(xn.data(), H, M, w[9], H, s.I, up.data(), s.I, false);
  silu_mul(gate.data(), up.data(), M * s.I, gate.data());
  gemm_tiled(gate.data(), s.I, M, w[10], s.I, H, x, H, true);
}

// The block's hidden rows after the draft layers and the final norm, [R * block, H] (as
// DFlashDraftModel.draft_hidden): block embeddings [anchor, mask x (block - 1)] per request, then
// every draft layer over each request's context rows in place. Checks the shared arguments.
std::vector<float> block_hidden(const at::Tensor& anchors, const at::Tensor& positions,
                                const std::vector<at::Tensor>& contexts,
                                const std::vector<at::Tensor>& weights, const at::Tensor& embed,
                                const at::Tensor& final_norm, const at::Tensor& cos,
                                const at::Tensor& sin, int64_t block, int64_t mask_token,
                                int64_t num_heads, int64_t num_kv_heads, int64_t intermediate,
                                double eps, Shape& s) {
  const int64_t layers = static_cast<int64_t>(weights.size()) / kDraftPerLayer;
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(weights.size()) == layers * kDraftPerLayer,
              "draft_block: ", kDraftPerLayer, " weights per draft layer");
  TORCH_CHECK(anchors.dim() == 1 && positions.sizes() == anchors.sizes() &&
                  anchors.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  anchors.is_contiguous() && positions.is_contiguous(),
              "draft_block: anchors, positions [R] int64");
  const int64_t R = anchors.size(0);
  TORCH_CHECK(static_cast<int64_t>(contexts.size()) == R * layers * 2,
              "draft_block: a context k and v per request and layer");
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() && embed.scalar_type() == at::kFloat,
              "draft_block: embed [V, H] float32");
  const int64_t V = embed.size(0), H = embed.size(1), d = weights[4].numel();
  s = Shape{R, block, H, num_heads, num_kv_heads, d, intermediate, V};
  const int64_t M = s.M(), half = d / 2, table = cos.size(0);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && d % 2 == 0, "draft_block: heads, head_dim");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == half && sin.sizes() == cos.sizes() &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "draft_block: cos, sin [positions, head_dim / 2] float32");
  TORCH_CHECK(final_norm.numel() == H, "draft_block: final norm [H]");
  const int64_t* anchor = anchors.data_ptr<int64_t>();
  const int64_t* apos = positions.data_ptr<int64_t>();
  const float* emb = embed.data_ptr<float>();
  const float feps = static_cast<float>(eps);

  std::vector<float> x(M * H);
  std::vector<int64_t> pos(M);  // clamped into the RoPE table, as DFlashDraftModel.draft_hidden
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = m / block, j = m % block;
    const int64_t tok = j == 0 ? anchor[r] : mask_token;
    TORCH_CHECK(tok >= 0 && tok < V, "draft_block: token ", tok, " outside the vocabulary");
    std::memcpy(&x[m * H], emb + tok * H, H * sizeof(float));
    pos[m] = std::min(apos[r] + j, table - 1);
    TORCH_CHECK(pos[m] >= 0, "draft_block: negative position");
  }
  for (int64_t l = 0; l < layers; ++l) {
    draft_layer(s, &weights[l * kDraftPerLayer], contexts, l, layers, cos.data_ptr<float>(),
                sin.data_ptr<float>(), pos.data(), half, feps, x.data());
  }
  for (int64_t m = 0; m < M; ++m) rms_norm(&x[m * H], final_norm.data_ptr<float>(), H, feps, &x[m * H]);
  return x;
}

}  // namespace

// `block_hidden` as a tensor [R, block, H], for sampled drafting (the picks stay in PyTorch).
at::Tensor draft_hidden(const at::Tensor& anchors, const at::Tensor& positions,
                        const std::vector<at::Tensor>& contexts,
                        const std::vector<at::Tensor>& weights, const at::Tensor& embed,
                        const at::Tensor& final_norm, const at::Tensor& cos, const at::Tensor& sin,
                        int64_t block, int64_t mask_token, int64_t num_heads, int64_t num_kv_heads,
                        int64_t intermediate, double eps) {
  Shape s{};
  std::vector<float> x = block_hidden(anchors, positions, contexts, weights, embed, final_norm,
                                      cos, sin, block, mask_token, num_heads, num_kv_heads,
                                      intermediate, eps, s);
  at::Tensor out = empty({s.R, block, s.H}, embed.options());
  std::memcpy(out.data_ptr<float>(), x.data(), x.size() * sizeof(float));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> draft_block(
    const at::Tensor& anchors, const at::Tensor& positions, const std::vector<at::Tensor>& contexts,
    const std::vector<at::Tensor>& weights, const at::Tensor& embed, const at::Tensor& final_norm,
    const at::Tensor& lm_head, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& markov_w1, const at::Tensor& markov_w2, const at::Tensor& conf_w,
    const at::Tensor& conf_b, int64_t block, int64_t mask_token, int64_t num_heads,
    int64_t num_kv_heads, int64_t intermediate, double eps) {
  Shape s{};
  std::vector<float> x = block_hidden(anchors, positions, contexts, weights, embed, final_norm,
                                      cos, sin, block, mask_token, num_heads, num_kv_heads,
                                      intermediate, eps, s);
  const int64_t R = s.R, M = s.M(), H = s.H, V = s.V;
  check_tiled(lm_head, H, V, "draft_block lm_head");
  const int64_t* anchor = anchors.data_ptr<int64_t>();
  std::vector<float> base(M * V);
  gemm_tiled(x.data(), H, M, lm_head, H, V, base.data(), V, false);

  const bool markov = markov_w1.numel() > 0, confidence = conf_w.numel() > 0;
  const int64_t rank = markov ? markov_w1.size(1) : 0;
  if (markov) {
    TORCH_CHECK(markov_w1.dim() == 2 && markov_w1.size(0) == V && markov_w1.is_contiguous() &&
                    markov_w1.scalar_type() == at::kFloat,
                "draft_block: markov_w1 [V, rank] float32");
    check_tiled(markov_w2, rank, V, "draft_block markov_w2");
  }
  const int64_t feat = confidence ? conf_w.size(1) : 0;  // H, or H + rank with the Markov input
  if (confidence) {
    check_tiled(conf_w, feat, 1, "draft_block confidence proj");
    TORCH_CHECK(feat == H || (markov && feat == H + rank),
                "draft_block: the confidence head reads [H] or [H + markov rank] features");
    TORCH_CHECK(conf_b.numel() <= 1, "draft_block: confidence bias [1] or empty");
  }
  auto opts = anchors.options();
  at::Tensor tokens = empty({R, block}, opts);
  at::Tensor conf = empty({confidence ? R : 0, block}, opts.dtype(at::kFloat));
  at::Tensor top = empty({confidence ? 0 : R, block}, opts.dtype(at::kFloat));
  int64_t* tok = tokens.data_ptr<int64_t>();
  std::vector<float> e(R * rank), bias(R * V), feats(M * feat);
  std::vector<int64_t> prev(anchor, anchor + R);
  for (int64_t j = 0; j < block; ++j) {  // slot j reads the token picked at slot j - 1
    if (markov) {
      for (int64_t r = 0; r < R; ++r) {
        std::memcpy(&e[r * rank], markov_w1.data_ptr<float>() + prev[r] * rank, rank * sizeof(float));
      }
      gemm_tiled(e.data(), rank, R, markov_w2, rank, V, bias.data(), V, false);
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t m = r * block + j;
      float* logits = &base[m * V];
      if (markov) {
        for (int64_t c = 0; c < V; ++c) logits[c] += bias[r * V + c];
      }
      const int64_t best = argmax(logits, V);
      tok[m] = best;
      if (!confidence) top.data_ptr<float>()[m] = top_prob(logits, V, logits[best]);
      if (confidence) {
        std::memcpy(&feats[m * feat], &x[m * H], H * sizeof(float));
        if (feat > H) std::memcpy(&feats[m * feat + H], &e[r * rank], rank * sizeof(float));
      }
      prev[r] = best;
    }
  }
  if (confidence) {
    float* c = conf.data_ptr<float>();
    gemm_tiled(feats.data(), feat, M, conf_w, feat, 1, c, 1, false);
    if (conf_b.numel() == 1) {
      const float b = conf_b.data_ptr<float>()[0];
      for (int64_t m = 0; m < M; ++m) c[m] += b;
    }
  }
  return {tokens, conf, top};
}

// The context rows of committed positions: target hidden states rows [N, n * H] -> per draft
// layer k (k_norm, rotary at `positions`) and v [N, kv, head_dim], as
// DFlashDraftModel.context_kv: features = hidden_norm(fc(rows)), then each layer's k and v.
std::vector<at::Tensor> draft_context(const at::Tensor& rows, const at::Tensor& positions,
                                      const std::vector<at::Tensor>& weights, const at::Tensor& fc,
                                      const at::Tensor& hidden_norm, const at::Tensor& cos,
                                      const at::Tensor& sin, int64_t num_kv_heads, double eps) {
  const int64_t layers = static_cast<int64_t>(weights.size()) / kDraftPerLayer;
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(weights.size()) == layers * kDraftPerLayer,
              "draft_context: ", kDraftPerLayer, " weights per draft layer");
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.scalar_type() == at::kFloat,
              "draft_context: rows [N, F] contiguous float32");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == rows.size(0) &&
                  positions.is_contiguous() && positions.scalar_type() == at::kLong,
              "draft_context: positions [N] int64");
  const int64_t N = rows.size(0), F = rows.size(1), H = hidden_norm.numel();
  const int64_t d = weights[5].numel(), kvh = num_kv_heads, kn = kvh * d, half = d / 2;
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == half && sin.sizes() == cos.sizes() &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "draft_context: cos, sin [positions, head_dim / 2]");
  check_tiled(fc, F, H, "draft_context fc");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t m = 0; m < N; ++m) {
    TORCH_CHECK(pos[m] >= 0 && pos[m] < cos.size(0), "draft_context: position ", pos[m],
                " outside the RoPE table");
  }
  const float feps = static_cast<float>(eps);
  std::vector<float> feats(N * H), tmp(d);
  gemm_tiled(rows.data_ptr<float>(), F, N, fc, F, H, feats.data(), H, false);
  for (int64_t m = 0; m < N; ++m) {
    rms_norm(&feats[m * H], hidden_norm.data_ptr<float>(), H, feps, &feats[m * H]);
  }
  std::vector<at::Tensor> out;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[l * kDraftPerLayer];
    check_tiled(w[2], H, kn, "draft_context k_proj");
    check_tiled(w[3], H, kn, "draft_context v_proj");
    at::Tensor k = empty({N, kvh, d}, rows.options()), v = empty({N, kvh, d}, rows.options());
    float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    gemm_tiled(feats.data(), H, N, w[2], H, kn, kp, kn, false);
    gemm_tiled(feats.data(), H, N, w[3], H, kn, vp, kn, false);
    for (int64_t m = 0; m < N; ++m) {
      const float *c = cos.data_ptr<float>() + pos[m] * half, *sn = sin.data_ptr<float>() + pos[m] * half;
      for (int64_t g = 0; g < kvh; ++g) {
        float* row = kp + (m * kvh + g) * d;
        rms_norm(row, w[5].data_ptr<float>(), d, feps, tmp.data());
        rotate(tmp.data(), c, sn, d, row);
      }
    }
    out.push_back(k);
    out.push_back(v);
  }
  return out;
}

}  // namespace specserve_kernels
