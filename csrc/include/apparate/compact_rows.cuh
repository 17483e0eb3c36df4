// CUDA kernel of apparate's stable row compaction: the kept rows of a (B, N) tensor move to its
// front in their original order, in place or into another buffer, with the count and the index
// left on the device. Semantics: compact_rows_ref in apparate/ops/compact_rows.py. Raw pointers
// only; rows are copied as bytes, so any element type works.
//
// Why the grid splits columns: in place, kept row r moves to d <= r, and d may be the source of a
// later kept row. A CTA that owns one byte-column slice of every row can order all accesses to
// that slice itself, so no CTA ever waits for another. It walks the rows in rounds of up to 256
// rows: a block scan of the keep flags gives each kept row its destination, every kept row of the
// round is loaded into registers, a barrier (rows of a round may be destinations of other rows of
// the same round), then all are stored. A round only writes rows below its first row, which later
// rounds never read, so rounds need nothing more between them. Narrow rows use narrower slices so
// that the grid still covers the GPU; each thread moves one 16-byte vector (or the widest access
// the alignment allows) of several rows per round, which keeps enough bytes in flight.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "apparate/common.cuh"

namespace apparate {

struct CompactRowsArgs {
  const void* src;  // x
  void* dst;        // out; == src for in place, else it must not overlap src
  int64_t rows;
  int64_t row_bytes;   // bytes of one row (N * element size)
  int64_t src_stride;  // bytes between rows of src
  int64_t dst_stride;  // bytes between rows of dst
  const bool* keep;    // (B,)
  int64_t keep_stride;
  int64_t* index;  // (B,) contiguous: original row of each new position, -1 past the count
  int32_t* count;  // (1,): number of kept rows
};

namespace compact_detail {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxRowsPerThread = 8;
constexpr int kMaxLanesPerRow = 32;
// Two sectors per row piece: narrower slices would waste half of every DRAM sector access.
constexpr int kMinLanesPerRow = 4;
constexpr int kCtasPerSm = 2;

struct Params {
  const char* src;
  char* dst;
  int64_t rows, row_bytes, src_stride, dst_stride;
  const bool* keep;
  int64_t keep_stride;
  int64_t* index;
  int32_t* count;
  int lanes_per_row;  // threads sharing one row of the CTA's slice (power of two, <= 32)
};

// CTA x owns bytes [x * lanes_per_row * V, (x + 1) * lanes_per_row * V) of every row. Its threads
// form kThreads / lanes_per_row groups; in a round, group g moves rows g, g + groups, ... of the
// round. CTA 0 also writes index and count.
template <int V, bool kInPlace>
__global__ void __launch_bounds__(kThreads) compact_rows_kernel(Params p) {
  using W = typename Word<V>::type;
  __shared__ int warp_kept[kWarps];
  __shared__ int rank_in_round[kThreads];  // position among the round's kept rows, -1 if dropped

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int groups = kThreads / p.lanes_per_row;
  const int rows_per_thread =
      p.lanes_per_row < kMaxRowsPerThread ? p.lanes_per_row : kMaxRowsPerThread;
  const int round_rows = groups * rows_per_thread;  // <= kThreads: one keep flag per thread
  const int group = tid / p.lanes_per_row;
  const int64_t col = (int64_t(blockIdx.x) * p.lanes_per_row + tid % p.lanes_per_row) * V;
  const bool col_valid = col < p.row_bytes;  // V divides row_bytes: a vector is all in or out
  const bool writes_index = blockIdx.x == 0;

  int64_t kept = 0;  // kept rows before this round
  for (int64_t base = 0; base < p.rows; base += round_rows) {
    const int64_t row = base + tid;
    const bool keep_row = tid < round_rows && row < p.rows && p.keep[row * p.keep_stride];
    const unsigned votes = __ballot_sync(0xffffffffu, keep_row);
    if (lane == 0) warp_kept[warp] = __popc(votes);
    __syncthreads();
    int before = 0;
    int in_round = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_kept[w] : 0;
      in_round += warp_kept[w];
    }
    const int rank = before + __popc(votes & ((1u << lane) - 1u));
    rank_in_round[tid] = keep_row ? rank : -1;
    if (writes_index && keep_row) p.index[kept + rank] = row;
    __syncthreads();

    W data[kMaxRowsPerThread];
    int moved[kMaxRowsPerThread];  // rank among the round's kept rows of each row moved, or -1
#pragma unroll
    for (int i = 0; i < kMaxRowsPerThread; ++i) {
      moved[i] = -1;
      if (i < rows_per_thread && col_valid) {
        const int j = group + groups * i;
        const int r = rank_in_round[j];
        const int64_t source = base + j;
        // In place, the rows before the first dropped one are already where they belong.
        if (r >= 0 && (!kInPlace || kept + r != source)) {
          moved[i] = r;
          data[i] = *reinterpret_cast<const W*>(p.src + source * p.src_stride + col);
        }
      }
    }
    if constexpr (kInPlace) __syncthreads();  // every load of the round precedes every store
#pragma unroll
    for (int i = 0; i < kMaxRowsPerThread; ++i) {
      if (moved[i] >= 0) {
        *reinterpret_cast<W*>(p.dst + (kept + moved[i]) * p.dst_stride + col) = data[i];
      }
    }
    kept += in_round;
    // No barrier needed before the next round: a thread rewrites warp_kept only once every
    // thread has passed this round's second barrier, and rank_in_round only once every thread has
    // passed the next round's first barrier, each after the last reads of them.
  }
  if (writes_index) {
    for (int64_t i = kept + tid; i < p.rows; i += kThreads) p.index[i] = -1;
    if (tid == 0) *p.count = int32_t(kept);
  }
}

template <int V>
cudaError_t launch_width(const Params& p, bool in_place, cudaStream_t stream) {
  const int64_t ctas = p.row_bytes > 0 ? ceil_div(p.row_bytes, int64_t(p.lanes_per_row) * V) : 1;
  if (ctas > INT32_MAX) return cudaErrorInvalidValue;
  if (in_place) {
    compact_rows_kernel<V, true><<<unsigned(ctas), kThreads, 0, stream>>>(p);
  } else {
    compact_rows_kernel<V, false><<<unsigned(ctas), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace compact_detail

// Compacts on `stream` (in place when a.dst == a.src). No allocation, no host synchronisation.
inline cudaError_t launch_compact_rows(const CompactRowsArgs& a, cudaStream_t stream) {
  using namespace compact_detail;
  int sms = 0;
  const cudaError_t err = current_device_attribute(cudaDevAttrMultiProcessorCount, &sms);
  if (err != cudaSuccess) return err;

  // Widest access that every row start and the row length allow.
  const auto rows_aligned = [&](const void* ptr, int64_t stride, int v) {
    return aligned_to(ptr, v) && divides(v, a.rows, stride);
  };
  int v = 16;
  while (v > 1 && !(a.row_bytes % v == 0 && rows_aligned(a.src, a.src_stride, v) &&
                    rows_aligned(a.dst, a.dst_stride, v))) {
    v /= 2;
  }
  // Wide slices keep accesses long; narrow ones give more CTAs. Halve until the grid covers
  // kCtasPerSm CTAs per SM (or the slice reaches its minimum).
  int lanes = kMaxLanesPerRow;
  const int64_t wanted_ctas = int64_t(kCtasPerSm) * sms;
  while (lanes > kMinLanesPerRow && ceil_div(a.row_bytes, int64_t(lanes) * v) < wanted_ctas) {
    lanes /= 2;
  }
  Params p{};
  p.src = static_cast<const char*>(a.src);
  p.dst = static_cast<char*>(a.dst);
  p.rows = a.rows;
  p.row_bytes = a.row_bytes;
  p.src_stride = a.src_stride;
  p.dst_stride = a.dst_stride;
  p.keep = a.keep;
  p.keep_stride = a.keep_stride;
  p.index = a.index;
  p.count = a.count;
  p.lanes_per_row = lanes;
  const bool in_place = a.src == a.dst;
  switch (v) {
    case 16:
      return launch_width<16>(p, in_place, stream);
    case 8:
      return launch_width<8>(p, in_place, stream);
    case 4:
      return launch_width<4>(p, in_place, stream);
    case 2:
      return launch_width<2>(p, in_place, stream);
    default:
      return launch_width<1>(p, in_place, stream);
  }
}

}  // namespace apparate
