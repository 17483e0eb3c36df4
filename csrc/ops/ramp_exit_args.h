// Argument parsing and checks of apparate_C::ramp_exit, one set for its CPU and CUDA kernels.
// The checks repeat the contract of apparate/ops/ramp_exit.py as a second line of defence for
// direct callers of the op.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "apparate/ramp_kinds.h"
#include "ops.h"

namespace apparate {

// A checked call: its parsed strings and sizes. hidden is (B, T, H), (B, C, Hh, Ww) or (B, H).
struct RampExitCall {
  RampPool pool;
  RampMetric metric;
  RampNorm norm;
  int64_t batch;     // B
  int64_t features;  // H (C for avg)
  int64_t classes;   // K
};

// `op` names the kernel in messages: "ramp_exit_cpu", "ramp_exit_cuda".
inline RampPool parse_ramp_pool(const char* op, std::string_view pool) {
  if (pool == "cls") return RampPool::kCls;
  if (pool == "mean") return RampPool::kMean;
  if (pool == "last") return RampPool::kLast;
  if (pool == "avg") return RampPool::kAvg;
  TORCH_CHECK(pool == "none", op, ": pool must be cls, mean, last, avg or none; got '", pool,
              "'");
  return RampPool::kNone;
}

inline RampMetric parse_ramp_metric(const char* op, std::string_view metric) {
  if (metric == "maxprob") return RampMetric::kMaxProb;
  if (metric == "margin") return RampMetric::kMargin;
  TORCH_CHECK(metric == "entropy", op, ": metric must be maxprob, margin or entropy; got '",
              metric, "'");
  return RampMetric::kEntropy;
}

inline RampNorm parse_ramp_norm(const char* op, std::optional<std::string_view> norm) {
  if (!norm.has_value()) return RampNorm::kNone;
  if (*norm == "rms") return RampNorm::kRms;
  TORCH_CHECK(*norm == "layer", op, ": norm must be None, rms or layer; got '", *norm, "'");
  return RampNorm::kLayer;
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// `device`: the device type the calling kernel runs on.
inline RampExitCall check_ramp_exit(const char* op, c10::DeviceType device,
                                    APPARATE_RAMP_EXIT_ARGS) {
  TORCH_CHECK(hidden.device().type() == device, op, ": hidden must be a ",
              c10::DeviceTypeName(device), " tensor; got ", hidden.device());
  RampExitCall call{};
  call.pool = parse_ramp_pool(op, pool);
  call.metric = parse_ramp_metric(op, metric);
  call.norm = parse_ramp_norm(op, norm);
  const auto check_on = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == hidden.device(), op, ": ", name, " must be on ", hidden.device(),
                " (the device of hidden); got ", t.device());
  };

  TORCH_CHECK(is_float_type(hidden.scalar_type()), op,
              ": hidden must be float32, float16 or bfloat16; got ", hidden.scalar_type());
  const int64_t rank = ramp_hidden_rank(call.pool);
  TORCH_CHECK(hidden.dim() == rank, op, ": hidden must have ", rank, " dims for pool '", pool,
              "'; got shape ", hidden.sizes());
  const bool over_tokens = ramp_pools_tokens(call.pool);
  TORCH_CHECK(!over_tokens || hidden.size(1) >= 1, op,
              ": hidden must have at least one token; got shape ", hidden.sizes());
  call.batch = hidden.size(0);
  call.features = over_tokens ? hidden.size(2) : hidden.size(1);

  check_on(weight, "weight");
  TORCH_CHECK(is_float_type(weight.scalar_type()) && weight.dim() == 2 &&
                  weight.size(1) == call.features && weight.size(0) >= 2,
              op, ": weight must be (K >= 2, H = ", call.features,
              ") float32, float16 or bfloat16; got ", weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) <= 1 || weight.stride(1) == 1, op,
              ": weight rows must be contiguous; got strides ", weight.strides());
  call.classes = weight.size(0);
  if (bias.has_value()) {
    check_on(*bias, "bias");
    TORCH_CHECK(is_float_type(bias->scalar_type()) && bias->dim() == 1 &&
                    bias->size(0) == call.classes,
                op, ": bias must be (K,) = (", call.classes, ",) float; got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  check_on(threshold, "threshold");
  TORCH_CHECK(threshold.scalar_type() == at::kFloat && threshold.numel() == 1, op,
              ": threshold must be a 0-dim float32 tensor; got ", threshold.sizes(), " ",
              threshold.scalar_type());
  if (mask.has_value()) {
    TORCH_CHECK(call.pool == RampPool::kMean || call.pool == RampPool::kLast, op,
                ": mask is only used with pool mean or last; got pool '", pool, "'");
    check_on(*mask, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 &&
                    mask->size(0) == call.batch && mask->size(1) == hidden.size(1),
                op, ": mask must be (B, T) bool; got ", mask->sizes(), " ", mask->scalar_type());
  }
  if (alive.has_value()) {
    check_on(*alive, "alive");
    TORCH_CHECK(alive->scalar_type() == at::kBool && alive->dim() == 1 &&
                    alive->size(0) == call.batch,
                op, ": alive must be (B,) bool; got ", alive->sizes(), " ", alive->scalar_type());
  }
  TORCH_CHECK(call.norm == RampNorm::kNone || norm_weight.has_value(), op, ": norm '", *norm,
              "' needs norm_weight of shape (H,)");
  TORCH_CHECK(call.norm != RampNorm::kNone || !norm_weight.has_value(), op,
              ": norm_weight is given but norm is None");
  if (norm_weight.has_value()) {
    check_on(*norm_weight, "norm_weight");
    TORCH_CHECK(is_float_type(norm_weight->scalar_type()) && norm_weight->dim() == 1 &&
                    norm_weight->size(0) == call.features,
                op, ": norm_weight must be (H,) = (", call.features, ",) float; got ",
                norm_weight->sizes(), " ", norm_weight->scalar_type());
  }
  TORCH_CHECK(norm_eps > 0, op, ": norm_eps must be positive; got ", norm_eps);
  if (logits_out.has_value()) {
    check_on(*logits_out, "logits_out");
    TORCH_CHECK(logits_out->scalar_type() == at::kFloat && logits_out->dim() == 2 &&
                    logits_out->size(0) == call.batch && logits_out->size(1) == call.classes &&
                    logits_out->is_contiguous(),
                op, ": logits_out must be contiguous (B, K) = (", call.batch, ", ", call.classes,
                ") float32; got ", logits_out->sizes(), " ", logits_out->scalar_type());
  }
  return call;
}

// The op's outputs, uninitialised, on hidden's device: confidence, prediction, exit.
inline RampExitResult empty_ramp_exit_result(const at::Tensor& hidden, int64_t batch) {
  const at::TensorOptions on_device = hidden.options();
  return {at::empty({batch}, on_device.dtype(at::kFloat)),
          at::empty({batch}, on_device.dtype(at::kLong)),
          at::empty({batch}, on_device.dtype(at::kBool))};
}

}  // namespace apparate
