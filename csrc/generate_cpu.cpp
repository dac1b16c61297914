// tiger_fast._generate_ext: the per-level selection step of trie-constrained decoding on the CPU
// (OpenMP over rows) plus the bindings of the CUDA launchers (csrc/generate_cuda.cu) and of
// Philox4x32-10 (csrc/philox.h).
//
// The specification is tiger_fast/reference/generate.py (beam_select_step, sample_select_step);
// docs/contracts.md ("Beam search", "Sampling") gives the contract.  Everything Python passes is checked
// here (shapes, dtypes, contiguity, every node id read from beam_nodes against the children table)
// and a violation raises ValueError/TypeError naming the argument: nothing may crash the process.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "generate_common.h"
#include "philox.h"

namespace py = pybind11;
using namespace tiger_fast;

namespace {

// ---- argument checking --------------------------------------------------------------------------

template <typename T>
const char* dtype_name();
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<double>() { return "float64"; }
template <> const char* dtype_name<int64_t>() { return "int64"; }
template <> const char* dtype_name<int32_t>() { return "int32"; }

// Checks dtype (exactly T: no silent casts), C-contiguity and the number of dimensions; returns a
// typed view.  Shape entries are checked by the caller (they relate arguments to each other).
template <typename T>
py::array_t<T> checked(const py::handle& obj, const char* name, int ndim) {
  if (!py::isinstance<py::array>(obj)) {
    std::ostringstream m;
    m << name << " must be a numpy array (or a CPU tensor passed as tensor.numpy()), got "
      << std::string(py::str(py::type::of(obj)));
    throw py::type_error(m.str());
  }
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>())) {
    std::ostringstream m;
    m << name << " must have dtype " << dtype_name<T>() << ", got " << std::string(py::str(a.dtype()))
      << " (convert it first, e.g. .astype / .to)";
    throw py::type_error(m.str());
  }
  if (a.ndim() != ndim) {
    std::ostringstream m;
    m << name << " must have " << ndim << " dimensions, got " << a.ndim();
    throw py::value_error(m.str());
  }
  if (!(a.flags() & py::array::c_style)) {
    std::ostringstream m;
    m << name << " must be C-contiguous (call .contiguous() / np.ascontiguousarray first)";
    throw py::value_error(m.str());
  }
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

std::string shape_str(const py::array& a) {
  std::ostringstream m;
  m << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) m << (i ? ", " : "") << a.shape(i);
  m << (a.ndim() == 1 ? ",)" : ")");
  return m.str();
}

int resolve_threads(int num_threads) {
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = OpenMP default)");
#ifdef _OPENMP
  return num_threads == 0 ? omp_get_max_threads() : num_threads;
#else
  return 1;
#endif
}

// ---- partial selection --------------------------------------------------------------------------

// A candidate: its key (float for beam search, double for sampling) and flat index e = b * S + t.
template <typename K>
struct Cand {
  K key;
  int64_t e;
};

// "a ranks before b": key descending, ties by flat index ascending.
template <typename K>
inline bool better(const Cand<K>& a, const Cand<K>& b) {
  return a.key > b.key || (a.key == b.key && a.e < b.e);
}

// Bounded heap of the best `cap` candidates seen so far, worst on top.  Candidates are offered in
// ascending flat index, so once the heap is full a newcomer beats the worst iff its key is strictly
// larger (an equal key has a larger index and loses the tie): one compare in the common case.
template <typename K>
struct TopK {
  std::vector<Cand<K>> h;
  size_t cap = 0;
  void reset(size_t c) {
    cap = c;
    h.clear();
    if (h.capacity() < c) h.reserve(c);
  }
  bool full() const { return h.size() == cap; }
  K worst() const { return h.front().key; }
  // Pre: candidates offered with ascending e.
  inline void offer(K key, int64_t e) {
    if (h.size() < cap) {
      h.push_back({key, e});
      std::push_heap(h.begin(), h.end(), better<K>);
    } else if (cap > 0 && key > h.front().key) {
      std::pop_heap(h.begin(), h.end(), better<K>);
      h.back() = {key, e};
      std::push_heap(h.begin(), h.end(), better<K>);
    }
  }
  void finish() { std::sort_heap(h.begin(), h.end(), better<K>); }  // best first
};

// Per-thread scratch reused across calls (no allocation in the hot loop once warm).
struct Scratch {
  TopK<float> topf;
  TopK<double> topd;
  std::vector<double> g;  // perturbed log-probs of one beam's children (sampling)
};
thread_local Scratch tls_scratch;

// Below this many (row, beam, code) entries a step runs on the calling thread: waking an OpenMP
// team costs more than the work (batch-1 serving).
constexpr int64_t kParallelMinWork = 1 << 15;

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();

// Error report from the parallel loop: the first (lowest) row with a problem wins, so the message
// does not depend on thread scheduling.
struct ErrorSlot {
  std::atomic<int64_t> row{std::numeric_limits<int64_t>::max()};
  int64_t beam = -1, value = 0;
  int code = 0;
  std::atomic_flag lock = ATOMIC_FLAG_INIT;
  void report(int64_t r, int64_t b, int64_t v, int c) {
    while (lock.test_and_set(std::memory_order_acquire)) {
    }
    if (r < row.load()) {
      row.store(r);
      beam = b;
      value = v;
      code = c;
    }
    lock.clear(std::memory_order_release);
  }
  void raise(int64_t n_nodes) const {
    if (code == 0) return;
    std::ostringstream m;
    if (code == kErrNodeOutOfRange) {
      m << "beam_nodes[" << row.load() << ", " << beam << "] = " << value
        << " is not a node of this level: must be -1 (absent beam) or in [0, " << n_nodes
        << ") (children has " << n_nodes << " rows)";
    } else if (value == -1) {
      m << "NaN in logprobs or beam_scores at row " << row.load() << ", beam " << beam
        << " (the model produced NaN/+inf logits)";
    } else {
      m << "NaN at row " << row.load() << ", beam " << beam
        << " in logprobs, tempered, beam_scores, beam_phi, beam_keys or gumbel (the sampler state must "
           "be finite or -inf; NaN means the model produced NaN/+inf logits)";
    }
    throw py::value_error(m.str());
  }
};

// A C++ exception (std::bad_alloc from a scratch buffer, ...) must not leave an OpenMP region:
// that calls std::terminate and aborts the process.  Each row's work runs inside try/catch, the
// first exception is kept here and rethrown after the region (pybind11 turns std::bad_alloc into
// MemoryError).
struct ExceptionSlot {
  std::exception_ptr first;
  std::mutex m;
  void capture() {
    std::lock_guard<std::mutex> g(m);
    if (!first) first = std::current_exception();
  }
  void rethrow() const {
    if (first) std::rethrow_exception(first);
  }
};

// Upper bound on the candidates one row can have, to size scratch buffers from what exists
// (B_in * S entries of logprobs) rather than from num_out alone.
inline size_t heap_capacity(int64_t B_in, int64_t S, int64_t B_out) {
  return static_cast<size_t>(std::min<int64_t>(B_out, B_in * S));
}

// ---- the two steps --------------------------------------------------------------------------------

// Calls f(t) for every t in [0, S) with row[t] >= 0, in ascending t.  Deep trie levels are sparse
// (~1.5 valid codes of 256 per node on a Beauty-size catalogue), so the scan tests 16 (AVX-512) or
// 8 (AVX2) entries per instruction and visits only the set bits.
template <typename F>
inline void for_each_valid(const int32_t* row, int64_t S, F&& f) {
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512i minus1 = _mm512_set1_epi32(-1);
  for (; t + 16 <= S; t += 16) {
    uint32_t m = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(reinterpret_cast<const void*>(row + t)), minus1);
    while (m) {
      const int j = __builtin_ctz(m);
      m &= m - 1;
      f(t + j);
    }
  }
#elif defined(__AVX2__)
  const __m256i minus1 = _mm256_set1_epi32(-1);
  for (; t + 8 <= S; t += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + t));
    uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, minus1))));
    while (m) {
      const int j = __builtin_ctz(m);
      m &= m - 1;
      f(t + j);
    }
  }
#endif
  for (; t < S; ++t)
    if (row[t] >= 0) f(t);
}

// NaN check: NaN log-probs or beam scores at a *valid* candidate raise ValueError (they would make
// the order undefined).  A NaN at a masked position cannot influence the result and is not looked
// for: scanning every entry would read the whole (R, B_in, S) block, 2-4x the work of the step at the
// sparse deep levels.  (The reference raises for NaN anywhere; tiger_fast.generate rejects NaN
// logits before either runs.)
struct StepShapes {
  int64_t R, B_in, S, n_nodes, B_out;
};

StepShapes check_common(const py::array_t<float>& logprobs, const py::array_t<float>& beam_scores,
                        const py::array_t<int64_t>& beam_nodes, const py::array_t<int32_t>& children,
                        int64_t num_out) {
  StepShapes s{logprobs.shape(0), logprobs.shape(1), logprobs.shape(2), children.shape(0), num_out};
  require(num_out >= 1, "num_out must be >= 1, got " + std::to_string(num_out));
  require(children.shape(1) == s.S,
          "children must have shape (n_nodes, S) with S = logprobs.shape[2] = " + std::to_string(s.S) +
              ", got " + shape_str(children));
  require(beam_scores.shape(0) == s.R && beam_scores.shape(1) == s.B_in,
          "beam_scores must have shape (R, B_in) = (" + std::to_string(s.R) + ", " +
              std::to_string(s.B_in) + "), got " + shape_str(beam_scores));
  require(beam_nodes.shape(0) == s.R && beam_nodes.shape(1) == s.B_in,
          "beam_nodes must have shape (R, B_in) = (" + std::to_string(s.R) + ", " +
              std::to_string(s.B_in) + "), got " + shape_str(beam_nodes));
  // e = b * S + t must fit the Philox counter word and int64 flat indices comfortably.
  require(s.B_in * s.S <= 0xFFFFFFFFll, "B_in * S must be < 2^32");
  return s;
}

// The outputs are R x num_out slots of `bytes_per_slot` bytes, all written (padding included).
// Refuse up front with MemoryError when they could never fit in this machine's physical memory:
// otherwise the allocation may succeed lazily (overcommit) and the padding writes get the process
// killed.
void check_output_size(int64_t R, int64_t B_out, int64_t bytes_per_slot) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (R == 0 || pages <= 0 || page <= 0) return;
  const unsigned __int128 need = static_cast<unsigned __int128>(R) * static_cast<uint64_t>(B_out) *
                                 static_cast<uint64_t>(bytes_per_slot);
  const unsigned __int128 have = static_cast<unsigned __int128>(pages) * static_cast<uint64_t>(page);
  if (need > have) {
    std::ostringstream m;
    m << "num_out = " << B_out << " with R = " << R << " rows needs "
      << static_cast<double>(need) / (1ull << 30) << " GiB of outputs, more than this machine's "
      << static_cast<double>(have) / (1ull << 30) << " GiB of memory; lower num_out or the batch";
    PyErr_SetString(PyExc_MemoryError, m.str().c_str());
    throw py::error_already_set();
  }
}

template <typename T>
py::array_t<T> new_array(int64_t R, int64_t B) {
  return py::array_t<T>(std::vector<py::ssize_t>{static_cast<py::ssize_t>(R), static_cast<py::ssize_t>(B)});
}

py::tuple beam_select_step(py::object logprobs_o, py::object beam_scores_o, py::object beam_nodes_o,
                           py::object children_o, int64_t num_out, int num_threads) {
  auto logprobs = checked<float>(logprobs_o, "logprobs", 3);
  auto beam_scores = checked<float>(beam_scores_o, "beam_scores", 2);
  auto beam_nodes = checked<int64_t>(beam_nodes_o, "beam_nodes", 2);
  auto children = checked<int32_t>(children_o, "children", 2);
  const StepShapes s = check_common(logprobs, beam_scores, beam_nodes, children, num_out);
  const int nt = resolve_threads(num_threads);
  check_output_size(s.R, s.B_out, 3 * 8 + 4);

  auto parent = new_array<int64_t>(s.R, s.B_out);
  auto token = new_array<int64_t>(s.R, s.B_out);
  auto score = new_array<float>(s.R, s.B_out);
  auto node = new_array<int64_t>(s.R, s.B_out);

  const float* lp = logprobs.data();
  const float* bs = beam_scores.data();
  const int64_t* bn = beam_nodes.data();
  const int32_t* ch = children.data();
  int64_t* o_parent = parent.mutable_data();
  int64_t* o_token = token.mutable_data();
  float* o_score = score.mutable_data();
  int64_t* o_node = node.mutable_data();
  ErrorSlot err;
  ExceptionSlot exc;
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4) if (s.R > 1 && s.R * s.B_in * s.S >= kParallelMinWork)
    for (int64_t r = 0; r < s.R; ++r) {
      try {
      TopK<float>& top = tls_scratch.topf;
      top.reset(heap_capacity(s.B_in, s.S, s.B_out));
      bool bad = false;
      for (int64_t b = 0; b < s.B_in && !bad; ++b) {
        const int64_t nd = bn[r * s.B_in + b];
        if (nd == -1) continue;  // absent beam
        if (nd < -1 || nd >= s.n_nodes) {
          err.report(r, b, nd, kErrNodeOutOfRange);
          bad = true;
          break;
        }
        const float base = bs[r * s.B_in + b];
        const float* lrow = lp + (r * s.B_in + b) * s.S;
        const int32_t* crow = ch + nd * s.S;
        const int64_t e0 = b * s.S;
        bool nan = false;
        for_each_valid(crow, s.S, [&](int64_t t) {
          const float v = base + lrow[t];  // one float32 add (-ffp-contract=off: no FMA games)
          if (v != v) {
            nan = true;  // NaN log-prob or beam score (+inf + -inf cannot occur: log-probs <= 0)
            return;
          }
          top.offer(v, e0 + t);
        });
        if (nan) {
          err.report(r, b, -1, kErrNaN);
          bad = true;
        }
      }
      top.finish();
      const size_t k = bad ? 0 : top.h.size();
      int64_t* pp = o_parent + r * s.B_out;
      int64_t* pt = o_token + r * s.B_out;
      float* ps = o_score + r * s.B_out;
      int64_t* pn = o_node + r * s.B_out;
      for (size_t i = 0; i < k; ++i) {
        const int64_t b = top.h[i].e / s.S, t = top.h[i].e % s.S;
        pp[i] = b;
        pt[i] = t;
        ps[i] = top.h[i].key;
        pn[i] = ch[bn[r * s.B_in + b] * s.S + t];
      }
      for (int64_t i = static_cast<int64_t>(k); i < s.B_out; ++i) {
        pp[i] = pt[i] = pn[i] = -1;
        ps[i] = kNegInfF;
      }
      } catch (...) {
        exc.capture();
      }
    }
  }
  exc.rethrow();
  err.raise(s.n_nodes);
  return py::make_tuple(parent, token, score, node);
}

uint64_t seed_arg(const py::object& seed_o);

py::tuple sample_select_step(py::object logprobs_o, py::object tempered_o, py::object beam_scores_o,
                             py::object beam_phi_o, py::object beam_keys_o, py::object beam_nodes_o,
                             py::object children_o, int64_t num_out, py::object seed_o,
                             py::object step_o, py::object row_keys_o, py::object gumbel_o,
                             int num_threads) {
  auto logprobs = checked<float>(logprobs_o, "logprobs", 3);
  auto tempered = checked<float>(tempered_o, "tempered", 3);
  auto beam_scores = checked<float>(beam_scores_o, "beam_scores", 2);
  auto beam_phi = checked<double>(beam_phi_o, "beam_phi", 2);
  auto beam_keys = checked<double>(beam_keys_o, "beam_keys", 2);
  auto beam_nodes = checked<int64_t>(beam_nodes_o, "beam_nodes", 2);
  auto children = checked<int32_t>(children_o, "children", 2);
  const StepShapes s = check_common(logprobs, beam_scores, beam_nodes, children, num_out);
  require(tempered.shape(0) == s.R && tempered.shape(1) == s.B_in && tempered.shape(2) == s.S,
          "tempered must have the shape of logprobs " + shape_str(logprobs) + ", got " +
              shape_str(tempered));
  require(beam_phi.shape(0) == s.R && beam_phi.shape(1) == s.B_in,
          "beam_phi must have shape (R, B_in), got " + shape_str(beam_phi));
  require(beam_keys.shape(0) == s.R && beam_keys.shape(1) == s.B_in,
          "beam_keys must have shape (R, B_in), got " + shape_str(beam_keys));
  // Noise: generated here from (seed, step, row_keys) for the valid candidates only, unless the
  // caller passes it explicitly (float64 (R, B_in, S), e.g. tiger_fast.philox.gumbel_noise).
  const uint64_t seed = seed_arg(seed_o);
  if (!py::isinstance<py::int_>(step_o) || py::isinstance<py::bool_>(step_o))
    throw py::type_error("step must be an int (the level index)");
  const int64_t step = step_o.cast<int64_t>();
  require(step >= 0 && step <= 0xFFFFFFFFll, "step must be in [0, 2^32), got " + std::to_string(step));
  const uint32_t step32 = static_cast<uint32_t>(step);
  auto row_keys = checked<int64_t>(row_keys_o, "row_keys", 1);
  require(row_keys.shape(0) == s.R, "row_keys must have shape (R,) = (" + std::to_string(s.R) +
                                        ",), got " + shape_str(row_keys));
  const bool have_noise = !gumbel_o.is_none();
  py::array_t<double> gumbel;
  if (have_noise) {
    gumbel = checked<double>(gumbel_o, "gumbel", 3);
    require(gumbel.shape(0) == s.R && gumbel.shape(1) == s.B_in && gumbel.shape(2) == s.S,
            "gumbel must have the shape of logprobs " + shape_str(logprobs) + ", got " + shape_str(gumbel));
  }
  const int nt = resolve_threads(num_threads);
  check_output_size(s.R, s.B_out, 5 * 8 + 4);

  auto parent = new_array<int64_t>(s.R, s.B_out);
  auto token = new_array<int64_t>(s.R, s.B_out);
  auto score = new_array<float>(s.R, s.B_out);
  auto node = new_array<int64_t>(s.R, s.B_out);
  auto phi = new_array<double>(s.R, s.B_out);
  auto key = new_array<double>(s.R, s.B_out);

  const float* lp = logprobs.data();
  const float* tp = tempered.data();
  const float* bs = beam_scores.data();
  const double* bphi = beam_phi.data();
  const double* bkey = beam_keys.data();
  const int64_t* bn = beam_nodes.data();
  const int32_t* ch = children.data();
  const double* gn = have_noise ? gumbel.data() : nullptr;
  const int64_t* rk = row_keys.data();
  int64_t* o_parent = parent.mutable_data();
  int64_t* o_token = token.mutable_data();
  float* o_score = score.mutable_data();
  int64_t* o_node = node.mutable_data();
  double* o_phi = phi.mutable_data();
  double* o_key = key.mutable_data();
  ErrorSlot err;
  ExceptionSlot exc;
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4) if (s.R > 1 && s.R * s.B_in * s.S >= kParallelMinWork)
    for (int64_t r = 0; r < s.R; ++r) {
      try {
      Scratch& sc = tls_scratch;
      TopK<double>& top = sc.topd;
      top.reset(heap_capacity(s.B_in, s.S, s.B_out));
      // g holds one beam's S perturbed log-probs: sized only once a beam with a node is met (then
      // its logprobs row of S floats exists, so S is backed by real memory)
      double* g = nullptr;
      const uint64_t row_key = static_cast<uint64_t>(rk[r]);
      bool bad = false;
      for (int64_t b = 0; b < s.B_in && !bad; ++b) {
        const int64_t nd = bn[r * s.B_in + b];
        if (nd == -1) continue;
        if (nd < -1 || nd >= s.n_nodes) {
          err.report(r, b, nd, kErrNodeOutOfRange);
          bad = true;
          break;
        }
        const double T = bkey[r * s.B_in + b];
        const double phi0 = bphi[r * s.B_in + b];
        if (T != T || phi0 != phi0) {
          err.report(r, b, 0, kErrNaN);
          bad = true;
          break;
        }
        // Every child key is <= T (key = T - nonnegative terms, rounding is monotone): if the heap
        // is full and its worst key is >= T, no child of this beam can enter (an equal key loses
        // on its larger flat index).
        if (top.full() && top.worst() >= T) continue;
        const float* trow = tp + (r * s.B_in + b) * s.S;
        const float* lrow = lp + (r * s.B_in + b) * s.S;
        const float bs_b = bs[r * s.B_in + b];
        const double* grow = gn ? gn + (r * s.B_in + b) * s.S : nullptr;
        const int32_t* crow = ch + nd * s.S;
        const uint32_t e0 = static_cast<uint32_t>(b * s.S);
        if (g == nullptr) {
          if (sc.g.size() < static_cast<size_t>(s.S)) sc.g.resize(static_cast<size_t>(s.S));
          g = sc.g.data();
        }
        // Pass 1: perturbed tempered log-probs G' = (phi + tempered) + gumbel of the valid
        // children, and their maximum Z.
        double Z = kNegInfD;
        bool nan = false;
        for_each_valid(crow, s.S, [&](int64_t t) {
          const double noise =
              grow ? grow[t] : gumbel_of(seed, step32, row_key, e0 + static_cast<uint32_t>(t));
          const double gi = (phi0 + static_cast<double>(trow[t])) + noise;
          // NaN tempered log-prob / beam_phi / noise, or NaN untempered score (checked too, so
          // the returned score is never NaN)
          nan |= (gi != gi) | (lrow[t] != lrow[t]) | (bs_b != bs_b);
          g[t] = gi;
          if (gi > Z) Z = gi;
        });
        if (nan) {
          err.report(r, b, 0, kErrNaN);
          bad = true;
          break;
        }
        // Pass 2: Kool's conditioning on the parent key, then the bounded heap.
        const bool T_finite = T > kNegInfD;
        for_each_valid(crow, s.S, [&](int64_t t) {
          // A -inf perturbed log-prob (or parent key) gives key -inf; still a valid candidate.
          const double k = (T_finite && g[t] > kNegInfD) ? kool_child_key(T, Z, g[t]) : kNegInfD;
          top.offer(k, static_cast<int64_t>(e0) + t);
        });
      }
      top.finish();
      const size_t k = bad ? 0 : top.h.size();
      const int64_t o = r * s.B_out;
      for (size_t i = 0; i < k; ++i) {
        const int64_t b = top.h[i].e / s.S, t = top.h[i].e % s.S;
        const int64_t src = (r * s.B_in + b) * s.S + t;
        o_parent[o + i] = b;
        o_token[o + i] = t;
        o_score[o + i] = bs[r * s.B_in + b] + lp[src];
        o_node[o + i] = ch[bn[r * s.B_in + b] * s.S + t];
        o_phi[o + i] = bphi[r * s.B_in + b] + static_cast<double>(tp[src]);
        o_key[o + i] = top.h[i].key;
      }
      for (int64_t i = static_cast<int64_t>(k); i < s.B_out; ++i) {
        o_parent[o + i] = o_token[o + i] = o_node[o + i] = -1;
        o_score[o + i] = kNegInfF;
        o_phi[o + i] = kNegInfD;
        o_key[o + i] = kNegInfD;
      }
      } catch (...) {
        exc.capture();
      }
    }
  }
  exc.rethrow();
  err.raise(s.n_nodes);
  return py::make_tuple(parent, token, score, node, phi, key);
}

// ---- Philox bindings (tests, and a fast noise source for callers that want one) ----------------

uint64_t seed_arg(const py::object& seed_o) {
  if (!py::isinstance<py::int_>(seed_o) || py::isinstance<py::bool_>(seed_o))
    throw py::type_error("seed must be an int in [0, 2^64)");
  py::int_ si = py::reinterpret_borrow<py::int_>(seed_o);
  py::object two64 = py::int_(1).attr("__lshift__")(64);
  if (si < py::int_(0) || !(si < two64))
    throw py::value_error("seed must be an int in [0, 2^64), got " + std::string(py::str(seed_o)));
  return si.cast<uint64_t>();
}

py::array_t<uint32_t> philox_word0_array(py::object seed_o, int64_t step, py::object row_keys_o,
                                         int64_t num_beams, int64_t num_codes) {
  const uint64_t seed = seed_arg(seed_o);
  auto row_keys = checked<int64_t>(row_keys_o, "row_keys", 1);
  require(step >= 0 && step <= 0xFFFFFFFFll, "step must be in [0, 2^32)");
  require(num_beams >= 0 && num_codes >= 0 && num_beams * num_codes <= 0x100000000ll,
          "num_beams * num_codes must be in [0, 2^32]");
  const int64_t R = row_keys.shape(0), n = num_beams * num_codes;
  py::array_t<uint32_t> out(std::vector<py::ssize_t>{R, num_beams, num_codes});
  uint32_t* o = out.mutable_data();
  const int64_t* rk = row_keys.data();
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t e = 0; e < n; ++e)
        o[r * n + e] = philox_word0(seed, static_cast<uint32_t>(e), static_cast<uint32_t>(step),
                                    static_cast<uint64_t>(rk[r]));
  }
  return out;
}

py::array_t<double> gumbel_noise_array(py::object seed_o, int64_t step, py::object row_keys_o,
                                       int64_t num_beams, int64_t num_codes) {
  auto words = philox_word0_array(seed_o, step, row_keys_o, num_beams, num_codes);
  py::array_t<double> out(std::vector<py::ssize_t>(words.shape(), words.shape() + 3));
  const uint32_t* w = words.data();
  double* o = out.mutable_data();
  const int64_t n = static_cast<int64_t>(words.size());
  for (int64_t i = 0; i < n; ++i) o[i] = -std::log(-std::log(philox_uniform(w[i])));
  return out;
}

// ---- CUDA bindings ----------------------------------------------------------------------------

#if defined(TIGER_FAST_WITH_CUDA)
// Probed once per process (the device count does not change; and the launchers must not make
// runtime calls beyond the launch itself while a CUDA graph is being captured).
std::string cuda_reason() {
  static const std::string reason = []() -> std::string {
    int n = 0;
    const int rc = tf_cuda_device_count(&n);
    if (rc != 0) return std::string("CUDA runtime: ") + tf_cuda_error_string(rc) + " (no usable GPU/driver)";
    if (n == 0) return "no CUDA device found";
    return "";
  }();
  return reason;
}
void check_cuda_rc(int rc, const char* what) {
  if (rc != 0) throw std::runtime_error(std::string(what) + ": " + tf_cuda_error_string(rc));
}
#else
std::string cuda_reason() {
  return "tiger_fast._generate_ext was built without CUDA (nvcc not found at build time, or "
         "TIGER_FAST_NO_CUDA=1); rebuild with nvcc on PATH to get the CUDA kernels";
}
#endif

#if defined(TIGER_FAST_WITH_CUDA)
void require_ptr(uintptr_t p, const char* name) {
  if (p == 0) throw py::value_error(std::string(name) + " is a null device pointer");
}
#endif

void check_sizes(int64_t R, int64_t B_in, int64_t S, int64_t n_nodes, int64_t B_out) {
  require(R >= 0 && B_in >= 0 && S >= 1 && n_nodes >= 0 && B_out >= 1,
          "sizes must be R >= 0, B_in >= 0, S >= 1, n_nodes >= 0, num_out >= 1");
  require(B_in * S <= 0xFFFFFFFFll, "B_in * S must be < 2^32");
  require(B_out <= 1024, "the CUDA step supports num_out <= 1024");
}

// Bytes of device workspace the CUDA steps need (one uint64 ordered key per candidate).
int64_t cuda_workspace_bytes(int64_t R, int64_t B_in, int64_t S) {
  require(R >= 0 && B_in >= 0 && S >= 0, "sizes must be non-negative");
  return R * B_in * S * static_cast<int64_t>(sizeof(uint64_t));
}

int cuda_beam_select_step(uintptr_t logprobs, uintptr_t beam_scores, uintptr_t beam_nodes,
                           uintptr_t children, int64_t R, int64_t B_in, int64_t S, int64_t n_nodes,
                           int64_t B_out, uintptr_t parent, uintptr_t token, uintptr_t score,
                           uintptr_t node, uintptr_t error_flag, uintptr_t workspace,
                           uintptr_t stream) {
  check_sizes(R, B_in, S, n_nodes, B_out);
#if defined(TIGER_FAST_WITH_CUDA)
  const std::string why = cuda_reason();
  if (!why.empty()) throw std::runtime_error("CUDA backend unavailable: " + why);
  if (R > 0 && B_out > 0) {
    for (auto [p, n] : {std::pair<uintptr_t, const char*>{parent, "parent"}, {token, "token"},
                        {score, "score"}, {node, "node"}, {error_flag, "error_flag"}})
      require_ptr(p, n);
    if (B_in > 0)
      for (auto [p, n] : {std::pair<uintptr_t, const char*>{logprobs, "logprobs"},
                          {beam_scores, "beam_scores"}, {beam_nodes, "beam_nodes"},
                          {children, "children"}, {workspace, "workspace"}})
        require_ptr(p, n);
  }
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = tf_cuda_beam_select_step(
        reinterpret_cast<const float*>(logprobs), reinterpret_cast<const float*>(beam_scores),
        reinterpret_cast<const int64_t*>(beam_nodes), reinterpret_cast<const int32_t*>(children), R,
        B_in, S, n_nodes, B_out, reinterpret_cast<int64_t*>(parent), reinterpret_cast<int64_t*>(token),
        reinterpret_cast<float*>(score), reinterpret_cast<int64_t*>(node),
        reinterpret_cast<int32_t*>(error_flag), reinterpret_cast<uint64_t*>(workspace), stream);
  }
  check_cuda_rc(rc, "cuda_beam_select_step");
  return 0;
#else
  (void)logprobs; (void)beam_scores; (void)beam_nodes; (void)children; (void)parent; (void)token;
  (void)score; (void)node; (void)error_flag; (void)workspace; (void)stream;
  throw std::runtime_error("CUDA backend unavailable: " + cuda_reason());
#endif
}

int cuda_sample_select_step(uintptr_t logprobs, uintptr_t tempered, uintptr_t beam_scores,
                             uintptr_t beam_phi, uintptr_t beam_keys, uintptr_t beam_nodes,
                             uintptr_t children, uintptr_t row_keys, int64_t R, int64_t B_in,
                             int64_t S, int64_t n_nodes, int64_t B_out, py::object seed_o,
                             int64_t step, uintptr_t parent, uintptr_t token, uintptr_t score,
                             uintptr_t node, uintptr_t phi, uintptr_t key, uintptr_t error_flag,
                             uintptr_t workspace, uintptr_t stream, uintptr_t gumbel) {
  check_sizes(R, B_in, S, n_nodes, B_out);
  const uint64_t seed = seed_arg(seed_o);
  require(step >= 0 && step <= 0xFFFFFFFFll, "step must be in [0, 2^32)");
#if defined(TIGER_FAST_WITH_CUDA)
  const std::string why = cuda_reason();
  if (!why.empty()) throw std::runtime_error("CUDA backend unavailable: " + why);
  if (R > 0 && B_out > 0) {
    for (auto [p, n] : {std::pair<uintptr_t, const char*>{parent, "parent"}, {token, "token"},
                        {score, "score"}, {node, "node"}, {phi, "phi"}, {key, "key"},
                        {error_flag, "error_flag"}})
      require_ptr(p, n);
    if (B_in > 0)
      for (auto [p, n] : {std::pair<uintptr_t, const char*>{logprobs, "logprobs"},
                          {tempered, "tempered"}, {beam_scores, "beam_scores"},
                          {beam_phi, "beam_phi"}, {beam_keys, "beam_keys"},
                          {beam_nodes, "beam_nodes"}, {children, "children"},
                          {workspace, "workspace"}})
        require_ptr(p, n);
    if (B_in > 0 && gumbel == 0) require_ptr(row_keys, "row_keys (needed when gumbel is 0)");
  }
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = tf_cuda_sample_select_step(
        reinterpret_cast<const float*>(logprobs), reinterpret_cast<const float*>(tempered),
        reinterpret_cast<const float*>(beam_scores), reinterpret_cast<const double*>(beam_phi),
        reinterpret_cast<const double*>(beam_keys), reinterpret_cast<const int64_t*>(beam_nodes),
        reinterpret_cast<const int32_t*>(children), reinterpret_cast<const double*>(gumbel),
        reinterpret_cast<const int64_t*>(row_keys), R,
        B_in, S, n_nodes, B_out, seed, static_cast<uint32_t>(step),
        reinterpret_cast<int64_t*>(parent), reinterpret_cast<int64_t*>(token),
        reinterpret_cast<float*>(score), reinterpret_cast<int64_t*>(node),
        reinterpret_cast<double*>(phi), reinterpret_cast<double*>(key),
        reinterpret_cast<int32_t*>(error_flag), reinterpret_cast<uint64_t*>(workspace), stream);
  }
  check_cuda_rc(rc, "cuda_sample_select_step");
  return 0;
#else
  (void)logprobs; (void)tempered; (void)beam_scores; (void)beam_phi; (void)beam_keys;
  (void)beam_nodes; (void)children; (void)gumbel; (void)row_keys; (void)parent; (void)token; (void)score;
  (void)node; (void)phi; (void)key; (void)error_flag; (void)workspace; (void)stream; (void)seed;
  throw std::runtime_error("CUDA backend unavailable: " + cuda_reason());
#endif
}

}  // namespace

PYBIND11_MODULE(_generate_ext, m) {
  m.doc() =
      "Trie-constrained selection step of tiger_fast decoding (C++/OpenMP, CUDA launchers) and "
      "Philox4x32-10.  Spec: tiger_fast/reference/generate.py.";

  m.def("beam_select_step", &beam_select_step, py::arg("logprobs"), py::arg("beam_scores"),
        py::arg("beam_nodes"), py::arg("children"), py::arg("num_out"), py::arg("num_threads") = 0,
        R"doc(One deterministic beam-search step of trie-constrained decoding.

logprobs float32 (R, B_in, S): the level's block of the full-vocab log_softmax;
beam_scores float32 (R, B_in); beam_nodes int64 (R, B_in), node at this depth or -1 (absent);
children int32 (n_nodes, S), child id or -1; num_out B_out >= 0; num_threads 0 = OpenMP default.
Candidates (b, t) with beam_nodes[b] >= 0 and children[node, t] >= 0 score beam_scores[b] +
logprobs[b, t] (one float32 add); the best B_out by score descending, ties by b * S + t ascending.
Returns (parent int64, token int64, score float32, node int64), each (R, B_out); missing slots
parent = token = node = -1, score = -inf.  All arrays C-contiguous numpy (CPU tensor.numpy()),
exact dtypes (no casts).  ValueError/TypeError name the argument: bad shapes, beam_nodes outside
[-1, n_nodes), num_out < 1, NaN at a valid candidate (a NaN at a masked position cannot change the
result and is not looked for).  Rows run in parallel (OpenMP) for large batches; the GIL is
released.)doc");

  m.def("sample_select_step", &sample_select_step, py::arg("logprobs"), py::arg("tempered"),
        py::arg("beam_scores"), py::arg("beam_phi"), py::arg("beam_keys"), py::arg("beam_nodes"),
        py::arg("children"), py::arg("num_out"), py::arg("seed"), py::arg("step"), py::arg("row_keys"),
        py::kw_only(), py::arg("gumbel") = py::none(), py::arg("num_threads") = 0,
        R"doc(One Gumbel-top-k stochastic beam search step (Kool et al. 2019) with trie constraint.

logprobs float32 (R, B_in, S) untempered (for the returned score); tempered float32
(R, B_in, S) = log_softmax(logits / T_l) over the full vocab, sliced; beam_scores float32 (R, B_in)
untempered sums; beam_phi float64 (R, B_in) tempered sums; beam_keys float64 (R, B_in) perturbed
keys (0 at the root); beam_nodes int64 (R, B_in); children int32 (n_nodes, S); num_out >= 1.
seed int in [0, 2^64), step (level), row_keys int64 (R,): the Philox stream of
tiger_fast.philox.gumbel_noise, made here for the valid candidates only (-log(-log(u)) with the C
library's log: may differ from torch's by an ulp); or keyword gumbel float64 (R, B_in, S) to pass
the noise explicitly (then seed/step/row_keys are only validated).  Per valid child: G' = (beam_phi + tempered) + gumbel; Z = max G' over the beam's valid
children; key = -log(exp(-T) - exp(-Z) + exp(-G')) in Kool's stable form (-inf if G' or T is -inf).
Top num_out by key descending, ties by flat index b * S + t ascending.
Returns (parent int64, token int64, score float32, node int64, phi float64, key float64), each
(R, num_out); missing: parent = token = node = -1, score = phi = key = -inf.)doc");

  m.def("philox4x32_10",
        [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
          const Philox4x32 o = philox4x32_10(c0, c1, c2, c3, k0, k1);
          return py::make_tuple(o.v[0], o.v[1], o.v[2], o.v[3]);
        },
        py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"),
        "Philox4x32-10 block: counter words c0..c3, key words k0, k1 (uint32) -> 4 uint32 words.");
  m.def("philox_word0", &philox_word0_array, py::arg("seed"), py::arg("step"), py::arg("row_keys"),
        py::arg("num_beams"), py::arg("num_codes"),
        "uint32 (R, num_beams, num_codes): word 0 of tiger_fast's counter layout "
        "(see tiger_fast/philox.py::philox_word0).");
  m.def("gumbel_noise", &gumbel_noise_array, py::arg("seed"), py::arg("step"), py::arg("row_keys"),
        py::arg("num_beams"), py::arg("num_codes"),
        "float64 (R, num_beams, num_codes) = -log(-log((x0 + 0.5) * 2^-32)) with the C library's log.");

  m.def("cuda_available", []() { return cuda_reason().empty(); },
        "True when the extension was built with CUDA and a device is usable.");
  m.def("cuda_unavailable_reason", &cuda_reason, "Why cuda_available() is False ('' when it is True).");
  m.def("cuda_built", []() {
#if defined(TIGER_FAST_WITH_CUDA)
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  m.def("cuda_workspace_bytes", &cuda_workspace_bytes, py::arg("R"), py::arg("B_in"), py::arg("S"),
        "Bytes of device workspace cuda_*_select_step need.");
  m.def("cuda_beam_select_step", &cuda_beam_select_step, py::arg("logprobs"), py::arg("beam_scores"),
        py::arg("beam_nodes"), py::arg("children"), py::arg("R"), py::arg("B_in"), py::arg("S"),
        py::arg("n_nodes"), py::arg("num_out"), py::arg("parent"), py::arg("token"), py::arg("score"),
        py::arg("node"), py::arg("error_flag"), py::arg("workspace"), py::arg("stream") = 0,
        R"doc(CUDA beam_select_step on device pointers (ints, e.g. tensor.data_ptr()), async on
`stream` (cudaStream_t as int).  Same dtypes/shapes as beam_select_step, all contiguous on one
device; error_flag int32 (1,) receives OR-ed error bits (1: beam node out of range -> that beam is
treated as absent, 2: NaN score), check it when convenient; workspace: cuda_workspace_bytes bytes.
Capturable in a CUDA graph (no host sync, no allocation).  Returns 0 (a launch error raises
RuntimeError).)doc");
  m.def("cuda_sample_select_step", &cuda_sample_select_step, py::arg("logprobs"), py::arg("tempered"),
        py::arg("beam_scores"), py::arg("beam_phi"), py::arg("beam_keys"), py::arg("beam_nodes"),
        py::arg("children"), py::arg("row_keys"), py::arg("R"), py::arg("B_in"), py::arg("S"),
        py::arg("n_nodes"), py::arg("num_out"), py::arg("seed"), py::arg("step"), py::arg("parent"),
        py::arg("token"), py::arg("score"), py::arg("node"), py::arg("phi"), py::arg("key"),
        py::arg("error_flag"), py::arg("workspace"), py::arg("stream") = 0, py::kw_only(),
        py::arg("gumbel") = 0,
        "CUDA sample_select_step on device pointers; the Gumbel noise is made on the device from "
        "(seed, step, row_keys) unless `gumbel` points to float64 (R, B_in, S) noise.  Returns 0 "
        "(errors raise); see cuda_beam_select_step for conventions.");
}
