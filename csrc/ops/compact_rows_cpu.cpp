// C++ CPU kernel of apparate_C::compact_rows and compact_rows_: stable compaction of the kept
// rows of a (B, N) tensor with contiguous rows.
//
// One sequential walk over the rows: a kept row i goes to position count <= i, so moving rows in
// increasing order never overwrites a row that is still to be read, which makes the in-place
// case safe with memmove. Rows already in place are not copied.

#include <ATen/ATen.h>

#include <cstring>

#include "compact_rows_args.h"
#include "ops.h"

namespace apparate {

void compact_rows_cpu(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& out,
                      const at::Tensor& index, const at::Tensor& count) {
  check_compact_rows("compact_rows_cpu", at::kCPU, x, keep, out, index, count);
  const int64_t rows = x.size(0);
  const int64_t row_bytes = x.size(1) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t src_stride = x.stride(0) * x.element_size();
  const int64_t dst_stride = out.stride(0) * out.element_size();
  const bool in_place = src == dst;
  at::Tensor keep_c = keep.contiguous();
  const bool* keep_ptr = keep_c.data_ptr<bool>();
  int64_t* index_ptr = index.data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (!keep_ptr[i]) continue;
    if (!(in_place && kept == i)) {
      std::memmove(dst + kept * dst_stride, src + i * src_stride, row_bytes);
    }
    index_ptr[kept++] = i;
  }
  for (int64_t j = kept; j < rows; ++j) index_ptr[j] = -1;
  *count.data_ptr<int32_t>() = static_cast<int32_t>(kept);
}

void compact_rows_inplace_cpu(const at::Tensor& x, const at::Tensor& keep,
                              const at::Tensor& index, const at::Tensor& count) {
  compact_rows_cpu(x, keep, x, index, count);
}

}  // namespace apparate
