// Philox4x32-10 counter-based random number generator (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011), written from the published algorithm.
//
// One header for host C++ and CUDA device code: when compiled by nvcc the functions are
// __host__ __device__, so the CPU extension and the CUDA kernels produce the same uint32 stream.
// Known-answer vectors (Random123 tests/kat_vectors) are checked in tests/test_generate_ext.py.
//
// tiger_fast's use (docs in tiger_fast/philox.py and docs/contracts.md, "Sampling"):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (e, step, row_key & 0xffffffff, row_key >> 32),  e = b * S_l + t
//   u       = (x0 + 0.5) * 2^-32   (float64, exact: x0 < 2^32 needs 33 bits of mantissa)
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ __forceinline__
#else
#define TF_HD inline
#endif

namespace tiger_fast {

struct Philox4x32 {
  uint32_t v[4];
};

// Round multipliers and Weyl key increments of Philox4x32 (from the paper).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

TF_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  // 32x32 -> 64-bit product; both host and device compile this to one wide multiply.
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Ten rounds; the key is bumped between rounds (nine bumps in all).
TF_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c0, &hi0, &lo0);
    philox_mulhilo(kPhiloxM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4x32 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// Word 0 of the block for tiger_fast's counter layout (the only word the sampler uses).
TF_HD uint32_t philox_word0(uint64_t seed, uint32_t e, uint32_t step, uint64_t row_key) {
  return philox4x32_10(e, step, static_cast<uint32_t>(row_key), static_cast<uint32_t>(row_key >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32))
      .v[0];
}

// u in (0, 1), exact in float64: (x + 1/2) / 2^32.
TF_HD double philox_uniform(uint32_t x) {
  return (static_cast<double>(x) + 0.5) * (1.0 / 4294967296.0);
}

}  // namespace tiger_fast
