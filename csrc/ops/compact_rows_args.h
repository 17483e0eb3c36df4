// Argument checks of apparate_C::compact_rows and compact_rows_, one set for their CPU and CUDA
// kernels. They repeat the contract of apparate/ops/compact_rows.py as a second line of defence
// for direct callers of the ops.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

namespace apparate {

// `op` names the kernel in messages ("compact_rows_cpu", "compact_rows_cuda"); `device` is the
// device type it runs on.
inline void check_compact_rows(const char* op, c10::DeviceType device, const at::Tensor& x,
                               const at::Tensor& keep, const at::Tensor& out,
                               const at::Tensor& index, const at::Tensor& count) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", c10::DeviceTypeName(device),
              " tensor; got ", x.device());
  const auto check_rows = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), "; got ",
                t.device());
    TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (B, N); got shape ", t.sizes());
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": rows of ", name,
                " must be contiguous; got strides ", t.strides());
  };
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), op,
              ": out must match x (", x.sizes(), ", ", x.scalar_type(), "); got ", out.sizes(),
              ", ", out.scalar_type());
  // Empty tensors have no data pointer to compare. Rows with gaps between them are too hard for
  // get_overlap_status; such an out is accepted when it does not share x's storage at all.
  if (x.numel() > 0 && out.data_ptr() == x.data_ptr()) {
    TORCH_CHECK(out.strides() == x.strides(), op,
                ": out starts where x does but has other strides");
  } else if (x.numel() > 0) {
    const at::MemOverlapStatus overlap = at::get_overlap_status(x, out);
    TORCH_CHECK(overlap == at::MemOverlapStatus::No ||
                    (overlap == at::MemOverlapStatus::TooHard &&
                     !out.storage().is_alias_of(x.storage())),
                op, ": out overlaps x without being x itself");
  }
  const int64_t rows = x.size(0);
  TORCH_CHECK(keep.device() == x.device() && keep.scalar_type() == at::kBool &&
                  keep.dim() == 1 && keep.size(0) == rows,
              op, ": keep must be (B,) = (", rows, ",) bool on ", x.device(), "; got ",
              keep.sizes(), " ", keep.scalar_type(), " on ", keep.device());
  TORCH_CHECK(index.device() == x.device() && index.scalar_type() == at::kLong &&
                  index.dim() == 1 && index.size(0) == rows && index.is_contiguous(),
              op, ": index must be contiguous (B,) = (", rows, ",) int64 on ", x.device());
  TORCH_CHECK(count.device() == x.device() && count.scalar_type() == at::kInt &&
                  count.numel() == 1,
              op, ": count must be (1,) int32 on ", x.device());
}

}  // namespace apparate
