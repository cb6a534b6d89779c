// L_s's per-map values on the CPU as two XLA FFI handlers, forward and backward.
//
// For each image b and channel c of ψ [B, H, W, C] (NHWC), positions j = (y, x):
//   m   = Σ_j ψ_j + eps,   c_y = Σ_j y·ψ_j / m,   c_x = Σ_j x·ψ_j / m   (0 where m = 0)
//   d_j = ‖j − c‖₂ (0 at 0),   S = Σ_j ψ_j·d_j,   v = S / m
// Forward: v [B, C] and the moments (m, c_y, c_x) [3, B, C] for the backward.
// The gradient, given the cotangent u [B, C] of v, is
//   u·∂v/∂ψ_j = scale·d_j + pull_y·(y − c_y) + pull_x·(x − c_x) − offset
//   scale = u/m,  offset = scale·v,  pull_y = scale·A_y/m,  pull_x = scale·A_x/m,
//   A_y = −Σ_k ψ_k·(y_k − c_y) / d_k,  A_x likewise (terms with d_k = 0 count 0)
// (all 0 where m = 0), which is what autodiff of losses.spatial_concentration_maps
// gives, safe square root and divisions included. Backward returns the four
// per-map coefficients [4, B, C] after one pass over ψ; cgl_jax/kernels/cpu.py
// forms the element-wise gradient in XLA, which fuses it into the pass that
// consumes it instead of this kernel writing (and page-faulting in) another
// ψ-sized buffer. Each work unit is one image and a slice of at most
// kChannelBlock channels, vectorised over channels with its accumulators in L1;
// units are spread over XLA's intra-op pool, and each output element has one
// owner, so results do not depend on the number of threads. Built and loaded by
// cgl_jax/kernels/cpu.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChannelBlock = 128;

struct Unit {
  int64_t image, channel_begin, channels;
};

// Per-channel statistics of one unit: mass m, centre (c_y, c_x) and, after the
// second pass, S and (backward only) A_y, A_x.
template <typename T>
struct Moments {
  std::vector<T> mass, centre_y, centre_x, weighted_distance, pull_y, pull_x;
  explicit Moments(int64_t n)
      : mass(n), centre_y(n), centre_x(n), weighted_distance(n), pull_y(n), pull_x(n) {}
};

// The safe division and square root of cgl_jax.losses, written without branches
// (a safe operand, then a select) so that the channel loops vectorise.
template <typename T>
inline T SafeDivide(T numerator, T denominator) {
  const T quotient = numerator / (denominator != 0 ? denominator : T(1));
  return denominator != 0 ? quotient : T(0);
}

template <typename T>
inline T SafeSqrt(T x) {  // x >= 0 here (a sum of squares): sqrt(0) = 0 already
  return std::sqrt(x > 0 ? x : T(0));
}

// One position's row of `channels` values into the per-channel accumulators.
// Plain __restrict__ pointers: with them GCC vectorises each loop over channels.
template <typename T>
void AddMoments(const T* __restrict__ row, T y, T x, T* __restrict__ mass,
                T* __restrict__ row_moment, T* __restrict__ col_moment, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    mass[c] += row[c];
    row_moment[c] += y * row[c];
    col_moment[c] += x * row[c];
  }
}

template <typename T>
void AddDistances(const T* __restrict__ row, T y, T x, const T* __restrict__ centre_y,
                  const T* __restrict__ centre_x, T* __restrict__ weighted, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const T dy = y - centre_y[c], dx = x - centre_x[c];
    weighted[c] += row[c] * SafeSqrt(dy * dy + dx * dx);
  }
}

template <typename T>
void AddDistancesAndPull(const T* __restrict__ row, T y, T x, const T* __restrict__ centre_y,
                         const T* __restrict__ centre_x, T* __restrict__ weighted,
                         T* __restrict__ pull_y, T* __restrict__ pull_x, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const T dy = y - centre_y[c], dx = x - centre_x[c];
    const T distance = SafeSqrt(dy * dy + dx * dx);
    weighted[c] += row[c] * distance;
    const T inverse = SafeDivide(row[c], distance);  // ψ / d, 0 where d = 0
    pull_y[c] -= inverse * dy;
    pull_x[c] -= inverse * dx;
  }
}

// Pass 2 over the unit, given mass and centre: S (and A_y, A_x if asked).
template <typename T>
void UnitDistances(const T* psi, int64_t height, int64_t width, int64_t row_stride,
                   int64_t channels, bool with_pull, Moments<T>* out) {
  std::fill_n(out->weighted_distance.begin(), channels, T(0));
  std::fill_n(out->pull_y.begin(), channels, T(0));
  std::fill_n(out->pull_x.begin(), channels, T(0));
  for (int64_t y = 0; y < height; ++y) {
    for (int64_t x = 0; x < width; ++x) {
      const T* row = psi + (y * width + x) * row_stride;
      if (with_pull) {
        AddDistancesAndPull(row, T(y), T(x), out->centre_y.data(), out->centre_x.data(),
                            out->weighted_distance.data(), out->pull_y.data(),
                            out->pull_x.data(), channels);
      } else {
        AddDistances(row, T(y), T(x), out->centre_y.data(), out->centre_x.data(),
                     out->weighted_distance.data(), channels);
      }
    }
  }
}

// Passes 1 and 2 over the unit: mass and centre, then S.
template <typename T>
void UnitMoments(const T* psi, int64_t height, int64_t width, int64_t row_stride,
                 int64_t channels, T eps, Moments<T>* out) {
  std::fill_n(out->mass.begin(), channels, T(0));
  std::fill_n(out->centre_y.begin(), channels, T(0));
  std::fill_n(out->centre_x.begin(), channels, T(0));
  for (int64_t y = 0; y < height; ++y) {
    for (int64_t x = 0; x < width; ++x) {
      AddMoments(psi + (y * width + x) * row_stride, T(y), T(x), out->mass.data(),
                 out->centre_y.data(), out->centre_x.data(), channels);
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    out->mass[c] += eps;
    out->centre_y[c] = SafeDivide(out->centre_y[c], out->mass[c]);  // moment → centre
    out->centre_x[c] = SafeDivide(out->centre_x[c], out->mass[c]);
  }
  UnitDistances(psi, height, width, row_stride, channels, /*with_pull=*/false, out);
}

struct Shape {
  int64_t batch, height, width, channels;
  int64_t blocks_per_image() const { return (channels + kChannelBlock - 1) / kChannelBlock; }
  Unit unit(int64_t u) const {
    const int64_t block = u % blocks_per_image();
    const int64_t begin = block * kChannelBlock;
    return {u / blocks_per_image(), begin, std::min(kChannelBlock, channels - begin)};
  }
};

template <ffi::DataType D>
ffi::Error ReadShape(const ffi::Buffer<D>& psi, Shape* shape) {
  const auto dims = psi.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("psi must have rank 4 [B, H, W, C]");
  *shape = {dims[0], dims[1], dims[2], dims[3]};
  return ffi::Error::Success();
}

template <typename T, ffi::DataType D>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<D> psi, ffi::ResultBuffer<D> values,
                   ffi::ResultBuffer<D> moments_out, double eps) {
  Shape s;
  if (ffi::Error error = ReadShape(psi, &s); error.failure()) return error;
  const T* data = psi.typed_data();
  T* result = values->typed_data();
  T* moments_result = moments_out->typed_data();  // [3, B, C]: m, c_y, c_x
  const int64_t plane = s.batch * s.channels;
  cgl_jax::ParallelFor(pool, s.batch * s.blocks_per_image(), [&](int64_t begin, int64_t end) {
    Moments<T> moments(kChannelBlock);
    for (int64_t u = begin; u < end; ++u) {
      const Unit unit = s.unit(u);
      const T* origin = data + unit.image * s.height * s.width * s.channels + unit.channel_begin;
      UnitMoments(origin, s.height, s.width, s.channels, unit.channels, static_cast<T>(eps),
                  &moments);
      const int64_t at = unit.image * s.channels + unit.channel_begin;
      for (int64_t c = 0; c < unit.channels; ++c) {
        result[at + c] = SafeDivide(moments.weighted_distance[c], moments.mass[c]);
        moments_result[at + c] = moments.mass[c];
        moments_result[plane + at + c] = moments.centre_y[c];
        moments_result[2 * plane + at + c] = moments.centre_x[c];
      }
    }
  });
  return ffi::Error::Success();
}

template <typename T, ffi::DataType D>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<D> psi, ffi::Buffer<D> moments_in,
                    ffi::Buffer<D> cotangent, ffi::ResultBuffer<D> coefficients) {
  Shape s;
  if (ffi::Error error = ReadShape(psi, &s); error.failure()) return error;
  const int64_t plane = s.batch * s.channels;
  if (cotangent.element_count() != static_cast<size_t>(plane))
    return ffi::Error::InvalidArgument("cotangent must have shape [B, C]");
  if (moments_in.element_count() != static_cast<size_t>(3 * plane))
    return ffi::Error::InvalidArgument("moments must have shape [3, B, C]");
  const T* data = psi.typed_data();
  const T* moments_data = moments_in.typed_data();
  const T* cot = cotangent.typed_data();
  T* result = coefficients->typed_data();  // [4, B, C]: scale, pull_y, pull_x, offset
  cgl_jax::ParallelFor(pool, s.batch * s.blocks_per_image(), [&](int64_t begin, int64_t end) {
    Moments<T> moments(kChannelBlock);
    for (int64_t u = begin; u < end; ++u) {
      const Unit unit = s.unit(u);
      const int64_t at = unit.image * s.channels + unit.channel_begin;
      std::copy_n(moments_data + at, unit.channels, moments.mass.begin());
      std::copy_n(moments_data + plane + at, unit.channels, moments.centre_y.begin());
      std::copy_n(moments_data + 2 * plane + at, unit.channels, moments.centre_x.begin());
      UnitDistances(data + unit.image * s.height * s.width * s.channels + unit.channel_begin,
                    s.height, s.width, s.channels, unit.channels, /*with_pull=*/true, &moments);
      for (int64_t c = 0; c < unit.channels; ++c) {
        const T mass = moments.mass[c];
        const T scale = SafeDivide(cot[at + c], mass);
        result[at + c] = scale;
        result[plane + at + c] = SafeDivide(scale * moments.pull_y[c], mass);
        result[2 * plane + at + c] = SafeDivide(scale * moments.pull_x[c], mass);
        result[3 * plane + at + c] = scale * SafeDivide(moments.weighted_distance[c], mass);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define CGL_DEFINE_SPATIAL_CONCENTRATION_HANDLERS(SUFFIX, T, D)                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(CglSpatialConcentrationForward##SUFFIX, (Forward<T, D>),      \
                                ffi::Ffi::Bind()                                               \
                                    .Ctx<ffi::ThreadPool>()                                    \
                                    .Arg<ffi::Buffer<D>>()                                     \
                                    .Ret<ffi::Buffer<D>>()                                     \
                                    .Ret<ffi::Buffer<D>>()                                     \
                                    .Attr<double>("eps"));                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(CglSpatialConcentrationBackward##SUFFIX, (Backward<T, D>),    \
                                ffi::Ffi::Bind()                                               \
                                    .Ctx<ffi::ThreadPool>()                                    \
                                    .Arg<ffi::Buffer<D>>()                                     \
                                    .Arg<ffi::Buffer<D>>()                                     \
                                    .Arg<ffi::Buffer<D>>()                                     \
                                    .Ret<ffi::Buffer<D>>());

CGL_DEFINE_SPATIAL_CONCENTRATION_HANDLERS(F32, float, ffi::F32)
CGL_DEFINE_SPATIAL_CONCENTRATION_HANDLERS(F64, double, ffi::F64)
