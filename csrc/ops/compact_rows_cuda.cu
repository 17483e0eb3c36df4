// Torch-facing CUDA entry points of apparate_C::compact_rows and compact_rows_. After the checks of
// compact_rows_args.h the work is done by the header-only kernel in apparate/compact_rows.cuh.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "apparate/compact_rows.cuh"
#include "compact_rows_args.h"
#include "ops.h"

namespace apparate {

void compact_rows_cuda(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& out,
                       const at::Tensor& index, const at::Tensor& count) {
  check_compact_rows("compact_rows_cuda", at::kCUDA, x, keep, out, index, count);

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t element = x.element_size();
  CompactRowsArgs a{};
  a.src = x.data_ptr();
  a.dst = out.data_ptr();
  a.rows = x.size(0);
  a.row_bytes = x.size(1) * element;
  a.src_stride = x.stride(0) * element;
  a.dst_stride = out.stride(0) * element;
  a.keep = keep.data_ptr<bool>();
  a.keep_stride = keep.stride(0);
  a.index = index.data_ptr<int64_t>();
  a.count = count.data_ptr<int32_t>();
  C10_CUDA_CHECK(launch_compact_rows(a, c10::cuda::getCurrentCUDAStream().stream()));
}

void compact_rows_inplace_cuda(const at::Tensor& x, const at::Tensor& keep,
                               const at::Tensor& index, const at::Tensor& count) {
  compact_rows_cuda(x, keep, x, index, count);
}

}  // namespace apparate
