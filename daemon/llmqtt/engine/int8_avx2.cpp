// y = x W^T + b for int8 W (7-bit values, one float scale per output row) on x86 with AVX2 and no VNNI.
//
// Why not fbgemm, which torch's quantized linear runs: a decode step is mostly reading weights, and
// fbgemm's one-row product read 18-24 GB/s of the demo model's weights on a 2-core EPYC where a plain sum
// reads 30-41 GB/s; this loop reads ~27 GB/s (docs/quantization.md has the measurements).
//
// Layout (`kernels.block`): W [N, K] as [N/8][K/4][8][4], zeros padding N and K to whole blocks. One
// 32-byte load holds 4 consecutive k of 8 output rows, so a block of 8 rows is one sequential stream and
// its 8 sums stay in one register (no horizontal sums). x is quantized per row to uint8 (asymmetric, zero
// point z); vpmaddubsw multiplies u8 x s8 pairs into int16, which cannot saturate with 7-bit weights:
// 2 * 255 * 64 = 32,640 < 32,767.
//   y[m, n] = sx[m] * sw[n] * (sum_k q[m, k] * W[n, k] - z[m] * sum_k W[n, k]) + b[n]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t ROWS = 8;    // output rows in a block: 8 int32 sums, one ymm
constexpr int64_t DEPTH = 4;   // consecutive k per row in a 32-byte load
constexpr int64_t TOKENS = 4;  // input rows sharing one read of a block (prefill; decode has 1)

// One input row to uint8: q = round(x / s) + z, with s and z from the row's min and max (0 included).
void quantize_row(const float* x, int64_t K, uint8_t* q, float* scale, int32_t* zero) {
  float lo = 0.f, hi = 0.f;
  for (int64_t k = 0; k < K; ++k) lo = std::min(lo, x[k]), hi = std::max(hi, x[k]);
  const float s = hi > lo ? (hi - lo) / 255.f : 1.f;
  const int32_t z = std::clamp(static_cast<int32_t>(std::nearbyint(-lo / s)), 0, 255);
  *scale = s, *zero = z;
  const __m256 inv = _mm256_set1_ps(1.f / s);
  const __m256i zv = _mm256_set1_epi32(z);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256i v = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv)), zv);
    const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packus_epi16(v16, v16));  // clamps to 0..255
  }
  for (; k < K; ++k)  // the same arithmetic as above, one at a time
    q[k] = static_cast<uint8_t>(std::clamp(static_cast<int32_t>(std::nearbyint(x[k] * (1.f / s))) + z, 0, 255));
}

// sums[(s * T + t) * ROWS + r] = q_t . W_r for T input rows (K bytes apart) and the ROWS weight rows of each
// of S blocks. S = 2 reads two streams from memory side by side: the demo's products read 26.7 instead of
// 21.8 GB/s (one stream), with a prefetch 1 KB ahead (2 threads, 2026-11-29).
template <int T, int S>
inline void dot_blocks(const int8_t* w0, const int8_t* w1, const uint8_t* q, int64_t K, int32_t* sums) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* w[2] = {w0, w1};
  __m256i acc[S][T];
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < T; ++t) acc[s][t] = _mm256_setzero_si256();
  for (int64_t k = 0, at = 0; k < K; k += DEPTH, at += ROWS * DEPTH) {
    if ((k & 7) == 0)  // once per 64-byte line
      for (int s = 0; s < S; ++s) _mm_prefetch(reinterpret_cast<const char*>(w[s] + at) + 1024, _MM_HINT_T0);
    __m256i xv[T];
    for (int t = 0; t < T; ++t) {
      int32_t four;  // q[t, k..k+3], broadcast to the 8 rows
      std::memcpy(&four, q + t * K + k, sizeof four);
      xv[t] = _mm256_set1_epi32(four);
    }
    for (int s = 0; s < S; ++s) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[s] + at));
      for (int t = 0; t < T; ++t)
        acc[s][t] = _mm256_add_epi32(acc[s][t], _mm256_madd_epi16(_mm256_maddubs_epi16(xv[t], wv), ones));
    }
  }
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < T; ++t) _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + (s * T + t) * ROWS), acc[s][t]);
}

template <int S>
void dot_tile(int64_t T, const int8_t* w0, const int8_t* w1, const uint8_t* q, int64_t K, int32_t* sums) {
  switch (T) {
    case 4: return dot_blocks<4, S>(w0, w1, q, K, sums);
    case 3: return dot_blocks<3, S>(w0, w1, q, K, sums);
    case 2: return dot_blocks<2, S>(w0, w1, q, K, sums);
    default: return dot_blocks<1, S>(w0, w1, q, K, sums);
  }
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& w_sum,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.size(2) == ROWS && w.size(3) == DEPTH &&
              w.is_contiguous(), "int8_mm: w must be blocked int8 [N/8, K/4, 8, 4]");
  // N and K as the caller sees them; the blocked copy is padded with zeros up to whole blocks
  const int64_t N = w_scale.numel(), K = x.size(-1), KP = w.size(1) * DEPTH, M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && KP >= K && KP - K < DEPTH, "int8_mm: x must be float32 [..., ", KP, "]");
  TORCH_CHECK(w.size(0) * ROWS >= N && w.size(0) * ROWS - N < ROWS && w_sum.numel() == N &&
              w_sum.scalar_type() == at::kInt, "int8_mm: scales or sums do not fit w");
  const float* b = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto y = at::empty(shape, x.options());
  const auto xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  std::vector<uint8_t> q(M * KP, 0);  // padded columns meet zero weights
  std::vector<float> xs(M);
  std::vector<int32_t> xz(M);
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * K, K, q.data() + m * KP, &xs[m], &xz[m]);
  });
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* ws = w_scale.data_ptr<float>();
  const int32_t* wsum = w_sum.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  // y[m, n0 .. n0+rows) from the integer sums of one block
  const auto scale_out = [&](const int32_t* dots, int64_t m, int64_t n0, int64_t rows) {
    if (rows == ROWS) {  // the 8 outputs at once
      const __m256i corrected = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots)),
          _mm256_mullo_epi32(_mm256_set1_epi32(xz[m]), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum + n0))));
      const __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(xs[m]), _mm256_loadu_ps(ws + n0)),
                                          _mm256_cvtepi32_ps(corrected));
      _mm256_storeu_ps(yp + m * N + n0, b ? _mm256_add_ps(scaled, _mm256_loadu_ps(b + n0)) : scaled);
      return;
    }
    for (int64_t r = 0; r < rows; ++r)
      yp[m * N + n0 + r] = xs[m] * ws[n0 + r] * static_cast<float>(dots[r] - xz[m] * wsum[n0 + r]) + (b ? b[n0 + r] : 0.f);
  };
  at::parallel_for(0, w.size(0), 1, [&](int64_t b0, int64_t b1) {
    alignas(32) int32_t sums[2 * TOKENS * ROWS];
    const int64_t half = (b1 - b0 + 1) / 2;  // this thread's blocks in two halves, read side by side
    for (int64_t i = 0; i < half; ++i) {
      const int64_t first = b0 + i, second = b0 + half + i;
      const bool pair = second < b1;
      for (int64_t m0 = 0; m0 < M; m0 += TOKENS) {
        const int64_t T = std::min(TOKENS, M - m0);
        const uint8_t* qt = q.data() + m0 * KP;
        if (pair) dot_tile<2>(T, wp + first * ROWS * KP, wp + second * ROWS * KP, qt, KP, sums);
        else dot_tile<1>(T, wp + first * ROWS * KP, nullptr, qt, KP, sums);
        for (int64_t s = 0; s < (pair ? 2 : 1); ++s) {
          const int64_t blk = s ? second : first;
          for (int64_t t = 0; t < T; ++t) scale_out(sums + (s * T + t) * ROWS, m0 + t, blk * ROWS, std::min(ROWS, N - blk * ROWS));
        }
      }
    }
  });
  return y;
}

// sum_k W[n, k] for every row of a blocked W: the input's zero point subtracts z times these.
// (The padded rows' sums too: zeros, cut by the caller.)
at::Tensor int8_row_sums(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.size(2) == ROWS && w.size(3) == DEPTH &&
              w.is_contiguous(), "int8_row_sums: w must be blocked int8 [N/8, K/4, 8, 4]");
  const int64_t N = w.size(0) * ROWS, K = w.size(1) * DEPTH;
  auto sums = at::empty({N}, w.options().dtype(at::kInt));
  const std::vector<uint8_t> ones(K, 1);
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* out = sums.data_ptr<int32_t>();
  at::parallel_for(0, N / ROWS, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) dot_blocks<1, 1>(wp + blk * ROWS * K, nullptr, ones.data(), K, out + blk * ROWS);
  });
  return sums;
}

at::Tensor int8_mm_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& w_sum,
                        const std::optional<at::Tensor>& bias) {
  auto shape = x.sizes().vec();
  shape.back() = w_scale.numel();
  return at::empty(shape, x.options());
}

}  // namespace

TORCH_LIBRARY(llmqtt_kernels, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor w_scale, Tensor w_sum, Tensor? bias) -> Tensor");
  m.def("int8_row_sums(Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(llmqtt_kernels, CPU, m) {
  m.impl("int8_mm", int8_mm);
  m.impl("int8_row_sums", int8_row_sums);
}
TORCH_LIBRARY_IMPL(llmqtt_kernels, Meta, m) { m.impl("int8_mm", int8_mm_meta); }
