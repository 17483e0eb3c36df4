// Torch-facing entry points of the apparate_C ops. Schemas live in csrc/torch_bindings.cpp;
// semantics are defined by the references in apparate/ops/ramp_exit.py and compact_rows.py.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace apparate {

using RampExitResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

#define APPARATE_RAMP_EXIT_ARGS                                                              \
  const at::Tensor &hidden, const at::Tensor &weight, const std::optional<at::Tensor> &bias, \
      const at::Tensor &threshold, std::string_view pool, std::string_view metric,           \
      const std::optional<at::Tensor> &mask, const std::optional<at::Tensor> &alive,         \
      std::optional<std::string_view> norm, const std::optional<at::Tensor> &norm_weight,    \
      double norm_eps, const std::optional<at::Tensor> &logits_out

// The same parameters by name, for passing them on (in APPARATE_RAMP_EXIT_ARGS's order).
#define APPARATE_RAMP_EXIT_ARG_NAMES \
  hidden, weight, bias, threshold, pool, metric, mask, alive, norm, norm_weight, norm_eps, logits_out

RampExitResult ramp_exit_cpu(APPARATE_RAMP_EXIT_ARGS);
RampExitResult ramp_exit_cuda(APPARATE_RAMP_EXIT_ARGS);

// x, out: (B, N) with contiguous rows; out is x itself or does not overlap it.
void compact_rows_cpu(const at::Tensor &x, const at::Tensor &keep, const at::Tensor &out,
                      const at::Tensor &index, const at::Tensor &count);
void compact_rows_inplace_cpu(const at::Tensor &x, const at::Tensor &keep, const at::Tensor &index,
                              const at::Tensor &count);
void compact_rows_cuda(const at::Tensor &x, const at::Tensor &keep, const at::Tensor &out,
                       const at::Tensor &index, const at::Tensor &count);
void compact_rows_inplace_cuda(const at::Tensor &x, const at::Tensor &keep,
                               const at::Tensor &index, const at::Tensor &count);

}  // namespace apparate
