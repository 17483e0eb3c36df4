// CUDA kernels of apparate's fused ramp: pool -> (norm) -> linear -> confidence -> exit decision.
// Semantics: ramp_exit_ref in apparate/ops/ramp_exit.py. Raw pointers only; no torch needed.
//
// Three kernels on one stream, with nothing read back to the host:
//   1. pool:       hidden -> pooled float32 rows in a workspace, dead rows as zeros. Parallel over
//                  rows, feature tiles and (for long means) slices of the positions.
//   2. logits:     split-K GEMV. A CTA owns a tile of up to 8 rows and a chunk of the K classes:
//                  it normalises the tile's pooled rows into shared memory, streams its chunk of
//                  the weight once for all rows of the tile, writes the logits if asked and reduces
//                  them to softmax statistics per (row, chunk). For small batches the weight is
//                  read from DRAM exactly once, which is what bounds this op (LM heads: K ~ 50k).
//   3. confidence: merges the chunk statistics of each row (online-softmax rescaling) and writes
//                  confidence, prediction and exit; the threshold is read on the device so that
//                  retuning it never recompiles or re-captures anything.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "apparate/common.cuh"
#include "apparate/ramp_kinds.h"

namespace apparate {

// Element type of the tensors read once per class or feature (bias, norm weight): a runtime
// switch costs nothing there, and templating the kernels on them too would multiply the number
// of instantiations by 9. hidden and weight, read in the hot loops, are template parameters.
enum class FloatType : int { kFloat32, kFloat16, kBFloat16 };

// Arguments of one ramp evaluation. Sizes and strides are in elements.
template <typename THidden, typename TWeight>
struct RampExitArgs {
  // (B, T, H) for cls / mean / last, (B, C, Hh, Ww) for avg (any strides, channels_last
  // included), (B, H) for none; sizes/strides beyond the pool's rank are ignored.
  const THidden* hidden;
  int64_t sizes[4];
  int64_t strides[4];
  RampPool pool;  // must be the pool the plan was made for
  const bool* mask;  // (B, T) valid tokens for mean / last, or null
  int64_t mask_strides[2];
  const bool* alive;  // (B,) or null
  int64_t alive_stride;
  RampNorm norm;
  const void* norm_weight;  // (H,), type norm_weight_type; null when norm is kNone
  FloatType norm_weight_type;
  int64_t norm_weight_stride;
  float norm_eps;
  const TWeight* weight;  // (K, H), unit stride along H
  int64_t classes;
  int64_t weight_row_stride;
  const void* bias;  // (K,), type bias_type, or null
  FloatType bias_type;
  int64_t bias_stride;
  RampMetric metric;
  const float* threshold;  // 0-dim, on the device
  float* logits;           // (B, K) contiguous, or null
  float* confidence;       // (B,)
  int64_t* prediction;     // (B,)
  bool* exit;              // (B,)
};

// Batch, feature size and averaged positions of hidden under a pool (sizes as in RampExitArgs).
struct RampShape {
  int64_t batch;
  int64_t features;
  int64_t mean_positions;  // positions a mean / avg pool averages; 0 for single-position pools
};

inline RampShape ramp_shape(RampPool pool, const int64_t (&sizes)[4]) {
  switch (pool) {
    case RampPool::kAvg:
      return {sizes[0], sizes[1], sizes[2] * sizes[3]};
    case RampPool::kNone:
      return {sizes[0], sizes[1], 0};
    case RampPool::kMean:
      return {sizes[0], sizes[2], sizes[1]};
    default:
      return {sizes[0], sizes[2], 0};
  }
}

// Launch geometry and workspace size; depends on the device, the shape and K only.
struct RampExitPlan {
  RampShape shape;
  int64_t classes;
  int splits;               // pooling blocks that share the positions of one row
  int64_t split_positions;  // positions per pooling split
  int rows_per_tile;        // rows of one logits CTA (<= 8)
  int tiles;
  int chunks;               // chunks of K per row tile
  int64_t chunk_rows;       // classes per chunk, a multiple of the 16 a warp handles per step
  size_t smem_bytes;        // dynamic shared memory of the logits kernel
  size_t pooled_bytes;
  size_t workspace_bytes;
  int64_t max_features;  // largest H whose pooled row fits in one CTA's shared memory
};

namespace ramp_detail {

using namespace detail;

constexpr int kPoolWarps = 8;
constexpr int kPoolThreads = kPoolWarps * kWarp;
// Positions each pooling warp loads before adding, to keep several loads in flight.
constexpr int kPoolUnroll = 4;

constexpr int kTileRows = 8;       // rows of hidden per logits CTA
constexpr int kRowsPerLane = 4;    // weight rows each lane multiplies at once
constexpr int kLanesPerRow = 8;    // lanes that share one weight row
constexpr int kWeightUnroll = 2;   // weight vectors each lane loads before multiplying
constexpr int kLogitWarps = 8;
constexpr int kLogitThreads = kLogitWarps * kWarp;
constexpr int kWarpClasses = kRowsPerLane * (kWarp / kLanesPerRow);  // classes per warp step
constexpr int kMinCtasPerSm = 2;
constexpr int kConfidenceWarps = 4;
// After the transposed reduction over the lanes of a group, lane q holds the sums of tile row q
// for its classes: a tile has exactly one row per lane of a group.
static_assert(kTileRows == kLanesPerRow, "one tile row per lane of a group after the reduction");
static_assert(kRowsPerLane == 4, "logits are stored as one float4 per lane");

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

__device__ __forceinline__ float load_float(const void* p, FloatType type, int64_t i) {
  switch (type) {
    case FloatType::kFloat16:
      return __half2float(__ldg(static_cast<const __half*>(p) + i));
    case FloatType::kBFloat16:
      return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(p) + i));
    default:
      return __ldg(static_cast<const float*>(p) + i);
  }
}

// Read-only (non-coherent cache) load: hidden, weight and the workspace written by an earlier
// kernel never change while these kernels run.
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  using W = typename Word<sizeof(Pack<T, N>)>::type;
  const W w = __ldg(reinterpret_cast<const W*>(p));
  Pack<T, N> out;
  __builtin_memcpy(&out, &w, sizeof(out));
  return out;
}

// All-zero bits (+0 in every type); built from bits because torch extensions compile with
// __CUDA_NO_HALF_CONVERSIONS__, which removes __half's converting constructors.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> zero_pack() {
  Pack<T, N> out;
  __builtin_memset(&out, 0, sizeof(out));
  return out;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Softmax statistics of a set of finite logits, mergeable in any order:
//   max, argmax (first index of the max), second (largest logit at any other index; equals max on
//   ties), sum = sum exp(l - max), wsum = sum exp(l - max) * (l - max).
// Non-finite logits only raise `nonfinite`: such a row's answer is NaN / -1 whatever the rest.

struct SoftmaxStats {
  float max;
  float second;
  float sum;
  float wsum;
  int argmax;
  int nonfinite;
};

__device__ __forceinline__ SoftmaxStats empty_stats() {
  return SoftmaxStats{-INFINITY, -INFINITY, 0.f, 0.f, INT32_MAX, 0};
}

// Adds logit l of class k; a caller adds the classes of one SoftmaxStats in increasing order.
__device__ __forceinline__ void push_logit(SoftmaxStats& s, float l, int k) {
  if (!isfinite(l)) {
    s.nonfinite = 1;
    return;
  }
  if (l > s.max) {
    if (s.sum > 0.f) {  // an empty set has max = -inf, where the rescaling would give NaN
      const float d = s.max - l;
      const float a = expf(d);
      s.wsum = a * (s.wsum + d * s.sum);
      s.sum *= a;
    }
    s.second = s.max;
    s.max = l;
    s.argmax = k;
    s.sum += 1.f;
  } else {
    s.second = fmaxf(s.second, l);
    const float d = l - s.max;
    const float e = expf(d);
    s.sum += e;
    s.wsum += e * d;
  }
}

__device__ __forceinline__ void add_rescaled(float& sum, float& wsum, const SoftmaxStats& s,
                                             float max) {
  if (s.sum > 0.f) {
    const float d = s.max - max;
    const float a = expf(d);
    sum += a * s.sum;
    wsum += a * (s.wsum + d * s.sum);
  }
}

__device__ __forceinline__ SoftmaxStats merge_stats(const SoftmaxStats& a, const SoftmaxStats& b) {
  const bool a_wins = a.max > b.max || (a.max == b.max && a.argmax < b.argmax);
  SoftmaxStats out;
  out.max = a_wins ? a.max : b.max;
  out.argmax = a_wins ? a.argmax : b.argmax;
  out.second = a_wins ? fmaxf(a.second, b.max) : fmaxf(b.second, a.max);
  out.sum = 0.f;
  out.wsum = 0.f;
  add_rescaled(out.sum, out.wsum, a, out.max);
  add_rescaled(out.sum, out.wsum, b, out.max);
  out.nonfinite = a.nonfinite | b.nonfinite;
  return out;
}

__device__ __forceinline__ SoftmaxStats shfl_xor_stats(const SoftmaxStats& s, int offset) {
  SoftmaxStats o;
  o.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
  o.second = __shfl_xor_sync(0xffffffffu, s.second, offset);
  o.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
  o.wsum = __shfl_xor_sync(0xffffffffu, s.wsum, offset);
  o.argmax = __shfl_xor_sync(0xffffffffu, s.argmax, offset);
  o.nonfinite = __shfl_xor_sync(0xffffffffu, s.nonfinite, offset);
  return o;
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: pooling. Every pool is one of three modes over "positions" t of a row, where the
// element of feature f at position t sits at b * stride_b + f * stride_f + offset(t) and
// offset(t) = (t / inner) * stride_outer + (t % inner) * stride_p (avg's two spatial dims; the
// launcher folds them into one whenever the strides allow, so the division is rarely executed).
//
// A mean over many positions of few rows (one request with a long sequence) would leave most SMs
// idle, so its positions are split over `splits` blocks (grid z). Each writes its share of the
// mean to its own slot of the workspace, (B, splits, H), and the logits kernel adds the slots up
// when it loads the row: no atomics, no extra pass, the same result on every run.

enum class PoolMode : int { kSelect, kLastValid, kMean };

template <typename T>
struct PoolParams {
  const T* hidden;
  int64_t features, positions, inner;
  int64_t stride_b, stride_f, stride_p, stride_outer;
  PoolMode mode;
  int64_t select;           // kSelect: the position taken (cls / none: 0, last without mask: T - 1)
  int64_t split_positions;  // kMean: positions per split (blockIdx.z)
  const bool* mask;
  int64_t mask_stride_b, mask_stride_t;
  const bool* alive;
  int64_t alive_stride;
  float* pooled;  // (B, gridDim.z, features)
};

template <typename T>
__device__ __forceinline__ int64_t position_offset(const PoolParams<T>& p, int64_t t) {
  if (p.inner == p.positions) return t * p.stride_p;
  return (t / p.inner) * p.stride_outer + (t % p.inner) * p.stride_p;
}

template <typename T>
__device__ __forceinline__ bool row_is_dead(const PoolParams<T>& p, int64_t b) {
  return p.alive != nullptr && !p.alive[b * p.alive_stride];
}

template <typename T>
__device__ __forceinline__ bool position_valid(const PoolParams<T>& p, int64_t b, int64_t t) {
  return p.mask == nullptr || p.mask[b * p.mask_stride_b + t * p.mask_stride_t];
}

// The mean's divisor: the number of valid positions of the whole row (at least 1) with a mask,
// else all positions. Every thread of the block returns it.
template <typename T>
__device__ __forceinline__ float mean_divisor(const PoolParams<T>& p, int64_t b,
                                              int* warp_count) {
  if (p.mask == nullptr) return float(p.positions);
  int count = 0;
  for (int64_t t = threadIdx.x; t < p.positions; t += kPoolThreads) {
    count += position_valid(p, b, t) ? 1 : 0;
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) count += __shfl_xor_sync(0xffffffffu, count, o);
  if (threadIdx.x % kWarp == 0) warp_count[threadIdx.x / kWarp] = count;
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kPoolWarps; ++w) total += warp_count[w];
  return float(total > 0 ? total : 1);
}

// Lanes over features (VEC consecutive features per lane, one vector load when VEC > 1), warps
// over positions. Grid (B, feature tiles of 32 * VEC, splits). Used for every pool whose features
// are contiguous, and for the single-position pools whatever their layout.
template <typename T, int VEC>
__global__ void __launch_bounds__(kPoolThreads) pool_features_kernel(PoolParams<T> p) {
  __shared__ float partial[kPoolWarps * VEC * kWarp];  // [warp][element][lane]: no bank conflicts
  __shared__ int warp_count[kPoolWarps];
  __shared__ int64_t last_valid[kPoolWarps];

  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t f0 = (int64_t(blockIdx.y) * kWarp + lane) * VEC;
  const bool active = f0 < p.features;  // VEC > 1 only when VEC divides features
  float* out = p.pooled + (b * gridDim.z + blockIdx.z) * p.features + f0;

  if (row_is_dead(p, b)) {  // pooled as zeros; hidden (maybe NaN) is never read
    if (warp == 0 && active) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = 0.f;
    }
    return;
  }
  const T* row = p.hidden + b * p.stride_b + f0 * p.stride_f;

  if (p.mode != PoolMode::kMean) {
    int64_t pos = p.select;
    if (p.mode == PoolMode::kLastValid) {
      int64_t best = -1;  // positions ascend, so the last hit of a thread is its largest
      for (int64_t t = threadIdx.x; t < p.positions; t += kPoolThreads) {
        if (position_valid(p, b, t)) best = t;
      }
#pragma unroll
      for (int o = kWarp / 2; o > 0; o /= 2) {
        const int64_t other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
      }
      if (lane == 0) last_valid[warp] = best;
      __syncthreads();
      best = last_valid[0];
#pragma unroll
      for (int w = 1; w < kPoolWarps; ++w) best = last_valid[w] > best ? last_valid[w] : best;
      pos = best < 0 ? 0 : best;  // no valid token: position 0, like the reference
    }
    if (warp == 0 && active) {
      const int64_t off = position_offset(p, pos);
      if constexpr (VEC > 1) {
        const Pack<T, VEC> v = load_pack<VEC>(row + off);
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = to_float(v.v[e]);
      } else {
        out[0] = to_float(__ldg(row + off));
      }
    }
    return;
  }

  const float divisor = mean_divisor(p, b, warp_count);
  const int64_t t_begin = int64_t(blockIdx.z) * p.split_positions;
  const int64_t t_end =
      t_begin + p.split_positions < p.positions ? t_begin + p.split_positions : p.positions;
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
  for (int64_t t0 = t_begin + warp; t0 < t_end; t0 += int64_t(kPoolWarps) * kPoolUnroll) {
    Pack<T, VEC> v[kPoolUnroll];
    bool use[kPoolUnroll];
#pragma unroll
    for (int u = 0; u < kPoolUnroll; ++u) {
      const int64_t t = t0 + int64_t(u) * kPoolWarps;
      // Masked positions are skipped, not multiplied by 0, so a NaN there cannot leak in.
      use[u] = active && t < t_end && position_valid(p, b, t);
      if (use[u]) {
        if constexpr (VEC > 1) {
          v[u] = load_pack<VEC>(row + position_offset(p, t));
        } else {
          v[u].v[0] = __ldg(row + position_offset(p, t));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kPoolUnroll; ++u) {
      if (use[u]) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += to_float(v[u].v[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) partial[(warp * VEC + e) * kWarp + lane] = acc[e];
  __syncthreads();
  if (warp != 0 || !active) return;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kPoolWarps; ++w) s += partial[(w * VEC + e) * kWarp + lane];
    out[e] = s / divisor;
  }
}

// Mean over positions for layouts whose positions are contiguous and features are not (NCHW
// feature maps): a warp per feature with lanes over positions, so loads stay coalesced.
// Grid (B, ceil(features / 8), splits).
template <typename T>
__global__ void __launch_bounds__(kPoolThreads) pool_positions_kernel(PoolParams<T> p) {
  __shared__ int warp_count[kPoolWarps];
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int64_t f = int64_t(blockIdx.y) * kPoolWarps + threadIdx.x / kWarp;
  if (row_is_dead(p, b)) {
    if (lane == 0 && f < p.features) p.pooled[(b * gridDim.z + blockIdx.z) * p.features + f] = 0.f;
    return;
  }
  const float divisor = mean_divisor(p, b, warp_count);
  if (f >= p.features) return;  // warp-uniform, and after the last block barrier
  const T* base = p.hidden + b * p.stride_b + f * p.stride_f;
  const int64_t t_begin = int64_t(blockIdx.z) * p.split_positions;
  const int64_t t_end =
      t_begin + p.split_positions < p.positions ? t_begin + p.split_positions : p.positions;
  float acc = 0.f;
  for (int64_t t0 = t_begin + lane; t0 < t_end; t0 += int64_t(kWarp) * kPoolUnroll) {
    T v[kPoolUnroll];
    bool use[kPoolUnroll];
#pragma unroll
    for (int u = 0; u < kPoolUnroll; ++u) {
      const int64_t t = t0 + int64_t(u) * kWarp;
      use[u] = t < t_end && position_valid(p, b, t);
      if (use[u]) v[u] = __ldg(base + position_offset(p, t));
    }
#pragma unroll
    for (int u = 0; u < kPoolUnroll; ++u) {
      if (use[u]) acc += to_float(v[u]);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) p.pooled[(b * gridDim.z + blockIdx.z) * p.features + f] = acc / divisor;
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: logits and per-(row, chunk) softmax statistics.
//
// Work split: grid (row tiles, chunks of K); tiles vary fastest so the CTAs that read the same
// weight chunk run together and share it through L2 when B > 8. In a CTA, warp w takes the warp
// steps w, w + 8, ... of the chunk; a warp step covers 16 classes: lane group g = lane / 8 takes
// classes 4g .. 4g + 3 and the 8 lanes of a group split H in 16-byte weight vectors. Each lane
// keeps 8 tile rows x 4 classes = 32 accumulators, so one pooled value read from shared memory
// feeds 4 FMAs and one weight value feeds 8: shared-memory bandwidth stays under the weight
// stream even at B = 8, and the 8 lanes per class keep H = 576 free of idle lanes.
//
// Shared memory holds the tile's normalised rows in float32. A lane reads the VEC pooled values
// matching its weight vector as VEC / 4 float4s; to keep those reads conflict-free each row is
// stored as VEC / 4 planes (element h of vector v goes to plane (h % VEC) / 4 at v * 4 + h % 4).

template <typename TW>
struct LogitsParams {
  const float* pooled;  // (B, splits, H): the pooling splits of each row, to be added up
  int splits;
  int64_t batch, features, classes;
  const TW* weight;
  int64_t weight_row_stride;
  const void* bias;
  FloatType bias_type;
  int64_t bias_stride;
  RampNorm norm;
  const void* norm_weight;
  FloatType norm_weight_type;
  int64_t norm_weight_stride;
  float norm_eps;
  int rows_per_tile;
  int chunks;
  int64_t chunk_rows;
  float* logits;          // (B, K) or null
  bool logits_vec4;       // logits rows start 16-byte aligned: a lane stores its 4 classes at once
  SoftmaxStats* partial;  // (B, chunks)
};

template <int VEC>
struct ActLayout {
  static constexpr int kPerLoad = VEC < 4 ? VEC : 4;  // floats per shared load
  static constexpr int kPlanes = VEC / kPerLoad;
  __device__ static __forceinline__ int index(int h, int features) {
    return (h % VEC) / kPerLoad * (features / kPlanes) + h / VEC * kPerLoad + h % kPerLoad;
  }
};

// Loads the pooled values of one plane of vector v of a shared row.
template <int VEC>
__device__ __forceinline__ void load_act_plane(const float* row, int plane, int v, int features,
                                               float (&a)[ActLayout<VEC>::kPerLoad]) {
  using L = ActLayout<VEC>;
  const float* src = row + plane * (features / L::kPlanes) + v * L::kPerLoad;
  if constexpr (L::kPerLoad == 4) {
    const float4 x = *reinterpret_cast<const float4*>(src);
    a[0] = x.x;
    a[1] = x.y;
    a[2] = x.z;
    a[3] = x.w;
  } else {
#pragma unroll
    for (int e = 0; e < L::kPerLoad; ++e) a[e] = src[e];
  }
}

// Sums 32 per-lane values over the 8 lanes of a group in 3 exchange steps (16 + 8 + 4 shuffles
// instead of 32 x 3): at each step a lane keeps the half of its values selected by one bit of its
// lane index and adds its partner's copy of that half. Afterwards lane q of the group holds the
// group sums of values 4q .. 4q + 3, i.e. tile row q for its 4 classes.
template <int Bit>
__device__ __forceinline__ void group_transpose_sum(float (&v)[kTileRows * kRowsPerLane],
                                                    int lane) {
  constexpr int kHalf = Bit * kRowsPerLane;  // values a lane keeps after this step
  const bool upper = (lane & Bit) != 0;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float keep = upper ? v[i + kHalf] : v[i];
    const float give = upper ? v[i] : v[i + kHalf];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, give, Bit);
  }
  if constexpr (Bit > 1) group_transpose_sum<Bit / 2>(v, lane);
}

template <typename TW, int VEC>
__global__ void __launch_bounds__(kLogitThreads, kMinCtasPerSm)
    ramp_logits_kernel(LogitsParams<TW> p) {
  using Act = ActLayout<VEC>;
  extern __shared__ float4 smem_act4[];
  float* act = reinterpret_cast<float*>(smem_act4);
  __shared__ SoftmaxStats warp_stats[kLogitWarps][kTileRows];

  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int features = int(p.features);
  const int64_t row0 = int64_t(blockIdx.x) * p.rows_per_tile;
  const int nrows = int(p.batch - row0 < p.rows_per_tile ? p.batch - row0 : p.rows_per_tile);

  // Sum the pooling splits of the tile's rows and normalise them into shared memory, one warp per
  // row. Every chunk's CTA repeats this, but it reads only nrows * splits * H floats from L2, and
  // it spares pooling a row-wide reduction, so pooling can spread a row over many blocks.
  if (warp < nrows) {
    const float* src = p.pooled + (row0 + warp) * p.splits * p.features;
    float* dst = act + warp * features;
    float sum = 0.f;
    for (int h = lane; h < features; h += kWarp) {
      float x = __ldg(src + h);
      for (int split = 1; split < p.splits; ++split) x += __ldg(src + split * p.features + h);
      dst[Act::index(h, features)] = x;
      sum += x;
    }
    // Each lane revisits only the elements it wrote, so the warp needs no barrier in between.
    if (p.norm != RampNorm::kNone) {
      const float mean = p.norm == RampNorm::kLayer ? warp_sum(sum) / float(features) : 0.f;
      float ss = 0.f;
      for (int h = lane; h < features; h += kWarp) {
        const float c = dst[Act::index(h, features)] - mean;
        ss += c * c;
      }
      const float scale = rsqrtf(warp_sum(ss) / float(features) + p.norm_eps);
      for (int h = lane; h < features; h += kWarp) {
        float& y = dst[Act::index(h, features)];
        y = ((y - mean) * scale) *
            load_float(p.norm_weight, p.norm_weight_type, h * p.norm_weight_stride);
      }
    }
  }
  __syncthreads();

  const int group = lane / kLanesPerRow;
  const int q = lane % kLanesPerRow;
  const int nvec = features / VEC;
  const int64_t k_begin = int64_t(blockIdx.y) * p.chunk_rows;
  const int64_t k_end =
      k_begin + p.chunk_rows < p.classes ? k_begin + p.chunk_rows : p.classes;
  SoftmaxStats stats = empty_stats();  // of tile row q, over this lane's classes

  for (int64_t k0 = k_begin + int64_t(warp) * kWarpClasses; k0 < k_end;
       k0 += int64_t(kLogitWarps) * kWarpClasses) {
    const int64_t k_lane = k0 + group * kRowsPerLane;
    const TW* wrow[kRowsPerLane];
    bool wvalid[kRowsPerLane];
#pragma unroll
    for (int g = 0; g < kRowsPerLane; ++g) {
      wvalid[g] = k_lane + g < k_end;
      wrow[g] = p.weight + (wvalid[g] ? k_lane + g : k_begin) * p.weight_row_stride;
    }
    float acc[kTileRows * kRowsPerLane];
#pragma unroll
    for (int i = 0; i < kTileRows * kRowsPerLane; ++i) acc[i] = 0.f;

    for (int v0 = q; v0 < nvec; v0 += kLanesPerRow * kWeightUnroll) {
      Pack<TW, VEC> w[kWeightUnroll][kRowsPerLane];
#pragma unroll
      for (int u = 0; u < kWeightUnroll; ++u) {
        const int v = v0 + u * kLanesPerRow;
#pragma unroll
        for (int g = 0; g < kRowsPerLane; ++g) {
          if (v < nvec && wvalid[g]) {
            w[u][g] = load_pack<VEC>(wrow[g] + int64_t(v) * VEC);
          } else {
            w[u][g] = zero_pack<TW, VEC>();
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kWeightUnroll; ++u) {
        const int v = v0 + u * kLanesPerRow;
        // Past the end of H: skip rather than multiply zeros, which would turn an infinite
        // pooled value into NaN.
        if (v < nvec) {
          // One plane (up to 4 elements of the vector) at a time keeps the converted weights
          // at 16 registers, which leaves room for two vectors in flight per class.
#pragma unroll
          for (int plane = 0; plane < Act::kPlanes; ++plane) {
            float wf[kRowsPerLane][Act::kPerLoad];
#pragma unroll
            for (int g = 0; g < kRowsPerLane; ++g) {
#pragma unroll
              for (int e = 0; e < Act::kPerLoad; ++e) {
                wf[g][e] = to_float(w[u][g].v[plane * Act::kPerLoad + e]);
              }
            }
#pragma unroll
            for (int r = 0; r < kTileRows; ++r) {
              if (r < nrows) {
                float a[Act::kPerLoad];
                load_act_plane<VEC>(act + r * features, plane, v, features, a);
#pragma unroll
                for (int g = 0; g < kRowsPerLane; ++g) {
#pragma unroll
                  for (int e = 0; e < Act::kPerLoad; ++e) {
                    acc[r * kRowsPerLane + g] = fmaf(a[e], wf[g][e], acc[r * kRowsPerLane + g]);
                  }
                }
              }
            }
          }
        }
      }
    }

    group_transpose_sum<kLanesPerRow / 2>(acc, lane);
    if (q < nrows) {
      const int64_t row = row0 + q;
#pragma unroll
      for (int j = 0; j < kRowsPerLane; ++j) {
        const int64_t k = k_lane + j;
        if (k < k_end) {
          if (p.bias != nullptr) acc[j] += load_float(p.bias, p.bias_type, k * p.bias_stride);
          push_logit(stats, acc[j], int(k));
        }
      }
      if (p.logits != nullptr) {
        float* out = p.logits + row * p.classes + k_lane;
        if (p.logits_vec4 && k_lane + kRowsPerLane <= k_end) {
          *reinterpret_cast<float4*>(out) = make_float4(acc[0], acc[1], acc[2], acc[3]);
        } else {
#pragma unroll
          for (int j = 0; j < kRowsPerLane; ++j) {
            if (k_lane + j < k_end) out[j] = acc[j];
          }
        }
      }
    }
  }

  // Lanes q, q + 8, q + 16, q + 24 hold row q: merge them, then merge the warps.
  stats = merge_stats(stats, shfl_xor_stats(stats, kLanesPerRow));
  stats = merge_stats(stats, shfl_xor_stats(stats, 2 * kLanesPerRow));
  if (lane < kTileRows) warp_stats[warp][lane] = stats;
  __syncthreads();
  if (int(threadIdx.x) < nrows) {
    SoftmaxStats s = warp_stats[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < kLogitWarps; ++w) s = merge_stats(s, warp_stats[w][threadIdx.x]);
    p.partial[(row0 + threadIdx.x) * p.chunks + blockIdx.y] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 3: one warp per row merges the row's chunk statistics and decides.

struct ConfidenceParams {
  const SoftmaxStats* partial;  // (B, chunks)
  int64_t batch;
  int chunks;
  float log_classes;
  RampMetric metric;
  const float* threshold;
  const bool* alive;
  int64_t alive_stride;
  float* confidence;
  int64_t* prediction;
  bool* exit;
};

__global__ void __launch_bounds__(kConfidenceWarps* kWarp)
    ramp_confidence_kernel(ConfidenceParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = int64_t(blockIdx.x) * kConfidenceWarps + threadIdx.x / kWarp;
  if (b >= p.batch) return;
  if (p.alive != nullptr && !p.alive[b * p.alive_stride]) {
    if (lane == 0) {
      p.confidence[b] = 0.f;
      p.prediction[b] = 0;
      p.exit[b] = false;
    }
    return;
  }
  SoftmaxStats s = empty_stats();
  for (int c = lane; c < p.chunks; c += kWarp) s = merge_stats(s, p.partial[b * p.chunks + c]);
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) s = merge_stats(s, shfl_xor_stats(s, o));
  if (lane != 0) return;
  if (s.nonfinite) {
    p.confidence[b] = NAN;
    p.prediction[b] = -1;
    p.exit[b] = false;
    return;
  }
  float conf;
  if (p.metric == RampMetric::kMaxProb) {
    conf = 1.f / s.sum;
  } else if (p.metric == RampMetric::kMargin) {
    conf = (1.f - expf(s.second - s.max)) / s.sum;
  } else {
    const float entropy = logf(s.sum) - s.wsum / s.sum;
    conf = fminf(fmaxf(1.f - entropy / p.log_classes, 0.f), 1.f);
  }
  p.confidence[b] = conf;
  p.prediction[b] = s.argmax;
  p.exit[b] = isfinite(conf) && conf >= *p.threshold;
}

template <typename T>
cudaError_t launch_pool(const PoolParams<T>& p, int64_t batch, int splits, cudaStream_t stream) {
  if (p.features == 0) return cudaSuccess;
  if (p.mode == PoolMode::kMean && p.stride_f != 1 && p.features > 1 && p.stride_p == 1 &&
      p.positions >= kWarp) {
    const dim3 grid(unsigned(batch), unsigned(ceil_div(p.features, kPoolWarps)), unsigned(splits));
    pool_positions_kernel<T><<<grid, kPoolThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  constexpr int kVec = int(16 / sizeof(T));
  const bool inner_folded = p.inner == p.positions;
  const bool vector = (p.stride_f == 1 || p.features == 1) && p.features % kVec == 0 &&
                      aligned_to(p.hidden, 16) &&
                      divides(kVec, batch, p.stride_b) && divides(kVec, p.positions, p.stride_p) &&
                      (inner_folded || divides(kVec, p.positions, p.stride_outer));
  const int64_t per_block = int64_t(kWarp) * (vector ? kVec : 1);
  const dim3 grid(unsigned(batch), unsigned(ceil_div(p.features, per_block)), unsigned(splits));
  if (vector) {
    pool_features_kernel<T, kVec><<<grid, kPoolThreads, 0, stream>>>(p);
  } else {
    pool_features_kernel<T, 1><<<grid, kPoolThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename TW, int VEC>
cudaError_t launch_logits(const LogitsParams<TW>& p, const RampExitPlan& plan,
                          cudaStream_t stream) {
  auto kernel = ramp_logits_kernel<TW, VEC>;
  if (plan.smem_bytes > 48 * 1024) {
    // Opting in to more than the default 48 KiB is a host-side attribute, not a stream operation,
    // so it is allowed while a CUDA graph is being captured.
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(unsigned(plan.tiles), unsigned(plan.chunks));
  kernel<<<grid, kLogitThreads, plan.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ramp_detail

// Plans a ramp over hidden of `sizes` under `pool` with K = `classes` on the current device.
// Fails with cudaErrorInvalidValue when one pooled row (H float32 values) does not fit in a CTA's
// shared memory; plan->max_features then says the limit.
inline cudaError_t plan_ramp_exit(RampPool pool, const int64_t (&sizes)[4], int64_t classes,
                                  RampExitPlan* plan) {
  using namespace ramp_detail;
  // Pooling blocks wanted per SM before a row's positions are split, and the most splits: each
  // split adds a slot per row that every logits CTA reads back.
  constexpr int64_t kPoolBlocksPerSm = 2;
  constexpr int64_t kMaxSplits = 16;
  int sms = 0, smem_optin = 0;
  cudaError_t err = current_device_attribute(cudaDevAttrMultiProcessorCount, &sms);
  if (err == cudaSuccess) {
    err = current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &smem_optin);
  }
  if (err != cudaSuccess) return err;

  RampExitPlan r{};
  r.shape = ramp_shape(pool, sizes);
  r.classes = classes;
  const int64_t batch = r.shape.batch;
  const int64_t features = r.shape.features;
  const int64_t budget =
      int64_t(smem_optin) - int64_t(sizeof(SoftmaxStats)) * kLogitWarps * kTileRows;
  r.max_features = budget / int64_t(sizeof(float));
  const int64_t row_bytes = features * int64_t(sizeof(float));
  int64_t cap = row_bytes == 0 ? kTileRows : budget / row_bytes;
  cap = cap < kTileRows ? cap : kTileRows;
  if (cap < 1) {
    *plan = r;
    return cudaErrorInvalidValue;
  }
  const int64_t rows = batch > 0 ? batch : 1;

  const int64_t positions = r.shape.mean_positions;
  r.splits = 1;
  r.split_positions = positions;
  if (positions > 0) {
    // Feature tiles as 16-byte loads of a 16-bit type make them (the most a row can have).
    const int64_t blocks = rows * ceil_div(features > 0 ? features : 1, kWarp * 8);
    int64_t splits = ceil_div(kPoolBlocksPerSm * sms, blocks);
    const int64_t useful = ceil_div(positions, int64_t(kPoolWarps) * kPoolUnroll);
    splits = splits < useful ? splits : useful;
    splits = splits < kMaxSplits ? splits : kMaxSplits;
    splits = splits > 1 ? splits : 1;
    r.split_positions = ceil_div(positions, splits);
    r.splits = int(ceil_div(positions, r.split_positions));  // no empty split
  }

  r.tiles = int(ceil_div(rows, cap));
  r.rows_per_tile = int(ceil_div(rows, r.tiles));  // balanced tiles, none of them empty
  // Enough chunks for kMinCtasPerSm resident CTAs per SM in total, but at least one warp step
  // per warp of a CTA, so that small heads are not split into chunks of idle warps.
  const int64_t steps = ceil_div(classes, kWarpClasses);
  const int64_t want = ceil_div(int64_t(kMinCtasPerSm) * sms, r.tiles);
  int64_t steps_per_chunk = ceil_div(steps, want);
  steps_per_chunk = steps_per_chunk > kLogitWarps ? steps_per_chunk : kLogitWarps;
  r.chunk_rows = steps_per_chunk * kWarpClasses;
  r.chunks = int(classes > 0 ? ceil_div(classes, r.chunk_rows) : 1);
  r.smem_bytes = size_t(r.rows_per_tile) * size_t(row_bytes);
  r.pooled_bytes = round_up(size_t(batch) * size_t(r.splits) * size_t(row_bytes), 256);
  r.workspace_bytes = r.pooled_bytes + size_t(batch) * size_t(r.chunks) * sizeof(SoftmaxStats);
  *plan = r;
  return cudaSuccess;
}

// Runs the ramp on `stream`. `workspace` (plan.workspace_bytes, 256-byte aligned) is scratch on
// the same device; nothing is allocated and nothing waits for the device.
template <typename THidden, typename TWeight>
cudaError_t launch_ramp_exit(const RampExitArgs<THidden, TWeight>& a, const RampExitPlan& plan,
                             void* workspace, cudaStream_t stream) {
  using namespace ramp_detail;
  const RampShape shape = ramp_shape(a.pool, a.sizes);
  if (shape.batch != plan.shape.batch || shape.features != plan.shape.features ||
      shape.mean_positions != plan.shape.mean_positions || a.classes != plan.classes) {
    return cudaErrorInvalidValue;
  }
  const int64_t batch = shape.batch;
  if (batch == 0) return cudaSuccess;
  float* pooled = static_cast<float*>(workspace);
  SoftmaxStats* partial =
      reinterpret_cast<SoftmaxStats*>(static_cast<char*>(workspace) + plan.pooled_bytes);

  PoolParams<THidden> pp{};
  pp.hidden = a.hidden;
  pp.features = shape.features;
  pp.stride_b = a.strides[0];
  if (a.pool == RampPool::kAvg) {
    pp.stride_f = a.strides[1];
    pp.positions = shape.mean_positions;
    pp.stride_p = a.strides[3];
    pp.stride_outer = a.strides[2];
    const bool foldable = a.sizes[2] <= 1 || a.strides[2] == a.sizes[3] * a.strides[3];
    pp.inner = foldable ? pp.positions : a.sizes[3];
    pp.mode = PoolMode::kMean;
  } else if (a.pool == RampPool::kNone) {
    pp.stride_f = a.strides[1];
    pp.positions = 1;
    pp.inner = 1;
    pp.mode = PoolMode::kSelect;
  } else {
    pp.stride_f = a.strides[2];
    pp.positions = a.sizes[1];
    pp.stride_p = a.strides[1];
    pp.inner = pp.positions;
    if (a.pool == RampPool::kMean) {
      pp.mode = PoolMode::kMean;
    } else if (a.pool == RampPool::kLast && a.mask != nullptr) {
      pp.mode = PoolMode::kLastValid;
    } else {
      pp.mode = PoolMode::kSelect;
      pp.select = a.pool == RampPool::kLast ? pp.positions - 1 : 0;
    }
  }
  pp.split_positions = plan.split_positions;
  const bool uses_mask = a.pool == RampPool::kMean || a.pool == RampPool::kLast;
  pp.mask = uses_mask ? a.mask : nullptr;
  pp.mask_stride_b = a.mask_strides[0];
  pp.mask_stride_t = a.mask_strides[1];
  pp.alive = a.alive;
  pp.alive_stride = a.alive_stride;
  pp.pooled = pooled;
  cudaError_t err = launch_pool(pp, batch, plan.splits, stream);
  if (err != cudaSuccess) return err;

  LogitsParams<TWeight> lp{};
  lp.pooled = pooled;
  lp.splits = plan.splits;
  lp.batch = batch;
  lp.features = shape.features;
  lp.classes = plan.classes;
  lp.weight = a.weight;
  lp.weight_row_stride = a.weight_row_stride;
  lp.bias = a.bias;
  lp.bias_type = a.bias_type;
  lp.bias_stride = a.bias_stride;
  lp.norm = a.norm;
  lp.norm_weight = a.norm_weight;
  lp.norm_weight_type = a.norm_weight_type;
  lp.norm_weight_stride = a.norm_weight_stride;
  lp.norm_eps = a.norm_eps;
  lp.rows_per_tile = plan.rows_per_tile;
  lp.chunks = plan.chunks;
  lp.chunk_rows = plan.chunk_rows;
  lp.logits = a.logits;
  // k_lane is a multiple of 4, so 16-byte row starts make every lane's 4 classes one float4.
  lp.logits_vec4 = aligned_to(a.logits, 16) && plan.classes % 4 == 0;
  lp.partial = partial;
  constexpr int kVec = int(16 / sizeof(TWeight));
  const bool vector = shape.features % kVec == 0 &&
                      aligned_to(a.weight, 16) &&
                      divides(kVec, plan.classes, a.weight_row_stride);
  err = vector ? launch_logits<TWeight, kVec>(lp, plan, stream)
               : launch_logits<TWeight, 1>(lp, plan, stream);
  if (err != cudaSuccess) return err;

  ConfidenceParams cp{};
  cp.partial = partial;
  cp.batch = batch;
  cp.chunks = plan.chunks;
  // The reference divides by math.log(K), a double rounded to float32.
  cp.log_classes = float(std::log(double(plan.classes)));
  cp.metric = a.metric;
  cp.threshold = a.threshold;
  cp.alive = a.alive;
  cp.alive_stride = a.alive_stride;
  cp.confidence = a.confidence;
  cp.prediction = a.prediction;
  cp.exit = a.exit;
  const unsigned blocks = unsigned(ceil_div(batch, kConfidenceWarps));
  ramp_confidence_kernel<<<blocks, kConfidenceWarps * kWarp, 0, stream>>>(cp);
  return cudaGetLastError();
}

}  // namespace apparate
