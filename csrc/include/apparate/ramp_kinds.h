// What a ramp is asked to compute: how hidden is pooled, which confidence decides the exit and
// which normalisation follows the pooling. Plain C++, so that the CPU kernel, the CUDA kernels and
// the argument parsing of both name them with one set of enums.
#pragma once

namespace apparate {

enum class RampPool : int { kCls, kMean, kLast, kAvg, kNone };
enum class RampMetric : int { kMaxProb, kMargin, kEntropy };
enum class RampNorm : int { kNone, kRms, kLayer };

// cls / mean / last read hidden as (B, T, H); avg reads (B, C, Hh, Ww) and none (B, H).
constexpr bool ramp_pools_tokens(RampPool pool) {
  return pool == RampPool::kCls || pool == RampPool::kMean || pool == RampPool::kLast;
}

constexpr int ramp_hidden_rank(RampPool pool) {
  return pool == RampPool::kAvg ? 4 : pool == RampPool::kNone ? 2 : 3;
}

}  // namespace apparate
