// Fused rational-quadratic spline (forward or inverse) with its Jacobians, for the CPU.
//
// One pass per element computes what boltzflow/flows/splines.py computes in ~60 torch ops
// (softmax of the bin logits, knots, bin search, the RQ map or its inverse, log|dy/dx|) and the
// derivatives of y and log|dy/dx| with respect to the input and to every unnormalised parameter,
// so the backward pass in torch is two broadcast multiplies. The derivatives with respect to the
// bin quantities (x_k, w_k, y_k, h_k, d_k, d_k+1) come from forward-mode dual numbers (exact, no
// hand-derived algebra for the inverse's quadratic root); the chain rule through softmax, cumsum and
// softplus to the parameters is written out below. All arithmetic is in double. The bin's input knot
// enters only through (input - knot) and its output knot only additively, so their derivatives follow
// from the input's (the negative) and from 1 / 0: 5 tangents carry what 7 would.
//
// Layout: x (n,), params (n, P) row-major: K width logits, K height logits, then the derivative
// logits (K - 1 interior knots for kind 0 = spline on [-bound, bound] with identity tails and unit
// boundary slopes; K knots for kind 1 = circular spline on [-pi, pi) whose slope at pi equals the one
// at -pi). Outputs y (n,), ld (n,), dy/dx, dld/dx (n,), dy/dparams, dld/dparams (n, P).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int NT = 5;  // tangents: x, w_k, h_k, d_k, d_k+1 (x_k and y_k follow from x, see the header)

// Forward-mode dual number with N tangents (N = 0: plain arithmetic, for calls without gradients).
template <int N>
struct Dual {
  double v;
  double g[N > 0 ? N : 1];
};

template <int N>
inline Dual<N> cst(double v) {
  Dual<N> r;
  r.v = v;
  for (int i = 0; i < N; ++i) r.g[i] = 0.0;
  return r;
}
template <int N>
inline Dual<N> var(double v, int i) {
  Dual<N> r = cst<N>(v);
  if (i < N) r.g[i] = 1.0;
  return r;
}
template <int N>
inline Dual<N> operator+(const Dual<N>& a, const Dual<N>& b) {
  Dual<N> r;
  r.v = a.v + b.v;
  for (int i = 0; i < N; ++i) r.g[i] = a.g[i] + b.g[i];
  return r;
}
template <int N>
inline Dual<N> operator-(const Dual<N>& a, const Dual<N>& b) {
  Dual<N> r;
  r.v = a.v - b.v;
  for (int i = 0; i < N; ++i) r.g[i] = a.g[i] - b.g[i];
  return r;
}
template <int N>
inline Dual<N> operator*(const Dual<N>& a, const Dual<N>& b) {
  Dual<N> r;
  r.v = a.v * b.v;
  for (int i = 0; i < N; ++i) r.g[i] = a.g[i] * b.v + a.v * b.g[i];
  return r;
}
template <int N>
inline Dual<N> operator*(double a, const Dual<N>& b) {
  Dual<N> r;
  r.v = a * b.v;
  for (int i = 0; i < N; ++i) r.g[i] = a * b.g[i];
  return r;
}
template <int N>
inline Dual<N> operator/(const Dual<N>& a, const Dual<N>& b) {
  Dual<N> r;
  const double inv = 1.0 / b.v;
  r.v = a.v * inv;
  for (int i = 0; i < N; ++i) r.g[i] = (a.g[i] - r.v * b.g[i]) * inv;
  return r;
}
template <int N>
inline Dual<N> dlog(const Dual<N>& a) {
  Dual<N> r;
  r.v = std::log(a.v);
  const double inv = 1.0 / a.v;
  for (int i = 0; i < N; ++i) r.g[i] = a.g[i] * inv;
  return r;
}
template <int N>
inline Dual<N> dsqrt(const Dual<N>& a) {
  Dual<N> r;
  r.v = std::sqrt(a.v);
  const double f = 0.5 / r.v;
  for (int i = 0; i < N; ++i) r.g[i] = a.g[i] * f;
  return r;
}
// clamp with torch's gradient convention: pass-through inside [lo, hi] (ends included), zero outside
template <int N>
inline Dual<N> dclamp(const Dual<N>& a, double lo, double hi) {
  if (a.v < lo) return cst<N>(lo);
  if (a.v > hi) return cst<N>(hi);
  return a;
}

// exp(x) for x <= 0, vectorisable (libm's exp is not vectorised without -ffast-math): x = n ln2 + r,
// |r| <= ln2/2, exp(r) by its degree-13 Taylor polynomial (Horner), 2^n through the exponent bits.
// Relative error ~1e-16; 0 below -700 (softmax logits after subtracting their maximum).
inline double exp_nonpos(double x) {
  const bool tiny = x < -700.0;
  x = tiny ? 0.0 : x;
  const double n = std::nearbyint(x * 1.4426950408889634074);
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  constexpr double c[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
                            1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};
  double p = c[13];
  for (int i = 12; i >= 0; --i) p = p * r + c[i];
  const uint64_t bits = static_cast<uint64_t>(static_cast<int64_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(double));
  return tiny ? 0.0 : p * scale;
}

inline double softplus(double z) { return z > 30.0 ? z : std::log1p(std::exp(z)); }
inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

constexpr int KMAX = 256;

template <typename T, int N>
void spline_one(const T* xin_p, const T* p, int K, int kind, double bound, int inverse, double min_w, double min_h,
                double min_d, double d_offset, T* y_out, T* ld_out, T* dydx, T* dldx, T* jy, T* jl) {
  const int P = kind == 0 ? 3 * K - 1 : 3 * K;
  const double xin = static_cast<double>(*xin_p);
  if (N > 0) {
    for (int q = 0; q < P; ++q) {
      jy[q] = T(0);
      jl[q] = T(0);
    }
  }
  const double lo = kind == 0 ? -bound : -M_PI;
  const double hi = -lo;
  const double S = hi - lo;
  if (kind == 0 && !(xin >= -bound && xin <= bound)) {  // identity tails (NaN passes through too)
    *y_out = T(xin);
    *ld_out = T(0);
    *dydx = T(1);
    *dldx = T(0);
    return;
  }
  double x = xin;
  if (kind == 1) {  // wrap to [-pi, pi) like torch.remainder(x + pi, 2 pi) - pi
    double r = std::fmod(x + M_PI, 2.0 * M_PI);
    if (r < 0) r += 2.0 * M_PI;
    x = r - M_PI;
  }
  double sw[KMAX], sh[KMAX], cw[KMAX + 1], ch[KMAX + 1];
  // softmax of the width and height logits, knots
  for (int pass = 0; pass < 2; ++pass) {
    const T* a = p + pass * K;
    double* s = pass == 0 ? sw : sh;
    double* c = pass == 0 ? cw : ch;
    const double mn = pass == 0 ? min_w : min_h;
    double mx = static_cast<double>(a[0]);
    for (int i = 1; i < K; ++i) mx = std::max(mx, static_cast<double>(a[i]));
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < K; ++i) {
      s[i] = exp_nonpos(static_cast<double>(a[i]) - mx);
      sum += s[i];
    }
    const double inv = 1.0 / sum;
    double acc = 0.0;
    c[0] = lo;
    for (int i = 0; i < K; ++i) {
      s[i] *= inv;
      acc += mn + (1.0 - mn * K) * s[i];
      c[i + 1] = lo + S * acc;
    }
    c[K] = hi;
  }
  const double* cin = inverse ? ch : cw;
  double xc = std::min(std::max(x, lo), hi);
  const bool clamped = xc != x;
  int k = 0;  // largest k with cin[k] <= xc, within [0, K - 1]
  while (k + 1 < K && cin[k + 1] <= xc) ++k;
  // knot slopes d_k, d_k+1 and d(slope)/d(logit) for the ones that have a logit
  auto slope = [&](int j, int* logit, double* dsl) -> double {
    *logit = -1;
    *dsl = 0.0;
    if (kind == 0) {
      if (j == 0 || j == K) return 1.0;
      *logit = 2 * K + (j - 1);
    } else {
      *logit = 2 * K + (j == K ? 0 : j);
    }
    const double z = static_cast<double>(p[*logit]) + d_offset;
    *dsl = sigmoid(z);
    return min_d + softplus(z);
  };
  int lk, lk1;
  double gk, gk1;
  const double dk_v = slope(k, &lk, &gk);
  const double dk1_v = slope(k + 1, &lk1, &gk1);
  using D = Dual<N>;
  // X is a variable even when clamped: its tangent gives the input knot's (negated); dy/dx is zeroed below
  D X = var<N>(xc, 0);
  D XK = cst<N>(cw[k]), WK = var<N>(cw[k + 1] - cw[k], 1), YK = cst<N>(ch[k]), HK = var<N>(ch[k + 1] - ch[k], 2);
  D DK = var<N>(dk_v, 3), DK1 = var<N>(dk1_v, 4);
  D s = HK / WK;
  D xi, out;
  if (!inverse) {
    xi = dclamp((X - XK) / WK, 0.0, 1.0);
  } else {
    D dy = X - YK;
    D sumd = DK1 + DK - 2.0 * s;
    D qa = HK * (s - DK) + dy * sumd;
    D qb = HK * DK - dy * sumd;
    D qc = cst<N>(0.0) - s * dy;
    D disc = qb * qb - 4.0 * (qa * qc);
    if (disc.v < 0.0) disc = cst<N>(0.0);
    D root = (2.0 * qc) / (cst<N>(0.0) - qb - dsqrt(disc));
    xi = dclamp(root, 0.0, 1.0);
    out = XK + xi * WK;
  }
  D one = cst<N>(1.0);
  D t = xi * (one - xi);
  D den = s + (DK1 + DK - 2.0 * s) * t;
  D omx = one - xi;
  D dnum = (s * s) * (DK1 * xi * xi + 2.0 * (s * t) + DK * omx * omx);
  D ld = dlog(dnum) - 2.0 * dlog(den);
  D y;
  if (!inverse) {
    y = YK + HK * (s * xi * xi + DK * t) / den;
  } else {
    y = out;
    ld = cst<N>(0.0) - ld;
  }
  *y_out = T(y.v);
  *ld_out = T(ld.v);
  if constexpr (N == 0) {
    *dydx = T(0);
    *dldx = T(0);
    return;
  } else {
    *dydx = T(clamped ? 0.0 : y.g[0]);
    *dldx = T(clamped ? 0.0 : ld.g[0]);
    // chain rule to the parameters, for both outputs
    for (int o = 0; o < 2; ++o) {
      const D& fd = o == 0 ? y : ld;
      // the 7 bin-quantity derivatives (x, x_k, w_k, y_k, h_k, d_k, d_k+1) from the 5 tangents: the input
      // knot (x_k forward, y_k inverse) enters as (x - knot); the output knot (y_k forward, x_k inverse)
      // adds to y and not to log|dy/dx|
      struct { double g[7]; } f;
      const double out_knot = o == 0 ? 1.0 : 0.0;
      f.g[0] = fd.g[0];
      f.g[1] = inverse ? out_knot : -fd.g[0];
      f.g[2] = fd.g[1];
      f.g[3] = inverse ? -fd.g[0] : out_knot;
      f.g[4] = fd.g[2];
      f.g[5] = fd.g[3];
      f.g[6] = fd.g[4];
      T* j = o == 0 ? jy : jl;
      for (int pass = 0; pass < 2; ++pass) {
        const double* sm = pass == 0 ? sw : sh;
        const double mn = pass == 0 ? min_w : min_h;
        const double g_pos = f.g[pass == 0 ? 1 : 3], g_size = f.g[pass == 0 ? 2 : 4];
        // d f / d frac_i = S (g_pos [i < k] + g_size [i == k]); frac = mn + (1 - mn K) softmax
        double gs[KMAX];
        double dot = 0.0;
        for (int i = 0; i < K; ++i) {
          const double gf = S * ((i < k ? g_pos : 0.0) + (i == k ? g_size : 0.0)) * (1.0 - mn * K);
          gs[i] = gf;
          dot += sm[i] * gf;
        }
        for (int i = 0; i < K; ++i) j[pass * K + i] = T(sm[i] * (gs[i] - dot));
      }
      if (lk >= 0) j[lk] = T(static_cast<double>(j[lk]) + f.g[5] * gk);
      if (lk1 >= 0) j[lk1] = T(static_cast<double>(j[lk1]) + f.g[6] * gk1);
    }
  }
}

template <typename T>
void spline_all(int64_t n, int K, const T* x, const T* params, int kind, double bound, int inverse, double min_w,
                double min_h, double min_d, double d_offset, int n_threads, T* y, T* ld, T* dydx, T* dldx, T* jy,
                T* jl) {
  const int P = kind == 0 ? 3 * K - 1 : 3 * K;
#pragma omp parallel for schedule(static) num_threads(n_threads > 0 ? n_threads : 1) if (n > 4096)
  for (int64_t e = 0; e < n; ++e) {
    if (jy != nullptr)
      spline_one<T, NT>(x + e, params + e * P, K, kind, bound, inverse, min_w, min_h, min_d, d_offset, y + e, ld + e,
                        dydx + e, dldx + e, jy + e * P, jl + e * P);
    else
      spline_one<T, 0>(x + e, params + e * P, K, kind, bound, inverse, min_w, min_h, min_d, d_offset, y + e, ld + e,
                       dydx + e, dldx + e, nullptr, nullptr);
  }
}

}  // namespace

extern "C" {

int bf_rq_spline_f64(int64_t n, int K, const double* x, const double* params, int kind, double bound, int inverse,
                     double min_w, double min_h, double min_d, double d_offset, int n_threads, double* y, double* ld,
                     double* dydx, double* dldx, double* jy, double* jl) {
  if (K < 2 || K > KMAX) return 1;
  spline_all<double>(n, K, x, params, kind, bound, inverse, min_w, min_h, min_d, d_offset, n_threads, y, ld, dydx, dldx, jy, jl);
  return 0;
}

int bf_rq_spline_f32(int64_t n, int K, const float* x, const float* params, int kind, double bound, int inverse,
                     double min_w, double min_h, double min_d, double d_offset, int n_threads, float* y, float* ld,
                     float* dydx, float* dldx, float* jy, float* jl) {
  if (K < 2 || K > KMAX) return 1;
  spline_all<float>(n, K, x, params, kind, bound, inverse, min_w, min_h, min_d, d_offset, n_threads, y, ld, dydx, dldx, jy, jl);
  return 0;
}
}
