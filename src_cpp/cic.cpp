// Cloud-in-cell (CIC) paint and readout kernels for jerald_nbk, callable from jit-compiled JAX
// through XLA FFI custom calls, and from numpy through pybind11.
//
// Conventions (shared with jerald_nbk/pm/fourier.py and jax_backend.py):
//   * positions are in box units (Mpc/h), any real value: the box is periodic and the kernels wrap;
//     `scale[d] = Nmesh[d] / BoxSize[d]` turns them into mesh units, cell i covers [i, i+1).
//   * meshes are C-ordered (Nx, Ny, Nz, C): C channels painted or read with one set of weights.
//   * paint:   mesh[c, ch] += w[p, ch] * W(u_p - c)         W = product of (1 - |t|) per axis
//     (weights of shape (1, C): the same for every particle, e.g. unit masses, with no (N, C)
//     array of ones; likewise the cotangent of readout_vjp_pos)
//     readout: out[p, ch]   = sum_c mesh[c, ch] W(u_p - c)  (the exact adjoint of paint)
//     readout_vjp_pos: out[p, d] = sum_ch g[p, ch] d/dx_d readout(p, ch)   (piecewise constant)
//     displace:     out = x + readout(grad mesh)  (a displacement layer's last step)
//     displace_vjp: out = ct + readout_vjp_pos(grad mesh, ct) + readout_vjp_pos(u, 1): its whole
//                   position cotangent, u being the cotangent of the layer's unit-mass paint
//
// Threads: readouts are parallel over particles. Paint is parallel over x planes: each thread owns
// a range of planes and adds, in particle order, the contributions that fall in them, so no two
// threads write the same cell and the result is bitwise independent of the number of threads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace py = pybind11;

namespace {

int g_num_threads = 0;  // 0: OpenMP's default

int num_threads() {
#ifdef _OPENMP
  return g_num_threads > 0 ? g_num_threads : omp_get_max_threads();
#else
  return 1;
#endif
}

struct Grid {
  int64_t n[3];
  double scale[3];
  int64_t nch;
};

// Lower cell index (wrapped into [0, n)) and the fractional offset in [0, 1).
// floor by truncation: std::floor is a libm call on baseline x86-64 (no SSE4.1 roundsd), and the
// integer modulo is only needed for the rare particle outside [0, BoxSize).
inline void wrap_cell(double u, int64_t n, int64_t& i, double& f) {
  int64_t fl = static_cast<int64_t>(u);
  if (u < static_cast<double>(fl)) --fl;
  f = u - static_cast<double>(fl);
  if (fl >= 0 && fl < n) {
    i = fl;
  } else {
    i = fl % n;
    if (i < 0) i += n;
  }
}

template <typename T>
inline void cell_of(const T* x, const Grid& g, int64_t i0[3], int64_t i1[3], double f[3]) {
  for (int d = 0; d < 3; ++d) {
    wrap_cell(static_cast<double>(x[d]) * g.scale[d], g.n[d], i0[d], f[d]);
    i1[d] = (i0[d] + 1 == g.n[d]) ? 0 : i0[d] + 1;
  }
}

// Channel count as a template parameter for the common cases (1: densities, 3: vectors), so the
// inner loops unroll; NCH = 0 means "read it from the grid".
template <int NCH>
inline int64_t channels(const Grid& g) {
  return NCH > 0 ? NCH : g.nch;
}

// Paint: threads own disjoint ranges of x planes and each scans all particles, adding only the
// contributions that land in its planes. Every cell then receives its contributions in particle
// order, exactly as in a serial loop, so the result is bitwise independent of the thread count,
// with no sort and no extra memory.
//
// Inside the parallel region the channel count and the grid are the region's own (a constant and a
// private copy): GCC outlines the region before propagating constants, so a count declared
// outside it is read from memory at every add, and the inner loop over channels is not unrolled
// (measured: 62 ms against 28 ms for one 128^3 paint on one thread).
template <typename T, int NCH>
void paint_impl(T* mesh, const T* pos, const T* w, int64_t wrows, int64_t npart,
                const Grid& grid) {
  std::fill(mesh, mesh + grid.n[0] * grid.n[1] * grid.n[2] * channels<NCH>(grid), T(0));
  int nthr = num_threads();
  if (npart < 4096) nthr = 1;
  if (nthr > grid.n[0]) nthr = static_cast<int>(grid.n[0]);
#pragma omp parallel num_threads(nthr)
  {
    const Grid g = grid;
    const int64_t nch = channels<NCH>(g);
    const int64_t wstep = wrows == 1 ? 0 : nch;  // one row of weights for every particle
    const int64_t nx = g.n[0];
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int tid = 0, nt = 1;
#endif
    const int64_t lo = nx * tid / nt, hi = nx * (tid + 1) / nt;
    const int64_t plane = g.n[1] * g.n[2] * nch;
    for (int64_t p = 0; p < npart; ++p) {
      const T* x = pos + 3 * p;
      int64_t ix0;
      double fx;
      wrap_cell(static_cast<double>(x[0]) * g.scale[0], nx, ix0, fx);
      const int64_t ix1 = (ix0 + 1 == nx) ? 0 : ix0 + 1;
      const bool own0 = ix0 >= lo && ix0 < hi, own1 = ix1 >= lo && ix1 < hi;
      if (!own0 && !own1) continue;
      int64_t iy0, iz0;
      double fy, fz;
      wrap_cell(static_cast<double>(x[1]) * g.scale[1], g.n[1], iy0, fy);
      wrap_cell(static_cast<double>(x[2]) * g.scale[2], g.n[2], iz0, fz);
      const int64_t iy[2] = {iy0, (iy0 + 1 == g.n[1]) ? 0 : iy0 + 1};
      const int64_t iz[2] = {iz0, (iz0 + 1 == g.n[2]) ? 0 : iz0 + 1};
      const double wx[2] = {1.0 - fx, fx}, wy[2] = {1.0 - fy, fy}, wz[2] = {1.0 - fz, fz};
      const int64_t ix[2] = {ix0, ix1};
      const bool own[2] = {own0, own1};
      const T* wp = w + wstep * p;
      for (int a = 0; a < 2; ++a) {
        if (!own[a]) continue;
        T* base = mesh + ix[a] * plane;
        for (int b = 0; b < 2; ++b)
          for (int c = 0; c < 2; ++c) {
            const T k = static_cast<T>(wx[a] * wy[b] * wz[c]);
            T* cell = base + (iy[b] * g.n[2] + iz[c]) * nch;
            for (int64_t ch = 0; ch < nch; ++ch) cell[ch] += k * wp[ch];
          }
      }
    }
  }
}

template <typename T>
void paint(T* mesh, const T* pos, const T* w, int64_t wrows, int64_t npart, const Grid& g) {
  if (g.nch == 1) return paint_impl<T, 1>(mesh, pos, w, wrows, npart, g);
  if (g.nch == 3) return paint_impl<T, 3>(mesh, pos, w, wrows, npart, g);
  return paint_impl<T, 0>(mesh, pos, w, wrows, npart, g);
}

// ``base`` (optional, (N, C) like ``out``): added to the readout, out = base + readout; a
// layer's new positions are its old ones plus the gradient read out at them (JaxEngine.displace).
template <typename T, int NCH>
void readout_impl(const T* mesh, const T* pos, T* out, int64_t npart, const Grid& g,
                  const T* base) {
  const int64_t nch = channels<NCH>(g);
  const int nthr = npart > 4096 ? num_threads() : 1;
  const Grid gl = g;  // a private copy: the outlined OpenMP body then keeps it in registers
#pragma omp parallel for num_threads(nthr) schedule(static)
  for (int64_t p = 0; p < npart; ++p) {
    int64_t i0[3], i1[3];
    double f[3];
    cell_of(pos + 3 * p, gl, i0, i1, f);
    const int64_t ix[2] = {i0[0], i1[0]}, iy[2] = {i0[1], i1[1]}, iz[2] = {i0[2], i1[2]};
    const double wx[2] = {1.0 - f[0], f[0]}, wy[2] = {1.0 - f[1], f[1]}, wz[2] = {1.0 - f[2], f[2]};
    T* o = out + nch * p;
    if constexpr (NCH > 0) {
      T acc[NCH] = {};
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
          for (int c = 0; c < 2; ++c) {
            const T k = static_cast<T>(wx[a] * wy[b] * wz[c]);
            const T* cell = mesh + ((ix[a] * gl.n[1] + iy[b]) * gl.n[2] + iz[c]) * NCH;
            for (int ch = 0; ch < NCH; ++ch) acc[ch] += k * cell[ch];
          }
      if (base)
        for (int ch = 0; ch < NCH; ++ch) o[ch] = base[NCH * p + ch] + acc[ch];
      else
        for (int ch = 0; ch < NCH; ++ch) o[ch] = acc[ch];
    } else {
      for (int64_t ch = 0; ch < nch; ++ch) o[ch] = base ? base[nch * p + ch] : T(0);
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
          for (int c = 0; c < 2; ++c) {
            const T k = static_cast<T>(wx[a] * wy[b] * wz[c]);
            const T* cell = mesh + ((ix[a] * gl.n[1] + iy[b]) * gl.n[2] + iz[c]) * nch;
            for (int64_t ch = 0; ch < nch; ++ch) o[ch] += k * cell[ch];
          }
    }
  }
}

template <typename T>
void readout(const T* mesh, const T* pos, T* out, int64_t npart, const Grid& g,
             const T* base = nullptr) {
  if (g.nch == 1) return readout_impl<T, 1>(mesh, pos, out, npart, g, base);
  if (g.nch == 3) return readout_impl<T, 3>(mesh, pos, out, npart, g, base);
  return readout_impl<T, 0>(mesh, pos, out, npart, g, base);
}

// out[p, d] = sum_ch gout[p, ch] * d/dx_d readout(mesh[..., ch], x_p), in 1/(Mpc/h) units.
// Optional: ``unit`` (a 1-channel mesh of the same grid) adds d/dx_d readout(unit, x_p), as the
// position gradient of a unit-mass paint whose cotangent mesh it is; ``base`` ((N, 3)) is added
// to the result. One pass then gives a displacement layer's whole position cotangent
// (JaxEngine.displace): its own, the readout's and the density paint's.
template <typename T, int NCH>
void readout_vjp_pos_impl(const T* mesh, const T* pos, const T* gout, int64_t grows, T* out,
                          int64_t npart, const Grid& g, const T* unit, const T* base) {
  const int64_t nch = channels<NCH>(g);
  const int64_t gstep = grows == 1 ? 0 : nch;  // one cotangent row for every particle
  const int nthr = npart > 4096 ? num_threads() : 1;
  const Grid gl = g;  // private copy, kept in registers by the outlined body
#pragma omp parallel for num_threads(nthr) schedule(static)
  for (int64_t p = 0; p < npart; ++p) {
    int64_t i0[3], i1[3];
    double f[3];
    cell_of(pos + 3 * p, gl, i0, i1, f);
    const int64_t ix[2] = {i0[0], i1[0]}, iy[2] = {i0[1], i1[1]}, iz[2] = {i0[2], i1[2]};
    const double wx[2] = {1.0 - f[0], f[0]}, wy[2] = {1.0 - f[1], f[1]};
    const T* gp = gout + gstep * p;
    T gl_[NCH > 0 ? NCH : 1];
    if constexpr (NCH > 0)
      for (int ch = 0; ch < NCH; ++ch) gl_[ch] = gp[ch];
    // v[a][b][c] = g . mesh at the corner; the gradient of the trilinear interpolation, factored
    // axis by axis (z, then y, then x): a fifth of the multiplications of the corner-by-corner sum
    double v[2][2][2];
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b)
        for (int c = 0; c < 2; ++c) {
          const int64_t at = (ix[a] * gl.n[1] + iy[b]) * gl.n[2] + iz[c];
          const T* cell = mesh + at * nch;
          double s = unit ? static_cast<double>(unit[at]) : 0.0;
          if constexpr (NCH > 0) {
            for (int ch = 0; ch < NCH; ++ch) s += static_cast<double>(gl_[ch]) * cell[ch];
          } else {
            for (int64_t ch = 0; ch < nch; ++ch) s += static_cast<double>(gp[ch]) * cell[ch];
          }
          v[a][b][c] = s;
        }
    double yz[2], dy[2], dz[2];  // per x plane: value, d/dy and d/dz of the bilinear (y, z) part
    for (int a = 0; a < 2; ++a) {
      const double z0 = v[a][0][0] + f[2] * (v[a][0][1] - v[a][0][0]);  // along z, at y0
      const double z1 = v[a][1][0] + f[2] * (v[a][1][1] - v[a][1][0]);  // along z, at y1
      yz[a] = z0 + f[1] * (z1 - z0);
      dy[a] = z1 - z0;
      dz[a] = wy[0] * (v[a][0][1] - v[a][0][0]) + wy[1] * (v[a][1][1] - v[a][1][0]);
    }
    const double a0 = yz[1] - yz[0];
    const double a1 = wx[0] * dy[0] + wx[1] * dy[1];
    const double a2 = wx[0] * dz[0] + wx[1] * dz[1];
    const double b[3] = {base ? static_cast<double>(base[3 * p]) : 0.0,
                         base ? static_cast<double>(base[3 * p + 1]) : 0.0,
                         base ? static_cast<double>(base[3 * p + 2]) : 0.0};
    out[3 * p] = static_cast<T>(b[0] + a0 * gl.scale[0]);
    out[3 * p + 1] = static_cast<T>(b[1] + a1 * gl.scale[1]);
    out[3 * p + 2] = static_cast<T>(b[2] + a2 * gl.scale[2]);
  }
}

template <typename T>
void readout_vjp_pos(const T* mesh, const T* pos, const T* gout, int64_t grows, T* out,
                     int64_t npart, const Grid& g, const T* unit = nullptr,
                     const T* base = nullptr) {
  if (g.nch == 1)
    return readout_vjp_pos_impl<T, 1>(mesh, pos, gout, grows, out, npart, g, unit, base);
  if (g.nch == 3)
    return readout_vjp_pos_impl<T, 3>(mesh, pos, gout, grows, out, npart, g, unit, base);
  return readout_vjp_pos_impl<T, 0>(mesh, pos, gout, grows, out, npart, g, unit, base);
}

// Central finite-difference gradient of a periodic real mesh (Nx, Ny, Nz) -> (Nx, Ny, Nz, 3), and
// its adjoint (Nx, Ny, Nz, 3) -> (Nx, Ny, Nz):
//   forward: out[c, a] = sum_t coef[a][t] (f(c + (t+1) e_a) - f(c - (t+1) e_a))
//   adjoint: out[c]    = -sum_a sum_t coef[a][t] (g_a(c + (t+1) e_a) - g_a(c - (t+1) e_a))
// (the stencil is antisymmetric, so its adjoint is its negative). coef[a][t] = c_t / H_a with the
// weights c_t of jerald_nbk.pm.fourier.FD_WEIGHTS, passed in by the caller. One pass over the mesh,
// parallel over x planes. Along z the interior of each row reads at fixed offsets (a loop the
// compiler vectorises), the M cells at either end through a periodic index table.
template <typename T, bool ADJ, int M>
void fd_gradient_rows(const T* in, T* out, const int64_t n[3], const double* coefd) {
  const int64_t nx = n[0], ny = n[1], nz = n[2];
  constexpr int64_t CIN = ADJ ? 3 : 1;
  auto wrap = [](int64_t i, int64_t len) { return ((i % len) + len) % len; };
  std::vector<int64_t> zp(nz * M), zm(nz * M);
  for (int64_t k = 0; k < nz; ++k)
    for (int t = 0; t < M; ++t) zp[k * M + t] = wrap(k + t + 1, nz), zm[k * M + t] = wrap(k - t - 1, nz);
  int nthr = num_threads();
  if (nx * ny * nz < 32768) nthr = 1;
#pragma omp parallel num_threads(nthr)
  {
    T c[3][M];
    for (int a = 0; a < 3; ++a)
      for (int t = 0; t < M; ++t) c[a][t] = static_cast<T>(coefd[a * M + t]);
    const int64_t lo = M < nz - M ? M : nz, hi = M < nz - M ? nz - M : nz;  // interior [lo, hi)
#pragma omp for schedule(static)
    for (int64_t i = 0; i < nx; ++i) {
      for (int64_t j = 0; j < ny; ++j) {
        const T *xp[M], *xm[M], *yp[M], *ym[M];
        for (int t = 0; t < M; ++t) {
          xp[t] = in + ((wrap(i + t + 1, nx) * ny + j) * nz) * CIN;
          xm[t] = in + ((wrap(i - t - 1, nx) * ny + j) * nz) * CIN;
          yp[t] = in + ((i * ny + wrap(j + t + 1, ny)) * nz) * CIN + (ADJ ? 1 : 0);
          ym[t] = in + ((i * ny + wrap(j - t - 1, ny)) * nz) * CIN + (ADJ ? 1 : 0);
        }
        const T* z0 = in + ((i * ny + j) * nz) * CIN + (ADJ ? 2 : 0);
        T* o = out + (i * ny + j) * nz * (ADJ ? 1 : 3);
        auto cell = [&](int64_t k, const int64_t* kp, const int64_t* km) {
          T s0 = 0, s1 = 0, s2 = 0;
          for (int t = 0; t < M; ++t) {
            s0 += c[0][t] * (xp[t][k * CIN] - xm[t][k * CIN]);
            s1 += c[1][t] * (yp[t][k * CIN] - ym[t][k * CIN]);
            s2 += c[2][t] * (z0[kp[t] * CIN] - z0[km[t] * CIN]);
          }
          if constexpr (ADJ) {
            o[k] = -(s0 + s1 + s2);
          } else {
            o[3 * k] = s0, o[3 * k + 1] = s1, o[3 * k + 2] = s2;
          }
        };
        for (int64_t k = 0; k < lo; ++k) cell(k, &zp[k * M], &zm[k * M]);
        for (int64_t k = hi; k < nz; ++k) cell(k, &zp[k * M], &zm[k * M]);
        for (int64_t k = lo; k < hi; ++k) {
          T s0 = 0, s1 = 0, s2 = 0;
          for (int t = 0; t < M; ++t) {
            s0 += c[0][t] * (xp[t][k * CIN] - xm[t][k * CIN]);
            s1 += c[1][t] * (yp[t][k * CIN] - ym[t][k * CIN]);
            s2 += c[2][t] * (z0[(k + t + 1) * CIN] - z0[(k - t - 1) * CIN]);
          }
          if constexpr (ADJ) {
            o[k] = -(s0 + s1 + s2);
          } else {
            o[3 * k] = s0, o[3 * k + 1] = s1, o[3 * k + 2] = s2;
          }
        }
      }
    }
  }
}

template <typename T, bool ADJ>
void fd_gradient_impl(const T* in, T* out, const int64_t n[3], const double* coef, int m) {
  if (m == 2) return fd_gradient_rows<T, ADJ, 2>(in, out, n, coef);
  if (m == 3) return fd_gradient_rows<T, ADJ, 3>(in, out, n, coef);
  return fd_gradient_rows<T, ADJ, 1>(in, out, n, coef);
}

// ------------------------------------------------------------------------------------------------
// XLA FFI handlers.

ffi::Error check_pos(const ffi::AnyBuffer& pos, const char* who) {
  auto d = pos.dimensions();
  if (d.size() != 2 || d[1] != 3)
    return ffi::Error::InvalidArgument(std::string(who) + ": positions must have shape (N, 3)");
  return ffi::Error::Success();
}

ffi::Error check_mesh(const ffi::AnyBuffer& mesh, Grid& g, double sx, double sy, double sz,
                      const char* who) {
  auto d = mesh.dimensions();
  if (d.size() != 4)
    return ffi::Error::InvalidArgument(std::string(who) + ": mesh must have shape (Nx, Ny, Nz, C)");
  g = Grid{{d[0], d[1], d[2]}, {sx, sy, sz}, d[3]};
  return ffi::Error::Success();
}

bool same_float_type(ffi::DataType t, std::initializer_list<const ffi::AnyBuffer*> bufs) {
  if (t != ffi::DataType::F32 && t != ffi::DataType::F64) return false;
  for (auto* b : bufs)
    if (b->element_type() != t) return false;
  return true;
}

ffi::Error PaintImpl(ffi::AnyBuffer pos, ffi::AnyBuffer w, double sx, double sy, double sz,
                     ffi::Result<ffi::AnyBuffer> mesh) {
  if (auto e = check_pos(pos, "cic_paint"); !e.success()) return e;
  Grid g;
  if (auto e = check_mesh(*mesh, g, sx, sy, sz, "cic_paint"); !e.success()) return e;
  const int64_t n = pos.dimensions()[0];
  const auto wd = w.dimensions();
  if (wd.size() != 2 || (wd[0] != n && wd[0] != 1) || wd[1] != g.nch)
    return ffi::Error::InvalidArgument("cic_paint: weights must have shape (N, C) or (1, C)");
  if (!same_float_type(pos.element_type(), {&w, &*mesh}))
    return ffi::Error::InvalidArgument("cic_paint: all buffers must be float32 or all float64");
  if (pos.element_type() == ffi::DataType::F32)
    paint(mesh->typed_data<float>(), pos.typed_data<float>(), w.typed_data<float>(), wd[0], n, g);
  else
    paint(mesh->typed_data<double>(), pos.typed_data<double>(), w.typed_data<double>(), wd[0], n,
          g);
  return ffi::Error::Success();
}

// DISPLACE: a displacement layer's last step, new positions = pos + readout(mesh, pos), the mesh
// holding the 3-channel gradient.
template <bool DISPLACE>
ffi::Error ReadoutImpl(ffi::AnyBuffer mesh, ffi::AnyBuffer pos, double sx, double sy, double sz,
                       ffi::Result<ffi::AnyBuffer> out) {
  const char* who = DISPLACE ? "cic_displace" : "cic_readout";
  if (auto e = check_pos(pos, who); !e.success()) return e;
  Grid g;
  if (auto e = check_mesh(mesh, g, sx, sy, sz, who); !e.success()) return e;
  if (DISPLACE && g.nch != 3)
    return ffi::Error::InvalidArgument("cic_displace: mesh must have 3 channels");
  const int64_t n = pos.dimensions()[0];
  if (!same_float_type(pos.element_type(), {&mesh, &*out}))
    return ffi::Error::InvalidArgument(std::string(who) +
                                       ": all buffers must be float32 or all float64");
  if (pos.element_type() == ffi::DataType::F32)
    readout(mesh.typed_data<float>(), pos.typed_data<float>(), out->typed_data<float>(), n, g,
            DISPLACE ? pos.typed_data<float>() : nullptr);
  else
    readout(mesh.typed_data<double>(), pos.typed_data<double>(), out->typed_data<double>(), n, g,
            DISPLACE ? pos.typed_data<double>() : nullptr);
  return ffi::Error::Success();
}

ffi::Error ReadoutVjpPosImpl(ffi::AnyBuffer mesh, ffi::AnyBuffer pos, ffi::AnyBuffer gout,
                             double sx, double sy, double sz, ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = check_pos(pos, "cic_readout_vjp_pos"); !e.success()) return e;
  Grid g;
  if (auto e = check_mesh(mesh, g, sx, sy, sz, "cic_readout_vjp_pos"); !e.success()) return e;
  const int64_t n = pos.dimensions()[0];
  if (!same_float_type(pos.element_type(), {&mesh, &gout, &*out}))
    return ffi::Error::InvalidArgument("cic_readout_vjp_pos: mixed float types");
  const auto gd = gout.dimensions();
  if (gd.size() != 2 || (gd[0] != n && gd[0] != 1) || gd[1] != g.nch)
    return ffi::Error::InvalidArgument("cic_readout_vjp_pos: cotangent must have shape (N, C) or (1, C)");
  if (pos.element_type() == ffi::DataType::F32)
    readout_vjp_pos(mesh.typed_data<float>(), pos.typed_data<float>(), gout.typed_data<float>(),
                    gd[0], out->typed_data<float>(), n, g);
  else
    readout_vjp_pos(mesh.typed_data<double>(), pos.typed_data<double>(),
                    gout.typed_data<double>(), gd[0], out->typed_data<double>(), n, g);
  return ffi::Error::Success();
}

// Its position cotangent in one pass: ct + sum_ch ct[:, ch] grad readout(mesh[..., ch]) +
// grad readout(unit), where ``unit`` (.., 1) is the cotangent of the layer's unit-mass paint.
ffi::Error DisplaceVjpImpl(ffi::AnyBuffer mesh, ffi::AnyBuffer unit, ffi::AnyBuffer pos,
                           ffi::AnyBuffer ct, double sx, double sy, double sz,
                           ffi::Result<ffi::AnyBuffer> out) {
  const char* who = "cic_displace_vjp";
  if (auto e = check_pos(pos, who); !e.success()) return e;
  Grid g, gu;
  if (auto e = check_mesh(mesh, g, sx, sy, sz, who); !e.success()) return e;
  if (auto e = check_mesh(unit, gu, sx, sy, sz, who); !e.success()) return e;
  if (g.nch != 3 || gu.nch != 1 || gu.n[0] != g.n[0] || gu.n[1] != g.n[1] || gu.n[2] != g.n[2])
    return ffi::Error::InvalidArgument("cic_displace_vjp: meshes must be (Nx, Ny, Nz, 3) and 1");
  const int64_t n = pos.dimensions()[0];
  const auto cd = ct.dimensions();
  if (cd.size() != 2 || cd[0] != n || cd[1] != 3)
    return ffi::Error::InvalidArgument("cic_displace_vjp: cotangent must have shape (N, 3)");
  if (!same_float_type(pos.element_type(), {&mesh, &unit, &ct, &*out}))
    return ffi::Error::InvalidArgument("cic_displace_vjp: mixed float types");
  if (pos.element_type() == ffi::DataType::F32)
    readout_vjp_pos(mesh.typed_data<float>(), pos.typed_data<float>(), ct.typed_data<float>(), n,
                    out->typed_data<float>(), n, g, unit.typed_data<float>(),
                    ct.typed_data<float>());
  else
    readout_vjp_pos(mesh.typed_data<double>(), pos.typed_data<double>(), ct.typed_data<double>(),
                    n, out->typed_data<double>(), n, g, unit.typed_data<double>(),
                    ct.typed_data<double>());
  return ffi::Error::Success();
}

template <bool ADJ>
ffi::Error FdGradientImpl(ffi::AnyBuffer in, double hx, double hy, double hz, double c1, double c2,
                          double c3, int64_t taps, ffi::Result<ffi::AnyBuffer> out) {
  const char* who = ADJ ? "fd_gradient_adjoint" : "fd_gradient";
  auto d = in.dimensions();
  auto od = out->dimensions();
  const bool ok = ADJ ? (d.size() == 4 && d[3] == 3 && od.size() == 3)
                      : (d.size() == 3 && od.size() == 4 && od[3] == 3);
  if (!ok) return ffi::Error::InvalidArgument(std::string(who) + ": bad mesh shapes");
  if (taps < 1 || taps > 3) return ffi::Error::InvalidArgument(std::string(who) + ": 1-3 taps");
  if (!same_float_type(in.element_type(), {&*out}))
    return ffi::Error::InvalidArgument(std::string(who) + ": mixed float types");
  const int64_t n[3] = {d[0], d[1], d[2]};
  const double c[3] = {c1, c2, c3}, h[3] = {hx, hy, hz};
  double coef[9];
  for (int a = 0; a < 3; ++a)
    for (int t = 0; t < taps; ++t) coef[a * taps + t] = c[t] / h[a];
  const int m = static_cast<int>(taps);
  if (in.element_type() == ffi::DataType::F32)
    fd_gradient_impl<float, ADJ>(in.typed_data<float>(), out->typed_data<float>(), n, coef, m);
  else
    fd_gradient_impl<double, ADJ>(in.typed_data<double>(), out->typed_data<double>(), n, coef, m);
  return ffi::Error::Success();
}

}  // namespace

#define JERALD_FD_BINDING                                                                          \
  ffi::Ffi::Bind()                                                                                 \
      .Arg<ffi::AnyBuffer>()                                                                       \
      .Attr<double>("hx")                                                                          \
      .Attr<double>("hy")                                                                          \
      .Attr<double>("hz")                                                                          \
      .Attr<double>("c1")                                                                          \
      .Attr<double>("c2")                                                                          \
      .Attr<double>("c3")                                                                          \
      .Attr<int64_t>("taps")                                                                       \
      .Ret<ffi::AnyBuffer>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldFdGradient, FdGradientImpl<false>, JERALD_FD_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldFdGradientAdjoint, FdGradientImpl<true>, JERALD_FD_BINDING);

// The CIC handlers: buffers (positions, weights, meshes, cotangents), the mesh's cells per unit
// length along x, y, z, and one result.
#define JERALD_BUFFER .Arg<ffi::AnyBuffer>()
#define JERALD_CIC_SCALES .Attr<double>("sx").Attr<double>("sy").Attr<double>("sz")
#define JERALD_CIC_BINDING(BUFFERS) ffi::Ffi::Bind() BUFFERS JERALD_CIC_SCALES .Ret<ffi::AnyBuffer>()
#define JERALD_2 JERALD_BUFFER JERALD_BUFFER
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldCicPaint, PaintImpl, JERALD_CIC_BINDING(JERALD_2));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldCicReadout, ReadoutImpl<false>, JERALD_CIC_BINDING(JERALD_2));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldCicReadoutVjpPos, ReadoutVjpPosImpl,
                              JERALD_CIC_BINDING(JERALD_2 JERALD_BUFFER));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldCicDisplace, ReadoutImpl<true>, JERALD_CIC_BINDING(JERALD_2));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldCicDisplaceVjp, DisplaceVjpImpl,
                              JERALD_CIC_BINDING(JERALD_2 JERALD_2));

// ------------------------------------------------------------------------------------------------
// pybind11: FFI capsules, thread control, and numpy entry points (tests, benchmarks, non-JAX use).

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

Grid grid_from(py::tuple shape, py::tuple scale, int64_t nch) {
  if (shape.size() != 3 || scale.size() != 3) throw std::invalid_argument("shape and scale need 3 entries");
  Grid g{{shape[0].cast<int64_t>(), shape[1].cast<int64_t>(), shape[2].cast<int64_t>()},
         {scale[0].cast<double>(), scale[1].cast<double>(), scale[2].cast<double>()},
         nch};
  for (int d = 0; d < 3; ++d)
    if (g.n[d] <= 0) throw std::invalid_argument("mesh shape entries must be positive");
  return g;
}

void check_np_pos(const py::buffer_info& b) {
  if (b.ndim != 2 || b.shape[1] != 3) throw std::invalid_argument("positions must have shape (N, 3)");
}

template <typename T>
Arr<T> np_paint(Arr<T> pos, Arr<T> w, py::tuple shape, py::tuple scale) {
  auto pb = pos.request(), wb = w.request();
  check_np_pos(pb);
  if (wb.ndim != 2 || (wb.shape[0] != pb.shape[0] && wb.shape[0] != 1))
    throw std::invalid_argument("weights must have shape (N, C) or (1, C)");
  Grid g = grid_from(shape, scale, wb.shape[1]);
  Arr<T> mesh({g.n[0], g.n[1], g.n[2], g.nch});
  {
    py::gil_scoped_release nogil;
    paint(mesh.mutable_data(), pos.data(), w.data(), wb.shape[0], pb.shape[0], g);
  }
  return mesh;
}

template <typename T>
Arr<T> np_readout(Arr<T> mesh, Arr<T> pos, py::tuple scale) {
  auto mb = mesh.request(), pb = pos.request();
  check_np_pos(pb);
  if (mb.ndim != 4) throw std::invalid_argument("mesh must have shape (Nx, Ny, Nz, C)");
  Grid g = grid_from(py::make_tuple(mb.shape[0], mb.shape[1], mb.shape[2]), scale, mb.shape[3]);
  Arr<T> out({static_cast<int64_t>(pb.shape[0]), g.nch});
  {
    py::gil_scoped_release nogil;
    readout(mesh.data(), pos.data(), out.mutable_data(), pb.shape[0], g);
  }
  return out;
}

template <typename T>
Arr<T> np_readout_vjp_pos(Arr<T> mesh, Arr<T> pos, Arr<T> gout, py::tuple scale) {
  auto mb = mesh.request(), pb = pos.request(), gb = gout.request();
  check_np_pos(pb);
  if (mb.ndim != 4) throw std::invalid_argument("mesh must have shape (Nx, Ny, Nz, C)");
  if (gb.ndim != 2 || (gb.shape[0] != pb.shape[0] && gb.shape[0] != 1) ||
      gb.shape[1] != mb.shape[3])
    throw std::invalid_argument("cotangent must have shape (N, C) or (1, C)");
  Grid g = grid_from(py::make_tuple(mb.shape[0], mb.shape[1], mb.shape[2]), scale, mb.shape[3]);
  Arr<T> out({static_cast<int64_t>(pb.shape[0]), int64_t{3}});
  {
    py::gil_scoped_release nogil;
    readout_vjp_pos(mesh.data(), pos.data(), gout.data(), gb.shape[0], out.mutable_data(),
                    pb.shape[0], g);
  }
  return out;
}

// The pmesh engine's particle layout, first pass (pmesh_backend.PmeshEngine._np_layout): for every
// particle, the x plane i0 = floor(x * scale_x) (wrapped), its owner, and the row (x in cells from
// the owner's padded slab's ghost plane, y, z) written to ``rows``; returns the particles whose
// owner is not ``rank`` and those in a slab's last plane (their CIC window also reaches the next
// slab), in particle order. One pass, no temporaries: the numpy version made ten.
template <typename T>
py::tuple np_slab_rows(Arr<T> pos, double scale_x, Arr<int64_t> plane_owner, Arr<int64_t> x0,
                       Arr<bool> slab_end, int64_t rank) {
  auto pb = pos.request();
  check_np_pos(pb);
  const int64_t n = pb.shape[0], nx = plane_owner.size();
  if (slab_end.size() != nx) throw std::invalid_argument("plane_owner and slab_end differ in length");
  Arr<T> rows({n, int64_t{3}});
  std::vector<int64_t> away, ghost;
  {
    py::gil_scoped_release nogil;
    const T* x = pos.data();
    T* r = rows.mutable_data();
    const int64_t* owner = plane_owner.data();
    const int64_t* start = x0.data();
    const bool* end = slab_end.data();
    for (int64_t p = 0; p < n; ++p, x += 3, r += 3) {
      int64_t i0;
      double f;
      wrap_cell(static_cast<double>(x[0]) * scale_x, nx, i0, f);
      const int64_t o = owner[i0];
      r[0] = static_cast<T>(static_cast<double>(i0 - (start[o] - 1)) + f);
      r[1] = x[1];
      r[2] = x[2];
      if (o != rank) away.push_back(p);
      if (end[i0]) ghost.push_back(p);
    }
  }
  auto to_np = [](const std::vector<int64_t>& v) {
    Arr<int64_t> a({static_cast<py::ssize_t>(v.size())});
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  return py::make_tuple(rows, to_np(away), to_np(ghost));
}

template <typename Fn>
py::capsule capsule(Fn* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

PYBIND11_MODULE(_cic, m) {
  m.doc() = "CIC paint/readout kernels (C++, OpenMP) for jerald_nbk, as XLA FFI targets and numpy functions";
  m.def("registrations", []() {
    py::dict d;
    d["jerald_cic_paint"] = capsule(JeraldCicPaint);
    d["jerald_cic_readout"] = capsule(JeraldCicReadout);
    d["jerald_cic_readout_vjp_pos"] = capsule(JeraldCicReadoutVjpPos);
    d["jerald_cic_displace"] = capsule(JeraldCicDisplace);
    d["jerald_cic_displace_vjp"] = capsule(JeraldCicDisplaceVjp);
    d["jerald_fd_gradient"] = capsule(JeraldFdGradient);
    d["jerald_fd_gradient_adjoint"] = capsule(JeraldFdGradientAdjoint);
    return d;
  }, "FFI handler capsules, by target name, for jax.ffi.register_ffi_target.");
  m.def("max_threads", &num_threads, "Threads the kernels use.");
  m.def("set_num_threads", [](int n) { g_num_threads = n; },
        "Set the kernels' thread count (0: OpenMP's default, e.g. OMP_NUM_THREADS).");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("paint", &np_paint<double>, py::arg("pos"), py::arg("weights"), py::arg("shape"), py::arg("scale"));
  m.def("paint", &np_paint<float>, py::arg("pos"), py::arg("weights"), py::arg("shape"), py::arg("scale"));
  m.def("readout", &np_readout<double>, py::arg("mesh"), py::arg("pos"), py::arg("scale"));
  m.def("readout", &np_readout<float>, py::arg("mesh"), py::arg("pos"), py::arg("scale"));
  m.def("readout_vjp_pos", &np_readout_vjp_pos<double>, py::arg("mesh"), py::arg("pos"),
        py::arg("cotangent"), py::arg("scale"));
  m.def("readout_vjp_pos", &np_readout_vjp_pos<float>, py::arg("mesh"), py::arg("pos"),
        py::arg("cotangent"), py::arg("scale"));
  m.def("slab_rows", &np_slab_rows<double>, py::arg("pos"), py::arg("scale_x"),
        py::arg("plane_owner"), py::arg("x0"), py::arg("slab_end"), py::arg("rank"));
  m.def("slab_rows", &np_slab_rows<float>, py::arg("pos"), py::arg("scale_x"),
        py::arg("plane_owner"), py::arg("x0"), py::arg("slab_end"), py::arg("rank"));
}
