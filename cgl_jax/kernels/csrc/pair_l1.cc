// L_g's sampled pair sums on the CPU as two XLA FFI handlers, forward and backward.
//
//   out[m, g, k]     = Σ_n |x[m, n, g·f + i_k] − x[m, n, g·f + j_k]|             (forward)
//   grad[m, g, i, n] = Σ over the pairs k that contain i, with partner o,        (backward)
//                      cot[m, g, k] · sign(x[m, n, g·f + i] − x[m, n, g·f + o])
//
// x is channels-last [..., N, C] (ψ with its positions flattened), flattened to M
// = prod(...) blocks; group g holds channels [g·f, (g+1)·f) with f = C // G (the
// C − G·f free channels are not read); pairs is int32 [r, 2]. A work unit is one
// block and group: its f channels are first copied into a filter-major [f, N]
// buffer (204 KB at f = 51, N = 32×32), which stays in L2 across all r pairs, so
// ψ is read from memory once per pass and XLA need not write a filter-major copy
// of ψ. The backward writes the gradient filter-major, [M, G, f, N], one
// contiguous row per filter (cgl_jax/kernels/cpu.py moves it back to
// channels-last, which XLA fuses into the consumer). Units are spread over XLA's
// intra-op thread pool; each output element is computed by one thread in a
// fixed order, so results do not depend on the number of threads. Built and
// loaded by cgl_jax/kernels/cpu.py.
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
  int64_t blocks, positions, channels, groups, filters, pairs;
  // Row stride of the unit's filter-major buffers: N plus 16 values, so that a
  // power-of-two N (1,024 at 32×32) does not put all f rows in one L1 set.
  int64_t row_stride() const { return positions + 16; }
};

template <typename T, ffi::DataType D>
ffi::Error CheckShapes(const ffi::Buffer<D>& x, const ffi::Buffer<ffi::S32>& pairs,
                       int64_t groups, Shape* shape) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("x must have rank >= 2 [..., N, C]");
  const auto pair_dims = pairs.dimensions();
  if (pair_dims.size() != 2 || pair_dims[1] != 2)
    return ffi::Error::InvalidArgument("pair_indices must have shape [r, 2]");
  shape->positions = dims[dims.size() - 2];
  shape->channels = dims[dims.size() - 1];
  if (groups < 1 || shape->channels / groups < 1)
    return ffi::Error::InvalidArgument("num_groups must lie in [1, C]");
  shape->groups = groups;
  shape->filters = shape->channels / groups;
  shape->blocks = 1;
  for (size_t d = 0; d + 2 < dims.size(); ++d) shape->blocks *= dims[d];
  shape->pairs = pair_dims[0];
  return ffi::Error::Success();
}

// Copies unit (m, g)'s f channels of x [N, C] (channels-last) into rows [f, N].
// Blocks of 16 positions: each read stays within 16 rows of x, each write fills
// 16 consecutive values of a row, so both sides stay in cache.
template <typename T>
void GatherRows(const T* x, const Shape& s, T* rows) {
  constexpr int64_t kTile = 16;
  for (int64_t n0 = 0; n0 < s.positions; n0 += kTile) {
    const int64_t n1 = std::min(s.positions, n0 + kTile);
    for (int64_t i = 0; i < s.filters; ++i) {
      T* row = rows + i * s.row_stride();
      for (int64_t n = n0; n < n1; ++n) row[n] = x[n * s.channels + i];
    }
  }
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
ffi::Error PairL1Forward(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<ffi::S32> pairs,
                         ffi::ResultBuffer<D> out, int64_t groups) {
  Shape s;
  if (ffi::Error error = CheckShapes<T, D>(x, pairs, groups, &s); error.failure()) return error;
  const std::vector<int32_t> pair = ClampedPairs(pairs.typed_data(), s.pairs, s.filters);
  const T* data = x.typed_data();
  T* result = out->typed_data();  // [M, G, r]
  cgl_jax::ParallelFor(pool, s.blocks * s.groups, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(s.filters * s.row_stride());
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t m = unit / s.groups, g = unit % s.groups;
      GatherRows(data + m * s.positions * s.channels + g * s.filters, s, rows.data());
      for (int64_t k = 0; k < s.pairs; ++k) {
        result[unit * s.pairs + k] = AbsDifferenceSum(rows.data() + pair[2 * k] * s.row_stride(),
                                                      rows.data() + pair[2 * k + 1] * s.row_stride(),
                                                      s.positions);
      }
    }
  });
  return ffi::Error::Success();
}

// The pairs as incidences sorted by owner filter (stable: pairs where the filter
// is first, then second, each in pair order), as kernels.xla.pair_incidences.
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
ffi::Error PairL1Backward(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<ffi::S32> pairs,
                          ffi::Buffer<D> cotangent, ffi::ResultBuffer<D> grad, int64_t groups) {
  Shape s;
  if (ffi::Error error = CheckShapes<T, D>(x, pairs, groups, &s); error.failure()) return error;
  if (cotangent.element_count() != static_cast<size_t>(s.blocks * s.groups * s.pairs))
    return ffi::Error::InvalidArgument("cotangent must have shape [..., G, r]");
  const std::vector<int32_t> pair = ClampedPairs(pairs.typed_data(), s.pairs, s.filters);
  const Incidences inc = SortedIncidences(pair, s.pairs, s.filters);
  const T* data = x.typed_data();
  const T* cot = cotangent.typed_data();
  T* result = grad->typed_data();
  const int64_t n = s.positions, stride = s.row_stride();
  cgl_jax::ParallelFor(pool, s.blocks * s.groups, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(s.filters * stride);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t m = unit / s.groups, g = unit % s.groups;
      GatherRows(data + m * n * s.channels + g * s.filters, s, rows.data());
      for (int64_t f = 0; f < s.filters; ++f) {
        T* __restrict__ row = result + (unit * s.filters + f) * n;  // [M, G, f, N]
        std::fill(row, row + n, T(0));
        const T* __restrict__ own = rows.data() + f * stride;
        for (int64_t e = inc.starts[f]; e < inc.starts[f + 1]; ++e) {
          const T* __restrict__ partner = rows.data() + inc.other[e] * stride;
          const T c = cot[unit * s.pairs + inc.pair[e]];
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
                                    .Ret<ffi::Buffer<D>>()                                    \
                                    .Attr<int64_t>("num_groups"));                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(CglPairL1Backward##SUFFIX, (PairL1Backward<T, D>),           \
                                ffi::Ffi::Bind()                                              \
                                    .Ctx<ffi::ThreadPool>()                                   \
                                    .Arg<ffi::Buffer<D>>()                                    \
                                    .Arg<ffi::Buffer<ffi::S32>>()                             \
                                    .Arg<ffi::Buffer<D>>()                                    \
                                    .Ret<ffi::Buffer<D>>()                                    \
                                    .Attr<int64_t>("num_groups"));

CGL_DEFINE_PAIR_L1_HANDLERS(F32, float, ffi::F32)
CGL_DEFINE_PAIR_L1_HANDLERS(F64, double, ffi::F64)
