// L_g's sampled pair sums on the CPU as two XLA FFI handlers, forward and backward.
//
//   out[m, k]   = Σ_n |maps[m, i_k, n] − maps[m, j_k, n]|                  (forward)
//   grad[m, i]  = Σ over the pairs k that contain i, with partner o,        (backward)
//                 cot[m, k] · sign(maps[m, i, :] − maps[m, o, :])
//
// maps is [..., f, N] (filter-major: each filter's map is a contiguous row of N
// positions), flattened to M = prod(...) blocks of f rows; pairs is int32 [r, 2].
// Blocks are independent: one block's f rows (e.g. 51 × 1024 floats = 204 KB)
// stay in L2 across all its pairs, so ψ is read from memory once per pass, and
// the blocks are spread over XLA's intra-op thread pool. Each output element is
// computed by one thread in a fixed order, so results do not depend on the
// number of threads. Built and loaded by cgl_jax/cpu_kernels.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Σ |a − b| over n values with 16 independent partial sums (vectorised without
// reassociating anything, so the result is the same on every run).
template <typename T>
T AbsDifferenceSum(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 16;
  T partial[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T d = a[k + l] - b[k + l];
      partial[l] += d < 0 ? -d : d;
    }
  }
  T tail = 0;
  for (; k < n; ++k) {
    const T d = a[k] - b[k];
    tail += d < 0 ? -d : d;
  }
  T total = 0;
  for (int l = 0; l < kLanes; ++l) total += partial[l];
  return total + tail;
}

// jnp.sign: ±1, ±0 for ±0 and NaN for NaN; branch-free so the row loop vectorises.
template <typename T>
inline T Sign(T d) {
  return (d != 0 && d == d) ? std::copysign(T(1), d) : d;
}

struct Shape {
  int64_t blocks, filters, positions, pairs;
};

template <typename T, ffi::DataType D>
ffi::Error CheckShapes(const ffi::Buffer<D>& maps, const ffi::Buffer<ffi::S32>& pairs,
                       Shape* shape) {
  const auto dims = maps.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("maps must have rank >= 2 [..., f, N]");
  const auto pair_dims = pairs.dimensions();
  if (pair_dims.size() != 2 || pair_dims[1] != 2)
    return ffi::Error::InvalidArgument("pair_indices must have shape [r, 2]");
  shape->filters = dims[dims.size() - 2];
  shape->positions = dims[dims.size() - 1];
  shape->blocks = 1;
  for (size_t d = 0; d + 2 < dims.size(); ++d) shape->blocks *= dims[d];
  shape->pairs = pair_dims[0];
  return ffi::Error::Success();
}

// Pair filters as jax's dynamic slices read them: a negative index counts from
// the end, then the index is clamped to [0, f).
std::vector<int32_t> ClampedPairs(const int32_t* pairs, int64_t num_pairs, int64_t filters) {
  std::vector<int32_t> clamped(2 * num_pairs);
  for (int64_t k = 0; k < 2 * num_pairs; ++k) {
    const int64_t index = pairs[k] < 0 ? pairs[k] + filters : pairs[k];
    clamped[k] = static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(index, 0), filters - 1));
  }
  return clamped;
}

template <typename T, ffi::DataType D>
ffi::Error PairL1Forward(ffi::ThreadPool pool, ffi::Buffer<D> maps, ffi::Buffer<ffi::S32> pairs,
                         ffi::ResultBuffer<D> out) {
  Shape s;
  if (ffi::Error error = CheckShapes<T, D>(maps, pairs, &s); error.failure()) return error;
  const std::vector<int32_t> pair = ClampedPairs(pairs.typed_data(), s.pairs, s.filters);
  const T* data = maps.typed_data();
  T* result = out->typed_data();
  cgl_jax::ParallelFor(pool, s.blocks, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* block = data + m * s.filters * s.positions;
      for (int64_t k = 0; k < s.pairs; ++k) {
        result[m * s.pairs + k] = AbsDifferenceSum(block + pair[2 * k] * s.positions,
                                                   block + pair[2 * k + 1] * s.positions,
                                                   s.positions);
      }
    }
  });
  return ffi::Error::Success();
}

// The pairs as incidences sorted by owner filter (stable: pairs where the filter
// is first, then second, each in pair order), as losses._pair_incidences.
struct Incidences {
  std::vector<int64_t> starts;  // [f + 1]
  std::vector<int32_t> other, pair;
};

Incidences SortedIncidences(const std::vector<int32_t>& pair, int64_t num_pairs, int64_t filters) {
  Incidences inc;
  inc.starts.assign(filters + 1, 0);
  for (int64_t k = 0; k < 2 * num_pairs; ++k) ++inc.starts[pair[k] + 1];
  for (int64_t f = 0; f < filters; ++f) inc.starts[f + 1] += inc.starts[f];
  inc.other.resize(2 * num_pairs);
  inc.pair.resize(2 * num_pairs);
  std::vector<int64_t> fill(inc.starts.begin(), inc.starts.end() - 1);
  for (int side = 0; side < 2; ++side) {
    for (int64_t k = 0; k < num_pairs; ++k) {
      const int64_t slot = fill[pair[2 * k + side]]++;
      inc.other[slot] = pair[2 * k + 1 - side];
      inc.pair[slot] = static_cast<int32_t>(k);
    }
  }
  return inc;
}

template <typename T, ffi::DataType D>
ffi::Error PairL1Backward(ffi::ThreadPool pool, ffi::Buffer<D> maps, ffi::Buffer<ffi::S32> pairs,
                          ffi::Buffer<D> cotangent, ffi::ResultBuffer<D> grad) {
  Shape s;
  if (ffi::Error error = CheckShapes<T, D>(maps, pairs, &s); error.failure()) return error;
  if (cotangent.element_count() != static_cast<size_t>(s.blocks * s.pairs))
    return ffi::Error::InvalidArgument("cotangent must have one value per block and pair");
  const std::vector<int32_t> pair = ClampedPairs(pairs.typed_data(), s.pairs, s.filters);
  const Incidences inc = SortedIncidences(pair, s.pairs, s.filters);
  const T* data = maps.typed_data();
  const T* cot = cotangent.typed_data();
  T* result = grad->typed_data();
  const int64_t n = s.positions;
  cgl_jax::ParallelFor(pool, s.blocks, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* block = data + m * s.filters * n;
      for (int64_t f = 0; f < s.filters; ++f) {
        T* row = result + (m * s.filters + f) * n;
        std::fill(row, row + n, T(0));
        const T* own = block + f * n;
        for (int64_t e = inc.starts[f]; e < inc.starts[f + 1]; ++e) {
          const T* partner = block + inc.other[e] * n;
          const T c = cot[m * s.pairs + inc.pair[e]];
          for (int64_t p = 0; p < n; ++p) row[p] += c * Sign(own[p] - partner[p]);
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define CGL_DEFINE_PAIR_L1_HANDLERS(SUFFIX, T, D)                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(CglPairL1Forward##SUFFIX, (PairL1Forward<T, D>),             \
                                ffi::Ffi::Bind()                                              \
                                    .Ctx<ffi::ThreadPool>()                                   \
                                    .Arg<ffi::Buffer<D>>()                                    \
                                    .Arg<ffi::Buffer<ffi::S32>>()                             \
                                    .Ret<ffi::Buffer<D>>());                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(CglPairL1Backward##SUFFIX, (PairL1Backward<T, D>),           \
                                ffi::Ffi::Bind()                                              \
                                    .Ctx<ffi::ThreadPool>()                                   \
                                    .Arg<ffi::Buffer<D>>()                                    \
                                    .Arg<ffi::Buffer<ffi::S32>>()                             \
                                    .Arg<ffi::Buffer<D>>()                                    \
                                    .Ret<ffi::Buffer<D>>());

CGL_DEFINE_PAIR_L1_HANDLERS(F32, float, ffi::F32)
CGL_DEFINE_PAIR_L1_HANDLERS(F64, double, ffi::F64)
