// Shared pieces of the trie-constrained selection step, used by csrc/generate_cpu.cpp (host C++)
// and csrc/generate_cuda.cu (nvcc).  No torch headers anywhere: the CUDA entry points take raw
// device pointers, sizes and a cudaStream_t passed as an integer.
//
// Semantics (docs/contracts.md, "Beam search" and "Sampling"; reference: tiger_fast/reference/generate.py):
//   candidates of row r: (b, t) with beam_nodes[r, b] >= 0 and children[node, t] >= 0;
//   beam search:  key = beam_scores[r, b] + logprobs[r, b, t]   (one float32 add)
//   sampling:     key = Kool's truncated-Gumbel perturbed key (float64), see kool_child_key below;
//   keep the best num_out keys, descending; ties by the flat index e = b * S + t ascending;
//   empty slots: parent = token = node = -1, score = -inf (and key = -inf when sampling).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"

namespace tiger_fast {

// Error bits reported by the kernels (the CPU path raises ValueError naming the argument; the CUDA
// kernels cannot raise, so they skip the offending read and OR these bits into an int32 flag).
enum GenerateError : int32_t {
  kErrNone = 0,
  kErrNodeOutOfRange = 1,   // beam_nodes[r, b] >= n_nodes
  kErrNaN = 2,              // a valid candidate's score or key is NaN (candidate dropped)
};

// Order-preserving map float64 -> uint64 (larger double -> larger integer).  -0.0 is mapped like
// +0.0 first: the contract compares keys numerically (-0.0 == +0.0, tie by flat index).  Every
// non-NaN double maps to a value > 0, so 0 can mark "no candidate".
TF_HD uint64_t ordered_bits(double x) {
  if (x == 0.0) x = 0.0;
  uint64_t u;
#if defined(__CUDA_ARCH__)
  u = static_cast<uint64_t>(__double_as_longlong(x));
#else
  std::memcpy(&u, &x, sizeof(u));
#endif
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

// log(1 - exp(a)) for a <= 0 (Mächler's "log1mexp": two branches to keep it accurate).
TF_HD double log1mexp(double a) {
  return a > -0.6931471805599453 ? log(-expm1(a)) : log1p(-exp(a));
}

// Kool et al. 2019 (Stochastic Beam Search, eq. 23 / appendix B.3): given the parent's perturbed
// key T, the maximum Z of the perturbed log-probs of its children, and this child's perturbed
// log-prob g (<= Z), the child's key is -log(exp(-T) - exp(-Z) + exp(-g)), computed stably:
//   v = T - g + log1mexp(g - Z);   key = T - max(v, 0) - log1p(exp(-|v|)).
// For the maximising child (g == Z) this is T exactly.
TF_HD double kool_child_key(double T, double Z, double g) {
  const double v = T - g + log1mexp(g - Z);
  return T - (v > 0.0 ? v : 0.0) - log1p(exp(-fabs(v)));
}

// Standard Gumbel noise of tiger_fast's sampler for one candidate.
TF_HD double gumbel_of(uint64_t seed, uint32_t step, uint64_t row_key, uint32_t e) {
  const double u = philox_uniform(philox_word0(seed, e, step, row_key));
  return -log(-log(u));
}

}  // namespace tiger_fast

// ---- CUDA launchers (defined in generate_cuda.cu; declared here so generate_cpu.cpp can bind
// them without including any CUDA header).  Every pointer is a device pointer; `stream` is a
// cudaStream_t cast to an integer (0 = legacy default stream).  Return value: 0 on success, else a
// CUDA error code (cudaError_t as int); tf_cuda_error_string turns it into text.
#if defined(TIGER_FAST_WITH_CUDA)
extern "C" {
int tf_cuda_device_count(int* count);
const char* tf_cuda_error_string(int code);

// Deterministic beam search step.  Shapes as in beam_select_step; `error_flag` int32[1] (device)
// receives GenerateError bits (OR-ed, never cleared by the kernel).
int tf_cuda_beam_select_step(const float* logprobs, const float* beam_scores,
                             const int64_t* beam_nodes, const int32_t* children, int64_t R,
                             int64_t B_in, int64_t S, int64_t n_nodes, int64_t B_out,
                             int64_t* parent, int64_t* token, float* score, int64_t* node,
                             int32_t* error_flag, uint64_t* workspace, uintptr_t stream);

// Gumbel-top-k sampling step (see sample_select_step in generate_cpu.cpp for the arguments).
// gumbel: float64 (R, B_in, S) noise, or nullptr to generate it from (seed, step, row_keys).
int tf_cuda_sample_select_step(const float* logprobs, const float* tempered,
                               const float* beam_scores, const double* beam_phi,
                               const double* beam_keys, const int64_t* beam_nodes,
                               const int32_t* children, const double* gumbel,
                               const int64_t* row_keys, int64_t R,
                               int64_t B_in, int64_t S, int64_t n_nodes, int64_t B_out,
                               uint64_t seed, uint32_t step, int64_t* parent, int64_t* token,
                               float* score, int64_t* node, double* phi, double* key,
                               int32_t* error_flag, uint64_t* workspace, uintptr_t stream);
}
#endif
