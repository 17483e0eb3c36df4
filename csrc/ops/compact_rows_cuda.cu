// Torch-facing CUDA entry points of apparate_C::compact_rows and compact_rows_. The checks repeat
// the contract of apparate/ops/compact_rows.py as a second line of defence for direct callers;
// the work is done by the header-only kernel in apparate/compact_rows.cuh.

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "apparate/compact_rows.cuh"
#include "ops.h"

namespace apparate {
namespace {

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "compact_rows_cuda: ", name,
              " must be on ", x.device(), "; got ", t.device());
  TORCH_CHECK(t.dim() == 2, "compact_rows_cuda: ", name, " must be 2-D (B, N); got shape ",
              t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "compact_rows_cuda: rows of ", name,
              " must be contiguous; got strides ", t.strides());
}

void compact(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& out,
             const at::Tensor& index, const at::Tensor& count) {
  TORCH_CHECK(x.is_cuda(), "compact_rows_cuda: x must be a CUDA tensor; got ", x.device());
  check_rows(x, "x", x);
  check_rows(out, "out", x);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "compact_rows_cuda: out must match x (", x.sizes(), ", ", x.scalar_type(),
              "); got ", out.sizes(), ", ", out.scalar_type());
  if (out.data_ptr() != x.data_ptr()) {
    TORCH_CHECK(at::get_overlap_status(x, out) == at::MemOverlapStatus::No,
                "compact_rows_cuda: out overlaps x without being x itself");
  } else {
    TORCH_CHECK(out.strides() == x.strides(),
                "compact_rows_cuda: out starts where x does but has other strides");
  }
  const int64_t rows = x.size(0);
  TORCH_CHECK(keep.device() == x.device() && keep.scalar_type() == at::kBool &&
                  keep.dim() == 1 && keep.size(0) == rows,
              "compact_rows_cuda: keep must be (B,) = (", rows, ",) bool on ", x.device(),
              "; got ", keep.sizes(), " ", keep.scalar_type(), " on ", keep.device());
  TORCH_CHECK(index.device() == x.device() && index.scalar_type() == at::kLong &&
                  index.dim() == 1 && index.size(0) == rows && index.is_contiguous(),
              "compact_rows_cuda: index must be contiguous (B,) = (", rows, ",) int64 on ",
              x.device());
  TORCH_CHECK(count.device() == x.device() && count.scalar_type() == at::kInt &&
                  count.numel() == 1,
              "compact_rows_cuda: count must be (1,) int32 on ", x.device());

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t element = x.element_size();
  CompactRowsArgs a{};
  a.src = x.data_ptr();
  a.dst = out.data_ptr();
  a.rows = rows;
  a.row_bytes = x.size(1) * element;
  a.src_stride = x.stride(0) * element;
  a.dst_stride = out.stride(0) * element;
  a.keep = keep.data_ptr<bool>();
  a.keep_stride = keep.stride(0);
  a.index = index.data_ptr<int64_t>();
  a.count = count.data_ptr<int32_t>();
  C10_CUDA_CHECK(launch_compact_rows(a, c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

void compact_rows_cuda(const at::Tensor& x, const at::Tensor& keep, const at::Tensor& out,
                       const at::Tensor& index, const at::Tensor& count) {
  compact(x, keep, out, index, count);
}

void compact_rows_inplace_cuda(const at::Tensor& x, const at::Tensor& keep,
                               const at::Tensor& index, const at::Tensor& count) {
  compact(x, keep, x, index, count);
}

}  // namespace apparate
