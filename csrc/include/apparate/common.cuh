// Building blocks of apparate's CUDA kernels: vector access types, the integer arithmetic of
// launch geometry and device queries. Raw CUDA only, like the kernel headers that include it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace apparate::detail {

constexpr int kWarp = 32;

// Unsigned integer type of a Bytes-wide access: data moved as these words takes one load or store
// per vector whatever its element type, and any element type fits.
template <int Bytes>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = uint32_t;
};
template <>
struct Word<2> {
  using type = uint16_t;
};
template <>
struct Word<1> {
  using type = uint8_t;
};

// N consecutive elements loaded as one access (N * sizeof(T) bytes, naturally aligned).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

inline bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uint64_t(bytes) == 0;
}

// Whether `count` items `stride` apart all keep the alignment of the first to a multiple of
// `vec`; a single item has no stride to spoil it.
inline bool divides(int64_t vec, int64_t count, int64_t stride) {
  return count <= 1 || stride % vec == 0;
}

inline cudaError_t current_device_attribute(cudaDeviceAttr attribute, int* value) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  return err == cudaSuccess ? cudaDeviceGetAttribute(value, attribute, device) : err;
}

}  // namespace apparate::detail
