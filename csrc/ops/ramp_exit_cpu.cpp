// C++ CPU kernel of apparate_C::ramp_exit: pool -> (norm) -> linear -> confidence -> exit,
// in one pass per row with no intermediate tensors beyond one logits chunk.
//
// Small heads (the NLP case, K of a few classes) compute their dot products here; large heads
// hand each chunk of K to the BLAS matrix product, whose speed no hand loop matches, and fuse
// everything after it (bias, softmax statistics, top-2, argmax, exit) into one pass per chunk.
// The hot loops are compiled for AVX-512, AVX2 and a baseline and chosen at load time.

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "ramp_exit_args.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define APPARATE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define APPARATE_MULTIVERSION
#endif

namespace apparate {
namespace {

// Heads of at most this many multiply-adds per row are evaluated by hand-written dot products;
// above it a BLAS call is cheaper than its dispatch overhead.
constexpr int64_t kSmallHeadMacs = 1 << 15;
// Logits are produced and reduced this many columns at a time, so memory stays bounded for
// LM-sized heads while each BLAS call remains large.
constexpr int64_t kChunk = 2048;

APPARATE_MULTIVERSION
float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float total = 0.f;
  for (int j = 0; j < 16; ++j) total += acc[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

APPARATE_MULTIVERSION
void add_into(float* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

APPARATE_MULTIVERSION
float sum(const float* x, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j];
  }
  float total = 0.f;
  for (int j = 0; j < 16; ++j) total += acc[j];
  for (; i < n; ++i) total += x[i];
  return total;
}

// Maximum of x[0, n) and whether any element is NaN or infinite.
APPARATE_MULTIVERSION
float max_and_finite(const float* x, int64_t n, bool* finite) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float best[16];
  int bad[16] = {0};
  for (int j = 0; j < 16; ++j) best[j] = -kInf;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) {
      float v = x[i + j];
      best[j] = v > best[j] ? v : best[j];
      bad[j] |= !(std::fabs(v) <= std::numeric_limits<float>::max());
    }
  }
  float top = -kInf;
  int any_bad = 0;
  for (int j = 0; j < 16; ++j) {
    top = best[j] > top ? best[j] : top;
    any_bad |= bad[j];
  }
  for (; i < n; ++i) {
    top = x[i] > top ? x[i] : top;
    any_bad |= !(std::fabs(x[i]) <= std::numeric_limits<float>::max());
  }
  *finite = !any_bad;
  return top;
}

APPARATE_MULTIVERSION
float max_of(const float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) top = x[i] > top ? x[i] : top;
  return top;
}

// exp(x) for x <= 0 by Cody-Waite range reduction and a degree-7 polynomial (relative error
// about 1e-7), written branch-free so the loops around it vectorise; exp(x < -87) is taken as 0.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  float clamped = x < -87.0f ? -87.0f : x;
  float n = std::floor(clamped * kLog2e + 0.5f);
  float r = clamped - n * kLn2Hi - n * kLn2Lo;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.f : p * scale;
}

// sum exp(x - top) and sum exp(x - top) * (x - top) over x[0, n), x <= top.
APPARATE_MULTIVERSION
void exp_sums(const float* x, int64_t n, float top, float* sum_exp, float* sum_weighted) {
  float s[16] = {0.f};
  float u[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) {
      float z = x[i + j] - top;
      float e = exp_nonpositive(z);
      s[j] += e;
      u[j] += e * z;
    }
  }
  float total_s = 0.f, total_u = 0.f;
  for (int j = 0; j < 16; ++j) {
    total_s += s[j];
    total_u += u[j];
  }
  for (; i < n; ++i) {
    float z = x[i] - top;
    float e = exp_nonpositive(z);
    total_s += e;
    total_u += e * z;
  }
  *sum_exp = total_s;
  *sum_weighted = total_u;
}

// Running softmax statistics of one row over the chunks of K seen so far.
struct RowStats {
  // Whole row of fewer than 16 logits (small classifiers): plain scalar loops, no vector set-up.
  void set_small(const float* logits, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
      const float v = logits[k];
      if (!std::isfinite(v)) {
        finite = false;
        return;
      }
      if (v > top) second = top, top = v, argmax = k;
      else if (v > second) second = v;
    }
    for (int64_t k = 0; k < n; ++k) {
      const float z = logits[k] - top;
      const float e = std::exp(z);
      sum_exp += e;
      sum_weighted += e * z;
    }
  }

  float top = -std::numeric_limits<float>::infinity();
  float second = -std::numeric_limits<float>::infinity();
  float sum_exp = 0.f;       // sum exp(l - top)
  float sum_weighted = 0.f;  // sum exp(l - top) * (l - top)
  int64_t argmax = -1;
  bool finite = true;

  void add_chunk(const float* logits, int64_t n, int64_t offset) {
    if (!finite) return;
    if (argmax < 0 && n < 16) return set_small(logits, n);
    bool chunk_finite = true;
    float chunk_top = max_and_finite(logits, n, &chunk_finite);
    if (!chunk_finite) {
      finite = false;
      return;
    }
    int64_t chunk_arg = 0;
    while (logits[chunk_arg] != chunk_top) ++chunk_arg;
    float chunk_second =
        std::max(max_of(logits, chunk_arg), max_of(logits + chunk_arg + 1, n - chunk_arg - 1));
    float chunk_s, chunk_u;
    exp_sums(logits, n, chunk_top, &chunk_s, &chunk_u);
    if (argmax < 0) {
      top = chunk_top, second = chunk_second, sum_exp = chunk_s, sum_weighted = chunk_u;
      argmax = offset + chunk_arg;
    } else if (chunk_top > top) {
      float shift = top - chunk_top;
      float scale = std::exp(shift);
      sum_weighted = chunk_u + scale * (sum_weighted + shift * sum_exp);
      sum_exp = chunk_s + scale * sum_exp;
      second = std::max(top, chunk_second);
      top = chunk_top;
      argmax = offset + chunk_arg;
    } else {
      float shift = chunk_top - top;
      float scale = std::exp(shift);
      sum_weighted += scale * (chunk_u + shift * chunk_s);
      sum_exp += scale * chunk_s;
      second = std::max(second, chunk_top);
    }
  }
};

// out[c] = sum of plane c's `len` contiguous elements, planes `stride` apart. Narrow types are
// converted on the fly, sixteen planes side by side so the adds do not form one dependent chain.
template <typename T>
void sum_planes(const T* x, int64_t planes, int64_t len, int64_t stride, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    // float32 planes reduce in place with the vectorised sum, no conversion needed.
    for (int64_t c = 0; c < planes; ++c) out[c] = sum(x + c * stride, len);
    return;
  }
  constexpr int kLanes = 16;
  int64_t c = 0;
  for (; c + kLanes <= planes; c += kLanes) {
    float acc[kLanes] = {0.f};
    for (int64_t p = 0; p < len; ++p) {
      for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<float>(x[(c + j) * stride + p]);
    }
    for (int j = 0; j < kLanes; ++j) out[c + j] = acc[j];
  }
  for (; c < planes; ++c) {
    float acc = 0.f;
    for (int64_t p = 0; p < len; ++p) acc += static_cast<float>(x[c * stride + p]);
    out[c] = acc;
  }
}

template <typename T>
void pool_row(const T* row, RampPool pool, const at::IntArrayRef sizes,
              const at::IntArrayRef strides, const bool* mask_row, float* out, float* scratch) {
  if (pool == RampPool::kAvg) {
    const int64_t channels = sizes[1], height = sizes[2], width = sizes[3];
    const int64_t sc = strides[1], sy = strides[2], sx = strides[3];
    const int64_t spatial = height * width;
    if (sx == 1 && sy == width) {
      sum_planes(row, channels, spatial, sc, out);
      for (int64_t c = 0; c < channels; ++c) out[c] /= static_cast<float>(spatial);
      return;
    }
    std::fill(out, out + channels, 0.f);
    for (int64_t y = 0; y < height; ++y) {
      for (int64_t x = 0; x < width; ++x) {
        const T* pixel = row + y * sy + x * sx;
        for (int64_t c = 0; c < channels; ++c) scratch[c] = static_cast<float>(pixel[c * sc]);
        add_into(out, scratch, channels);
      }
    }
    for (int64_t c = 0; c < channels; ++c) out[c] /= static_cast<float>(spatial);
    return;
  }
  const bool tokens = ramp_pools_tokens(pool);
  const int64_t features = sizes[tokens ? 2 : 1];
  const int64_t sh = strides[tokens ? 2 : 1];
  auto load = [&](const T* src, float* dst) {
    if constexpr (std::is_same_v<T, float>) {
      if (sh == 1) {
        std::memcpy(dst, src, features * sizeof(float));
        return;
      }
    }
    if (sh == 1) {
      for (int64_t h = 0; h < features; ++h) dst[h] = static_cast<float>(src[h]);
    } else {
      for (int64_t h = 0; h < features; ++h) dst[h] = static_cast<float>(src[h * sh]);
    }
  };
  if (pool == RampPool::kCls || pool == RampPool::kNone) {
    load(row, out);
  } else if (pool == RampPool::kLast) {
    int64_t last = sizes[1] - 1;
    if (mask_row != nullptr) {
      last = 0;
      for (int64_t t = sizes[1] - 1; t >= 0; --t) {
        if (mask_row[t]) {
          last = t;
          break;
        }
      }
    }
    load(row + last * strides[1], out);
  } else {  // mean
    std::fill(out, out + features, 0.f);
    int64_t count = 0;
    for (int64_t t = 0; t < sizes[1]; ++t) {
      if (mask_row != nullptr && !mask_row[t]) continue;
      load(row + t * strides[1], scratch);
      add_into(out, scratch, features);
      ++count;
    }
    const float denom = static_cast<float>(std::max<int64_t>(count, 1));
    for (int64_t h = 0; h < features; ++h) out[h] /= denom;
  }
}

void normalise_row(float* x, int64_t n, RampNorm norm, const float* weight, float eps) {
  float mean = 0.f;
  if (norm == RampNorm::kLayer) {
    mean = sum(x, n) / static_cast<float>(n);
    for (int64_t i = 0; i < n; ++i) x[i] -= mean;
  }
  const float rstd = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * rstd * weight[i];
}

// A float32 view of a parameter tensor: the tensor's own memory when it already is contiguous
// float32 (the common case, no copy), else a converted copy held in `storage`.
const float* as_float(const at::Tensor& t, at::Tensor& storage) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  storage = t.to(at::kFloat).contiguous();
  return storage.data_ptr<float>();
}

}  // namespace

RampExitResult ramp_exit_cpu(APPARATE_RAMP_EXIT_ARGS) {
  const RampExitCall call = check_ramp_exit("ramp_exit_cpu", at::kCPU, APPARATE_RAMP_EXIT_ARG_NAMES);
  const int64_t batch = call.batch;
  const int64_t classes = call.classes;
  const int64_t features = call.features;

  at::Tensor confidence, prediction, exit_mask;
  std::tie(confidence, prediction, exit_mask) = empty_ramp_exit_result(hidden, batch);

  at::Tensor mask_c;
  const bool* mask_ptr = nullptr;
  if (mask.has_value()) {
    mask_c = mask->contiguous();
    mask_ptr = mask_c.data_ptr<bool>();
  }
  at::Tensor alive_c;
  const bool* alive_ptr = nullptr;
  if (alive.has_value()) {
    alive_c = alive->contiguous();
    alive_ptr = alive_c.data_ptr<bool>();
  }
  at::Tensor norm_w_storage;
  const float* norm_w =
      call.norm != RampNorm::kNone ? as_float(*norm_weight, norm_w_storage) : nullptr;

  // 1. Pool (and normalise) every row into float32. A float32 cls/none ramp over live rows
  // reads its rows straight from hidden, with no copy.
  const auto sizes = hidden.sizes();
  const auto strides = hidden.strides();
  const bool direct = (call.pool == RampPool::kCls || call.pool == RampPool::kNone) &&
                      hidden.scalar_type() == at::kFloat && hidden.stride(-1) == 1 &&
                      call.norm == RampNorm::kNone && alive_ptr == nullptr;
  const int64_t pooled_stride = direct ? strides[0] : features;
  std::unique_ptr<float[]> pooled_buf(direct ? nullptr : new float[batch * features]);
  float* pooled_ptr = direct ? hidden.data_ptr<float>() : pooled_buf.get();
  const int64_t seq = ramp_pools_tokens(call.pool) ? sizes[1] : 1;
  const int64_t scratch_len =
      call.pool == RampPool::kAvg ? std::max(sizes[2] * sizes[3], features) : features;
  if (!direct) AT_DISPATCH_V2(hidden.scalar_type(), "ramp_exit_pool", AT_WRAP([&] {
    const scalar_t* base = hidden.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> scratch(new float[scratch_len]);
      for (int64_t b = begin; b < end; ++b) {
        float* out = pooled_ptr + b * features;
        if (alive_ptr != nullptr && !alive_ptr[b]) {
          std::fill(out, out + features, 0.f);
          continue;
        }
        pool_row<scalar_t>(base + b * strides[0], call.pool, sizes, strides,
                           mask_ptr ? mask_ptr + b * seq : nullptr, out, scratch.get());
        if (call.norm != RampNorm::kNone)
          normalise_row(out, features, call.norm, norm_w, static_cast<float>(norm_eps));
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);

  // 2. Logits chunk by chunk, folded into per-row softmax statistics.
  const bool small_head = classes * features <= kSmallHeadMacs;
  const int64_t chunk = small_head ? classes : std::min(classes, kChunk);
  at::Tensor small_weight_storage, bias_storage;
  const float* small_weight = small_head ? as_float(weight, small_weight_storage) : nullptr;
  const float* bias_f = bias.has_value() ? as_float(*bias, bias_storage) : nullptr;
  float* logits_out_ptr = logits_out.has_value() ? logits_out->data_ptr<float>() : nullptr;

  std::unique_ptr<float[]> logits_buf(new float[(small_head ? 1 : 2) * batch * chunk]);
  float* logits_ptr = logits_buf.get();
  float* transposed_ptr = logits_ptr + batch * chunk;
  std::vector<RowStats> stats(batch);
  for (int64_t k0 = 0; k0 < classes; k0 += chunk) {
    const int64_t width = std::min(chunk, classes - k0);
    if (small_head) {
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t k = 0; k < width; ++k)
          logits_ptr[b * width + k] =
              dot(pooled_ptr + b * pooled_stride, small_weight + k * features, features);
      }
    } else {
      at::Tensor w_chunk = weight.narrow(0, k0, width);
      if (weight.scalar_type() != at::kFloat) w_chunk = w_chunk.to(at::kFloat);
      // (width, H) @ (H, B): with B small, BLAS runs this orientation markedly faster than
      // (B, H) @ (H, width) here; the transposed chunk is then laid out row by row.
      const auto f32 = at::TensorOptions().dtype(at::kFloat);
      at::Tensor transposed = at::from_blob(transposed_ptr, {width, batch}, f32);
      at::mm_out(transposed, w_chunk,
                 at::from_blob(pooled_ptr, {batch, features}, {pooled_stride, 1}, f32).t());
      for (int64_t k = 0; k < width; ++k) {
        for (int64_t b = 0; b < batch; ++b) logits_ptr[b * width + k] = transposed_ptr[k * batch + b];
      }
    }
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        float* row = logits_ptr + b * width;
        if (bias_f != nullptr) {
          for (int64_t k = 0; k < width; ++k) row[k] += bias_f[k0 + k];
        }
        if (logits_out_ptr != nullptr)
          std::memcpy(logits_out_ptr + b * classes + k0, row, width * sizeof(float));
        if (alive_ptr == nullptr || alive_ptr[b]) stats[b].add_chunk(row, width, k0);
      }
    });
  }

  // 3. Confidence, prediction and exit decision.
  const float threshold_value = *threshold.data_ptr<float>();
  float* conf_ptr = confidence.data_ptr<float>();
  int64_t* pred_ptr = prediction.data_ptr<int64_t>();
  bool* exit_ptr = exit_mask.data_ptr<bool>();
  const float log_classes = std::log(static_cast<float>(classes));
  for (int64_t b = 0; b < batch; ++b) {
    if (alive_ptr != nullptr && !alive_ptr[b]) {
      conf_ptr[b] = 0.f, pred_ptr[b] = 0, exit_ptr[b] = false;
      continue;
    }
    const RowStats& s = stats[b];
    if (!s.finite) {
      conf_ptr[b] = std::numeric_limits<float>::quiet_NaN(), pred_ptr[b] = -1, exit_ptr[b] = false;
      continue;
    }
    float conf;
    if (call.metric == RampMetric::kMaxProb) {
      conf = 1.f / s.sum_exp;
    } else if (call.metric == RampMetric::kMargin) {
      conf = (1.f - std::exp(s.second - s.top)) / s.sum_exp;
    } else {
      const float entropy = std::log(s.sum_exp) - s.sum_weighted / s.sum_exp;
      conf = std::min(1.f, std::max(0.f, 1.f - entropy / log_classes));
    }
    conf_ptr[b] = conf;
    pred_ptr[b] = s.argmax;
    exit_ptr[b] = std::isfinite(conf) && conf >= threshold_value;
  }
  return {confidence, prediction, exit_mask};
}

}  // namespace apparate
