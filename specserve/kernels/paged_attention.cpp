// Paged attention on the CPU: decode steps, verify windows and prefill chunks.
//
// Reads each sequence's keys and values in place, page by page, from the cache layout of
// `specserve.models.attention.CppBackend`: one tensor [2, kv, num_blocks, page_size, d] per
// layer whose key pages are stored transposed ([d, page_size]; `store_kv` writes them), so that
// scores are vector products over 16 keys at a time. Nothing is gathered and no mask is built: query j of a sequence with Q new tokens and
// L keys sees keys 0 .. L - Q + j, and an online softmax runs over one tile of keys at a time.
// One work item is a (sequence, block of up to 64 queries, kv head): its rows (the queries x
// the heads of the group) read each key and value row of the group once, from L1, for all of
// them. Items are shared out to threads in runs of about equal work. The cache may be 16-bit
// under float32 queries (`--kv-cache-dtype bfloat16`): half the bytes read, the same float32 sums.


#include "kernels.h"
#include "ops.h"

namespace specserve_kernels {

void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache,
                     const at::Tensor& block_tables, const at::Tensor& q_starts,
                     const at::Tensor& q_lens, const at::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && cache.size(0) == 2,
              "paged_attention: q [N, h, d] and cache [2, kv, blocks, page, d]");
  TORCH_CHECK(q.is_contiguous() && cache.is_contiguous() && out.is_contiguous(),
              "paged_attention: q, cache and out must be contiguous");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() &&
                  (q.scalar_type() == cache.scalar_type() || q.scalar_type() == at::kFloat),
              "paged_attention: q and out share a dtype, and the cache has it too or q is float32");
  TORCH_CHECK(q.size(1) % cache.size(1) == 0 && q.size(2) == cache.size(4),
              "paged_attention: heads must be a multiple of kv heads, head dims equal");
  for (const auto* t : {&block_tables, &q_starts, &q_lens, &kv_lens}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(),
                "paged_attention: index tensors must be contiguous int64 on the CPU");
  }
  const int64_t d = q.size(2);
  auto run = [&](auto qtag, auto ctag) {
    using QT = decltype(qtag);
    using CT = decltype(ctag);
    if (d == 64) {
      attend<QT, CT, 64>(out, q, cache, block_tables, q_starts, q_lens, kv_lens, scale);
    } else if (d == 128) {
      attend<QT, CT, 128>(out, q, cache, block_tables, q_starts, q_lens, kv_lens, scale);
    } else {
      attend<QT, CT, 0>(out, q, cache, block_tables, q_starts, q_lens, kv_lens, scale);
    }
  };
  const auto qt = q.scalar_type(), ct = cache.scalar_type();
  if (qt == at::kFloat && ct == at::kFloat) {
    run(float{}, float{});
  } else if (qt == at::kFloat && ct == at::kBFloat16) {
    run(float{}, c10::BFloat16{});
  } else if (qt == at::kFloat && ct == at::kHalf) {
    run(float{}, c10::Half{});
  } else if (qt == at::kBFloat16 && ct == at::kBFloat16) {
    run(c10::BFloat16{}, c10::BFloat16{});
  } else if (qt == at::kHalf && ct == at::kHalf) {
    run(c10::Half{}, c10::Half{});
  } else {
    TORCH_CHECK(false, "paged_attention: q ", qt, " with a ", ct, " cache is not supported");
  }
}

// k, v [N, kv, d] into `slots` [N] of the cache: keys transposed into their pages (rounded to
// a 16-bit cache's type when k, v are float32).
void store_kv_op(at::Tensor cache, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& slots) {
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous(),
              "store_kv: a contiguous cache [2, kv, blocks, page, d]");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == cache.size(1) &&
                  k.size(2) == cache.size(4) && k.is_contiguous() && v.is_contiguous(),
              "store_kv: contiguous k, v [N, kv, d] of the cache's heads");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == cache.scalar_type() || k.scalar_type() == at::kFloat),
              "store_kv: k and v share a dtype, and the cache has it too or k is float32");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                  slots.device().is_cpu() && slots.size(0) == k.size(0),
              "store_kv: slots [N] contiguous int64 on the CPU");
  const int64_t kv = cache.size(1), blocks = cache.size(2), page = cache.size(3), d = cache.size(4);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.size(0); ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < blocks * page, "store_kv: slot ", slot[i], " out of range");
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (k.scalar_type() == at::kFloat) {
      store_kv(cache.data_ptr<T>(), kv, blocks, page, d, k.data_ptr<float>(),
               v.data_ptr<float>(), kv * d, slot, k.size(0));
    } else {
      store_kv(cache.data_ptr<T>(), kv, blocks, page, d, k.data_ptr<T>(), v.data_ptr<T>(),
               kv * d, slot, k.size(0));
    }
  };
  switch (cache.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "store_kv: dtype ", cache.scalar_type(), " is not supported");
  }
}

}  // namespace specserve_kernels
