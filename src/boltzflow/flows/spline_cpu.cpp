// Fused rational-quadratic spline (forward or inverse) with its Jacobians, for the CPU.
//
// One pass per element computes what boltzflow/flows/splines.py computes in ~60 torch ops
// (softmax of the bin logits, knots, bin search, the RQ map or its inverse, log|dy/dx|) and the
// derivatives of y and log|dy/dx| with respect to the input and to every unnormalised parameter,
// so the backward pass in torch is two broadcast multiplies. The derivatives with respect to the
// bin quantities (x_k, w_k, y_k, h_k, d_k, d_k+1) come from forward-mode dual numbers (exact, no
// hand-derived algebra for the inverse's quadratic root); the chain rule through softmax, cumsum and
// softplus to the parameters is written out below. All arithmetic is in double. The elements go through
// in blocks of W = 8, every step a loop over the block's lanes that the compiler vectorises (bin search and
// knot look-ups as per-lane selects, exp and log as polynomials), ~4x the element-at-a-time speed. The bin's input knot
// enters only through (input - knot) and its output knot only additively, so their derivatives follow
// from the input's (the negative) and from 1 / 0: 5 tangents carry what 7 would.
//
// Layout: x (n,), params (n, P) row-major: K width logits, K height logits, then the derivative
// logits (K - 1 interior knots for kind 0 = spline on [-bound, bound] with identity tails and unit
// boundary slopes; K knots for kind 1 = circular spline on [-pi, pi) whose slope at pi equals the one
// at -pi). Outputs y (n,), ld (n,), dy/dx, dld/dx (n,), dy/dparams, dld/dparams (n, P).
// No floating-point traps are ever enabled here, so the compiler may evaluate both sides of a select: without
// this the lane loops that hold a division under a condition stay scalar (2-3x slower).
#pragma GCC optimize("no-trapping-math")
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int NT = 5;  // tangents: x, w_k, h_k, d_k, d_k+1 (x_k and y_k follow from x, see the header)

// exp(x) for x <= 0, vectorisable (libm's exp is not vectorised without -ffast-math): x = n ln2 + r,
// |r| <= ln2/2, exp(r) by its degree-13 Taylor polynomial (Horner), 2^n through the exponent bits.
// Relative error ~1e-16; 0 below -700 (softmax logits after subtracting their maximum). n is rounded and
// turned into exponent bits by adding 1.5 * 2^52 (the double's low bits then hold n) and integer
// arithmetic on the bits: no double <-> int64 conversion, which AVX2 lacks (it kept these loops scalar).
constexpr double ROUND_SHIFT = 6755399441055744.0;  // 1.5 * 2^52
inline double exp_nonpos(double x) {
  const bool tiny = x < -700.0;
  x = tiny ? 0.0 : x;
  const double t = x * 1.4426950408889634074 + ROUND_SHIFT;  // n = round(x / ln 2) in t's low bits
  const double n = t - ROUND_SHIFT;
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  // Horner written out (no inner loop, so that a loop over lanes calling this vectorises)
  const double p =
      1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (1.0 / 720 + r * (1.0 / 5040 +
      r * (1.0 / 40320 + r * (1.0 / 362880 + r * (1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600 +
      r * (1.0 / 6227020800.0)))))))))))));
  const uint64_t nb = __builtin_bit_cast(uint64_t, t) - __builtin_bit_cast(uint64_t, ROUND_SHIFT);  // n mod 2^64
  const double scale = __builtin_bit_cast(double, (nb + 1023) << 52);
  return tiny ? 0.0 : p * scale;
}


constexpr int KMAX = 256;
constexpr int W = 8;  // elements per block: one AVX-512 register of doubles per lane-loop

#define LANES _Pragma("omp simd") for (int l = 0; l < W; ++l)

// log(x) for finite x > 0, vectorisable: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^23 (relative error ~1e-17). Subnormals and 0 are
// not handled (the callers take logs of slopes >= min_derivative and of sums of them).
inline double log_pos(double x) {
  const uint64_t bits = __builtin_bit_cast(uint64_t, x);
  // the biased exponent (x > 0: no sign bit) as a double without an int64 -> double conversion (not in AVX2):
  // 2^52 + e has e in its low mantissa bits
  const double eb = __builtin_bit_cast(double, (bits >> 52) | 0x4330000000000000ULL) - 4503599627370496.0 - 1023.0;
  double m = __builtin_bit_cast(double, (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);  // in [1, 2)
  const bool big = m > 1.4142135623730951;
  m = big ? 0.5 * m : m;
  const double e = eb + (big ? 1.0 : 0.0);
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  const double p = 1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11 + s2 * (1.0 / 13 +
                   s2 * (1.0 / 15 + s2 * (1.0 / 17 + s2 * (1.0 / 19 + s2 * (1.0 / 21 + s2 * (1.0 / 23)))))))))));
  return e * 0.6931471805599453094 + 2.0 * s * p;
}

// Per-lane forward-mode dual numbers with N tangents (N = 0: values only), W lanes at once.
template <int N>
struct LD {
  double v[W];
  double g[N > 0 ? N : 1][W];
};

template <int N>
inline LD<N> lcst(double c) {
  LD<N> r;
  LANES r.v[l] = c;
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = 0.0;
  return r;
}
template <int N>
inline LD<N> lval(const double* v, int tangent) {  // a variable (tangent < N) or a constant per lane
  LD<N> r;
  LANES r.v[l] = v[l];
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = i == tangent ? 1.0 : 0.0;
  return r;
}
template <int N>
inline LD<N> operator+(const LD<N>& a, const LD<N>& b) {
  LD<N> r;
  LANES r.v[l] = a.v[l] + b.v[l];
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = a.g[i][l] + b.g[i][l];
  return r;
}
template <int N>
inline LD<N> operator-(const LD<N>& a, const LD<N>& b) {
  LD<N> r;
  LANES r.v[l] = a.v[l] - b.v[l];
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = a.g[i][l] - b.g[i][l];
  return r;
}
template <int N>
inline LD<N> operator*(const LD<N>& a, const LD<N>& b) {
  LD<N> r;
  LANES r.v[l] = a.v[l] * b.v[l];
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = a.g[i][l] * b.v[l] + a.v[l] * b.g[i][l];
  return r;
}
template <int N>
inline LD<N> operator*(double c, const LD<N>& b) {
  LD<N> r;
  LANES r.v[l] = c * b.v[l];
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = c * b.g[i][l];
  return r;
}
template <int N>
inline LD<N> operator/(const LD<N>& a, const LD<N>& b) {
  LD<N> r;
  double inv[W];
  LANES {
    inv[l] = 1.0 / b.v[l];
    r.v[l] = a.v[l] * inv[l];
  }
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = (a.g[i][l] - r.v[l] * b.g[i][l]) * inv[l];
  return r;
}
template <int N>
inline LD<N> llog(const LD<N>& a) {
  LD<N> r;
  double inv[W];
  LANES {
    r.v[l] = log_pos(a.v[l]);
    inv[l] = 1.0 / a.v[l];
  }
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = a.g[i][l] * inv[l];
  return r;
}
template <int N>
inline LD<N> lsqrt(const LD<N>& a) {
  LD<N> r;
  double f[W];
  LANES {
    r.v[l] = std::sqrt(a.v[l]);
    f[l] = 0.5 / r.v[l];
  }
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = a.g[i][l] * f[l];
  return r;
}
// clamp with torch's gradient convention: pass-through inside [lo, hi] (ends included), zero outside
template <int N>
inline LD<N> lclamp(const LD<N>& a, double lo, double hi) {
  LD<N> r;
  double in[W];
  LANES {
    in[l] = (a.v[l] >= lo && a.v[l] <= hi) ? 1.0 : 0.0;
    r.v[l] = std::min(std::max(a.v[l], lo), hi);
  }
  for (int i = 0; i < N; ++i) LANES r.g[i][l] = a.g[i][l] * in[l];
  return r;
}

// Up to W elements [e0, e0 + m): the spline of every element and, for N > 0, its derivatives.
template <typename T, int N>
void spline_block(int64_t e0, int m, int K, const T* xs, const T* ps, int kind, double bound, int inverse,
                  double min_w, double min_h, double min_d, double d_offset, T* y_out, T* ld_out, T* dydx_out,
                  T* dldx_out, T* jy_out, T* jl_out) {
  const int P = kind == 0 ? 3 * K - 1 : 3 * K;
  const double lo = kind == 0 ? -bound : -M_PI;
  const double hi = -lo;
  const double S = hi - lo;
  double xin[W], x[W], tail[W];
  alignas(64) double a[3 * KMAX][W];
  for (int l = 0; l < W; ++l) {
    xin[l] = l < m ? static_cast<double>(xs[e0 + l]) : 0.0;
    for (int i = 0; i < P; ++i) a[i][l] = l < m ? static_cast<double>(ps[(e0 + l) * P + i]) : 0.0;
  }
  LANES {
    // identity tails outside [-bound, bound] (kind 0; NaN passes through too): computed at 0, replaced below
    tail[l] = (kind == 0 && !(xin[l] >= -bound && xin[l] <= bound)) ? 1.0 : 0.0;
    double v = tail[l] != 0.0 ? 0.0 : xin[l];
    if (kind == 1) {  // wrap to [-pi, pi) like torch.remainder(x + pi, 2 pi) - pi
      const double r = v + M_PI;
      double w = r - 2.0 * M_PI * std::floor(r * (0.5 / M_PI));
      w = w >= 2.0 * M_PI ? w - 2.0 * M_PI : w;
      v = w - M_PI;
    }
    x[l] = v;
  }
  // softmax of the width and height logits, knots
  alignas(64) double sw[KMAX][W], sh[KMAX][W], cw[KMAX + 1][W], ch[KMAX + 1][W];
  for (int pass = 0; pass < 2; ++pass) {
    double(*s)[W] = pass == 0 ? sw : sh;
    double(*c)[W] = pass == 0 ? cw : ch;
    const double mn = pass == 0 ? min_w : min_h;
    double mx[W], sum[W], acc[W];
    LANES {
      mx[l] = a[pass * K][l];
      sum[l] = 0.0;
      acc[l] = 0.0;
      c[0][l] = lo;
      c[K][l] = hi;
    }
    for (int i = 1; i < K; ++i) LANES mx[l] = std::max(mx[l], a[pass * K + i][l]);
    for (int i = 0; i < K; ++i) LANES {
        s[i][l] = exp_nonpos(a[pass * K + i][l] - mx[l]);
        sum[l] += s[i][l];
      }
    LANES sum[l] = 1.0 / sum[l];
    for (int i = 0; i < K; ++i) LANES {
        s[i][l] *= sum[l];
        acc[l] += mn + (1.0 - mn * K) * s[i][l];
        if (i + 1 < K) c[i + 1][l] = lo + S * acc[l];
      }
  }
  double(*cin)[W] = inverse ? ch : cw;
  double xc[W], clamped[W];
  int kb[W];
  LANES {
    xc[l] = std::min(std::max(x[l], lo), hi);
    clamped[l] = xc[l] != x[l] ? 1.0 : 0.0;
    kb[l] = 0;  // largest k with cin[k] <= xc, within [0, K - 1] (the knots increase)
  }
  for (int i = 1; i < K; ++i) LANES kb[l] += cin[i][l] <= xc[l] ? 1 : 0;
  double xk[W], wk[W], yk[W], hk[W];
  LANES {
    xk[l] = 0.0;
    wk[l] = 0.0;
    yk[l] = 0.0;
    hk[l] = 0.0;
  }
  for (int i = 0; i < K; ++i) LANES {
      const bool sel = kb[l] == i;
      xk[l] = sel ? cw[i][l] : xk[l];
      wk[l] = sel ? cw[i + 1][l] - cw[i][l] : wk[l];
      yk[l] = sel ? ch[i][l] : yk[l];
      hk[l] = sel ? ch[i + 1][l] - ch[i][l] : hk[l];
    }
  // knot slopes d_k, d_k+1 = min_d + softplus(logit + offset) and their derivatives sigmoid(.); the
  // boundary knots of kind 0 have slope 1 and no logit (index -1)
  double dk[W], dk1[W], gk[W], gk1[W];
  int lk[W], lk1[W];
  for (int side = 0; side < 2; ++side) {
    double* dv = side == 0 ? dk : dk1;
    double* gv = side == 0 ? gk : gk1;
    int* li = side == 0 ? lk : lk1;
    double z[W];
    LANES {
      const int j = kb[l] + side;
      li[l] = kind == 0 ? ((j == 0 || j == K) ? -1 : 2 * K + (j - 1)) : 2 * K + (j == K ? 0 : j);
      z[l] = 0.0;
    }
    for (int q = 2 * K; q < P; ++q) LANES z[l] = q == li[l] ? a[q][l] : z[l];
    LANES {
      const double zz = z[l] + d_offset;
      const double e = exp_nonpos(-std::fabs(zz));  // softplus and sigmoid without overflow
      const double sp = std::max(zz, 0.0) + log_pos(1.0 + e);
      const double sg = (zz >= 0.0 ? 1.0 : e) / (1.0 + e);
      dv[l] = li[l] < 0 ? 1.0 : min_d + sp;
      gv[l] = li[l] < 0 ? 0.0 : sg;
    }
  }
  using D = LD<N>;
  // X is a variable even when clamped: its tangent gives the input knot's (negated); dy/dx is zeroed below
  D X = lval<N>(xc, 0);
  D XK = lval<N>(inverse ? yk : xk, -1);  // the input knot
  D WK = lval<N>(wk, 1), HK = lval<N>(hk, 2), DK = lval<N>(dk, 3), DK1 = lval<N>(dk1, 4);
  D YK = lval<N>(yk, -1), XKF = lval<N>(xk, -1);
  D s = HK / WK;
  D xi, out;
  if (!inverse) {
    xi = lclamp((X - XK) / WK, 0.0, 1.0);
  } else {
    D dy = X - YK;
    D sumd = DK1 + DK - 2.0 * s;
    D qa = HK * (s - DK) + dy * sumd;
    D qb = HK * DK - dy * sumd;
    D qc = lcst<N>(0.0) - s * dy;
    D disc = qb * qb - 4.0 * (qa * qc);
    LANES {
      const bool neg = disc.v[l] < 0.0;
      disc.v[l] = neg ? 0.0 : disc.v[l];
      for (int i = 0; i < N; ++i) disc.g[i][l] = neg ? 0.0 : disc.g[i][l];
    }
    D root = (2.0 * qc) / (lcst<N>(0.0) - qb - lsqrt(disc));
    xi = lclamp(root, 0.0, 1.0);
    out = XKF + xi * WK;
  }
  D one = lcst<N>(1.0);
  D t = xi * (one - xi);
  D den = s + (DK1 + DK - 2.0 * s) * t;
  D omx = one - xi;
  D dnum = (s * s) * (DK1 * xi * xi + 2.0 * (s * t) + DK * omx * omx);
  D ld = llog(dnum) - 2.0 * llog(den);
  D y;
  if (!inverse) {
    y = YK + HK * (s * xi * xi + DK * t) / den;
  } else {
    y = out;
    ld = lcst<N>(0.0) - ld;
  }
  for (int l = 0; l < m; ++l) {
    const bool tl = tail[l] != 0.0;
    y_out[e0 + l] = T(tl ? xin[l] : y.v[l]);
    ld_out[e0 + l] = T(tl ? 0.0 : ld.v[l]);
  }
  if constexpr (N == 0) {
    for (int l = 0; l < m; ++l) {
      dydx_out[e0 + l] = T(0);
      dldx_out[e0 + l] = T(0);
    }
    return;
  } else {
    for (int l = 0; l < m; ++l) {
      const bool tl = tail[l] != 0.0, cl = clamped[l] != 0.0;
      dydx_out[e0 + l] = T(tl ? 1.0 : (cl ? 0.0 : y.g[0][l]));
      dldx_out[e0 + l] = T(tl || cl ? 0.0 : ld.g[0][l]);
    }
    // chain rule to the parameters, for both outputs
    alignas(64) double J[3 * KMAX][W];
    for (int o = 0; o < 2; ++o) {
      const D& fd = o == 0 ? y : ld;
      // the bin-quantity derivatives from the 5 tangents: the input knot (x_k forward, y_k inverse) enters
      // as (x - knot); the output knot (y_k forward, x_k inverse) adds to y and not to log|dy/dx|
      const double out_knot = o == 0 ? 1.0 : 0.0;
      double g_xk[W], g_yk[W];
      LANES {
        g_xk[l] = inverse ? out_knot : -fd.g[0][l];
        g_yk[l] = inverse ? -fd.g[0][l] : out_knot;
      }
      for (int q = 2 * K; q < P; ++q) LANES J[q][l] = 0.0;
      for (int pass = 0; pass < 2; ++pass) {
        double(*sm)[W] = pass == 0 ? sw : sh;
        const double mn = pass == 0 ? min_w : min_h;
        const double* g_pos = pass == 0 ? g_xk : g_yk;
        const double* g_size = fd.g[pass == 0 ? 1 : 2];
        // d f / d frac_i = S (g_pos [i < k] + g_size [i == k]); frac = mn + (1 - mn K) softmax
        double dot[W];
        LANES dot[l] = 0.0;
        for (int i = 0; i < K; ++i) LANES {
            const double gf = S * ((i < kb[l] ? g_pos[l] : 0.0) + (i == kb[l] ? g_size[l] : 0.0)) * (1.0 - mn * K);
            J[pass * K + i][l] = gf;
            dot[l] += sm[i][l] * gf;
          }
        for (int i = 0; i < K; ++i) LANES J[pass * K + i][l] = sm[i][l] * (J[pass * K + i][l] - dot[l]);
      }
      for (int l = 0; l < W; ++l) {
        if (lk[l] >= 0) J[lk[l]][l] += fd.g[3][l] * gk[l];
        if (lk1[l] >= 0) J[lk1[l]][l] += fd.g[4][l] * gk1[l];
      }
      T* jout = o == 0 ? jy_out : jl_out;
      for (int l = 0; l < m; ++l) {
        T* row = jout + (e0 + l) * P;
        if (tail[l] != 0.0)
          for (int i = 0; i < P; ++i) row[i] = T(0);
        else
          for (int i = 0; i < P; ++i) row[i] = T(J[i][l]);
      }
    }
  }
}

template <typename T>
void spline_all(int64_t n, int K, const T* x, const T* params, int kind, double bound, int inverse, double min_w,
                double min_h, double min_d, double d_offset, int n_threads, T* y, T* ld, T* dydx, T* dldx, T* jy,
                T* jl) {
  const int64_t blocks = (n + W - 1) / W;
#pragma omp parallel for schedule(static) num_threads(n_threads > 0 ? n_threads : 1) if (n > 4096)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t e0 = b * W;
    const int m = static_cast<int>(std::min<int64_t>(W, n - e0));
    if (jy != nullptr)
      spline_block<T, NT>(e0, m, K, x, params, kind, bound, inverse, min_w, min_h, min_d, d_offset, y, ld, dydx, dldx,
                          jy, jl);
    else
      spline_block<T, 0>(e0, m, K, x, params, kind, bound, inverse, min_w, min_h, min_d, d_offset, y, ld, dydx, dldx,
                         nullptr, nullptr);
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
