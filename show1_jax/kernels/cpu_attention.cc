// Multi-head softmax attention for XLA:CPU, float32, forward only (show1_jax/kernels/__init__.py builds and binds it).
//
// XLA:CPU runs attention's batched matrix products with a small contraction dimension (the head dim, 8-128) at a
// fraction of the machine's GEMM rate, and materialises the [N, H, Lq, Lk] logits several times for the softmax.
// This kernel does one (sequence, head) pair per task: it packs K^T (scaled) and V once, then for each block of
// query rows computes the logits into a cache-resident buffer, takes the softmax in place and multiplies by V,
// normalising at the end. Tasks run on XLA's intra-op thread pool, the calling thread included.
//
// Layout (show1_jax.layers.attention's): q [N, Lq, H*D], k and v [N, Lk, H*D], out [N, Lq, H*D], channel h*D + d.
// The inner loops use GCC/Clang vector extensions sized to the target's registers (AVX-512, AVX, else 128-bit:
// SSE, NEON).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector and query rows per register block, by the target's vector registers (measured on AVX-512:
// 8 rows x 4 vectors of keys beat 4 x 4, 6 x 4 and 12 x 4 by 20-30%; a vector wider than the target's registers
// is split by the compiler into spilled halves, 20x slower).
#if defined(__AVX512F__)
constexpr int64_t kW = 16;
constexpr int64_t kRows = 8;
#elif defined(__AVX__)
constexpr int64_t kW = 8;
constexpr int64_t kRows = 4;
#else
constexpr int64_t kW = 4;
constexpr int64_t kRows = 4;
#endif
constexpr int64_t kBlockRows = 32;  // query rows per logits block (32 x Lk floats stay in L2)

typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf Splat(float x) { return vf{} + x; }

// exp(x) for x <= 0 (logits minus their row maximum); relative error ~1e-7. Inputs below -87 give exp(-87) ~ 1.6e-38
// instead of a denormal or zero, which no softmax row sum can notice.
inline vf Exp(vf x) {
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2), |x / ln 2| < 2^22
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;               // x - n ln 2 in two parts (Cody-Waite)
  vf p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n, n >= -126
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t n, lq, lk, heads, dim;
  float scale;
};

// s[r, j0 : j0 + NV * kW] = q_r . kt[:, j0 : ...] for the first nr of kRows query rows (rows past nr repeat the last).
template <int NV>
inline void LogitsTile(const float* const* qr, const float* kt, int64_t lkp, int64_t d, int64_t j0, int64_t nr,
                       float* s) {
  vf a[kRows][NV] = {};
  for (int64_t c = 0; c < d; ++c) {
    vf kv[NV];
    for (int u = 0; u < NV; ++u) kv[u] = Load(kt + c * lkp + j0 + u * kW);
    for (int64_t r = 0; r < kRows; ++r) {
      const vf qv = Splat(qr[r][c]);
      for (int u = 0; u < NV; ++u) a[r][u] += qv * kv[u];
    }
  }
  for (int64_t r = 0; r < nr; ++r)
    for (int u = 0; u < NV; ++u) Store(s + r * lkp + j0 + u * kW, a[r][u]);
}

// out[r, c0 : c0 + NV * kW] = (p_r . vp[:, c0 : ...]) * inv[r], clipped to the head dim d.
template <int NV>
inline void OutputTile(const float* const* sr, const float* vp, int64_t lk, int64_t dp, int64_t d, int64_t c0,
                       int64_t nr, const float* inv, float* out, int64_t hd) {
  vf a[kRows][NV] = {};
  for (int64_t j = 0; j < lk; ++j) {
    vf vv[NV];
    for (int u = 0; u < NV; ++u) vv[u] = Load(vp + j * dp + c0 + u * kW);
    for (int64_t r = 0; r < kRows; ++r) {
      const vf w = Splat(sr[r][j]);
      for (int u = 0; u < NV; ++u) a[r][u] += w * vv[u];
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    float buf[NV * kW];
    for (int u = 0; u < NV; ++u) Store(buf + u * kW, a[r][u] * inv[r]);
    std::memcpy(out + r * hd + c0, buf, std::min<int64_t>(NV * kW, d - c0) * sizeof(float));
  }
}

// One (sequence, head) pair. Scratch: kt [D, Lkp], vp [Lk, Dp], s [kBlockRows, Lkp].
void AttendOne(const Problem& p, int64_t seq, int64_t head, float* kt, float* vp, float* s) {
  const int64_t d = p.dim, hd = p.heads * p.dim, lk = p.lk;
  const int64_t lkp = RoundUp(lk, kW), dp = RoundUp(d, kW);
  const float* q = p.q + seq * p.lq * hd + head * d;
  const float* k = p.k + seq * lk * hd + head * d;
  const float* v = p.v + seq * lk * hd + head * d;
  float* out = p.out + seq * p.lq * hd + head * d;

  for (int64_t c = 0; c < d; ++c) {
    float* row = kt + c * lkp;
    for (int64_t j = 0; j < lk; ++j) row[j] = k[j * hd + c] * p.scale;
    std::fill(row + lk, row + lkp, 0.0f);
  }
  for (int64_t j = 0; j < lk; ++j) {
    std::memcpy(vp + j * dp, v + j * hd, d * sizeof(float));
    std::fill(vp + j * dp + d, vp + (j + 1) * dp, 0.0f);
  }

  for (int64_t i0 = 0; i0 < p.lq; i0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, p.lq - i0);
    // Logits s[r, j] = q[i0 + r] . kt[:, j], four rows by four vectors of keys at a time.
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t nr = std::min(kRows, rows - r0);
      const float* qr[kRows];
      for (int64_t r = 0; r < kRows; ++r) qr[r] = q + (i0 + r0 + std::min(r, nr - 1)) * hd;
      float* sr = s + r0 * lkp;
      int64_t j0 = 0;
      for (; j0 + 4 * kW <= lkp; j0 += 4 * kW) LogitsTile<4>(qr, kt, lkp, d, j0, nr, sr);
      for (; j0 < lkp; j0 += kW) LogitsTile<1>(qr, kt, lkp, d, j0, nr, sr);
    }
    // Softmax numerators in place (padded keys get weight 0) and 1 / row sums.
    float inv[kBlockRows];
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * lkp;
      std::fill(row + lk, row + lkp, -std::numeric_limits<float>::infinity());
      vf m = Load(row);
      for (int64_t j = kW; j < lkp; j += kW) {
        const vf x = Load(row + j);
        m = x > m ? x : m;
      }
      float mx = m[0];
      for (int64_t e = 1; e < kW; ++e) mx = std::max(mx, m[e]);
      vf sum = {};
      for (int64_t j = 0; j < lkp; j += kW) {
        const vf e = Exp(Load(row + j) - mx);
        Store(row + j, e);
        sum += e;
      }
      for (int64_t j = lk; j < lkp; ++j) row[j] = 0.0f;  // padded keys: exactly zero weight from here on
      float total = 0.0f;
      for (int64_t e = 0; e < kW; ++e) total += sum[e];  // includes the padded keys' exp(-87) < 1e-37 each
      inv[r] = 1.0f / total;
    }
    // out[i0 + r, :] = (s[r, :] @ vp) / sum, four rows by up to four vectors of the head dim at a time.
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t nr = std::min(kRows, rows - r0);
      const float* sr[kRows];
      for (int64_t r = 0; r < kRows; ++r) sr[r] = s + (r0 + std::min(r, nr - 1)) * lkp;
      float* o = out + (i0 + r0) * hd;
      for (int64_t c0 = 0; c0 < dp; c0 += 4 * kW) {
        switch (std::min<int64_t>(4, (dp - c0) / kW)) {
          case 4: OutputTile<4>(sr, vp, lk, dp, d, c0, nr, inv + r0, o, hd); break;
          case 3: OutputTile<3>(sr, vp, lk, dp, d, c0, nr, inv + r0, o, hd); break;
          case 2: OutputTile<2>(sr, vp, lk, dp, d, c0, nr, inv + r0, o, hd); break;
          default: OutputTile<1>(sr, vp, lk, dp, d, c0, nr, inv + r0, o, hd); break;
        }
      }
    }
  }
}

// Tasks shared between the calling thread and pool workers; kept alive by whichever finishes last.
struct Shared {
  Problem problem;
  int64_t tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Work() {
    const int64_t d = problem.dim;
    const int64_t lkp = RoundUp(problem.lk, kW), dp = RoundUp(d, kW);
    std::vector<float> scratch;
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      if (scratch.empty()) scratch.resize(d * lkp + problem.lk * dp + kBlockRows * lkp);
      AttendOne(problem, t / problem.heads, t % problem.heads, scratch.data(), scratch.data() + d * lkp,
                scratch.data() + d * lkp + problem.lk * dp);
      if (done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::ResultBuffer<ffi::F32> out, int64_t heads, float scale) {
  // [..., L, H*D]: leading dimensions (a batch added by vmap, say) flatten into N.
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank || vd.size() != rank)
    return ffi::Error::InvalidArgument("show1 attention: q, k, v must be [N, L, H*D] of one rank");
  int64_t n = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (kd[i] != qd[i] || vd[i] != qd[i]) return ffi::Error::InvalidArgument("show1 attention: batch mismatch");
    n *= qd[i];
  }
  const int64_t lq = qd[rank - 2], lk = kd[rank - 2], hd = qd[rank - 1];
  if (heads < 1 || hd % heads != 0 || kd[rank - 1] != hd || vd[rank - 1] != hd || vd[rank - 2] != lk)
    return ffi::Error::InvalidArgument("show1 attention: q, k, v widths must equal heads * head_dim, k and v lengths");
  auto shared = std::make_shared<Shared>();
  shared->problem =
      Problem{q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(), n, lq, lk, heads, hd / heads, scale};
  shared->tasks = n * heads;
  if (lk == 0 && lq > 0) return ffi::Error::InvalidArgument("show1 attention: no keys");
  if (shared->tasks == 0 || lq == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == shared->tasks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Show1CpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
