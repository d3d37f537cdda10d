// Shared pieces of the CPU kernels: the target's float vectors, a vectorisable exp, the tiled
// product (`tile_rows`, `gemm_tiled`), RMSNorm, the rotary embedding and the paged attention of
// short queries (`attend`), used by paged_attention.cpp, dense_step.cpp, draft_step.cpp and
// row_attention.cpp.
#pragma once

// Only the tensor, allocation and thread-pool headers: ATen/ATen.h (every operator) and
// torch/library.h (the dispatcher; only register.cpp needs it) would double the time each
// translation unit takes to compile.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>  // `load_w`'s widening; other targets take the generic path
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cmath>
#include <limits>
#include <vector>


namespace specserve_kernels {

// A new CPU tensor, straight from the allocator (the kernels' outputs and scratch; at::empty
// would go through the dispatcher and its headers).
inline at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_cpu(size, options));
}

constexpr int64_t kTile = 64;  // keys per online-softmax step (whole pages, at most this many)

// One hardware register of floats in GCC's generic vector type: 16 lanes with AVX-512, 8 with
// AVX / AVX2, 4 elsewhere (SSE, NEON). A wider type than the target's registers is not split
// into registers: GCC keeps such vectors (and arrays of them) in memory and copies them 16
// bytes at a time, which made every product of an AVX2 build about 25x slower than `torch.mm`.
// Loads and stores are unaligned, through a may_alias twin of the type: a `memcpy` of 64 bytes
// compiles to two 32-byte copies through the stack where the target prefers 256-bit vectors
// (GCC's tuning for recent Xeons), and the 64-byte reload of those stalls on store forwarding.
// A sum over lanes depends on the width, so two builds for different targets may differ in the
// last bits; within one build every path gives the same bits (what lossless decoding needs).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef float vf_alias __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));

// Vectors of the target's register file: 32 with AVX-512, 16 otherwise. The register blocks of
// the products and of attention are sized to it (`kPanel`, `kValueRows`, `kMaxRows`).
constexpr bool kWideRegs = kLanes == 16;

inline vf load(const float* p) { return *reinterpret_cast<const vf_alias*>(p); }

// Keeps v in a register: GCC otherwise folds a vector used by several multiply-adds into each
// of them as a memory operand, one load per use (the weighted-value sum's R rows each loaded
// the value vector again, 7 loads for 6 multiply-adds on AVX2). The same value either way.
inline void in_register(vf& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

inline void store(float* p, vf v) { *reinterpret_cast<vf_alias*>(p) = v; }

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

// Halves of a vector, down to 4 lanes, with `op` (a tree, not kLanes - 1 dependent steps).
template <typename Op>
inline vf4 fold4(vf v, Op op) {
#if defined(__AVX512F__)
  const vf8 a = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  return op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
#elif defined(__AVX__)
  return op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
  (void)op;
  return v;
#endif
}

inline float hsum(vf v) {  // a tree of halves, not kLanes - 1 dependent adds
  const vf4 b = fold4(v, [](auto x, auto y) { return x + y; });
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The sums of four vectors, each added in `hsum`'s order (so the same bits); with 16 lanes the
// shuffles and adds are shared by the four.
inline void hsum4(vf d0, vf d1, vf d2, vf d3, float* out) {
#if defined(__AVX512F__)
  const vf a = __builtin_shufflevector(d0, d1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(d0, d1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf b = __builtin_shufflevector(d2, d3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(d2, d3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf c = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const vf e = c + __builtin_shufflevector(c, c, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const vf sums = e + __builtin_shufflevector(e, e, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = sums[0], out[1] = sums[4], out[2] = sums[8], out[3] = sums[12];
#else
  out[0] = hsum(d0), out[1] = hsum(d1), out[2] = hsum(d2), out[3] = hsum(d3);
#endif
}

// e^r for r in [-ln2/2, ln2/2], on a float or on a vector: the polynomial of both `fast_exp`s.
template <typename T>
inline T exp_poly(T r) {
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(x) for x <= 0 (and -inf), to ~1 ulp: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2].
// Plain arithmetic so that the compiler vectorises the loops that call it (std::exp does not).
inline float fast_exp(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: still a normal float; -inf maps here too
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float p = exp_poly(x - n * 0.693359375f + n * 2.12194440e-4f);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}

typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

// `fast_exp` on a vector, step for step (n rounded to nearest even by the 1.5 * 2^23 trick,
// which is `nearbyint` for |n| < 2^22).
inline vf fast_exp(vf x) {
  const vf zero = {};
  const vf lo = zero - 87.0f;  // -inf maps here too
  x = x < lo ? lo : x;
  const vf magic = zero + 12582912.0f;
  const vf t = x * 1.44269504088896341f;
  const vf n = (t + magic) - magic;
  vf p = exp_poly(x - n * 0.693359375f + n * 2.12194440e-4f);
  const vi bits = reinterpret_cast<vi&>(p) + (__builtin_convertvector(n, vi) << 23);
  return reinterpret_cast<const vf&>(bits);
}

// y = silu(g) * u over n values, a vector at a time: sigmoid from exp(-|g|), inside
// `fast_exp`'s domain (std::exp is a libm call per value).
inline void silu_mul(const float* g, const float* u, int64_t n, float* y) {
  int64_t i = 0;
  const vf zero = {};
  for (; i + kLanes <= n; i += kLanes) {
    const vf x = load(g + i);
    const vf e = fast_exp(x < zero ? x : -x);
    const vf sig = x < zero ? e / (1.f + e) : 1.f / (1.f + e);
    store(y + i, x * sig * load(u + i));
  }
  for (; i < n; ++i) {
    const float x = g[i], e = fast_exp(x < 0.f ? x : -x);
    const float sig = x < 0.f ? e / (1.f + e) : 1.f / (1.f + e);
    y[i] = x * sig * u[i];
  }
}

// The first index of the largest value (torch.argmax), and max softmax(l) = 1 / sum exp(l - max)
// (a greedy draft's confidence proxy): the draft steps' picks.
inline int64_t argmax(const float* l, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) best = l[i] > l[best] ? i : best;
  return best;
}

inline float top_prob(const float* l, int64_t n, float mx) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += fast_exp(l[i] - mx);
  return 1.f / sum;
}

// Four dot products of one query row with four keys, any head size: four independent
// accumulators share the row's loads.
inline void dot4(const float* a, const float* const* k, int64_t d, float* out) {
  const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < d; ++i) {
    s0 += a[i] * k0[i];
    s1 += a[i] * k1[i];
    s2 += a[i] * k2[i];
    s3 += a[i] * k3[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

constexpr int64_t kCols = 64;  // output columns per tile of a tiled weight

// Work (multiply-adds) below which a loop stays on the calling thread: a fork/join costs
// microseconds on an idle machine, and when another process holds a core the join waits for
// a descheduled thread (a batch-1 decode step of a small model ran 1.8x slower on two threads
// than on one next to a local client). Larger steps (batches, prefill) still use every thread.
constexpr int64_t kMinParallelWork = 1 << 21;

// The same for a tiled product, whose weights mostly come from cache: the verify window of
// one stream (8 rows of the demo target, 3M multiply-adds a gate-up product) split in two ran
// slower next to `bench serve` on the other core (`make demo` A, DSPARK: 1,300 against 1,560
// tok/s). Attention keeps the lower bar: ten decoding requests' K/V streams from memory, and
// two threads read it faster.
constexpr int64_t kMinParallelProduct = 1 << 22;

// Weight bytes per chunk above which a tiled product splits across threads whatever its work.
constexpr int64_t kMinParallelBytes = 2 << 20;

// The grain (items per chunk) for at::parallel_for over items of `work_per_item` each.
// Rounded up, so that no chunk holds less than `min_work` (two items of 1.5M each stay on one
// thread at kMinParallelWork).
inline int64_t grain_for(int64_t work_per_item, int64_t min_work = kMinParallelWork) {
  const int64_t per = std::max<int64_t>(1, work_per_item);
  return std::max<int64_t>(1, (min_work + per - 1) / per);
}

// A block of at least 4 rows spends long enough on each weight row that the weight stream
// stalls at every 4 KB page (16 rows of a tile), where the hardware prefetcher stops: it fetches
// a page ahead itself. 150M model, ten requests decoding 1,024-token contexts: 75 ms a step
// against 94. One row streams fast enough without help (batch 1 is at the copy floor).
constexpr int kPrefetchRows = 4;
constexpr int64_t kPrefetchAheadBytes = 4096;  // a page ahead: 16 float32 tile rows, 32 16-bit

// A 16-bit product over 1-3 rows prefetches too when its weight is over this size (it then
// streams from memory, not from cache): its loads carry half the bytes and the widening, and
// the hardware prefetcher alone left the 150M model's batch-1 decode at 38-40 tok/s, against
// 48-54 with it. Float32 at one row lost 5% with it (26 against 27-28 tok/s), and products
// of the demo target (at most 1 MB) lost 3-4%.
constexpr int64_t kStreamBytes = 1 << 20;
constexpr int64_t kFetchNextRows = 24;  // rows of a product from which passes fetch the next tile

// Rows from which a 16-bit tile is widened to float32 once, into a buffer the passes read,
// instead of widening its 16 lanes at every load of every pass. Below, the first pass streams
// the tile from memory while it computes (150M model, ten decoding requests: 62-64 ms a step
// against 73-78 widened; ten verify windows of 4: 106-107 against 114-128); from here the
// passes' widening costs more (a 512-token prefill chunk: 912-918 ms unwidened, 805-912 widened).
constexpr int64_t kWidenRows = 64;

// Tiled weights hold float32, or 16 bits a value where every value of the weight is exact in
// bfloat16 or float16 (`tile_for_kernels` in specserve/models/layers.py chooses): widening is
// exact and the sums are the same float32 sums in the same order, so a product gives the same
// bits from either copy, and reads half the bytes from the 16-bit one.
// GCC's generic vector conversions come out as scalar conversions (float16) or 256-bit halves
// (bfloat16), so AVX-512, AVX2 and F16C get their own instructions.
typedef uint16_t vh __attribute__((vector_size(2 * kLanes), aligned(2), may_alias));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));

inline vf load_w(const float* p) { return load(p); }

inline vf load_w(const c10::BFloat16* p) {  // the 16 bits are float32's upper half
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#elif defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
  return (vf)(__builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16);
#endif
}

inline vf load_w(const c10::Half* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf out;
  for (int i = 0; i < kLanes; ++i) out[i] = static_cast<float>(p[i]);
  return out;
#endif
}

// Vectors of a tile's columns that `tile_rows` accumulates at once (a panel): with AVX-512,
// all 64 columns (4 vectors; 6 rows x 4 accumulators and the 4 weight vectors fit the 32
// registers); with 16 registers, 2 vectors (6 x 2 accumulators, as the usual 6 x 16 AVX2
// kernel), so a tile takes kCols / kLanes / 2 panels.
constexpr int kPanel = kWideRegs ? 4 : 2;

// The panel for a block of MB rows: one row takes all of a tile's columns in one panel (8
// accumulators and the weight vectors still fit 16 registers), two rows half of them.
template <int MB>
constexpr int panel_for() {
  constexpr int all = static_cast<int>(kCols / kLanes);
  if constexpr (MB == 1) return std::min(all, 8);
  else if constexpr (MB == 2) return std::min(all, std::max(kPanel, 4));
  else return kPanel;
}

// Weight rows a tile is walked in: every panel of a block of rows before the next block, so
// that the tile streams front to back once (a block is 2-4 KB: later panels read it from L1)
// instead of once per panel with a stride of a whole tile row, which the prefetchers follow
// badly. The panels' accumulators go to L1 between blocks (MB x P vectors per 16 rows).
// AVX2, the 150M model's gate-up product from memory (`benchmarks/linear_kernels.py
// --weights 64`): one row in float32 took 1.88 ms in four strided passes (6.7 GB/s; MKL's
// `mm` 0.89 ms), 0.78-1.06 in one panel; in 16 bits two rows took 0.83-0.92 ms panel by
// panel, 0.56 in blocks, three rows 1.14 and 0.60.
constexpr int64_t kBlockK = 16;

// y[i, :ncols] (+)= x[i, :K] @ w[:K, :64] for MB rows (w's rows `ldw` values apart, 64 of
// them read), a panel of P vectors at a time: P x MB accumulators in registers, each w row's
// panel loaded once for all MB rows. Each output is the same sum over k in order whatever
// the panels and blocks (an accumulator kept in L1 between blocks holds the same float), so
// the bits depend on neither.
// FETCH: also fetch lines line .. line_end - 1 of `next` into L2 (see rows_times_tile).
template <int MB, bool FETCH = false, typename W = float, bool STREAM = false>
inline void tile_rows(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                      float* y, int64_t ldy, int64_t ncols, bool accumulate,
                      const void* next = nullptr, int64_t line = 0, int64_t line_end = 0,
                      int64_t every = 1) {
  constexpr int P = panel_for<MB>();
  constexpr int kPanelCols = P * kLanes;
  constexpr int kPanels = kCols / kPanelCols;
  const int panels =  // a narrow last tile: no work past its columns
      static_cast<int>(std::min<int64_t>(kPanels, (ncols + kPanelCols - 1) / kPanelCols));
  const char* next_bytes = static_cast<const char*>(next);
  vf held[kPanels][MB][P] = {};  // the accumulators between blocks
  int64_t countdown = every;
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t k1 = std::min(K, k0 + kBlockK);
    for (int panel = 0; panel < panels; ++panel) {
      const W* wp = w + panel * kPanelCols;
      vf a[MB][P];
      for (int i = 0; i < MB; ++i) {
        for (int c = 0; c < P; ++c) a[i][c] = held[panel][i][c];
      }
      for (int64_t k = k0; k < k1; ++k) {
        const W* wk = wp + k * ldw;
        if (panel == 0) {  // the first panel to read this weight row
          if constexpr (MB >= kPrefetchRows || STREAM) {  // the whole tile row, a page ahead
            constexpr int64_t rows_ahead = kPrefetchAheadBytes / (kCols * sizeof(W));
            const char* ahead = reinterpret_cast<const char*>(w + (k + rows_ahead) * ldw);
            for (size_t b = 0; b < kCols * sizeof(W); b += 64) __builtin_prefetch(ahead + b, 0, 2);
          }
          if constexpr (FETCH) {  // lines line .. line_end - 1 of `next`, one every `every` rows
            if (--countdown == 0) {
              countdown = every;
              if (line < line_end) __builtin_prefetch(next_bytes + 64 * line++, 0, 2);
            }
          }
        }
        vf wv[P];
#pragma GCC unroll 8
        for (int c = 0; c < P; ++c) wv[c] = load_w(wk + c * kLanes);
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i) {
          const float xv = x[i * ldx + k];
#pragma GCC unroll 8
          for (int c = 0; c < P; ++c) a[i][c] += xv * wv[c];
        }
      }
      for (int i = 0; i < MB; ++i) {
        for (int c = 0; c < P; ++c) held[panel][i][c] = a[i][c];
      }
    }
  }
  for (int panel = 0; panel < panels; ++panel) {
    const int64_t col0 = panel * kPanelCols;
    const int64_t n = std::min<int64_t>(kPanelCols, ncols - col0);
    for (int i = 0; i < MB; ++i) {
      float* yr = y + i * ldy + col0;
      if (n == kPanelCols && !accumulate) {
        for (int c = 0; c < P; ++c) store(yr + c * kLanes, held[panel][i][c]);
        continue;
      }
      float buf[kPanelCols];
      for (int c = 0; c < P; ++c) store(buf + c * kLanes, held[panel][i][c]);
      if (accumulate) {
        for (int64_t c = 0; c < n; ++c) yr[c] += buf[c];
      } else {
        for (int64_t c = 0; c < n; ++c) yr[c] = buf[c];
      }
    }
  }
}

// y [M, 64-column chunk] (+)= x [M, K] @ w [K, 64]: up to 8 rows in one block (a verify window
// of 8 or a draft block of 7 in one pass over the tile; with 16 registers, 7-8 rows as 6 and
// the rest); more in blocks of 6 rows (each pass after the first reads the tile from L2), the
// rest in one block. 150M model, ten verify
// windows of 8: 209 ms a step against 227 in blocks of 8.
//
// With `kFetchNextRows` rows or more, passes 1 to 12 also fetch `next` (the tile this thread
// reads after this one) into L2, a line every few weight rows, spread so that the memory works
// while the multiply-adds of this tile run from L2; only a product's first tile then streams
// from memory while the multiply-adds wait. 150M gate-up weight, 80 rows, weights from DRAM:
// 2.78 ms against 3.21. Fetching it at the rate the multiply-adds read (a line per weight row)
// or in one pass was slower than not at all: the fetches then hold the line-fill buffers the
// tile's own loads from L2 need.
//
// A 16-bit tile read by `kWidenRows` rows or more is widened to float32 once, into a buffer
// the passes read from L1 / L2.
template <typename W>
inline void rows_times_tile(const float* x, int64_t ldx, int64_t M, const W* w, int64_t ldw,
                            int64_t K, float* y, int64_t ldy, int64_t ncols, bool accumulate,
                            const void* next = nullptr, int64_t next_lines = 0,
                            bool stream = false) {
  if constexpr (!std::is_same_v<W, float>) {
    if (M >= kWidenRows) {
      thread_local std::vector<float> wide;
      wide.resize(K * kCols);
      for (int64_t k = 0; k < K; ++k) {
        for (int c = 0; c < kCols / kLanes; ++c) {
          store(wide.data() + k * kCols + c * kLanes, load_w(w + k * ldw + c * kLanes));
        }
      }
      rows_times_tile<float>(x, ldx, M, wide.data(), kCols, K, y, ldy, ncols, accumulate, next,
                             next_lines);
      return;
    }
  }
  int64_t m = 0;
  if (M > 8) {  // 6 x kPanel accumulators and kPanel weight vectors fit the registers; 8 spill
    const int64_t spread = M >= kFetchNextRows && next != nullptr ? std::min<int64_t>(M / 6 - 1, 12) : 0;
    const int64_t lines = next_lines;
    const int64_t per = spread > 0 ? (lines + spread - 1) / spread : 0;  // lines a pass fetches
    const int64_t every = per > 0 ? std::max<int64_t>(1, K / per) : 0;    // weight rows per line
    for (int64_t pass = 0; m + 6 <= M; m += 6, ++pass) {
      if (pass >= 1 && pass <= spread) {
        tile_rows<6, true>(x + m * ldx, ldx, w, ldw, K, y + m * ldy, ldy, ncols, accumulate,
                           next, (pass - 1) * per, std::min(lines, pass * per), every);
      } else {
        tile_rows<6>(x + m * ldx, ldx, w, ldw, K, y + m * ldy, ldy, ncols, accumulate);
      }
    }
  }
  // With 16 registers, 8 rows x 2 accumulator vectors spill: 7 or 8 rows go as 6 (15
  // registers), then 1 or 2 in wide panels, the second block reading the tile from L2.
  // AVX2, eight rows, 16-bit weights that stay in L3 (the demo target's): a gate-up product
  // 104-128 µs against 120-168 in one block of 8 (builds alternated in separate processes);
  // weights from memory (150M): 0.95-1.22 ms against 1.01-1.31.
  if constexpr (!kWideRegs) {
    if (M - m >= 7) {
      tile_rows<6>(x + m * ldx, ldx, w, ldw, K, y + m * ldy, ldy, ncols, accumulate);
      m += 6;
    }
  }
  for (; m + 8 <= M; m += 8) tile_rows<8>(x + m * ldx, ldx, w, ldw, K, y + m * ldy, ldy, ncols, accumulate);
  const float* xm = x + m * ldx;
  float* ym = y + m * ldy;
  switch (M - m) {
    case 7: tile_rows<7>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate); break;
    case 6: tile_rows<6>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate); break;
    case 5: tile_rows<5>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate); break;
    case 4: tile_rows<4>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate); break;
    case 3:
      if (stream) tile_rows<3, false, W, true>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate);
      else tile_rows<3>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate);
      break;
    case 2:
      if (stream) tile_rows<2, false, W, true>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate);
      else tile_rows<2>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate);
      break;
    case 1:
      if (stream) tile_rows<1, false, W, true>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate);
      else tile_rows<1>(xm, ldx, w, ldw, K, ym, ldy, ncols, accumulate);
      break;
    default: break;
  }
}

// y [M, N] (+)= x [M, K] @ W, W tiled [ceil(N / 64), K, 64]; ldx / ldy are row strides.
template <typename W>
inline void gemm_tiled_as(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K,
                          int64_t N, float* y, int64_t ldy, bool accumulate) {
  const int64_t tiles = (N + kCols - 1) / kCols;
  // Split by work, or by weight bytes: a product whose weight is large streams from memory at
  // one row as well, and two threads read it faster (150M model, batch-1 decode on two threads).
  const int64_t tile_bytes = K * kCols * static_cast<int64_t>(sizeof(W));
  const int64_t by_bytes = std::max<int64_t>(1, (kMinParallelBytes + tile_bytes - 1) / tile_bytes);
  const int64_t grain = std::min(grain_for(M * K * kCols, kMinParallelProduct), by_bytes);
  const bool stream = sizeof(W) == 2 && tiles * tile_bytes > kStreamBytes;
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const W* wt = w + t * K * kCols;
      const int64_t ncols = std::min(kCols, N - t * kCols);
      float* yt = y + t * kCols;
      rows_times_tile<W>(x, ldx, M, wt, kCols, K, yt, ldy, ncols, accumulate,
                         t + 1 < end ? wt + K * kCols : nullptr, tile_bytes / 64, stream);
    }
  });
}

// The same for a tiled weight of any of the three types (`check_tiled`).
inline void gemm_tiled(const float* x, int64_t ldx, int64_t M, const at::Tensor& w, int64_t K,
                       int64_t N, float* y, int64_t ldy, bool accumulate) {
  switch (w.scalar_type()) {
    case at::kBFloat16:
      return gemm_tiled_as(x, ldx, M, w.data_ptr<c10::BFloat16>(), K, N, y, ldy, accumulate);
    case at::kHalf:
      return gemm_tiled_as(x, ldx, M, w.data_ptr<c10::Half>(), K, N, y, ldy, accumulate);
    default:
      return gemm_tiled_as(x, ldx, M, w.data_ptr<float>(), K, N, y, ldy, accumulate);
  }
}

inline void check_tiled(const at::Tensor& w, int64_t K, int64_t N, const char* what) {
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kCols && w.size(1) == K &&
                  w.size(0) == (N + kCols - 1) / kCols && w.is_contiguous() &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 ||
                   w.scalar_type() == at::kHalf),
              what, ": expected a contiguous float32, bfloat16 or float16 tiled weight [",
              (N + kCols - 1) / kCols, ", ", K, ", 64], got ", w.sizes());
}

// y = x * rsqrt(mean(x^2) + eps) * weight over n values.
inline void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < n; ++c) ss += x[c] * x[c];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] = x[c] * r * weight[c];
}

// Neox rotary embedding (rotate_half) of one head: cos, sin [d / 2].
inline void rotate(const float* x, const float* cos, const float* sin, int64_t d, float* y) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    y[i] = a * cos[i] - b * sin[i];
    y[i + half] = b * cos[i] + a * sin[i];
  }
}

template <typename T>
inline void load_rows(float* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The most query rows `rows_tile` keeps in registers at head size D (the queries): 4 at 64, 2
// at 128 with 32 registers, half that with 16; the generic head size (D = 0) goes through
// `row_tile`, one row at a time.
template <int D>
constexpr int64_t kMaxRows = D == 0 ? 1 : (D <= 64 ? 4 : 2) / (kWideRegs ? 1 : 2);

// The most rows `attend` adds weighted values for at once: 6 x 4 accumulators at head size 64
// with 32 registers; with 16, 3 rows of kPanel-vector column panels (`add_values`).
template <int D>
constexpr int64_t kValueRows = D == 0 ? 1 : !kWideRegs ? 3 : D <= 64 ? 6 : 2;

template <typename V>
inline V vmax(V a, V b) { return a > b ? a : b; }

// The largest of n floats (-inf for none), a vector at a time. GCC leaves an `omp simd`
// max reduction scalar: one dependent `vmaxss` per score, 4 cycles each (a maximum is exact, so
// the order does not change any bits).
inline float max_of(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
  if (n >= kLanes) {
    vf v = load(x);
    for (t = kLanes; t + kLanes <= n; t += kLanes) {
      const vf y = load(x + t);
      v = vmax(y, v);
    }
    const vf4 b = fold4(v, [](auto x, auto y) { return vmax(x, y); });
    m = std::max(std::max(b[0], b[2]), std::max(b[1], b[3]));
  }
  for (; t < n; ++t) m = std::max(m, x[t]);
  return m;
}

// The online-softmax step of one row over its `visible` scores of a tile (exponentiated in
// place): updates (mx, sum) and returns the factor the row's accumulator is scaled by.
inline float softmax_step(float* sr, int64_t visible, float& mx, float& sum) {
  const float m_new = std::max(mx, max_of(sr, visible));
  // a vector at a time, then the rest one by one: the same bits for a row whatever rows it is
  // attended with (the sum's order depends only on `visible`)
  vf lanes = {};
  int64_t t = 0;
  for (; t + kLanes <= visible; t += kLanes) {
    const vf e = fast_exp(load(sr + t) - m_new);
    store(sr + t, e);
    lanes += e;
  }
  float tile_sum = hsum(lanes);
  for (; t < visible; ++t) {
    sr[t] = fast_exp(sr[t] - m_new);
    tile_sum += sr[t];
  }
  const float correction = fast_exp(mx - m_new);  // 0 on the first tile (mx = -inf)
  sum = sum * correction + tile_sum;
  mx = m_new;
  return correction;
}

// acc[r] = acc[r] * correction[r] + sum over t < visible of s[r, t] * v_t, for R rows of head
// size D (accumulators in registers; each value row loaded once for all R rows). A row whose
// own keys end before `visible` has zero weights past them: adding 0 * v leaves its bits.
// With 16 registers the head is taken in panels of kPanel vectors, so that R x kPanel
// accumulators fit; each value's sum over t has the same order. The panels walk the values in
// blocks of kValueBlock rows, every panel of a block before the next block (as `tile_rows`
// walks a weight tile), so that each value row is read whole, once, from memory; the
// accumulators go back to acc between blocks (the same floats: the same bits).
constexpr int64_t kValueBlock = 4;

template <int D, int R, typename VT = float>
inline void add_values(const float* s, int64_t ld_score, const VT* const* vrow,
                       int64_t visible, const float* correction, float* acc) {
  constexpr int C = D / kLanes, P = kWideRegs || C < kPanel ? C : kPanel;
  // at least one block, so that the correction is applied even with no value to add
  for (int64_t t0 = 0; t0 < visible || t0 == 0; t0 += kValueBlock) {
    const int64_t t1 = std::min(visible, t0 + kValueBlock);
    for (int c0 = 0; c0 < C; c0 += P) {
      vf a[R][P];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < P; ++c) {
          a[r][c] = load(acc + r * D + (c0 + c) * kLanes);
          if (t0 == 0) a[r][c] *= correction[r];
        }
      for (int64_t t = t0; t < t1; ++t) {
        const VT* vr = vrow[t] + c0 * kLanes;
#pragma GCC unroll 16
        for (int c = 0; c < P; ++c) {
          vf vv = load_w(vr + c * kLanes);
          in_register(vv);  // one load, not one per row (a 2,048-token causal chunk's attention
                            // 37 ms against 40-45 a layer on an AVX2 host)
          for (int r = 0; r < R; ++r) a[r][c] += s[r * ld_score + t] * vv;
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < P; ++c) store(acc + r * D + (c0 + c) * kLanes, a[r][c]);
    }
  }
}

// `add_values` for `chunk` rows (at most kMaxRows<D>), any head size d when D = 0; value rows
// of float32 or of a 16-bit cache (widened as they are loaded).
template <int D, typename VT = float>
inline void add_values_rows(int64_t chunk, const float* s, int64_t ld_score,
                            const VT* const* vrow, int64_t visible, int64_t d,
                            const float* correction, float* acc) {
  if constexpr (D > 0) {
    switch (chunk) {
      case 6:
        if constexpr (D <= 64) add_values<D, 6, VT>(s, ld_score, vrow, visible, correction, acc);
        break;
      case 5:
        if constexpr (D <= 64) add_values<D, 5, VT>(s, ld_score, vrow, visible, correction, acc);
        break;
      case 4: add_values<D, 4, VT>(s, ld_score, vrow, visible, correction, acc); break;
      case 3: add_values<D, 3, VT>(s, ld_score, vrow, visible, correction, acc); break;
      case 2: add_values<D, 2, VT>(s, ld_score, vrow, visible, correction, acc); break;
      default: add_values<D, 1, VT>(s, ld_score, vrow, visible, correction, acc); break;
    }
  } else {
    for (int64_t r = 0; r < chunk; ++r) {
      float* ar = acc + r * d;
      const float* sr = s + r * ld_score;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) ar[c] *= correction[r];
      for (int64_t t = 0; t < visible; ++t) {
        const float w = sr[t];
        const VT* vr = vrow[t];
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) ar[c] += w * static_cast<float>(vr[c]);
      }
    }
  }
}

// One query row against `visible` keys stored as rows, any head size d (64 and 128 go through
// `rows_tile`): scores, the online-softmax update of (mx, sum) and the weighted values added to
// acc (the drafters' attention: draft_step.cpp, row_attention.cpp).
inline void row_tile(const float* qr, const float* const* krow, const float* const* vrow,
                     int64_t visible, int64_t d, float* s, float* acc, float& mx, float& sum) {
  int64_t t = 0;
  for (; t + 4 <= visible; t += 4) dot4(qr, &krow[t], d, &s[t]);
  for (; t < visible; ++t) s[t] = dot(qr, krow[t], d);
  const float correction = softmax_step(s, visible, mx, sum);
  add_values_rows<0>(1, s, 0, vrow, visible, d, &correction, acc);
}

// R query rows that see the same keys (the grouped heads of one query, D > 0) against
// `visible` keys stored as rows at once: each key and value row is loaded once for all R rows,
// the queries and accumulators stay in registers. Each score is the same sum in the same order
// as with R = 1, so a row's result does not depend on R.
template <int D, int R>
inline void rows_tile(const float* q, const float* const* krow, const float* const* vrow,
                      int64_t visible, int64_t ld_score, float* s, float* acc, float* mx,
                      float* sum) {
  constexpr int C = D / kLanes;
  vf qv[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) qv[r][c] = load(q + r * D + c * kLanes);
  for (int64_t t = 0; t < visible; ++t) {
    const float* k = krow[t];
    vf dots[R] = {};
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const vf kv = load(k + c * kLanes);
      for (int r = 0; r < R; ++r) dots[r] += qv[r][c] * kv;
    }
    if constexpr (R == 4) {
      float sums[4];
      hsum4(dots[0], dots[1], dots[2], dots[3], sums);
      for (int r = 0; r < R; ++r) s[r * ld_score + t] = sums[r];
    } else {
      for (int r = 0; r < R; ++r) s[r * ld_score + t] = hsum(dots[r]);
    }
  }
  float correction[R];
  for (int r = 0; r < R; ++r) correction[r] = softmax_step(s + r * ld_score, visible, mx[r], sum[r]);
  add_values<D, R>(s, ld_score, vrow, visible, correction, acc);
}

// One tile pass of `chunk` rows (at most kMaxRows<D>) that see the same `visible` keys: q, s
// and acc of the first row, the rows' softmax state mx, sum; scores `ld_score` apart.
template <int D>
inline void attend_rows(int64_t chunk, const float* q, const float* const* krow,
                        const float* const* vrow, int64_t visible, int64_t d, int64_t ld_score,
                        float* s, float* acc, float* mx, float* sum) {
  if constexpr (D > 0) {
    switch (chunk) {
      case 4: rows_tile<D, 4>(q, krow, vrow, visible, ld_score, s, acc, mx, sum); break;
      case 3: rows_tile<D, 3>(q, krow, vrow, visible, ld_score, s, acc, mx, sum); break;
      case 2: rows_tile<D, 2>(q, krow, vrow, visible, ld_score, s, acc, mx, sum); break;
      default: rows_tile<D, 1>(q, krow, vrow, visible, ld_score, s, acc, mx, sum); break;
    }
  } else {
    row_tile(q, krow, vrow, visible, d, s, acc, *mx, *sum);
  }
}

// A piece of `attend`'s work: queries q0 .. q1 - 1 of sequence b against KV head g.
struct AttendItem {
  int64_t b, g, q0, q1, work;  // work: multiply-adds
};

// Queries per item of a long query (a prefill chunk): enough rows to reuse each key tile many
// times, small enough that two threads share one sequence's chunk.
constexpr int64_t kQueryBlock = 64;

// The items of an `attend` call, in order (sequence, query block, KV head), and the first item
// of each of `parts` contiguous runs of about equal work (parts + 1 entries, the last = size).
inline std::vector<int64_t> split_items(const std::vector<AttendItem>& items, int64_t parts) {
  int64_t total = 0;
  for (const auto& it : items) total += it.work;
  std::vector<int64_t> first{0};
  int64_t done = 0, i = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    while (i < static_cast<int64_t>(items.size()) && done + items[i].work / 2 < target)
      done += items[i++].work;
    first.push_back(i);
  }
  first.push_back(static_cast<int64_t>(items.size()));
  return first;
}

// --- Paged attention over keys stored transposed (`attend`) -------------------------------
//
// The cache of `specserve.models.attention.CppBackend`: one tensor [2, kv, num_blocks, page, d]
// per layer whose value pages are [page, d] (a row per token) and whose key pages are stored
// transposed, [d, page] (element c of the page's token u at c * page + u). A query's scores
// against kKeys keys (a vector's lanes) are then one vector: a multiply-add per element of the head, with the query
// element broadcast, and no horizontal sums (the row-major `rows_tile` above spends more on
// those than on the products).


constexpr int64_t kKeys = kLanes;  // keys per score vector
constexpr int64_t kPrefetchBytes = 256;  // of each page of the next tile
constexpr int64_t kScores32Rows = 4;  // fewer rows read keys faster a vector at a time

// Scores of RB query rows (q [RB, d]) against kKeys keys stored transposed, kt[c * ldk + u] =
// element c of key u: s[r * ld_score + u]. Each score is the multiply-adds over c = 0 .. d - 1
// in order, so it has the same bits for any RB and wherever the keys sit.
template <int RB, typename KT>
inline void scores16(const float* q, int64_t d, const KT* kt, int64_t ldk, float* s,
                     int64_t ld_score) {
  vf acc[RB] = {};
  for (int64_t c = 0; c < d; ++c) {
    const vf k = load_w(kt + c * ldk);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) acc[r] += q[r * d + c] * k;
  }
  for (int r = 0; r < RB; ++r) store(s + r * ld_score, acc[r]);
}

// `scores16` for two groups of kKeys keys at once (kt, kt2; scores of the second group after
// the first's): each query element, broadcast, serves 2 kKeys keys, so the loads no longer outnumber
// the multiply-adds. The same sums in the same order as `scores16`.
template <int RB, typename KT>
inline void scores32(const float* q, int64_t d, const KT* kt, const KT* kt2, int64_t ldk,
                     float* s, int64_t ld_score) {
  vf acc[RB] = {}, acc2[RB] = {};
  for (int64_t c = 0; c < d; ++c) {
    const vf k = load_w(kt + c * ldk), k2 = load_w(kt2 + c * ldk);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const float qc = q[r * d + c];
      acc[r] += qc * k;
      acc2[r] += qc * k2;
    }
  }
  for (int r = 0; r < RB; ++r) {
    store(s + r * ld_score, acc[r]);
    store(s + r * ld_score + kKeys, acc2[r]);
  }
}

// `scores16` (kt2 null) or `scores32` for any number of rows, eight (`scores32` with 16
// registers: six) at a time, each key vector loaded once for them all; keys of float32 or of a
// 16-bit cache (widened as they are loaded).
template <typename KT>
inline void scores_rows(int64_t rows, const float* q, int64_t d, const KT* kt, int64_t ldk,
                        float* s, int64_t ld_score, const KT* kt2 = nullptr) {
#define SPECSERVE_SCORES(RB, QR, SR)                              \
  if (kt2 != nullptr)                                             \
    scores32<RB>(QR, d, kt, kt2, ldk, SR, ld_score);              \
  else                                                            \
    scores16<RB>(QR, d, kt, ldk, SR, ld_score)
  int64_t r = 0;
  if (kWideRegs || kt2 == nullptr) {
    for (; r + 8 <= rows; r += 8) {
      SPECSERVE_SCORES(8, q + r * d, s + r * ld_score);
    }
  } else {
    // With 16 registers, `scores32` of 8 rows needs 16 accumulators and spills them; 6 rows
    // keep 12, the two key vectors and the broadcast query element in registers (one layer's
    // causal attention over a 2,048-token prefill chunk: 45 ms against 52-54, the quietest of
    // three alternated runs each on an AVX2 host; 4 rows: 50).
    for (; r + 6 <= rows; r += 6) {
      SPECSERVE_SCORES(6, q + r * d, s + r * ld_score);
    }
  }
  const float* qr = q + r * d;
  float* sr = s + r * ld_score;
  switch (rows - r) {
    case 7: SPECSERVE_SCORES(7, qr, sr); break;
    case 6: SPECSERVE_SCORES(6, qr, sr); break;
    case 5: SPECSERVE_SCORES(5, qr, sr); break;
    case 4: SPECSERVE_SCORES(4, qr, sr); break;
    case 3: SPECSERVE_SCORES(3, qr, sr); break;
    case 2: SPECSERVE_SCORES(2, qr, sr); break;
    case 1: SPECSERVE_SCORES(1, qr, sr); break;
    default: break;
  }
#undef SPECSERVE_SCORES
}

// Queries and outputs of type QT (float32, or the 16-bit type of a 16-bit model), a cache of
// type CT: the model's, or a 16-bit cache under a float32 model (`--kv-cache-dtype`), whose
// keys and values are widened to float32 as they are loaded. Every sum is float32.
template <typename QT, typename CT, int D>
void attend(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
            const at::Tensor& block_tables, const at::Tensor& q_starts,
            const at::Tensor& q_lens, const at::Tensor& kv_lens, double scale) {
  const int64_t h = q.size(1), d = D > 0 ? D : q.size(2);
  const int64_t kv = cache.size(1), num_blocks = cache.size(2), page = cache.size(3);
  const int64_t group = h / kv, batch = q_lens.size(0), max_pages = block_tables.size(1);
  const int64_t tile_pages = std::max<int64_t>(1, kTile / page), tile = tile_pages * page;
  const QT* qp = q.data_ptr<QT>();
  QT* op = out.data_ptr<QT>();
  const CT* kp = cache.data_ptr<CT>();
  const CT* vp = kp + kv * num_blocks * page * d;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = q_starts.data_ptr<int64_t>();
  const int64_t* qlens = q_lens.data_ptr<int64_t>();
  const int64_t* klens = kv_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  // A page of a multiple of kKeys keys is read in place, kKeys keys at a time; a smaller page's
  // keys are first copied, kKeys at a time, into a float32 buffer. Value rows are read in place.
  const bool in_place = page % kKeys == 0;

  std::vector<AttendItem> items;
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t nq = qlens[b], nk = klens[b];
    for (int64_t q0 = 0; q0 < nq; q0 += kQueryBlock) {
      const int64_t q1 = std::min(nq, q0 + kQueryBlock);
      // query j sees nk - nq + j + 1 keys: the block's sum of that, 2 multiply-adds per key
      const int64_t keys = (q1 - q0) * (nk - nq + 1) + (q0 + q1 - 1) * (q1 - q0) / 2;
      const int64_t work = 2 * group * keys * d;
      for (int64_t g = 0; g < kv; ++g) items.push_back({b, g, q0, q1, work});
      total += kv * work;
    }
  }
  const int64_t parts = std::clamp<int64_t>(total / kMinParallelWork, 1, at::get_num_threads());
  const std::vector<int64_t> first_item = split_items(items, parts);
  const int64_t padded_tile = (tile + kKeys - 1) / kKeys * kKeys;
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<float> qbuf, acc, mx, sum, score, correction, kbuf(d * kKeys);
    std::vector<int64_t> seen;
    std::vector<const CT*> vrow(tile);
    for (int64_t item = first_item[part_begin]; item < first_item[part_end]; ++item) {
      const auto [b, g, q0, q1, work] = items[item];
      const int64_t nq = qlens[b], rows = (q1 - q0) * group;
      const int64_t nk = klens[b] - nq + q1;  // the keys the block's last query sees
      const int64_t* table = tables + b * max_pages;
      qbuf.resize(rows * d);
      acc.assign(rows * d, 0.f);
      mx.assign(rows, -std::numeric_limits<float>::infinity());
      sum.assign(rows, 0.f);
      score.resize(rows * padded_tile);
      correction.resize(rows);
      seen.resize(rows);
      for (int64_t r = 0; r < rows; ++r) {  // row r = j * group + i: query q0 + j, head g*group + i
        const int64_t j = r / group, i = r % group;
        float* dst = &qbuf[r * d];
        load_rows(dst, qp + ((starts[b] + q0 + j) * h + g * group + i) * d, d);
        for (int64_t c = 0; c < d; ++c) dst[c] *= fscale;
      }
      for (int64_t first = 0; first < nk; first += tile) {
        const int64_t n = std::min(tile, nk - first);
        // The first lines of each of the next tile's pages into L2 while this one is attended.
        // A key page and a value page are 4 KB each (16 keys of head size 64), and the hardware
        // stream prefetcher stops at 4 KB boundaries; a few demand-like fetches at the start
        // of a page start it again (adjacent pages of one request too). One layer, ten requests
        // decoding 1,024-token contexts on pages taken in turns: 0.47 ms against 0.56 with
        // every line of the next tile prefetched.
        for (int64_t t = first + tile; t < std::min(nk, first + 2 * tile); t += page) {
          const int64_t block = table[t / page];
          const char* kpage = reinterpret_cast<const char*>(kp + (g * num_blocks + block) * page * d);
          const char* vpage = reinterpret_cast<const char*>(vp + (g * num_blocks + block) * page * d);
          const int64_t bytes = std::min<int64_t>(page * d * sizeof(CT), kPrefetchBytes);
          for (int64_t off = 0; off < bytes; off += 64) {
            __builtin_prefetch(kpage + off, 0, 2);
            __builtin_prefetch(vpage + off, 0, 2);
          }
        }
        // keys first .. first + seen[r] - 1 of this tile are visible to row r's query; rows are
        // in query order, so seen[] does not decrease
        for (int64_t r = 0; r < rows; ++r)
          seen[r] = std::clamp<int64_t>(nk - (q1 - q0) + r / group - first + 1, 0, n);
        const int64_t visible = seen[rows - 1];
        if (visible <= 0) continue;
        for (int64_t t = 0; t < visible; t += page) {  // the value rows, page by page, in place
          const int64_t block = table[(first + t) / page];
          const int64_t base = (g * num_blocks + block) * page * d;
          const int64_t m = std::min(page, visible - t);
          for (int64_t u = 0; u < m; ++u) vrow[t + u] = vp + base + u * d;
        }
        int64_t r_lo = 0;  // the first row that sees any of keys t0 ..
        auto keys_at = [&](int64_t key) {  // kKeys keys of one page, in place
          return kp + (g * num_blocks + table[key / page]) * page * d + key % page;
        };
        for (int64_t t0 = 0; t0 < visible; t0 += kKeys) {
          while (seen[r_lo] <= t0) ++r_lo;
          float* sr = &score[r_lo * padded_tile + t0];
          if (in_place && rows - r_lo >= kScores32Rows && t0 + kKeys < visible) {
            // 2 kKeys keys (rows that see only the first kKeys get scores they never use)
            scores_rows(rows - r_lo, &qbuf[r_lo * d], d, keys_at(first + t0), page, sr,
                        padded_tile, keys_at(first + t0 + kKeys));
            t0 += kKeys;
          } else if (in_place) {
            scores_rows(rows - r_lo, &qbuf[r_lo * d], d, keys_at(first + t0), page, sr,
                        padded_tile);
          } else {
            for (int64_t u = 0; u < kKeys; ++u) {
              const int64_t key = first + t0 + u;
              if (t0 + u < visible) {
                const CT* src = kp + (g * num_blocks + table[key / page]) * page * d + key % page;
                for (int64_t c = 0; c < d; ++c) kbuf[c * kKeys + u] = static_cast<float>(src[c * page]);
              } else {
                for (int64_t c = 0; c < d; ++c) kbuf[c * kKeys + u] = 0.f;
              }
            }
            scores_rows(rows - r_lo, &qbuf[r_lo * d], d, kbuf.data(), kKeys, sr, padded_tile);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = &score[r * padded_tile];
          if (seen[r] > 0) {
            correction[r] = softmax_step(sr, seen[r], mx[r], sum[r]);
          } else {
            correction[r] = 1.f;  // sees none of this tile's keys
          }
        }
        for (int64_t r = 0; r < rows;) {
          int64_t chunk = std::min<int64_t>(kValueRows<D>, rows - r);
          const int64_t last = seen[r + chunk - 1];  // the most keys a row of the chunk sees
          for (int64_t i = r; i < r + chunk; ++i)  // no weight past a row's own keys
            std::fill(&score[i * padded_tile + seen[i]], &score[i * padded_tile + last], 0.f);
          if (last > 0)
            add_values_rows<D>(chunk, &score[r * padded_tile], padded_tile, vrow.data(), last, d,
                               &correction[r], &acc[r * d]);
          r += chunk;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = r / group, i = r % group;
        const float inv = 1.f / sum[r];
        QT* dst = op + ((starts[b] + q0 + j) * h + g * group + i) * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<QT>(acc[r * d + c] * inv);
      }
    }
  });
}

// The new tokens' keys and values into their slots of a `CppBackend` cache [2, kv, blocks, page,
// d]: keys transposed into their page ([d, page]), values as rows. k, v: [n, kv, d] with rows
// `ld` elements apart (a slice of a fused QKV row works), slots [n]. Rounded to the cache's
// type T when it is narrower than theirs (S), to nearest even, as `Tensor.to` rounds.
template <typename T, typename S>
inline void store_kv(T* cache, int64_t kv, int64_t num_blocks, int64_t page, int64_t d,
                     const S* k, const S* v, int64_t ld, const int64_t* slots, int64_t n) {
  T* vp = cache + kv * num_blocks * page * d;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t block = slots[i] / page, u = slots[i] % page;
    for (int64_t g = 0; g < kv; ++g) {
      T* kt = cache + (g * num_blocks + block) * page * d + u;
      const S* ks = k + i * ld + g * d;
      for (int64_t c = 0; c < d; ++c) kt[c * page] = static_cast<T>(ks[c]);
      T* vt = vp + (g * num_blocks * page + slots[i]) * d;
      const S* vs = v + i * ld + g * d;
      if constexpr (std::is_same_v<T, S>) {
        std::memcpy(vt, vs, d * sizeof(T));
      } else {
        for (int64_t c = 0; c < d; ++c) vt[c] = static_cast<T>(vs[c]);
      }
    }
  }
}

}  // namespace specserve_kernels
