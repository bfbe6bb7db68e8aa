// Cloud-in-cell (CIC) paint and readout kernels for jerald_nbk, callable from jit-compiled JAX
// through XLA FFI custom calls, and from numpy through pybind11.
//
// Conventions (shared with jerald_nbk/pm/fourier.py and jax_backend.py):
//   * positions are in box units (Mpc/h), any real value: the box is periodic and the kernels wrap;
//     `scale[d] = Nmesh[d] / BoxSize[d]` turns them into mesh units, cell i covers [i, i+1).
//   * meshes are C-ordered (Nx, Ny, Nz, C): C channels painted or read with one set of weights.
//   * paint:   mesh[c, ch] += w[p, ch] * W(u_p - c)         W = product of (1 - |t|) per axis
//     readout: out[p, ch]   = sum_c mesh[c, ch] W(u_p - c)  (the exact adjoint of paint)
//     readout_vjp_pos: out[p, d] = sum_ch g[p, ch] d/dx_d readout(p, ch)   (piecewise constant)
//
// Threads: readouts are parallel over particles. Paint is parallel over groups of two x-planes:
// particles are stably bucketed by their x cell, and even groups, then odd groups, are painted
// concurrently, so no two threads touch the same plane. Within a group one thread adds in
// particle order, so the result is bitwise independent of the number of threads.
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
template <typename T>
inline void cell_of(const T* x, const Grid& g, int64_t i0[3], double f[3]) {
  for (int d = 0; d < 3; ++d) {
    const double u = static_cast<double>(x[d]) * g.scale[d];
    const double fl = std::floor(u);
    f[d] = u - fl;
    int64_t i = static_cast<int64_t>(fl) % g.n[d];
    i0[d] = i < 0 ? i + g.n[d] : i;
  }
}

template <typename T>
inline void paint_one(T* mesh, const T* x, const T* w, const Grid& g) {
  int64_t i0[3];
  double f[3];
  cell_of(x, g, i0, f);
  const int64_t ix[2] = {i0[0], (i0[0] + 1) % g.n[0]};
  const int64_t iy[2] = {i0[1], (i0[1] + 1) % g.n[1]};
  const int64_t iz[2] = {i0[2], (i0[2] + 1) % g.n[2]};
  const double wx[2] = {1.0 - f[0], f[0]}, wy[2] = {1.0 - f[1], f[1]}, wz[2] = {1.0 - f[2], f[2]};
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b)
      for (int c = 0; c < 2; ++c) {
        const T k = static_cast<T>(wx[a] * wy[b] * wz[c]);
        T* cell = mesh + ((ix[a] * g.n[1] + iy[b]) * g.n[2] + iz[c]) * g.nch;
        for (int64_t ch = 0; ch < g.nch; ++ch) cell[ch] += k * w[ch];
      }
}

template <typename T>
void paint(T* mesh, const T* pos, const T* w, int64_t npart, const Grid& g) {
  const int64_t ncell = g.n[0] * g.n[1] * g.n[2] * g.nch;
  std::fill(mesh, mesh + ncell, T(0));
  const int64_t nx = g.n[0];
  const int nthr = num_threads();
  // Small inputs take the serial path whatever the thread count; larger ones always take the
  // bucketed path, so the summation order (and the result, bitwise) never depends on threads.
  if (npart < 4096 || nx < 4) {
    for (int64_t p = 0; p < npart; ++p) paint_one(mesh, pos + 3 * p, w + g.nch * p, g);
    return;
  }
  // Stable counting sort of particles by x cell.
  std::vector<int32_t> xcell(npart);
  std::vector<int64_t> start(nx + 1, 0);
#pragma omp parallel for num_threads(nthr) schedule(static)
  for (int64_t p = 0; p < npart; ++p) {
    int64_t i0[3];
    double f[3];
    cell_of(pos + 3 * p, g, i0, f);
    xcell[p] = static_cast<int32_t>(i0[0]);
  }
  for (int64_t p = 0; p < npart; ++p) ++start[xcell[p] + 1];
  for (int64_t i = 0; i < nx; ++i) start[i + 1] += start[i];
  std::vector<int64_t> order(npart);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < npart; ++p) order[fill[xcell[p]]++] = p;
  }
  std::vector<int32_t>().swap(xcell);
  // Group g holds x planes [2g, 2g+2) and writes planes [2g, 2g+3): same-parity groups never meet,
  // except the last group and group 0 across the periodic boundary when the count is odd.
  const int64_t ngroup = (nx + 1) / 2;
  const int64_t last_apart = (ngroup % 2 == 1) ? ngroup - 1 : -1;
  auto run_group = [&](int64_t grp) {
    const int64_t b = start[2 * grp], e = start[std::min<int64_t>(2 * grp + 2, nx)];
    for (int64_t q = b; q < e; ++q) {
      const int64_t p = order[q];
      paint_one(mesh, pos + 3 * p, w + g.nch * p, g);
    }
  };
  for (int parity = 0; parity < 2; ++parity) {
#pragma omp parallel for num_threads(nthr) schedule(dynamic, 1)
    for (int64_t grp = parity; grp < ngroup; grp += 2)
      if (grp != last_apart) run_group(grp);
  }
  if (last_apart >= 0) run_group(last_apart);
}

template <typename T>
void readout(const T* mesh, const T* pos, T* out, int64_t npart, const Grid& g) {
  const int nthr = num_threads();
#pragma omp parallel for num_threads(nthr) schedule(static) if (npart > 4096)
  for (int64_t p = 0; p < npart; ++p) {
    int64_t i0[3];
    double f[3];
    cell_of(pos + 3 * p, g, i0, f);
    const int64_t ix[2] = {i0[0], (i0[0] + 1) % g.n[0]};
    const int64_t iy[2] = {i0[1], (i0[1] + 1) % g.n[1]};
    const int64_t iz[2] = {i0[2], (i0[2] + 1) % g.n[2]};
    const double wx[2] = {1.0 - f[0], f[0]}, wy[2] = {1.0 - f[1], f[1]}, wz[2] = {1.0 - f[2], f[2]};
    T* o = out + g.nch * p;
    for (int64_t ch = 0; ch < g.nch; ++ch) o[ch] = T(0);
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b)
        for (int c = 0; c < 2; ++c) {
          const T k = static_cast<T>(wx[a] * wy[b] * wz[c]);
          const T* cell = mesh + ((ix[a] * g.n[1] + iy[b]) * g.n[2] + iz[c]) * g.nch;
          for (int64_t ch = 0; ch < g.nch; ++ch) o[ch] += k * cell[ch];
        }
  }
}

// out[p, d] = sum_ch gout[p, ch] * d/dx_d readout(mesh[..., ch], x_p), in 1/(Mpc/h) units.
template <typename T>
void readout_vjp_pos(const T* mesh, const T* pos, const T* gout, T* out, int64_t npart,
                     const Grid& g) {
  const int nthr = num_threads();
#pragma omp parallel for num_threads(nthr) schedule(static) if (npart > 4096)
  for (int64_t p = 0; p < npart; ++p) {
    int64_t i0[3];
    double f[3];
    cell_of(pos + 3 * p, g, i0, f);
    const int64_t ix[2] = {i0[0], (i0[0] + 1) % g.n[0]};
    const int64_t iy[2] = {i0[1], (i0[1] + 1) % g.n[1]};
    const int64_t iz[2] = {i0[2], (i0[2] + 1) % g.n[2]};
    const double w[3][2] = {{1.0 - f[0], f[0]}, {1.0 - f[1], f[1]}, {1.0 - f[2], f[2]}};
    const double dw[2] = {-1.0, 1.0};
    const T* gp = gout + g.nch * p;
    double acc[3] = {0.0, 0.0, 0.0};
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b)
        for (int c = 0; c < 2; ++c) {
          const T* cell = mesh + ((ix[a] * g.n[1] + iy[b]) * g.n[2] + iz[c]) * g.nch;
          double v = 0.0;
          for (int64_t ch = 0; ch < g.nch; ++ch) v += static_cast<double>(gp[ch]) * cell[ch];
          acc[0] += v * dw[a] * w[1][b] * w[2][c];
          acc[1] += v * w[0][a] * dw[b] * w[2][c];
          acc[2] += v * w[0][a] * w[1][b] * dw[c];
        }
    for (int d = 0; d < 3; ++d) out[3 * p + d] = static_cast<T>(acc[d] * g.scale[d]);
  }
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
  if (w.dimensions().size() != 2 || w.dimensions()[0] != n || w.dimensions()[1] != g.nch)
    return ffi::Error::InvalidArgument("cic_paint: weights must have shape (N, C)");
  if (!same_float_type(pos.element_type(), {&w, &*mesh}))
    return ffi::Error::InvalidArgument("cic_paint: all buffers must be float32 or all float64");
  if (pos.element_type() == ffi::DataType::F32)
    paint(mesh->typed_data<float>(), pos.typed_data<float>(), w.typed_data<float>(), n, g);
  else
    paint(mesh->typed_data<double>(), pos.typed_data<double>(), w.typed_data<double>(), n, g);
  return ffi::Error::Success();
}

ffi::Error ReadoutImpl(ffi::AnyBuffer mesh, ffi::AnyBuffer pos, double sx, double sy, double sz,
                       ffi::Result<ffi::AnyBuffer> out) {
  if (auto e = check_pos(pos, "cic_readout"); !e.success()) return e;
  Grid g;
  if (auto e = check_mesh(mesh, g, sx, sy, sz, "cic_readout"); !e.success()) return e;
  const int64_t n = pos.dimensions()[0];
  if (!same_float_type(pos.element_type(), {&mesh, &*out}))
    return ffi::Error::InvalidArgument("cic_readout: all buffers must be float32 or all float64");
  if (pos.element_type() == ffi::DataType::F32)
    readout(mesh.typed_data<float>(), pos.typed_data<float>(), out->typed_data<float>(), n, g);
  else
    readout(mesh.typed_data<double>(), pos.typed_data<double>(), out->typed_data<double>(), n, g);
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
  if (pos.element_type() == ffi::DataType::F32)
    readout_vjp_pos(mesh.typed_data<float>(), pos.typed_data<float>(), gout.typed_data<float>(),
                    out->typed_data<float>(), n, g);
  else
    readout_vjp_pos(mesh.typed_data<double>(), pos.typed_data<double>(),
                    gout.typed_data<double>(), out->typed_data<double>(), n, g);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldCicPaint, PaintImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<double>("sx")
                                  .Attr<double>("sy")
                                  .Attr<double>("sz")
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldCicReadout, ReadoutImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<double>("sx")
                                  .Attr<double>("sy")
                                  .Attr<double>("sz")
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JeraldCicReadoutVjpPos, ReadoutVjpPosImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<double>("sx")
                                  .Attr<double>("sy")
                                  .Attr<double>("sz")
                                  .Ret<ffi::AnyBuffer>());

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
  if (wb.ndim != 2 || wb.shape[0] != pb.shape[0])
    throw std::invalid_argument("weights must have shape (N, C)");
  Grid g = grid_from(shape, scale, wb.shape[1]);
  Arr<T> mesh({g.n[0], g.n[1], g.n[2], g.nch});
  {
    py::gil_scoped_release nogil;
    paint(mesh.mutable_data(), pos.data(), w.data(), pb.shape[0], g);
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
  if (gb.ndim != 2 || gb.shape[0] != pb.shape[0] || gb.shape[1] != mb.shape[3])
    throw std::invalid_argument("cotangent must have shape (N, C)");
  Grid g = grid_from(py::make_tuple(mb.shape[0], mb.shape[1], mb.shape[2]), scale, mb.shape[3]);
  Arr<T> out({static_cast<int64_t>(pb.shape[0]), int64_t{3}});
  {
    py::gil_scoped_release nogil;
    readout_vjp_pos(mesh.data(), pos.data(), gout.data(), out.mutable_data(), pb.shape[0], g);
  }
  return out;
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
}
