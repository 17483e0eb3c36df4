// Torch-facing CUDA entry point of apparate_C::ramp_exit. After the checks of ramp_exit_args.h the
// work is done by the header-only kernels in apparate/ramp_exit.cuh on the current stream, with a
// workspace from the caching allocator, so the op never waits for the device and can be captured
// in a CUDA graph.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>
#include <type_traits>

#include "apparate/ramp_exit.cuh"
#include "ops.h"
#include "ramp_exit_args.h"

namespace apparate {
namespace {

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

}  // namespace

RampExitResult ramp_exit_cuda(APPARATE_RAMP_EXIT_ARGS) {
  const RampExitCall call = check_ramp_exit("ramp_exit_cuda", at::kCUDA, APPARATE_RAMP_EXIT_ARG_NAMES);
  const int64_t batch = call.batch;
  const int64_t classes = call.classes;

  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor confidence, prediction, exit;
  std::tie(confidence, prediction, exit) = empty_ramp_exit_result(hidden, batch);
  if (batch == 0) return {confidence, prediction, exit};

  int64_t sizes[4] = {0, 0, 0, 0};
  int64_t strides[4] = {0, 0, 0, 0};
  for (int64_t d = 0; d < hidden.dim(); ++d) {
    sizes[d] = hidden.size(d);
    strides[d] = hidden.stride(d);
  }
  RampExitPlan plan{};
  const cudaError_t planned = plan_ramp_exit(call.pool, sizes, classes, &plan);
  TORCH_CHECK(planned != cudaErrorInvalidValue, "ramp_exit_cuda: feature size H = ", call.features,
              " does not fit the shared memory of this GPU (at most ", plan.max_features,
              "); use the Triton or reference backend for it");
  C10_CUDA_CHECK(planned);
  const at::Tensor workspace =
      at::empty({int64_t(plan.workspace_bytes)}, hidden.options().dtype(at::kByte));

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
      a.pool = call.pool;
      if (mask.has_value()) {
        a.mask = mask->data_ptr<bool>();
        a.mask_strides[0] = mask->stride(0);
        a.mask_strides[1] = mask->stride(1);
      }
      if (alive.has_value()) {
        a.alive = alive->data_ptr<bool>();
        a.alive_stride = alive->stride(0);
      }
      a.norm = call.norm;
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
      a.metric = call.metric;
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
