// boltzflow: batched energy + analytic gradient of a compiled CHARMM36m System on the CPU.
//
// The C++ twin of boltzflow/energy/native_kernels.py (same formulas, same clamps for degenerate
// geometry, same validity rule), built on first use by boltzflow/energy/native_cpu.py and called
// through ctypes (which releases the GIL). Terms: harmonic distances (bonds + Urey-Bradley),
// LJ + Coulomb pairs, harmonic angles, periodic torsions as a per-dihedral Fourier series,
// wrapped harmonic impropers, CMAP, and OBC2 generalized Born with the ACE surface term.
//
// Layout: positions x (batch, n_atoms, 3) nm, row-major; energies u (batch,) kT; gradient
// g (batch, n_atoms, 3) kT/nm. Configurations are processed in blocks of L lanes: each block is
// transposed into a component-major scratch pos[3][n_atoms][L], every term runs one loop over the
// lanes (vectorised by the compiler), and gradients accumulate in grd[3][n_atoms][L] in cache.
// Blocks are spread over OpenMP threads.
#pragma GCC optimize("no-trapping-math")
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

extern "C" {
struct BfParams {
    int64_t n_atoms;
    int64_t n_hd;        // harmonic distances: 0.5 k (r - r0)^2
    const int32_t* hd_idx;  // (n_hd, 2)
    const double* hd_k;
    const double* hd_r0;
    int64_t n_pair;      // A/r^12 - B/r^6 + C/r
    const int32_t* pair_idx;  // (n_pair, 2)
    const double* pair_a;
    const double* pair_b;
    const double* pair_c;
    int64_t n_angle;     // 0.5 k (theta - theta0)^2
    const int32_t* angle_idx;  // (n_angle, 3), vertex in the middle
    const double* angle_k;
    const double* angle_t0;
    int64_t n_dq;        // dihedral quadruples (IUPAC sign)
    const int32_t* dq_idx;  // (n_dq, 4)
    int64_t n_fourier;   // sum_n kc[n] cos(n phi) + ks[n] sin(n phi), n = 1..n_fourier
    const double* kc;    // (n_dq, n_fourier)
    const double* ks;
    const int32_t* fourier_len;  // (n_dq,) highest n with a non-zero coefficient (0: none)
    double torsion_const;
    int64_t a0;          // quads a0.. are the ones whose angle impropers / CMAP need
    int64_t n_improper;  // k min(|d|, 2pi - |d|)^2, d = phi - phi0
    const int32_t* improper_map;  // (n_improper,) quad index - a0
    const double* improper_k;
    const double* improper_t0;
    const double* improper_2pi;
    int64_t n_cmap;
    const int32_t* cmap_phi_map;  // (n_cmap,) quad index - a0
    const int32_t* cmap_psi_map;
    const int32_t* cmap_base;     // first patch of the map
    const int32_t* cmap_size;     // grid size of the map
    const double* cmap_delta;     // 2 pi / size
    const double* cmap_coeff;     // (patches, 16) bicubic coefficients c[4 i + j] of da^i db^j
    int64_t gb;          // 1: OBC2 generalized Born (+ ACE surface area) over all atoms; 0: none
    const double* gb_q;  // (n_atoms,) charges, e
    const double* gb_or; // offset radii (radius - offset), nm
    const double* gb_sr; // scaled offset radii, nm
    double gb_offset, gb_pref, gb_eps_in, gb_eps_out, gb_kappa, gb_sa_coef, gb_sa_offset, gb_probe;
};
}

namespace {

#define BF_INLINE inline __attribute__((always_inline))

constexpr double kTiny = 1e-30;  // clamp for squared norms (as native_kernels.TINY)
constexpr double kPi = 3.14159265358979323846;

template <typename T> struct AtanTerms;
template <> struct AtanTerms<double> { static constexpr int n = 12; };
template <> struct AtanTerms<float> { static constexpr int n = 6; };

// atan(a) for a in [0, 1]: two half-angle steps bring the angle below pi/16 (|z| <= 0.199), where
// the Taylor series sum (-1)^k z^(2k+1) / (2k+1) converges to machine precision with AtanTerms
// terms. Branch-free, so the lane loops stay vectorised.
template <typename T>
BF_INLINE T atan01(T a) {
    T z = a / (T(1) + std::sqrt(T(1) + a * a));
    z = z / (T(1) + std::sqrt(T(1) + z * z));
    const T z2 = z * z;
    constexpr int n = AtanTerms<T>::n;
    T p = T((n - 1) % 2 ? -1.0 : 1.0) / T(2 * (n - 1) + 1);
#pragma GCC unroll 16
    for (int k = n - 2; k >= 0; --k) p = p * z2 + T(k % 2 ? -1.0 : 1.0) / T(2 * k + 1);
    return T(4) * z * p;
}

// atan2(y, x) with the quadrant rules of std::atan2 for finite arguments.
template <typename T>
BF_INLINE T atan2_(T y, T x) {
    const T ax = std::fabs(x), ay = std::fabs(y);
    const T mx = ax > ay ? ax : ay;
    const T mn = ax > ay ? ay : ax;
    const T a = mx > T(0) ? mn / mx : T(0);
    T r = atan01(a);
    r = ay > ax ? T(kPi / 2) - r : r;
    r = x < T(0) ? T(kPi) - r : r;
    return y < T(0) ? -r : r;
}

// Vectorisable exp and log (the libm calls are not vectorised without -ffast-math, which would
// also drop the isfinite checks). Range reduction by powers of two through the bit pattern,
// then Taylor series to machine precision.
template <typename T> struct Bits;
template <> struct Bits<double> {
    using U = uint64_t;
    using I = int64_t;
    static constexpr int mant = 52, bias = 1023, exp_terms = 14, log_terms = 11;
    static constexpr double min_arg = -700.0;
};
template <> struct Bits<float> {
    using U = uint32_t;
    using I = int32_t;
    static constexpr int mant = 23, bias = 127, exp_terms = 8, log_terms = 5;
    static constexpr double min_arg = -85.0;
};
constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;

// exp(x) for x <= 0 (0 below Bits::min_arg); |error| ~ 1 ulp.
template <typename T>
BF_INLINE T exp_neg(T x) {
    using B = Bits<T>;
    const bool under = x < T(B::min_arg);
    x = under ? T(0) : x;
    const T k = std::nearbyint(x * T(1.4426950408889634));
    const T r = (x - k * T(kLn2Hi)) - k * T(kLn2Lo);  // |r| <= ln2 / 2
    T p = T(1);
#pragma GCC unroll 16
    for (int n = B::exp_terms; n >= 1; --n) p = T(1) + p * r / T(n);
    const typename B::U bits = static_cast<typename B::U>(static_cast<typename B::I>(k) + B::bias) << B::mant;
    T scale;
    std::memcpy(&scale, &bits, sizeof(T));
    return under ? T(0) : p * scale;
}

// log(x) for normal x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)).
template <typename T>
BF_INLINE T log_pos(T x) {
    using B = Bits<T>;
    typename B::U bits;
    std::memcpy(&bits, &x, sizeof(T));
    typename B::I e = static_cast<typename B::I>(bits >> B::mant) - B::bias;
    const typename B::U mb = (bits & ((typename B::U(1) << B::mant) - 1)) | (static_cast<typename B::U>(B::bias) << B::mant);
    T m;
    std::memcpy(&m, &mb, sizeof(T));
    const bool big = m > T(1.4142135623730951);
    m = big ? m * T(0.5) : m;
    e = big ? e + 1 : e;
    const T z = (m - T(1)) / (m + T(1)), z2 = z * z;
    T p = T(1) / T(2 * B::log_terms - 1);
#pragma GCC unroll 16
    for (int k = B::log_terms - 2; k >= 0; --k) p = p * z2 + T(1) / T(2 * k + 1);
    const T te = T(e);
    return te * T(kLn2Hi) + (T(2) * z * p + te * T(kLn2Lo));
}

// max(v, floor), and whether the floor applied (a gradient through a floored value is zero).
template <typename T>
BF_INLINE T floored(T v, T floor, bool& applied) {
    applied = !(v > floor);
    return applied ? floor : v;
}
template <typename T>
BF_INLINE T floored(T v, T floor) {
    return v > floor ? v : floor;
}

// The four atoms' coordinate rows (component-major scratch) of one dihedral quad.
template <typename T>
struct Quad {
    const T *x0, *y0, *z0, *x1, *y1, *z1, *x2, *y2, *z2, *x3, *y3, *z3;
};

// Bond vectors b1 = p1 - p0, b2 = p2 - p1, b3 = p3 - p2, normals m = b1 x b2, n = b2 x b3 and the
// clamped |b2|^2 of lane l of a quad (shared by the angle and the gradient passes).
template <typename T>
struct Dihedral {
    T b1x, b1y, b1z, b2x, b2y, b2z, b3x, b3y, b3z, mx, my, mz, nx, ny, nz, b2n2;
    BF_INLINE Dihedral(const Quad<T>& q, int l) {
        b1x = q.x1[l] - q.x0[l]; b1y = q.y1[l] - q.y0[l]; b1z = q.z1[l] - q.z0[l];
        b2x = q.x2[l] - q.x1[l]; b2y = q.y2[l] - q.y1[l]; b2z = q.z2[l] - q.z1[l];
        b3x = q.x3[l] - q.x2[l]; b3y = q.y3[l] - q.y2[l]; b3z = q.z3[l] - q.z2[l];
        mx = b1y * b2z - b1z * b2y; my = b1z * b2x - b1x * b2z; mz = b1x * b2y - b1y * b2x;
        nx = b2y * b3z - b2z * b3y; ny = b2z * b3x - b2x * b3z; nz = b2x * b3y - b2y * b3x;
        const T b22 = b2x * b2x + b2y * b2y + b2z * b2z;
        b2n2 = b22 > T(kTiny) ? b22 : T(kTiny);
    }
};

template <typename T, int L, bool NG>
struct Block {
    const BfParams& P;
    const int64_t N;
    T* __restrict pos;  // [3][N][L]
    T* __restrict grd;  // [3][N][L]
    T* __restrict e;    // [L]
    T* __restrict cs;   // [n_dq][L] cos (then, from a0 on, the angle), sin, dE/dphi of every quad
    T* __restrict sn;
    T* __restrict de;
    T* __restrict gbs;  // [4][N][L]: Born integral I, radius B, dE/dB (then dE/dI), dB/dI

    inline const T* p(int c, int a) const { return pos + (c * N + a) * L; }
    inline T* g(int c, int a) const { return grd + (c * N + a) * L; }

    // Coordinate and gradient rows of a pair of atoms i, j (d = p_i - p_j).
    struct Rows {
        const T *xi, *yi, *zi, *xj, *yj, *zj;
        T *gxi, *gyi, *gzi, *gxj, *gyj, *gzj;
        BF_INLINE T dx(int l) const { return xi[l] - xj[l]; }
        BF_INLINE T dy(int l) const { return yi[l] - yj[l]; }
        BF_INLINE T dz(int l) const { return zi[l] - zj[l]; }
        // grad_i += s d, grad_j -= s d
        BF_INLINE void add(int l, T s, T dx, T dy, T dz) const {
            gxi[l] += s * dx; gyi[l] += s * dy; gzi[l] += s * dz;
            gxj[l] -= s * dx; gyj[l] -= s * dy; gzj[l] -= s * dz;
        }
    };
    inline Rows rows(int i, int j) const {
        return {p(0, i), p(1, i), p(2, i), p(0, j), p(1, j), p(2, j), g(0, i), g(1, i), g(2, i), g(0, j), g(1, j), g(2, j)};
    }

    // OBC2 Born integral term of atom o (offset radius o) from a neighbour of scaled radius s at
    // distance r, and its r-derivative; zero where r + s < o (as in OpenMM's CustomGBForce).
    static BF_INLINE T gb_val(T r, T inv_r, T o, T s) {
        const T U = r + s, Lr = std::fabs(r - s) > o ? std::fabs(r - s) : o;
        const T iU = T(1) / U, iL = T(1) / Lr;
        const T v = T(0.5) * (iL - iU + T(0.25) * (r - s * s * inv_r) * (iU * iU - iL * iL) + T(0.5) * log_pos(Lr * iU) * inv_r);
        const T keep = r + s - o >= T(0) ? T(1) : T(0);  // a product, not a select: keeps gcc's loop branch-free
        return v * keep;
    }
    static BF_INLINE T gb_dval(T r, T inv_r, T o, T s) {
        const T ad = std::fabs(r - s);
        const T U = r + s, Lr = ad > o ? ad : o;
        const T Lp = ad > o ? (r > s ? T(1) : T(-1)) : T(0);
        const T iU = T(1) / U, iL = T(1) / Lr;
        const T iU2 = iU * iU, iL2 = iL * iL;
        const T dv = T(0.5) * (-Lp * iL2 + iU2 + T(0.25) * (T(1) + s * s * inv_r * inv_r) * (iU2 - iL2)
                               + T(0.25) * (r - s * s * inv_r) * (T(-2) * iU2 * iU + T(2) * Lp * iL2 * iL)
                               + T(0.5) * ((Lp * iL - iU) * inv_r - log_pos(Lr * iU) * inv_r * inv_r));
        const T keep = r + s - o >= T(0) ? T(1) : T(0);
        return dv * keep;
    }

    void gb() {
        if (!P.gb) return;
        constexpr T tiny = T(1e-12);  // clamp of r^2 (as native._GB_TINY)
        T* I = gbs;
        T* Bv = gbs + N * L;
        T* D = gbs + 2 * N * L;
        T* dBdI = gbs + 3 * N * L;
        std::memset(I, 0, sizeof(T) * N * L);
        const T ein = T(1.0 / P.gb_eps_in), eout = T(1.0 / P.gb_eps_out), kap = T(P.gb_kappa), pref = T(P.gb_pref);
        for (int i = 0; i < N; ++i) {  // pass 1: Born integrals
            const T oi = T(P.gb_or[i]), si = T(P.gb_sr[i]);
            for (int j = i + 1; j < N; ++j) {
                const T oj = T(P.gb_or[j]), sj = T(P.gb_sr[j]);
                const Rows R = rows(i, j);
                T *Ii = I + i * L, *Ij = I + j * L;
#pragma omp simd
                for (int l = 0; l < L; ++l) {
                    const T dx = R.dx(l), dy = R.dy(l), dz = R.dz(l);
                    T r2 = dx * dx + dy * dy + dz * dz;
                    r2 = r2 > tiny ? r2 : tiny;
                    const T r = std::sqrt(r2), inv_r = T(1) / r;
                    Ii[l] += gb_val(r, inv_r, oi, sj);
                    Ij[l] += gb_val(r, inv_r, oj, si);
                }
            }
        }
        for (int i = 0; i < N; ++i) {  // Born radii, self and surface-area energies, their dE/dB
            const T o = T(P.gb_or[i]), q = T(P.gb_q[i]), radius = T(P.gb_or[i] + P.gb_offset);
            const T rad = T(P.gb_or[i] + P.gb_sa_offset);
            const T sa = T(P.gb_sa_coef) * (rad + T(P.gb_probe)) * (rad + T(P.gb_probe));
            const T *Ii = I + i * L;
            T *Bi = Bv + i * L, *Di = D + i * L, *dBi = dBdI + i * L;
#pragma omp simd
            for (int l = 0; l < L; ++l) {
                const T psi = Ii[l] * o;
                const T phi = psi - T(0.8) * psi * psi + T(4.85) * psi * psi * psi;
                const T em = exp_neg(T(-2) * std::fabs(phi));
                const T th = (phi < T(0) ? T(-1) : T(1)) * (T(1) - em) / (T(1) + em);
                const T B = T(1) / (T(1) / o - th / radius);
                Bi[l] = B;
                dBi[l] = B * B * (T(1) - th * th) * (T(1) - T(1.6) * psi + T(14.55) * psi * psi) * o / radius;
                const T es = exp_neg(-kap * B) * eout;
                const T scr = ein - es;
                const T iB = T(1) / B;
                e[l] += T(-0.5) * pref * scr * q * q * iB;
                T dEdB = T(-0.5) * pref * q * q * (kap * es * iB - scr * iB * iB);
                if (sa != T(0)) {
                    const T rb = rad * iB, rb2 = rb * rb, rb6 = rb2 * rb2 * rb2;
                    e[l] += sa * rb6;
                    dEdB += T(-6) * sa * rb6 * iB;
                }
                Di[l] = dEdB;
            }
        }
        for (int i = 0; i < N; ++i) {  // pass 2: pair screening energies, explicit forces, dE/dB
            for (int j = i + 1; j < N; ++j) {
                const T qq = T(P.gb_q[i] * P.gb_q[j]);
                if (qq == T(0)) continue;
                const Rows R = rows(i, j);
                const T *Bi = Bv + i * L, *Bj = Bv + j * L;
                T *Di = D + i * L, *Dj = D + j * L;
#pragma omp simd
                for (int l = 0; l < L; ++l) {
                    const T dx = R.dx(l), dy = R.dy(l), dz = R.dz(l);
                    bool clamped;
                    const T r2 = floored(dx * dx + dy * dy + dz * dz, tiny, clamped);
                    const T BB = Bi[l] * Bj[l];
                    const T ex = exp_neg(-r2 / (T(4) * BB));
                    const T f = std::sqrt(r2 + BB * ex), inv_f = T(1) / f;
                    const T ef = exp_neg(-kap * f) * eout;
                    const T scr = ein - ef;
                    e[l] += -pref * qq * scr * inv_f;
                    if (NG) {
                        const T c = -pref * qq * (kap * ef * inv_f - scr * inv_f * inv_f) * T(0.5) * inv_f;
                        const T dEdBB = c * ex * (T(1) + r2 / (T(4) * BB));
                        Di[l] += dEdBB * Bj[l];
                        Dj[l] += dEdBB * Bi[l];
                        const T s = clamped ? T(0) : T(2) * c * (T(1) - T(0.25) * ex);
                        R.add(l, s, dx, dy, dz);
                    }
                }
            }
        }
        if (!NG) return;
        for (int i = 0; i < N; ++i) {  // dE/dI = dE/dB dB/dI (kept in D)
            T *Di = D + i * L;
            const T* dBi = dBdI + i * L;
#pragma omp simd
            for (int l = 0; l < L; ++l) Di[l] *= dBi[l];
        }
        for (int i = 0; i < N; ++i) {  // pass 3: forces through the Born integrals
            const T oi = T(P.gb_or[i]), si = T(P.gb_sr[i]);
            for (int j = i + 1; j < N; ++j) {
                const T oj = T(P.gb_or[j]), sj = T(P.gb_sr[j]);
                const Rows R = rows(i, j);
                const T *Gi = D + i * L, *Gj = D + j * L;
#pragma omp simd
                for (int l = 0; l < L; ++l) {
                    const T dx = R.dx(l), dy = R.dy(l), dz = R.dz(l);
                    bool clamped;
                    const T r2 = floored(dx * dx + dy * dy + dz * dz, tiny, clamped);
                    const T r = std::sqrt(r2), inv_r = T(1) / r;
                    const T dv = Gi[l] * gb_dval(r, inv_r, oi, sj) + Gj[l] * gb_dval(r, inv_r, oj, si);
                    const T s = clamped ? T(0) : dv * inv_r;
                    R.add(l, s, dx, dy, dz);
                }
            }
        }
    }

    void harmonic_distance() {
        for (int64_t t = 0; t < P.n_hd; ++t) {
            const int i = P.hd_idx[2 * t], j = P.hd_idx[2 * t + 1];
            const T k = T(P.hd_k[t]), r0 = T(P.hd_r0[t]);
            const Rows R = rows(i, j);
#pragma omp simd
            for (int l = 0; l < L; ++l) {
                const T dx = R.dx(l), dy = R.dy(l), dz = R.dz(l);
                const T r2 = floored(dx * dx + dy * dy + dz * dz, T(kTiny));
                const T r = std::sqrt(r2);
                const T dr = r - r0, kdr = k * dr;
                e[l] += T(0.5) * kdr * dr;
                if (NG) {
                    const T s = kdr / r;
                    R.add(l, s, dx, dy, dz);
                }
            }
        }
    }

    void pairs() {
        for (int64_t t = 0; t < P.n_pair; ++t) {
            const int i = P.pair_idx[2 * t], j = P.pair_idx[2 * t + 1];
            const T A = T(P.pair_a[t]), B = T(P.pair_b[t]), C = T(P.pair_c[t]);
            const Rows R = rows(i, j);
#pragma omp simd
            for (int l = 0; l < L; ++l) {
                const T dx = R.dx(l), dy = R.dy(l), dz = R.dz(l);
                const T r2 = floored(dx * dx + dy * dy + dz * dz, T(kTiny));
                const T inv_r2 = T(1) / r2;
                const T inv_r = std::sqrt(inv_r2);
                const T inv_r6 = inv_r2 * inv_r2 * inv_r2;
                const T a6 = A * inv_r6;
                const T ec = C * inv_r;
                e[l] += (a6 - B) * inv_r6 + ec;
                if (NG) {
                    const T s = T(2) * (-(T(6) * a6 - T(3) * B) * inv_r6 - T(0.5) * ec) * inv_r2;
                    R.add(l, s, dx, dy, dz);
                }
            }
        }
    }

    void angles() {
        for (int64_t t = 0; t < P.n_angle; ++t) {
            const int i = P.angle_idx[3 * t], j = P.angle_idx[3 * t + 1], k = P.angle_idx[3 * t + 2];
            const T kk = T(P.angle_k[t]), t0 = T(P.angle_t0[t]);
            const T *xi = p(0, i), *yi = p(1, i), *zi = p(2, i), *xj = p(0, j), *yj = p(1, j), *zj = p(2, j);
            const T *xk = p(0, k), *yk = p(1, k), *zk = p(2, k);
            T *gxi = g(0, i), *gyi = g(1, i), *gzi = g(2, i), *gxj = g(0, j), *gyj = g(1, j), *gzj = g(2, j);
            T *gxk = g(0, k), *gyk = g(1, k), *gzk = g(2, k);
#pragma omp simd
            for (int l = 0; l < L; ++l) {
                const T ux = xi[l] - xj[l], uy = yi[l] - yj[l], uz = zi[l] - zj[l];
                const T vx = xk[l] - xj[l], vy = yk[l] - yj[l], vz = zk[l] - zj[l];
                const T wx = uy * vz - uz * vy, wy = uz * vx - ux * vz, wz = ux * vy - uy * vx;
                T w2 = wx * wx + wy * wy + wz * wz;
                w2 = w2 > T(kTiny) ? w2 : T(kTiny);
                const T wn = std::sqrt(w2);
                const T theta = atan2_(wn, ux * vx + uy * vy + uz * vz);
                const T dth = theta - t0, dE = kk * dth;
                e[l] += T(0.5) * dE * dth;
                if (NG) {
                    T u2 = ux * ux + uy * uy + uz * uz, v2 = vx * vx + vy * vy + vz * vz;
                    u2 = u2 > T(kTiny) ? u2 : T(kTiny);
                    v2 = v2 > T(kTiny) ? v2 : T(kTiny);
                    const T s = dE / wn, su = s / u2, sv = s / v2;
                    // d theta/du = (u x w) / (|u|^2 |w|), d theta/dv = (w x v) / (|v|^2 |w|)
                    const T gux = (uy * wz - uz * wy) * su, guy = (uz * wx - ux * wz) * su, guz = (ux * wy - uy * wx) * su;
                    const T gvx = (wy * vz - wz * vy) * sv, gvy = (wz * vx - wx * vz) * sv, gvz = (wx * vy - wy * vx) * sv;
                    gxi[l] += gux; gyi[l] += guy; gzi[l] += guz;
                    gxk[l] += gvx; gyk[l] += gvy; gzk[l] += gvz;
                    gxj[l] -= gux + gvx; gyj[l] -= guy + gvy; gzj[l] -= guz + gvz;
                }
            }
        }
    }

    // Pass 1 over quads: cos and sin of the dihedral (cs, sn slots t).
    void dihedral_angle(int64_t t) {
        const int32_t* q = P.dq_idx + 4 * t;
        const int i0 = q[0], i1 = q[1], i2 = q[2], i3 = q[3];
        const Quad<T> Q{p(0, i0), p(1, i0), p(2, i0), p(0, i1), p(1, i1), p(2, i1),
                        p(0, i2), p(1, i2), p(2, i2), p(0, i3), p(1, i3), p(2, i3)};
        T* cs_s = cs + t * L;
        T* sn_s = sn + t * L;
#pragma omp simd
        for (int l = 0; l < L; ++l) {
            const Dihedral<T> D(Q, l);
            const T yy = std::sqrt(D.b2n2) * (D.b1x * D.nx + D.b1y * D.ny + D.b1z * D.nz);
            const T xx = D.mx * D.nx + D.my * D.ny + D.mz * D.nz;
            const bool bad = (std::fabs(xx) + std::fabs(yy)) < T(1e-18);
            T h2 = xx * xx + yy * yy;
            h2 = h2 > T(kTiny) ? h2 : T(kTiny);
            const T inv = T(1) / std::sqrt(h2);
            cs_s[l] = bad ? T(1) : xx * inv;
            sn_s[l] = bad ? T(0) : yy * inv;
        }
    }

    // Pass 2: the quad's periodic torsions as a Fourier series in (cos, sin) -> energy, de = dE/dphi.
    void fourier(int64_t t) {
        const int nf = P.fourier_len[t];
        const T *c = cs + t * L, *s = sn + t * L;
        T* d = de + t * L;
        if (nf == 0) {
            for (int l = 0; l < L; ++l) d[l] = T(0);
            return;
        }
        const double* kc = P.kc + t * P.n_fourier;
        const double* ks = P.ks + t * P.n_fourier;
        T cn[L], snn[L];
        {
            const T a = T(kc[0]), b = T(ks[0]);
#pragma omp simd
            for (int l = 0; l < L; ++l) {
                cn[l] = c[l];
                snn[l] = s[l];
                e[l] += a * c[l] + b * s[l];
                d[l] = b * c[l] - a * s[l];
            }
        }
        for (int f = 1; f < nf; ++f) {
            const T a = T(kc[f]), b = T(ks[f]), w = T(f + 1);
#pragma omp simd
            for (int l = 0; l < L; ++l) {
                const T c2 = cn[l] * c[l] - snn[l] * s[l];
                const T s2 = snn[l] * c[l] + cn[l] * s[l];
                cn[l] = c2;
                snn[l] = s2;
                e[l] += a * c2 + b * s2;
                d[l] += w * (b * c2 - a * s2);
            }
        }
    }

    // Pass 4: gradient of quad t's dihedral scaled by de (dphi/dp: Blondel-Karplus).
    void dihedral_gradient(int64_t t) {
        const int32_t* q = P.dq_idx + 4 * t;
        const int i0 = q[0], i1 = q[1], i2 = q[2], i3 = q[3];
        const Quad<T> Q{p(0, i0), p(1, i0), p(2, i0), p(0, i1), p(1, i1), p(2, i1),
                        p(0, i2), p(1, i2), p(2, i2), p(0, i3), p(1, i3), p(2, i3)};
        T *g0x = g(0, i0), *g0y = g(1, i0), *g0z = g(2, i0), *g1x = g(0, i1), *g1y = g(1, i1), *g1z = g(2, i1);
        T *g2x = g(0, i2), *g2y = g(1, i2), *g2z = g(2, i2), *g3x = g(0, i3), *g3y = g(1, i3), *g3z = g(2, i3);
        const T* d = de + t * L;
#pragma omp simd
        for (int l = 0; l < L; ++l) {
            const Dihedral<T> D(Q, l);
            const T b2n = std::sqrt(D.b2n2);
            T m2 = D.mx * D.mx + D.my * D.my + D.mz * D.mz, n2 = D.nx * D.nx + D.ny * D.ny + D.nz * D.nz;
            m2 = m2 > T(kTiny) ? m2 : T(kTiny);
            n2 = n2 > T(kTiny) ? n2 : T(kTiny);
            const T s0 = -d[l] * b2n / m2, s3 = d[l] * b2n / n2;
            const T a0x = D.mx * s0, a0y = D.my * s0, a0z = D.mz * s0;
            const T a3x = D.nx * s3, a3y = D.ny * s3, a3z = D.nz * s3;
            const T f1 = (D.b1x * D.b2x + D.b1y * D.b2y + D.b1z * D.b2z) / D.b2n2;
            const T f3 = (D.b3x * D.b2x + D.b3y * D.b2y + D.b3z * D.b2z) / D.b2n2;
            g0x[l] += a0x; g0y[l] += a0y; g0z[l] += a0z;
            g3x[l] += a3x; g3y[l] += a3y; g3z[l] += a3z;
            g1x[l] += f3 * a3x - (T(1) + f1) * a0x;
            g1y[l] += f3 * a3y - (T(1) + f1) * a0y;
            g1z[l] += f3 * a3z - (T(1) + f1) * a0z;
            g2x[l] += f1 * a0x - (T(1) + f3) * a3x;
            g2y[l] += f1 * a0y - (T(1) + f3) * a3y;
            g2z[l] += f1 * a0z - (T(1) + f3) * a3z;
        }
    }

    void dihedrals() {
        for (int64_t t = 0; t < P.n_dq; ++t) dihedral_angle(t);
        for (int64_t t = 0; t < P.n_dq; ++t) fourier(t);
        for (int64_t t = P.a0; t < P.n_dq; ++t) {  // the angle itself where impropers / CMAP need it (in cs)
            T* c = cs + t * L;
            const T* si = sn + t * L;
#pragma omp simd
            for (int l = 0; l < L; ++l) c[l] = atan2_(si[l], c[l]);
        }
        const T* phi = cs + P.a0 * L;  // improper / CMAP maps count from a0
        for (int64_t m = 0; m < P.n_improper; ++m) {
            const int64_t s = P.improper_map[m];
            const T k = T(P.improper_k[m]), t0 = T(P.improper_t0[m]), two_pi = T(P.improper_2pi[m]);
            const T* ph = phi + s * L;
            T* d = de + (P.a0 + s) * L;
#pragma omp simd
            for (int l = 0; l < L; ++l) {
                const T diff = ph[l] - t0;
                const T ad = std::fabs(diff), alt = two_pi - ad;
                const bool use = ad <= alt;
                const T dm = use ? ad : alt;
                const T sg = diff > T(0) ? T(1) : (diff < T(0) ? T(-1) : T(0));
                e[l] += k * dm * dm;
                d[l] += T(2) * k * dm * (use ? sg : -sg);
            }
        }
        for (int64_t c = 0; c < P.n_cmap; ++c) {
            const int64_t sp = P.cmap_phi_map[c], ss = P.cmap_psi_map[c];
            const int32_t base = P.cmap_base[c], size = P.cmap_size[c];
            const T delta = T(P.cmap_delta[c]);
            const T two_pi = T(2 * kPi);
            const T *ph = phi + sp * L, *ps = phi + ss * L;
            T *dp = de + (P.a0 + sp) * L, *dq = de + (P.a0 + ss) * L;
            for (int l = 0; l < L; ++l) {
                T va = ph[l] + two_pi, vb = ps[l] + two_pi;
                va = va - std::floor(va / two_pi) * two_pi;
                vb = vb - std::floor(vb / two_pi) * two_pi;
                const T a = va / delta, b = vb / delta;
                int64_t s = static_cast<int64_t>(std::floor(a)), u = static_cast<int64_t>(std::floor(b));
                s = s < size - 1 ? s : size - 1;
                u = u < size - 1 ? u : size - 1;
                s = s > 0 ? s : 0;
                u = u > 0 ? u : 0;
                const T da = a - T(s), db = b - T(u);
                const double* cf = P.cmap_coeff + 16 * (base + s + size * u);
                T row[4], drow[4];
                for (int i = 0; i < 4; ++i) {
                    const T c0 = T(cf[4 * i]), c1 = T(cf[4 * i + 1]), c2 = T(cf[4 * i + 2]), c3 = T(cf[4 * i + 3]);
                    row[i] = ((c3 * db + c2) * db + c1) * db + c0;
                    drow[i] = (T(3) * c3 * db + T(2) * c2) * db + c1;
                }
                e[l] += ((row[3] * da + row[2]) * da + row[1]) * da + row[0];
                dp[l] += ((T(3) * row[3] * da + T(2) * row[2]) * da + row[1]) / delta;
                dq[l] += (((drow[3] * da + drow[2]) * da + drow[1]) * da + drow[0]) / delta;
            }
        }
        if (NG)
            for (int64_t t = 0; t < P.n_dq; ++t) dihedral_gradient(t);
    }
};

template <typename T, int L, bool NG>
void run(const BfParams* P, const T* x, int64_t batch, T* u, T* gout, double beta, int n_threads) {
    const int64_t N = P->n_atoms;
    const int64_t n_blocks = (batch + L - 1) / L;
    const int64_t na = P->n_dq;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<T> scratch(static_cast<size_t>((6 * N + 1 + 3 * na + (P->gb ? 4 * N : 0)) * L));
        T* pos = scratch.data();
        T* grd = pos + 3 * N * L;
        T* e = grd + 3 * N * L;
        T* cs = e + L;
        Block<T, L, NG> blk{*P, N, pos, grd, e, cs, cs + na * L, cs + 2 * na * L, cs + 3 * na * L};
        bool finite[L];
#pragma omp for schedule(static)
        for (int64_t ib = 0; ib < n_blocks; ++ib) {
            const int64_t b0 = ib * L;
            const int64_t nb = batch - b0 < L ? batch - b0 : L;
            for (int l = 0; l < L; ++l) finite[l] = true;
            for (int l = 0; l < L; ++l) {  // pad a short last block with copies of its last configuration
                const T* xb = x + (b0 + (l < nb ? l : nb - 1)) * N * 3;
                for (int64_t a = 0; a < N; ++a)
                    for (int c = 0; c < 3; ++c) {
                        const T v = xb[3 * a + c];
                        pos[(c * N + a) * L + l] = v;
                        finite[l] = finite[l] && std::isfinite(v);
                    }
            }
            if (NG) std::memset(grd, 0, sizeof(T) * 3 * N * L);
            for (int l = 0; l < L; ++l) e[l] = T(P->torsion_const);
            blk.harmonic_distance();
            blk.pairs();
            blk.angles();
            blk.dihedrals();
            blk.gb();
            for (int l = 0; l < nb; ++l) {
                const T ul = e[l] * T(beta);
                const bool ok = finite[l] && std::isfinite(ul);
                u[b0 + l] = ok ? ul : T(INFINITY);
                if (NG) {
                    T* gb = gout + (b0 + l) * N * 3;
                    for (int64_t a = 0; a < N; ++a)
                        for (int c = 0; c < 3; ++c) gb[3 * a + c] = ok ? grd[(c * N + a) * L + l] * T(beta) : T(0);
                }
            }
        }
    }
}

}  // namespace

extern "C" {
// x: (batch, n_atoms, 3) nm; u: (batch,) kT (+inf where the input or the energy is not finite);
// g: (batch, n_atoms, 3) kT/nm or NULL (zero rows where invalid). Returns 0.
int bf_energy_f64(const BfParams* P, const double* x, int64_t batch, double* u, double* g, double beta, int n_threads) {
    if (g) run<double, 16, true>(P, x, batch, u, g, beta, n_threads);
    else run<double, 16, false>(P, x, batch, u, g, beta, n_threads);
    return 0;
}
int bf_energy_f32(const BfParams* P, const float* x, int64_t batch, float* u, float* g, double beta, int n_threads) {
    if (g) run<float, 32, true>(P, x, batch, u, g, beta, n_threads);
    else run<float, 32, false>(P, x, batch, u, g, beta, n_threads);
    return 0;
}
int bf_abi_version() { return 2; }
}
