// Fused float32 screen for exact residual quantization (docs/contracts.md), module tiger_fast._quantize_ext.
//
// For a tile of RB rows and every level, the screen computes s(c) ~ ||c||^2 - 2 r.c in float32
// for all codewords, as one (D+1)-term FMA chain started from ||c||^2 over -2c (register-blocked
// like a small GEMM; the level's codebook stays in L1/L2), keeps each row's best and second-best
// value, and certifies the best with the rigorous bound documented in
// tiger_fast/reference/quantize.py::fp32_screen_bound:
//     T = 2 [gamma_{D+1} (||r|| + max ||c||)^2 + 4 D 2^-149] (1 + 2^-20),  u = 2^-24.
// A row whose gap (second - best, in float64) is not > T is re-decided here in float64 with a
// relative error bound (refine_row, the same rule as the reference's _refine).  Only rows that
// even float64 cannot separate (exact or near-exact ties), and rows whose magnitudes could
// overflow float32, are *flagged*: they stop at that level (codes from that level on are -1 and
// the residual holds r_level) and Python finishes them with the reference path (exact_argmin), so
// the results are identical to the reference.  Residual updates are one float32 subtraction per
// element.  SIMD: AVX-512 or AVX2+FMA intrinsics when compiled for them, else portable loops
// (all three certified the same way, so they return identical results).
//
// The caller passes, per level, only the codewords that do not exactly repeat a lower-index one
// (they can never win; ties -> lowest index) plus index_map to translate back.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
// GCC 12 reports a false -Wmaybe-uninitialized inside its own avx512fintrin.h (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace py = pybind11;

namespace {

#ifndef TF_NV
#define TF_NV 2
#endif
#ifndef TF_RB
#define TF_RB 8
#endif
constexpr int RB = TF_RB;      // rows per register tile
constexpr int NV = TF_NV;      // 16-float vectors of codewords per register tile
constexpr int KW = 16 * NV;    // codewords per register tile

struct Level {
  const float* cb = nullptr;  // (K, D) row-major, the unique codewords of this level
  const int64_t* index_map = nullptr;  // (K,) original codeword index
  int64_t K = 0, Kp = 0;      // K padded to a multiple of KW
  std::vector<float> cbT;     // (D, Kp) -2 * codewords, transposed, zero padded
  std::vector<float> cn;      // (Kp,) ||c||^2 in float64 rounded to float32; +inf for padding
  double cmax = 0.0;          // max ||c|| (float64)
};

// The screen's per-row result for one level (local codeword index into the level's unique set).
struct Pick {
  int32_t idx;
  float best, second;
};

#if defined(__AVX512F__)
// s(c) for RB rows x all codewords with AVX-512.  Each s(c) is the (D+1)-term float32 sum
// ||c||^2 + sum_d r_d (-2 c_d) (accumulator initialised with ||c||^2; -2c is stored, an exact
// scaling), i.e. exactly the screen model of fp32_screen_bound.  Values go to sbuf (RB, Kp);
// lane-wise min and second-min are tracked in registers (second = min(second, max(best, s))),
// and the best index is found afterwards by scanning sbuf for the first occurrence of the best.
void screen_tile(const float* rt, int D, const Level& L, Pick* out, float* sbuf) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 bv[RB], sv[RB];
  for (int i = 0; i < RB; ++i) {
    bv[i] = inf;
    sv[i] = inf;
  }
  // rows transposed to (D, RB): the broadcasts then use fixed offsets
  alignas(64) float rtT_small[RB * 128];
  std::vector<float> rtT_big;
  float* rtT = rtT_small;
  if (D > 128) {
    rtT_big.resize(static_cast<size_t>(RB) * D);
    rtT = rtT_big.data();
  }
  for (int i = 0; i < RB; ++i)
    for (int d = 0; d < D; ++d) rtT[d * RB + i] = rt[i * D + d];
  const float* cbT = L.cbT.data();
  const int64_t Kp = L.Kp;
  for (int64_t k0 = 0; k0 < Kp; k0 += KW) {
    __m512 a[NV][RB];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 n = _mm512_loadu_ps(L.cn.data() + k0 + 16 * v);
#pragma GCC unroll 16
      for (int i = 0; i < RB; ++i) a[v][i] = n;
    }
    const float* cp = cbT + k0;
    const float* rp = rtT;
    for (int d = 0; d < D; ++d, cp += Kp, rp += RB) {
      __m512 c[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[v] = _mm512_loadu_ps(cp + 16 * v);
#pragma GCC unroll 16
      for (int i = 0; i < RB; ++i) {
        const __m512 r = _mm512_set1_ps(rp[i]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) a[v][i] = _mm512_fmadd_ps(r, c[v], a[v][i]);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        _mm512_storeu_ps(sbuf + i * Kp + k0 + 16 * v, a[v][i]);
        sv[i] = _mm512_min_ps(sv[i], _mm512_max_ps(bv[i], a[v][i]));
        bv[i] = _mm512_min_ps(bv[i], a[v][i]);
      }
    }
  }
  for (int i = 0; i < RB; ++i) {
    const float best = _mm512_reduce_min_ps(bv[i]);
    const __m512 bb = _mm512_set1_ps(best);
    const __mmask16 eq = _mm512_cmp_ps_mask(bv[i], bb, _CMP_EQ_OQ);
    float second;
    if (__builtin_popcount(static_cast<unsigned>(eq)) > 1) {
      second = best;  // two lanes hold the best value: a tie
    } else {
      const __m512 others = _mm512_mask_blend_ps(eq, bv[i], inf);
      second = std::min(_mm512_reduce_min_ps(sv[i]), _mm512_reduce_min_ps(others));
    }
    // first codeword whose screened value equals the best (unique when the row is certified)
    const float* srow = sbuf + i * Kp;
    int32_t idx = 0;
    for (int64_t k0 = 0; k0 < Kp; k0 += 16) {
      const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(srow + k0), bb, _CMP_EQ_OQ);
      if (m) {
        idx = static_cast<int32_t>(k0 + __builtin_ctz(static_cast<unsigned>(m)));
        break;
      }
    }
    out[i] = Pick{idx, best, second};
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 + FMA version of the same screen (8-float vectors): the RB-row tile is processed in
// groups of 4 rows x 16 codewords (8 accumulators; 16 ymm registers in total).
void screen_tile(const float* rt, int D, const Level& L, Pick* out, float* sbuf) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  constexpr int RG = 4;
  static_assert(RB % RG == 0, "RB must be a multiple of 4");
  static_assert(KW % 16 == 0, "KW must be a multiple of 16");
  alignas(32) float rtT_small[RB * 128];
  std::vector<float> rtT_big;
  float* rtT = rtT_small;
  if (D > 128) {
    rtT_big.resize(static_cast<size_t>(RB) * D);
    rtT = rtT_big.data();
  }
  for (int i = 0; i < RB; ++i)
    for (int d = 0; d < D; ++d) rtT[d * RB + i] = rt[i * D + d];
  const float* cbT = L.cbT.data();
  const int64_t Kp = L.Kp;
  for (int g = 0; g < RB; g += RG) {
    __m256 bv[RG], sv[RG];
    for (int i = 0; i < RG; ++i) {
      bv[i] = inf;
      sv[i] = inf;
    }
    for (int64_t k0 = 0; k0 < Kp; k0 += 16) {
      const __m256 n0 = _mm256_loadu_ps(L.cn.data() + k0);
      const __m256 n1 = _mm256_loadu_ps(L.cn.data() + k0 + 8);
      __m256 a0[RG], a1[RG];
      for (int i = 0; i < RG; ++i) {
        a0[i] = n0;
        a1[i] = n1;
      }
      const float* cp = cbT + k0;
      const float* rp = rtT + g;
      for (int d = 0; d < D; ++d, cp += Kp, rp += RB) {
        const __m256 c0 = _mm256_loadu_ps(cp);
        const __m256 c1 = _mm256_loadu_ps(cp + 8);
#pragma GCC unroll 4
        for (int i = 0; i < RG; ++i) {
          const __m256 r = _mm256_broadcast_ss(rp + i);
          a0[i] = _mm256_fmadd_ps(r, c0, a0[i]);
          a1[i] = _mm256_fmadd_ps(r, c1, a1[i]);
        }
      }
      for (int i = 0; i < RG; ++i) {
        _mm256_storeu_ps(sbuf + (g + i) * Kp + k0, a0[i]);
        _mm256_storeu_ps(sbuf + (g + i) * Kp + k0 + 8, a1[i]);
        sv[i] = _mm256_min_ps(sv[i], _mm256_max_ps(bv[i], a0[i]));
        bv[i] = _mm256_min_ps(bv[i], a0[i]);
        sv[i] = _mm256_min_ps(sv[i], _mm256_max_ps(bv[i], a1[i]));
        bv[i] = _mm256_min_ps(bv[i], a1[i]);
      }
    }
    for (int i = 0; i < RG; ++i) {
      alignas(32) float b[8], s2[8];
      _mm256_store_ps(b, bv[i]);
      _mm256_store_ps(s2, sv[i]);
      int star = 0;
      for (int l = 1; l < 8; ++l)
        if (b[l] < b[star]) star = l;
      float second = std::numeric_limits<float>::infinity();
      for (int l = 0; l < 8; ++l) {
        second = std::min(second, s2[l]);
        if (l != star) second = std::min(second, b[l]);
      }
      const __m256 bb = _mm256_set1_ps(b[star]);
      const float* srow = sbuf + (g + i) * Kp;
      int32_t idx = 0;
      for (int64_t k0 = 0; k0 < Kp; k0 += 8) {
        const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(srow + k0), bb, _CMP_EQ_OQ));
        if (m) {
          idx = static_cast<int32_t>(k0 + __builtin_ctz(static_cast<unsigned>(m)));
          break;
        }
      }
      out[g + i] = Pick{idx, b[star], second};
    }
  }
}
#else
// Portable version (same contract; the compiler vectorises the inner loops).
void screen_tile(const float* rt, int D, const Level& L, Pick* out, float* sbuf) {
  const float inf = std::numeric_limits<float>::infinity();
  float bv[RB], sv[RB];
  int32_t bi[RB];
  for (int i = 0; i < RB; ++i) {
    bv[i] = inf;
    sv[i] = inf;
    bi[i] = 0;
  }
  const float* cbT = L.cbT.data();
  for (int64_t k0 = 0; k0 < L.Kp; k0 += KW) {
    float acc[RB][KW];
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < KW; ++j) acc[i][j] = L.cn[k0 + j];
    for (int d = 0; d < D; ++d) {
      const float* cp = cbT + d * L.Kp + k0;
      for (int i = 0; i < RB; ++i) {
        const float r = rt[i * D + d];
        for (int j = 0; j < KW; ++j) acc[i][j] += r * cp[j];
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < KW; ++j) {
        const float s = acc[i][j];
        sbuf[i * L.Kp + k0 + j] = s;
        if (s < bv[i]) {
          sv[i] = bv[i];
          bv[i] = s;
          bi[i] = static_cast<int32_t>(k0 + j);
        } else if (s < sv[i]) {
          sv[i] = s;
        }
      }
  }
  for (int i = 0; i < RB; ++i) out[i] = Pick{bi[i], bv[i], sv[i]};
}
#endif

double gamma_n(int n, double u) { return n * u / (1.0 - n * u); }

// ||r||^2 in float64 with 8 independent partial sums (vectorisable; any summation order is
// fine: the threshold's safety factor covers the float64 rounding of the norm).
inline double sqnorm(const float* r, int64_t D) {
  double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) {
      const double v = r[d + j];
      p[j] += v * v;
    }
  for (; d < D; ++d) {
    const double v = r[d];
    p[0] += v * v;
  }
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// Re-decide a row the float32 screen could not certify, in float64 (same rule as
// tiger_fast/reference/quantize.py::_refine).  Candidates: every codeword j the screen could not
// exclude, i.e. fl64(s_j - s_best) <= T.  For them S~_j = sum_d fl(fl(r_d - c_jd)^2) in float64:
// the difference of two float32 values is 0 or a multiple of 2^-149, so it has relative error
// <= 2^-53 and never underflows in float64, likewise its square, hence |S~ - S| <= gamma_{D+2} S
// (purely relative).  j is excluded when S~_j > fl(S~_min * h), h = 1 + 4 (D + 4) 2^-53.
// Returns the winner's local index, or -1 when more than one candidate survives (then the
// exact integer path in Python decides).
int64_t refine_row(const float* r, const float* srow, float best, double thr, const Level& L, int64_t D,
                   std::vector<int64_t>& cand, std::vector<double>& dist) {
  cand.clear();
  dist.clear();
  const double b = best;
  for (int64_t j = 0; j < L.K; ++j)
    if (!(static_cast<double>(srow[j]) - b > thr)) cand.push_back(j);
  double smin = std::numeric_limits<double>::infinity();
  for (int64_t j : cand) {
    const float* c = L.cb + j * D;
    double acc = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double t = static_cast<double>(r[d]) - static_cast<double>(c[d]);
      acc += t * t;
    }
    dist.push_back(acc);
    smin = std::min(smin, acc);
  }
  const double h = 1.0 + 4.0 * static_cast<double>(D + 4) * std::ldexp(1.0, -53);
  const double lim = smin * h;
  int64_t winner = -1;
  for (size_t q = 0; q < cand.size(); ++q) {
    if (!(dist[q] > lim)) {
      if (winner >= 0) return -1;
      winner = cand[q];
    }
  }
  return winner;
}

py::tuple quantize_screen(py::array latents, py::array codebooks, py::array offsets_a, py::array index_map_a,
                          int num_threads) {
  auto need = [](const py::array& a, const char* name, py::dtype dt, int ndim) {
    if (!a.dtype().is(dt))
      throw py::type_error(std::string(name) + ": wrong dtype (expected " + std::string(py::str(dt)) + ")");
    if (a.ndim() != ndim) throw py::value_error(std::string(name) + ": wrong number of dimensions");
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  };
  need(latents, "latents", py::dtype::of<float>(), 2);
  need(codebooks, "codebooks", py::dtype::of<float>(), 2);
  need(offsets_a, "offsets", py::dtype::of<int64_t>(), 1);
  need(index_map_a, "index_map", py::dtype::of<int64_t>(), 1);
  const int64_t N = latents.shape(0), D = latents.shape(1);
  const int64_t Ktot = codebooks.shape(0);
  if (D < 1 || D > (1 << 20)) throw py::value_error("latents: D must be in [1, 2^20]");
  if (codebooks.shape(1) != D) throw py::value_error("codebooks: D differs from latents");
  const int64_t nL = offsets_a.shape(0) - 1;
  if (nL < 1) throw py::value_error("offsets: need at least 2 entries (L >= 1)");
  if (index_map_a.shape(0) != Ktot) throw py::value_error("index_map: length must equal codebooks.shape[0]");
  const int64_t* off = static_cast<const int64_t*>(offsets_a.data());
  const int64_t* imap = static_cast<const int64_t*>(index_map_a.data());
  if (off[0] != 0 || off[nL] != Ktot) throw py::value_error("offsets: must start at 0 and end at codebooks.shape[0]");
  for (int64_t l = 0; l < nL; ++l) {
    if (off[l + 1] <= off[l]) throw py::value_error("offsets: every level needs >= 1 codeword (increasing offsets)");
    if (off[l + 1] - off[l] > (int64_t(1) << 30)) throw py::value_error("offsets: level too large");
  }
  for (int64_t k = 0; k < Ktot; ++k)
    if (imap[k] < 0) throw py::value_error("index_map: negative entry");

  const float* X = static_cast<const float*>(latents.data());
  const float* CB = static_cast<const float*>(codebooks.data());

  // Per-level preprocessing (small): transposed padded codebook, float32 norms, max norm.
  std::vector<Level> levels(nL);
  for (int64_t l = 0; l < nL; ++l) {
    Level& L = levels[l];
    L.cb = CB + off[l] * D;
    L.index_map = imap + off[l];
    L.K = off[l + 1] - off[l];
    L.Kp = (L.K + KW - 1) / KW * KW;
    L.cbT.assign(static_cast<size_t>(D * L.Kp), 0.0f);
    L.cn.assign(static_cast<size_t>(L.Kp), std::numeric_limits<float>::infinity());
    double cmax2 = 0.0;
    for (int64_t k = 0; k < L.K; ++k) {
      double n2 = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = L.cb[k * D + d];
        if (!std::isfinite(v)) throw py::value_error("codebooks: NaN/Inf");
        n2 += v * v;
        L.cbT[d * L.Kp + k] = -2.0f * L.cb[k * D + d];  // exact; |c| >= 2^127 overflows, but then the overflow pre-check flags every row
      }
      L.cn[k] = static_cast<float>(n2);  // may round to +inf: then the overflow pre-check flags
      cmax2 = std::max(cmax2, n2);
    }
    L.cmax = std::sqrt(cmax2);
  }

  py::array_t<int64_t> codes_a({N, nL});
  py::array_t<float> resid_a({N, D});
  py::array_t<int32_t> flag_a(N);
  int64_t* codes = codes_a.mutable_data();
  float* resid = resid_a.mutable_data();
  int32_t* flag = flag_a.mutable_data();

  const double g = gamma_n(static_cast<int>(D) + 1, std::ldexp(1.0, -24));
  const double abs_term = 4.0 * static_cast<double>(D) * std::ldexp(1.0, -149);
  const double safety = 1.0 + std::ldexp(1.0, -20);
  // Overflow pre-check: every intermediate of the screen is bounded by (||r|| + ||c||)^2 (1 + gamma);
  // below this limit nothing can overflow, so all screened values are finite.
  const double limit = static_cast<double>(std::numeric_limits<float>::max()) / 1.01;
  const int64_t ntiles = (N + RB - 1) / RB;
  int64_t max_kp = 0;
  for (const Level& L : levels) max_kp = std::max(max_kp, L.Kp);

  int64_t refined = 0;  // rows decided by refine_row (diagnostics)
  {
    py::gil_scoped_release release;
#ifdef _OPENMP
    const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt) reduction(+ : refined)
#endif
    {
      // per-thread scratch, allocated once
      std::vector<float> rt(static_cast<size_t>(RB * D), 0.0f);
      std::vector<float> sbuf(static_cast<size_t>(RB * max_kp));
      std::vector<int64_t> cand;
      std::vector<double> dist;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 16)  // rows are independent: balances a loaded machine
#endif
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t row0 = t * RB;
        const int rows = static_cast<int>(std::min<int64_t>(RB, N - row0));
        std::memcpy(rt.data(), X + row0 * D, sizeof(float) * rows * D);
        bool active[RB];
        for (int i = 0; i < RB; ++i) active[i] = i < rows;
        for (int i = 0; i < rows; ++i) {
          flag[row0 + i] = -1;
          for (int64_t l = 0; l < nL; ++l) codes[(row0 + i) * nL + l] = -1;
        }
        for (int64_t l = 0; l < nL; ++l) {
          const Level& L = levels[l];
          double thr[RB];
          bool any = false;
          for (int i = 0; i < rows; ++i) {
            if (!active[i]) continue;
            const double r2 = sqnorm(rt.data() + i * D, D);
            const double rc = std::sqrt(r2) + L.cmax;
            if (!(rc * rc * 1.001 < limit)) {  // could overflow float32: let the exact path decide
              flag[row0 + i] = static_cast<int32_t>(l);
              active[i] = false;
              continue;
            }
            thr[i] = 2.0 * (g * rc * rc + abs_term) * safety;
            any = true;
          }
          if (!any) break;
          Pick pk[RB];
          screen_tile(rt.data(), static_cast<int>(D), L, pk, sbuf.data());
          for (int i = 0; i < rows; ++i) {
            if (!active[i]) continue;
            const double gap = static_cast<double>(pk[i].second) - static_cast<double>(pk[i].best);
            int64_t k = pk[i].idx;
            if (!(gap > thr[i])) {
              k = refine_row(rt.data() + i * D, sbuf.data() + i * L.Kp, pk[i].best, thr[i], L, D, cand, dist);
              ++refined;
              if (k < 0) {
                flag[row0 + i] = static_cast<int32_t>(l);
                active[i] = false;
                continue;
              }
            }
            codes[(row0 + i) * nL + l] = L.index_map[k];
            const float* c = L.cb + k * D;
            float* r = rt.data() + i * D;
            for (int64_t d = 0; d < D; ++d) r[d] = r[d] - c[d];  // one float32 subtraction
          }
        }
        std::memcpy(resid + row0 * D, rt.data(), sizeof(float) * rows * D);
      }
    }
  }
  return py::make_tuple(codes_a, resid_a, flag_a, refined);
}

}  // namespace

PYBIND11_MODULE(_quantize_ext, m) {
  m.doc() = "tiger_fast C++ residual quantization: fused float32 screen with certified flags (docs/contracts.md)";
  m.def("quantize_screen", &quantize_screen, py::arg("latents"), py::arg("codebooks"), py::arg("offsets"),
        py::arg("index_map"), py::arg("num_threads") = -1,
        R"doc(Screen all levels in float32 and flag rows the screen cannot certify.

latents: float32 (N, D) C-contiguous; codebooks: float32 (sum K_l, D) the levels' unique codewords
concatenated; offsets: int64 (L+1,) level boundaries (0 ... sum K_l, strictly increasing);
index_map: int64 (sum K_l,) original codeword index of each row; num_threads: <= 0 = OpenMP default.
Returns (codes int64 (N, L), residual float32 (N, D), flag int32 (N,), refined int).  flag[i] = -1: row done,
codes and residual r_L final.  flag[i] = l >= 0: the row stopped before level l (codes[i, l:] = -1,
residual = r_l); decide it with the reference path from level l on.  refined: number of
(row, level) decisions the screen could not certify but the in-C++ float64 re-check did.)doc");
  m.attr("simd") =
#if defined(__AVX512F__)
      "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
      "avx2";
#else
      "portable";
#endif
}
