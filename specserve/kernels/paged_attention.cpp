// Paged attention for short queries (decode steps and verify windows) on the CPU.
//
// Reads each sequence's keys and values in place, page by page, from the cache layout of
// `specserve.models.attention.TorchBackend`: one tensor [2, kv, num_blocks, page_size, d] per
// layer. Nothing is gathered and no mask is built: query j of a sequence with Q new tokens and
// L keys sees keys 0 .. L - Q + j, and an online softmax runs over one page of keys at a time.
// One work item is a (sequence, kv head) pair: its queries (Q tokens x the heads of the group)
// read every key and value row of the group once, from L1, for all of them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTile = 64;  // keys per online-softmax step (whole pages, at most this many)

// 16 floats in GCC's generic vector type: one AVX-512 register, two AVX2 ones, whatever the
// target has. Loads and stores are unaligned.
constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64), aligned(4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

inline float hsum(vf v) {  // a tree of halves, not 15 dependent adds
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}


// exp(x) for x <= 0 (and -inf), to ~1 ulp: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2].
// Plain arithmetic so that the compiler vectorises the loops that call it (std::exp does not).
inline float fast_exp(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: still a normal float; -inf maps here too
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}

template <int D>
inline float dot(const float* a, const float* b, int64_t d_rt) {
  const int64_t d = D > 0 ? D : d_rt;
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

// Four dot products with one query row: four independent accumulators share its loads.
// Four dot products with one query row: four independent accumulators share its loads.
template <int D>
inline void dot4(const float* a, const float* const* k, int64_t d_rt, float* out) {
  if constexpr (D > 0) {
    vf s0{}, s1{}, s2{}, s3{};
#pragma GCC unroll 16
    for (int c = 0; c < D; c += kLanes) {
      const vf x = load(a + c);
      s0 += x * load(k[0] + c);
      s1 += x * load(k[1] + c);
      s2 += x * load(k[2] + c);
      s3 += x * load(k[3] + c);
    }
    out[0] = hsum(s0), out[1] = hsum(s1), out[2] = hsum(s2), out[3] = hsum(s3);
  } else {
    const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < d_rt; ++i) {
      s0 += a[i] * k0[i];
      s1 += a[i] * k1[i];
      s2 += a[i] * k2[i];
      s3 += a[i] * k3[i];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
  }
}

template <typename T>
inline void load_rows(float* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// One query row against `visible` keys: scores, the online-softmax update of (mx, sum) and
// the weighted values added to acc. D > 0 fixes the head size at compile time (the
// accumulator then lives in registers); D = 0 reads it from d_rt.
template <int D>
inline void row_tile(const float* qr, const float* const* krow, const float* const* vrow,
                     int64_t visible, int64_t d_rt, float* s, float* acc, float& mx,
                     float& sum) {
  const int64_t d = D > 0 ? D : d_rt;
  int64_t t = 0;
  for (; t + 4 <= visible; t += 4) dot4<D>(qr, &krow[t], d, &s[t]);
  for (; t < visible; ++t) s[t] = dot<D>(qr, krow[t], d);
  float tile_max = -std::numeric_limits<float>::infinity();
  for (t = 0; t < visible; ++t) tile_max = s[t] > tile_max ? s[t] : tile_max;
  const float m_new = std::max(mx, tile_max);
  float tile_sum = 0.f;
#pragma omp simd reduction(+ : tile_sum)
  for (t = 0; t < visible; ++t) {
    s[t] = fast_exp(s[t] - m_new);
    tile_sum += s[t];
  }
  const float correction = fast_exp(mx - m_new);  // 0 on the first tile (mx = -inf)
  sum = sum * correction + tile_sum;
  mx = m_new;
  if constexpr (D > 0) {
    vf a[D / kLanes];  // the accumulator in registers across the keys
#pragma GCC unroll 16
    for (int c = 0; c < D / kLanes; ++c) a[c] = load(acc + c * kLanes) * correction;
    for (t = 0; t < visible; ++t) {
      const float w = s[t];
      const float* vr = vrow[t];
#pragma GCC unroll 16
      for (int c = 0; c < D / kLanes; ++c) a[c] += w * load(vr + c * kLanes);
    }
#pragma GCC unroll 16
    for (int c = 0; c < D / kLanes; ++c) store(acc + c * kLanes, a[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) acc[c] *= correction;
    for (t = 0; t < visible; ++t) {
      const float w = s[t];
      const float* vr = vrow[t];
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) acc[c] += w * vr[c];
    }
  }
}

template <typename T, int D>
void attend(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
            const at::Tensor& block_tables, const at::Tensor& q_starts,
            const at::Tensor& q_lens, const at::Tensor& kv_lens, double scale) {
  const int64_t h = q.size(1), d = D > 0 ? D : q.size(2);
  const int64_t kv = cache.size(1), num_blocks = cache.size(2), page = cache.size(3);
  const int64_t group = h / kv, batch = q_lens.size(0), max_pages = block_tables.size(1);
  const int64_t tile_pages = std::max<int64_t>(1, kTile / page), tile = tile_pages * page;
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* kp = cache.data_ptr<T>();
  const T* vp = kp + kv * num_blocks * page * d;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = q_starts.data_ptr<int64_t>();
  const int64_t* qlens = q_lens.data_ptr<int64_t>();
  const int64_t* klens = kv_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  constexpr bool kFloat = std::is_same_v<T, float>;

  at::parallel_for(0, batch * kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf, acc, mx, sum, score, kbuf, vbuf;
    std::vector<const float*> krow(tile), vrow(tile);
    if (!kFloat) kbuf.resize(tile * d), vbuf.resize(tile * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv, g = item % kv;
      const int64_t nq = qlens[b], nk = klens[b], rows = nq * group;
      qbuf.resize(rows * d);
      acc.assign(rows * d, 0.f);
      mx.assign(rows, -std::numeric_limits<float>::infinity());
      sum.assign(rows, 0.f);
      score.resize(rows * tile);
      for (int64_t r = 0; r < rows; ++r) {  // row r = j * group + i: query j, head g*group + i
        const int64_t j = r / group, i = r % group;
        float* dst = &qbuf[r * d];
        load_rows(dst, qp + ((starts[b] + j) * h + g * group + i) * d, d);
        for (int64_t c = 0; c < d; ++c) dst[c] *= fscale;
      }
      for (int64_t first = 0; first < nk; first += tile) {
        const int64_t n = std::min(tile, nk - first);
        for (int64_t t = 0; t < n; t += page) {  // the tile's rows, page by page, in place
          const int64_t block = tables[b * max_pages + (first + t) / page];
          const int64_t base = (g * num_blocks + block) * page * d;
          const int64_t m = std::min(page, n - t);
          for (int64_t u = 0; u < m; ++u) {
            if constexpr (kFloat) {
              krow[t + u] = kp + base + u * d;
              vrow[t + u] = vp + base + u * d;
            } else {
              load_rows(&kbuf[(t + u) * d], kp + base + u * d, d);
              load_rows(&vbuf[(t + u) * d], vp + base + u * d, d);
              krow[t + u] = &kbuf[(t + u) * d];
              vrow[t + u] = &vbuf[(t + u) * d];
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t j = r / group;
          // keys first .. first + visible - 1 of this tile are visible to query j
          const int64_t visible = std::min(n, nk - nq + j - first + 1);
          if (visible <= 0) continue;
          row_tile<D>(&qbuf[r * d], krow.data(), vrow.data(), visible, d, &score[r * tile],
                      &acc[r * d], mx[r], sum[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = r / group, i = r % group;
        const float inv = 1.f / sum[r];
        T* dst = op + ((starts[b] + j) * h + g * group + i) * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(acc[r * d + c] * inv);
      }
    }
  });
}

void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache,
                     const at::Tensor& block_tables, const at::Tensor& q_starts,
                     const at::Tensor& q_lens, const at::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && cache.size(0) == 2,
              "paged_attention: q [N, h, d] and cache [2, kv, blocks, page, d]");
  TORCH_CHECK(q.is_contiguous() && cache.is_contiguous() && out.is_contiguous(),
              "paged_attention: q, cache and out must be contiguous");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "paged_attention: q, out and cache must share a dtype");
  TORCH_CHECK(q.size(1) % cache.size(1) == 0 && q.size(2) == cache.size(4),
              "paged_attention: heads must be a multiple of kv heads, head dims equal");
  for (const auto* t : {&block_tables, &q_starts, &q_lens, &kv_lens}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(),
                "paged_attention: index tensors must be contiguous int64 on the CPU");
  }
  const int64_t d = q.size(2);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (d == 64) {
      attend<T, 64>(out, q, cache, block_tables, q_starts, q_lens, kv_lens, scale);
    } else if (d == 128) {
      attend<T, 128>(out, q, cache, block_tables, q_starts, q_lens, kv_lens, scale);
    } else {
      attend<T, 0>(out, q, cache, block_tables, q_starts, q_lens, kv_lens, scale);
    }
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "paged_attention: dtype ", q.scalar_type(), " is not supported");
  }
}

}  // namespace

TORCH_LIBRARY(specserve, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_tables, "
      "Tensor q_starts, Tensor q_lens, Tensor kv_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(specserve, CPU, m) { m.impl("paged_attention", &paged_attention); }
