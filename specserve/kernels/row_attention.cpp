// Attention of new rows over per-request K/V rows, for all requests in one call: the MTP
// drafter's layer (`specserve/speculative/kv_rows.py`). Request r keeps its keys and values in
// its own buffers [kv, capacity, d] (head-major: one head's rows are one stream); its Q_r new
// rows (any number: a catch-up, a chain step) are written at rows starts[r] .. starts[r] + Q_r
// - 1, and new row j sees rows 0 .. starts[r] + j. The rows are read in place (no
// concatenation, no padded batch, no mask), an online softmax per tile of kTile keys through
// `attend_rows`, as `attend` reads pages. One work item is a (request, KV head) pair. Float32
// only.

#include "kernels.h"

namespace {

using namespace specserve_kernels;

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(specserve, m) {
  m.def(
      "row_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor(b!)[] keys, "
      "Tensor(c!)[] values, Tensor starts, Tensor q_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(specserve, CPU, m) { m.impl("row_attention", &row_attention); }
