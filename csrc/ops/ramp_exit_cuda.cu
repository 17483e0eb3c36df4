// Torch-facing CUDA entry point of apparate_C::ramp_exit. The checks repeat the contract of
// apparate/ops/ramp_exit.py (_check) as a second line of defence for direct callers; the work is
// done by the header-only kernels in apparate/ramp_exit.cuh on the current stream, with a
// workspace from the caching allocator, so the op never waits for the device and can be
// captured in a CUDA graph.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "apparate/ramp_exit.cuh"
#include "ops.h"

namespace apparate {
namespace {

RampPool parse_pool(std::string_view pool) {
  if (pool == "cls") return RampPool::kCls;
  if (pool == "mean") return RampPool::kMean;
  if (pool == "last") return RampPool::kLast;
  if (pool == "avg") return RampPool::kAvg;
  TORCH_CHECK(pool == "none", "ramp_exit_cuda: pool must be cls, mean, last, avg or none; got '",
              pool, "'");
  return RampPool::kNone;
}

RampMetric parse_metric(std::string_view metric) {
  if (metric == "maxprob") return RampMetric::kMaxProb;
  if (metric == "margin") return RampMetric::kMargin;
  TORCH_CHECK(metric == "entropy",
              "ramp_exit_cuda: metric must be maxprob, margin or entropy; got '", metric, "'");
  return RampMetric::kEntropy;
}

RampNorm parse_norm(std::optional<std::string_view> norm) {
  if (!norm.has_value()) return RampNorm::kNone;
  if (*norm == "rms") return RampNorm::kRms;
  TORCH_CHECK(*norm == "layer", "ramp_exit_cuda: norm must be None, rms or layer; got '", *norm,
              "'");
  return RampNorm::kLayer;
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

FloatType float_type(at::ScalarType t) {
  if (t == at::kHalf) return FloatType::kFloat16;
  if (t == at::kBFloat16) return FloatType::kBFloat16;
  return FloatType::kFloat32;
}

// Calls f with std::type_identity<T> for the CUDA type T of a float32/float16/bfloat16 tensor.
template <typename F>
cudaError_t with_cuda_type(at::ScalarType t, F&& f) {
  if (t == at::kHalf) return f(std::type_identity<__half>{});
  if (t == at::kBFloat16) return f(std::type_identity<__nv_bfloat16>{});
  return f(std::type_identity<float>{});
}

void check_on(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  TORCH_CHECK(t.device() == hidden.device(), "ramp_exit_cuda: ", name, " must be on ",
              hidden.device(), " (the device of hidden); got ", t.device());
}

}  // namespace

RampExitResult ramp_exit_cuda(APPARATE_RAMP_EXIT_ARGS) {
  const RampPool pool_kind = parse_pool(pool);
  const RampMetric metric_kind = parse_metric(metric);
  const RampNorm norm_kind = parse_norm(norm);

  TORCH_CHECK(hidden.is_cuda(), "ramp_exit_cuda: hidden must be a CUDA tensor; got ",
              hidden.device());
  TORCH_CHECK(is_float_type(hidden.scalar_type()),
              "ramp_exit_cuda: hidden must be float32, float16 or bfloat16; got ",
              hidden.scalar_type());
  const int64_t rank = pool_kind == RampPool::kAvg ? 4 : pool_kind == RampPool::kNone ? 2 : 3;
  TORCH_CHECK(hidden.dim() == rank, "ramp_exit_cuda: hidden must have ", rank,
              " dims for pool '", pool, "'; got shape ", hidden.sizes());
  const bool over_tokens =
      pool_kind == RampPool::kCls || pool_kind == RampPool::kMean || pool_kind == RampPool::kLast;
  TORCH_CHECK(!over_tokens || hidden.size(1) >= 1,
              "ramp_exit_cuda: hidden must have at least one token; got shape ", hidden.sizes());
  const int64_t batch = hidden.size(0);
  const int64_t features = over_tokens ? hidden.size(2) : hidden.size(1);

  check_on(weight, "weight", hidden);
  TORCH_CHECK(is_float_type(weight.scalar_type()) && weight.dim() == 2 &&
                  weight.size(1) == features && weight.size(0) >= 2,
              "ramp_exit_cuda: weight must be (K >= 2, H = ", features,
              ") float32, float16 or bfloat16; got ", weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) <= 1 || weight.stride(1) == 1,
              "ramp_exit_cuda: weight rows must be contiguous; got strides ", weight.strides());
  const int64_t classes = weight.size(0);
  if (bias.has_value()) {
    check_on(*bias, "bias", hidden);
    TORCH_CHECK(is_float_type(bias->scalar_type()) && bias->dim() == 1 &&
                    bias->size(0) == classes,
                "ramp_exit_cuda: bias must be (K,) = (", classes, ",) float; got ", bias->sizes(),
                " ", bias->scalar_type());
  }
  check_on(threshold, "threshold", hidden);
  TORCH_CHECK(threshold.scalar_type() == at::kFloat && threshold.numel() == 1,
              "ramp_exit_cuda: threshold must be a 0-dim float32 tensor; got ", threshold.sizes(),
              " ", threshold.scalar_type());
  if (mask.has_value()) {
    TORCH_CHECK(pool_kind == RampPool::kMean || pool_kind == RampPool::kLast,
                "ramp_exit_cuda: mask is only used with pool mean or last; got pool '", pool, "'");
    check_on(*mask, "mask", hidden);
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 &&
                    mask->size(0) == batch && mask->size(1) == hidden.size(1),
                "ramp_exit_cuda: mask must be (B, T) bool; got ", mask->sizes(), " ",
                mask->scalar_type());
  }
  if (alive.has_value()) {
    check_on(*alive, "alive", hidden);
    TORCH_CHECK(alive->scalar_type() == at::kBool && alive->dim() == 1 && alive->size(0) == batch,
                "ramp_exit_cuda: alive must be (B,) bool; got ", alive->sizes(), " ",
                alive->scalar_type());
  }
  TORCH_CHECK(norm_kind == RampNorm::kNone || norm_weight.has_value(),
              "ramp_exit_cuda: norm '", *norm, "' needs norm_weight of shape (H,)");
  TORCH_CHECK(norm_kind != RampNorm::kNone || !norm_weight.has_value(),
              "ramp_exit_cuda: norm_weight is given but norm is None");
  if (norm_weight.has_value()) {
    check_on(*norm_weight, "norm_weight", hidden);
    TORCH_CHECK(is_float_type(norm_weight->scalar_type()) && norm_weight->dim() == 1 &&
                    norm_weight->size(0) == features,
                "ramp_exit_cuda: norm_weight must be (H,) = (", features, ",) float; got ",
                norm_weight->sizes(), " ", norm_weight->scalar_type());
  }
  TORCH_CHECK(norm_eps > 0, "ramp_exit_cuda: norm_eps must be positive; got ", norm_eps);
  if (logits_out.has_value()) {
    check_on(*logits_out, "logits_out", hidden);
    TORCH_CHECK(logits_out->scalar_type() == at::kFloat && logits_out->dim() == 2 &&
                    logits_out->size(0) == batch && logits_out->size(1) == classes &&
                    logits_out->is_contiguous(),
                "ramp_exit_cuda: logits_out must be contiguous (B, K) = (", batch, ", ", classes,
                ") float32; got ", logits_out->sizes(), " ", logits_out->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::TensorOptions on_device = hidden.options();
  at::Tensor confidence = at::empty({batch}, on_device.dtype(at::kFloat));
  at::Tensor prediction = at::empty({batch}, on_device.dtype(at::kLong));
  at::Tensor exit = at::empty({batch}, on_device.dtype(at::kBool));
  if (batch == 0) return {confidence, prediction, exit};

  int64_t sizes[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};
  for (int64_t d = 0; d < hidden.dim(); ++d) {
    sizes[d] = hidden.size(d);
    strides[d] = hidden.stride(d);
  }
  RampExitPlan plan{};
  const cudaError_t planned = plan_ramp_exit(pool_kind, sizes, classes, &plan);
  TORCH_CHECK(planned != cudaErrorInvalidValue, "ramp_exit_cuda: feature size H = ", features,
              " does not fit the shared memory of this GPU (at most ", plan.max_features,
              "); use the Triton or reference backend for it");
  C10_CUDA_CHECK(planned);
  const at::Tensor workspace =
      at::empty({int64_t(plan.workspace_bytes)}, on_device.dtype(at::kByte));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t launched = with_cuda_type(hidden.scalar_type(), [&](auto hidden_tag) {
    return with_cuda_type(weight.scalar_type(), [&](auto weight_tag) {
      using TH = typename decltype(hidden_tag)::type;
      using TW = typename decltype(weight_tag)::type;
      RampExitArgs<TH, TW> a{};
      a.hidden = static_cast<const TH*>(hidden.data_ptr());
      for (int d = 0; d < 4; ++d) {
        a.sizes[d] = sizes[d];
        a.strides[d] = strides[d];
      }
      a.pool = pool_kind;
      if (mask.has_value()) {
        a.mask = mask->data_ptr<bool>();
        a.mask_strides[0] = mask->stride(0);
        a.mask_strides[1] = mask->stride(1);
      }
      if (alive.has_value()) {
        a.alive = alive->data_ptr<bool>();
        a.alive_stride = alive->stride(0);
      }
      a.norm = norm_kind;
      if (norm_weight.has_value()) {
        a.norm_weight = norm_weight->data_ptr();
        a.norm_weight_type = float_type(norm_weight->scalar_type());
        a.norm_weight_stride = norm_weight->stride(0);
      }
      a.norm_eps = float(norm_eps);
      a.weight = static_cast<const TW*>(weight.data_ptr());
      a.classes = classes;
      a.weight_row_stride = weight.stride(0);
      if (bias.has_value()) {
        a.bias = bias->data_ptr();
        a.bias_type = float_type(bias->scalar_type());
        a.bias_stride = bias->stride(0);
      }
      a.metric = metric_kind;
      a.threshold = threshold.data_ptr<float>();
      a.logits = logits_out.has_value() ? logits_out->data_ptr<float>() : nullptr;
      a.confidence = confidence.data_ptr<float>();
      a.prediction = prediction.data_ptr<int64_t>();
      a.exit = exit.data_ptr<bool>();
      return launch_ramp_exit(a, plan, workspace.data_ptr(), stream);
    });
  });
  C10_CUDA_CHECK(launched);
  return {confidence, prediction, exit};
}

}  // namespace apparate
