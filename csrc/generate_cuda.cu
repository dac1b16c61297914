// CUDA kernels of the trie-constrained selection step (deterministic beam search and Gumbel-top-k
// sampling).  No torch headers: raw device pointers, sizes and a cudaStream_t passed as an integer
// (bound in csrc/generate_cpu.cpp).  Semantics: csrc/generate_common.h and
// tiger_fast/reference/generate.py.
//
// One thread block per row.  Phase A (one warp per beam): every candidate (b, t) of the row gets a
// 64-bit order-preserving key in the caller's workspace, 0 for a masked candidate:
//   beam search: ordered_bits(double(beam_score + logprob))  (the float32 add, widened exactly)
//   sampling:    ordered_bits(Kool's truncated-Gumbel key), the beam's max Z by a warp reduction.
// Phase B: block-wide top-B_out over the composite (key desc, flat index e asc): an MSD radix select
// on the 64-bit keys (8 passes of 8 bits, early exit once the boundary digit holds exactly the
// missing count), then, if keys tie at the boundary, the lowest flat indices of the tied key in one
// ordered block scan; finally a bitonic sort of the <= 1024 winners in shared memory.
// Nothing here synchronises with the host or allocates: the step can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <math_constants.h>

#include <cub/block/block_scan.cuh>
#include <cstdint>

#include "generate_common.h"
#include "philox.h"

namespace tiger_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxOut = 1024;
// Phase-A marker for a masked candidate while the slot still holds a raw float64 (a NaN pattern a
// valid perturbed log-prob never has: NaN candidates are reported and masked).
constexpr unsigned long long kMasked = 0xFFFFFFFFFFFFFFFFull;

__device__ __forceinline__ double from_ordered(uint64_t u) {
  const uint64_t bits = (u >> 63) ? (u & 0x7FFFFFFFFFFFFFFFull) : ~u;
  return __longlong_as_double(static_cast<long long>(bits));
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

__device__ __forceinline__ bool before(uint64_t ua, uint32_t ea, uint64_t ub, uint32_t eb) {
  return ua > ub || (ua == ub && ea < eb);
}

struct SelectShared {
  unsigned int hist[256];
  uint64_t sel_u[kMaxOut];
  uint32_t sel_e[kMaxOut];
  unsigned int n_valid;
  unsigned int n_sel;
  uint64_t prefix, mask;
  unsigned int remaining;
  int done;
  typename cub::BlockScan<unsigned int, kThreads>::TempStorage scan;
};

// Top-k of the row's composite keys (ws[e], e), k = min(B_out, n_valid), into sh.sel_u / sh.sel_e
// sorted best first.  Returns k (uniform over the block).
__device__ unsigned int block_select(const uint64_t* __restrict__ ws, uint32_t n, uint32_t B_out,
                                     SelectShared& sh) {
  const int tid = threadIdx.x;
  const unsigned int k = min(static_cast<unsigned int>(B_out), sh.n_valid);
  if (tid == 0) {
    sh.prefix = 0;
    sh.mask = 0;
    sh.remaining = k;
    sh.done = (sh.n_valid <= B_out) ? 1 : 0;  // every valid candidate is selected
    sh.n_sel = 0;
  }
  __syncthreads();
  if (k == 0) return 0;
  // MSD radix select: find the boundary key digit by digit.
  for (int shift = 56; shift >= 0 && !sh.done; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    const uint64_t mask = sh.mask, prefix = sh.prefix;
    for (uint32_t i = tid; i < n; i += kThreads) {
      const uint64_t u = ws[i];
      if (u != 0 && (u & mask) == prefix) atomicAdd(&sh.hist[(u >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // Find the boundary digit d (from the top): warp-parallel over the 256 bins, lane j owning
      // digits 255 - 8j .. 248 - 8j; a lane-order prefix sum and a ballot pick the lane holding d.
      const unsigned int need = sh.remaining;
      const int hi = 255 - 8 * tid;
      unsigned int own = 0;
#pragma unroll
      for (int q = 0; q < 8; ++q) own += sh.hist[hi - q];
      unsigned int incl = own;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned int v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
        if (tid >= o) incl += v;
      }
      const unsigned int hit = __ballot_sync(0xFFFFFFFFu, incl >= need);  // never 0: total >= need
      if (tid == __ffs(hit) - 1) {
        unsigned int cum = incl - own;  // candidates with a digit above this lane's range
        int d = hi;
        for (int q = 0; q < 8; ++q, --d) {
          if (cum + sh.hist[d] >= need) break;
          cum += sh.hist[d];
        }
        // Candidates with a larger digit (cum of them) are in; `need - cum` more come from d.
        sh.remaining = need - cum;
        sh.prefix = prefix | (static_cast<uint64_t>(d) << shift);
        sh.mask = mask | (0xFFull << shift);
        if (sh.hist[d] == sh.remaining) sh.done = 1;  // the whole boundary digit is in
      }
    }
    __syncthreads();
  }
  const uint64_t mask = sh.mask, prefix = sh.prefix;
  if (sh.done) {
    // Selected: every valid candidate whose masked key is >= prefix (exactly k of them).
    for (uint32_t i = tid; i < n; i += kThreads) {
      const uint64_t u = ws[i];
      if (u != 0 && (u & mask) >= prefix) {
        const unsigned int slot = atomicAdd(&sh.n_sel, 1u);
        sh.sel_u[slot] = u;
        sh.sel_e[slot] = i;
      }
    }
    __syncthreads();
  } else {
    // prefix is now the full boundary key V: take every key > V, then the `remaining` lowest flat
    // indices among the keys == V (ordered block scan over e).
    for (uint32_t i = tid; i < n; i += kThreads) {
      const uint64_t u = ws[i];
      if (u > prefix) {
        const unsigned int slot = atomicAdd(&sh.n_sel, 1u);
        sh.sel_u[slot] = u;
        sh.sel_e[slot] = i;
      }
    }
    __syncthreads();
    const unsigned int base_slot = sh.n_sel, need = sh.remaining;
    unsigned int taken = 0;
    for (uint32_t c = 0; c < n && taken < need; c += kThreads) {
      const uint32_t i = c + tid;
      const unsigned int flag = (i < n && ws[i] == prefix) ? 1u : 0u;
      unsigned int rank, total;
      cub::BlockScan<unsigned int, kThreads>(sh.scan).ExclusiveSum(flag, rank, total);
      if (flag && taken + rank < need) {
        sh.sel_u[base_slot + taken + rank] = prefix;
        sh.sel_e[base_slot + taken + rank] = i;
      }
      taken += total;  // uniform across the block
      __syncthreads();  // scan storage reuse
    }
  }
  // Bitonic sort of the k winners, padded to a power of two with entries that sort last.
  unsigned int P = 1;
  while (P < k) P <<= 1;
  for (unsigned int i = k + tid; i < P; i += kThreads) {
    sh.sel_u[i] = 0;
    sh.sel_e[i] = 0xFFFFFFFFu;
  }
  __syncthreads();
  for (unsigned int size = 2; size <= P; size <<= 1) {
    for (unsigned int stride = size >> 1; stride > 0; stride >>= 1) {
      for (unsigned int i = tid; i < P; i += kThreads) {
        const unsigned int j = i ^ stride;
        if (j > i) {
          const bool best_first = (i & size) == 0;
          const bool ib = before(sh.sel_u[i], sh.sel_e[i], sh.sel_u[j], sh.sel_e[j]);
          if (best_first != ib) {
            const uint64_t tu = sh.sel_u[i];
            sh.sel_u[i] = sh.sel_u[j];
            sh.sel_u[j] = tu;
            const uint32_t te = sh.sel_e[i];
            sh.sel_e[i] = sh.sel_e[j];
            sh.sel_e[j] = te;
          }
        }
      }
      __syncthreads();
    }
  }
  return k;
}

__global__ void __launch_bounds__(kThreads)
beam_select_kernel(const float* __restrict__ logprobs, const float* __restrict__ beam_scores,
                   const int64_t* __restrict__ beam_nodes, const int32_t* __restrict__ children,
                   int64_t B_in, int64_t S, int64_t n_nodes, int64_t B_out, int64_t* parent,
                   int64_t* token, float* score, int64_t* node, int32_t* error_flag,
                   uint64_t* workspace) {
  __shared__ SelectShared sh;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t n = static_cast<uint32_t>(B_in * S);
  uint64_t* ws = workspace + r * B_in * S;
  if (tid == 0) sh.n_valid = 0;
  __syncthreads();
  unsigned int my_valid = 0;
  int my_err = 0;
  for (int64_t b = warp; b < B_in; b += kWarps) {
    const int64_t nd = beam_nodes[r * B_in + b];
    const bool ok = nd >= 0 && nd < n_nodes;
    if (!ok && nd != -1) my_err |= kErrNodeOutOfRange;  // treated as absent: nothing is read
    const float base = beam_scores[r * B_in + b];
    const float* lrow = logprobs + (r * B_in + b) * S;
    const int32_t* crow = children + (ok ? nd : 0) * S;
    for (int64_t t = lane; t < S; t += 32) {
      uint64_t u = 0;
      if (ok && crow[t] >= 0) {
        const float v = __fadd_rn(base, lrow[t]);
        if (v != v) {
          my_err |= kErrNaN;
        } else {
          u = ordered_bits(static_cast<double>(v));
          ++my_valid;
        }
      }
      ws[b * S + t] = u;
    }
  }
  if (my_err) atomicOr(error_flag, my_err);
  if (my_valid) atomicAdd(&sh.n_valid, my_valid);
  __syncthreads();
  const unsigned int k = block_select(ws, n, static_cast<uint32_t>(B_out), sh);
  for (int64_t i = tid; i < B_out; i += kThreads) {
    const int64_t o = r * B_out + i;
    if (i < static_cast<int64_t>(k)) {
      const int64_t e = sh.sel_e[i], b = e / S, t = e % S;
      parent[o] = b;
      token[o] = t;
      // Recomputed (the same one float32 add) rather than decoded from the ordered key, which
      // folded -0.0 into +0.0.
      score[o] = __fadd_rn(beam_scores[r * B_in + b], logprobs[(r * B_in + b) * S + t]);
      node[o] = children[beam_nodes[r * B_in + b] * S + t];
    } else {
      parent[o] = -1;
      token[o] = -1;
      node[o] = -1;
      score[o] = -CUDART_INF_F;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
sample_select_kernel(const float* __restrict__ logprobs, const float* __restrict__ tempered,
                     const float* __restrict__ beam_scores, const double* __restrict__ beam_phi,
                     const double* __restrict__ beam_keys, const int64_t* __restrict__ beam_nodes,
                     const int32_t* __restrict__ children, const double* __restrict__ gumbel,
                     const int64_t* __restrict__ row_keys, int64_t B_in, int64_t S, int64_t n_nodes,
                     int64_t B_out, uint64_t seed, uint32_t step, int64_t* parent, int64_t* token,
                     float* score, int64_t* node, double* phi, double* key, int32_t* error_flag,
                     uint64_t* workspace) {
  __shared__ SelectShared sh;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t n = static_cast<uint32_t>(B_in * S);
  uint64_t* ws = workspace + r * B_in * S;
  const uint64_t row_key = gumbel ? 0 : static_cast<uint64_t>(row_keys[r]);
  if (tid == 0) sh.n_valid = 0;
  __syncthreads();
  unsigned int my_valid = 0;
  int my_err = 0;
  for (int64_t b = warp; b < B_in; b += kWarps) {
    const int64_t nd = beam_nodes[r * B_in + b];
    bool ok = nd >= 0 && nd < n_nodes;
    if (!ok && nd != -1) my_err |= kErrNodeOutOfRange;
    const double T = beam_keys[r * B_in + b];
    const double phi0 = beam_phi[r * B_in + b];
    if (ok && (T != T || phi0 != phi0)) {
      my_err |= kErrNaN;
      ok = false;
    }
    const float* trow = tempered + (r * B_in + b) * S;
    const double* grow = gumbel ? gumbel + (r * B_in + b) * S : nullptr;
    const int32_t* crow = children + (ok ? nd : 0) * S;
    // Pass 1: perturbed tempered log-probs G' of the valid children (raw float64 in the
    // workspace) and their maximum Z (warp reduction; the warp owns the whole beam).
    double z = -CUDART_INF;
    for (int64_t t = lane; t < S; t += 32) {
      unsigned long long raw = kMasked;
      if (ok && crow[t] >= 0) {
        const double noise =
            grow ? grow[t] : gumbel_of(seed, step, row_key, static_cast<uint32_t>(b * S + t));
        const double g = __dadd_rn(__dadd_rn(phi0, static_cast<double>(trow[t])), noise);
        if (g != g) {
          my_err |= kErrNaN;
        } else {
          raw = static_cast<unsigned long long>(__double_as_longlong(g));
          z = fmax(z, g);
        }
      }
      ws[b * S + t] = raw;
    }
    z = warp_max(z);
    // Pass 2: Kool's conditioning on the parent key T (same lane re-reads its own writes).
    const bool T_finite = T > -CUDART_INF;
    for (int64_t t = lane; t < S; t += 32) {
      const unsigned long long raw = ws[b * S + t];
      uint64_t u = 0;
      if (raw != kMasked) {
        const double g = __longlong_as_double(static_cast<long long>(raw));
        const double k = (T_finite && g > -CUDART_INF) ? kool_child_key(T, z, g) : -CUDART_INF;
        u = ordered_bits(k);
        ++my_valid;
      }
      ws[b * S + t] = u;
    }
  }
  if (my_err) atomicOr(error_flag, my_err);
  if (my_valid) atomicAdd(&sh.n_valid, my_valid);
  __syncthreads();
  const unsigned int k = block_select(ws, n, static_cast<uint32_t>(B_out), sh);
  for (int64_t i = tid; i < B_out; i += kThreads) {
    const int64_t o = r * B_out + i;
    if (i < static_cast<int64_t>(k)) {
      const int64_t e = sh.sel_e[i], b = e / S, t = e % S;
      const int64_t src = (r * B_in + b) * S + t;
      parent[o] = b;
      token[o] = t;
      score[o] = __fadd_rn(beam_scores[r * B_in + b], logprobs[src]);
      node[o] = children[beam_nodes[r * B_in + b] * S + t];
      phi[o] = __dadd_rn(beam_phi[r * B_in + b], static_cast<double>(tempered[src]));
      key[o] = from_ordered(sh.sel_u[i]);  // a -0.0 key comes back as +0.0 (equal in value)
    } else {
      parent[o] = -1;
      token[o] = -1;
      node[o] = -1;
      score[o] = -CUDART_INF_F;
      phi[o] = -CUDART_INF;
      key[o] = -CUDART_INF;
    }
  }
}

bool bad_sizes(int64_t R, int64_t B_in, int64_t S, int64_t n_nodes, int64_t B_out) {
  return R < 0 || R > 0x7FFFFFFFll || B_in < 0 || S < 1 || n_nodes < 0 || B_out < 1 ||
         B_out > kMaxOut || B_in * S > 0xFFFFFFFFll;
}

}  // namespace
}  // namespace tiger_fast

using namespace tiger_fast;

extern "C" {

int tf_cuda_device_count(int* count) {
  *count = 0;
  const cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not poisoned
    *count = 0;
  }
  return static_cast<int>(e);
}

const char* tf_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int tf_cuda_beam_select_step(const float* logprobs, const float* beam_scores,
                             const int64_t* beam_nodes, const int32_t* children, int64_t R,
                             int64_t B_in, int64_t S, int64_t n_nodes, int64_t B_out,
                             int64_t* parent, int64_t* token, float* score, int64_t* node,
                             int32_t* error_flag, uint64_t* workspace, uintptr_t stream) {
  if (bad_sizes(R, B_in, S, n_nodes, B_out)) return static_cast<int>(cudaErrorInvalidValue);
  if (R == 0) return 0;
  beam_select_kernel<<<static_cast<unsigned int>(R), kThreads, 0,
                       reinterpret_cast<cudaStream_t>(stream)>>>(
      logprobs, beam_scores, beam_nodes, children, B_in, S, n_nodes, B_out, parent, token, score,
      node, error_flag, workspace);
  return static_cast<int>(cudaGetLastError());
}

int tf_cuda_sample_select_step(const float* logprobs, const float* tempered,
                               const float* beam_scores, const double* beam_phi,
                               const double* beam_keys, const int64_t* beam_nodes,
                               const int32_t* children, const double* gumbel,
                               const int64_t* row_keys, int64_t R, int64_t B_in, int64_t S,
                               int64_t n_nodes, int64_t B_out, uint64_t seed, uint32_t step,
                               int64_t* parent, int64_t* token, float* score, int64_t* node,
                               double* phi, double* key, int32_t* error_flag, uint64_t* workspace,
                               uintptr_t stream) {
  if (bad_sizes(R, B_in, S, n_nodes, B_out)) return static_cast<int>(cudaErrorInvalidValue);
  if (R == 0) return 0;
  sample_select_kernel<<<static_cast<unsigned int>(R), kThreads, 0,
                         reinterpret_cast<cudaStream_t>(stream)>>>(
      logprobs, tempered, beam_scores, beam_phi, beam_keys, beam_nodes, children, gumbel, row_keys,
      B_in, S, n_nodes, B_out, seed, step, parent, token, score, node, phi, key, error_flag,
      workspace);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
