// Sparse matrix products over a bitmask layout, for decoding pruned models on the CPU.
//
// A weight (N rows, K columns) is held as
//   mask    uint8 (N, stride): bit c of row n (least significant bit first, 16 columns per 2 bytes) is set when
//           column c is kept; stride = 2 * ceil(K / 16), the bits past K are zero;
//   values  float32 or bfloat16 (nnz + 16): the kept weights, row after row, then 16 zeros of padding (a vector
//           load may reach past the last row's values);
//   offsets int64 (N + 1): where each row's values start.
// y (B, N) = x (B, K_pad) . W^T reads only the mask and the kept values: 16 (or 8) columns at a time, the kept values
// are loaded contiguously and spread to their columns (AVX-512: vexpandps; AVX2: a permutation from a table), then
// multiplied with x. Rows are split over OpenMP threads. The scalar path is the reference and the fallback.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <immintrin.h>

namespace {

constexpr int kMaxTokens = 8;  // tokens multiplied per expansion of a row's values (registers of accumulators)

inline float bf16_to_float(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

template <typename V>
inline float value_at(const V* p, int64_t i);
template <>
inline float value_at<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float value_at<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }

// ---------------------------------------------------------------------------------------------------- scalar
template <typename V>
void rows_scalar(const float* x, int64_t tokens, int64_t kpad, const uint8_t* mask, int64_t stride, const V* values,
                 const int64_t* offsets, float* y, int64_t n_rows, int64_t row0, int64_t row1) {
    for (int64_t r = row0; r < row1; ++r) {
        const uint8_t* m = mask + r * stride;
        int64_t v = offsets[r];
        float acc[kMaxTokens];
        for (int64_t t0 = 0; t0 < tokens; t0 += kMaxTokens) {
            const int64_t nt = std::min<int64_t>(kMaxTokens, tokens - t0);
            for (int64_t t = 0; t < nt; ++t) acc[t] = 0.f;
            int64_t vi = v;
            for (int64_t byte = 0; byte < stride; ++byte) {
                uint32_t bits = m[byte];
                while (bits) {
                    const int64_t c = byte * 8 + __builtin_ctz(bits);
                    const float w = value_at(values, vi++);
                    for (int64_t t = 0; t < nt; ++t) acc[t] += w * x[(t0 + t) * kpad + c];
                    bits &= bits - 1;
                }
            }
            for (int64_t t = 0; t < nt; ++t) y[(t0 + t) * n_rows + r] = acc[t];
        }
    }
}

// ---------------------------------------------------------------------------------------------------- AVX2
struct Avx2Tables {
    alignas(32) int32_t perm[256][8];
    alignas(32) int32_t keep[256][8];
    Avx2Tables() {
        for (int m = 0; m < 256; ++m) {
            int next = 0;
            for (int lane = 0; lane < 8; ++lane) {
                const bool on = (m >> lane) & 1;
                perm[m][lane] = on ? next : 0;
                keep[m][lane] = on ? -1 : 0;
                next += on;
            }
        }
    }
};
const Avx2Tables& avx2_tables() {
    static const Avx2Tables tables;
    return tables;
}

__attribute__((target("avx2,fma,popcnt"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,popcnt"))) inline __m256 load8(const uint16_t* p) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

template <typename V, int NT, int U>
__attribute__((target("avx2,fma,popcnt"))) inline void tile_avx2(const float* x, int64_t kpad, const uint8_t* m,
                                                                int64_t bytes, const V* vp, float* out,
                                                                int64_t out_step) {
    const Avx2Tables& tab = avx2_tables();
    __m256 acc[U][NT];
    for (int u = 0; u < U; ++u)
        for (int t = 0; t < NT; ++t) acc[u][t] = _mm256_setzero_ps();
    for (int64_t byte = 0; byte < bytes; byte += U) {  // ``bytes`` is even and U is 1 or 2
        for (int u = 0; u < U; ++u) {
            const uint32_t bits = m[byte + u];
            const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.perm[bits]));
            const __m256 keep =
                _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tab.keep[bits])));
            const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(load8(vp), perm), keep);
            vp += _mm_popcnt_u32(bits);
            const float* xc = x + (byte + u) * 8;
            for (int t = 0; t < NT; ++t) acc[u][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + t * kpad), acc[u][t]);
        }
    }
    for (int t = 0; t < NT; ++t) {
        __m256 sum = acc[0][t];
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][t]);
        out[t * out_step] = hsum256(sum);
    }
}

template <typename V>
__attribute__((target("avx2,fma,popcnt"))) void rows_avx2(const float* x, int64_t tokens, int64_t kpad,
                                                         const uint8_t* mask, int64_t stride, const V* values,
                                                         const int64_t* offsets, float* y, int64_t n_rows,
                                                         int64_t row0, int64_t row1) {
    for (int64_t r = row0; r < row1; ++r) {
        const uint8_t* m = mask + r * stride;
        const V* vp = values + offsets[r];
        int64_t t0 = 0;
        for (; t0 + 4 <= tokens; t0 += 4) tile_avx2<V, 4, 1>(x + t0 * kpad, kpad, m, stride, vp, y + t0 * n_rows + r, n_rows);
        const float* xt = x + t0 * kpad;
        float* yt = y + t0 * n_rows + r;
        switch (tokens - t0) {
            case 0: break;
            case 1: tile_avx2<V, 1, 2>(xt, kpad, m, stride, vp, yt, n_rows); break;
            case 2: tile_avx2<V, 2, 2>(xt, kpad, m, stride, vp, yt, n_rows); break;
            default: tile_avx2<V, 3, 1>(xt, kpad, m, stride, vp, yt, n_rows); break;
        }
    }
}

// ---------------------------------------------------------------------------------------------------- AVX-512
__attribute__((target("avx512f,avx512bw,popcnt"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f,avx512bw,popcnt"))) inline __m512 load16(const uint16_t* p) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// One tile of ``NT`` tokens of one row, with ``U`` accumulators per token taking turns over the chunks, so that
// a single token (decode) is not held up by the latency of one chain of fused multiply-adds.
template <typename V, int NT, int U>
__attribute__((target("avx512f,avx512bw,popcnt"))) inline void tile_avx512(const float* x, int64_t kpad,
                                                                          const uint16_t* m, int64_t chunks,
                                                                          const V* vp, float* out, int64_t out_step) {
    __m512 acc[U][NT];
    for (int u = 0; u < U; ++u)
        for (int t = 0; t < NT; ++t) acc[u][t] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + U <= chunks; c += U) {
        for (int u = 0; u < U; ++u) {
            uint16_t bits;
            std::memcpy(&bits, m + c + u, sizeof(bits));
            const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16(vp));
            vp += _mm_popcnt_u32(bits);
            const float* xc = x + (c + u) * 16;
            for (int t = 0; t < NT; ++t) acc[u][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + t * kpad), acc[u][t]);
        }
    }
    for (; c < chunks; ++c) {
        uint16_t bits;
        std::memcpy(&bits, m + c, sizeof(bits));
        const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16(vp));
        vp += _mm_popcnt_u32(bits);
        const float* xc = x + c * 16;
        for (int t = 0; t < NT; ++t) acc[0][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + t * kpad), acc[0][t]);
    }
    for (int t = 0; t < NT; ++t) {
        __m512 sum = acc[0][t];
        for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][t]);
        out[t * out_step] = _mm512_reduce_add_ps(sum);
    }
}

template <typename V>
__attribute__((target("avx512f,avx512bw,popcnt"))) void rows_avx512(const float* x, int64_t tokens, int64_t kpad,
                                                                   const uint8_t* mask, int64_t stride,
                                                                   const V* values, const int64_t* offsets, float* y,
                                                                   int64_t n_rows, int64_t row0, int64_t row1) {
    const int64_t chunks = stride / 2;
    for (int64_t r = row0; r < row1; ++r) {
        const uint16_t* m = reinterpret_cast<const uint16_t*>(mask + r * stride);
        const V* vp = values + offsets[r];
        int64_t t0 = 0;
        for (; t0 + 8 <= tokens; t0 += 8) tile_avx512<V, 8, 1>(x + t0 * kpad, kpad, m, chunks, vp, y + t0 * n_rows + r, n_rows);
        const int64_t left = tokens - t0;
        const float* xt = x + t0 * kpad;
        float* yt = y + t0 * n_rows + r;
        switch (left) {
            case 0: break;
            case 1: tile_avx512<V, 1, 4>(xt, kpad, m, chunks, vp, yt, n_rows); break;
            case 2: tile_avx512<V, 2, 4>(xt, kpad, m, chunks, vp, yt, n_rows); break;
            case 3: tile_avx512<V, 3, 2>(xt, kpad, m, chunks, vp, yt, n_rows); break;
            case 4: tile_avx512<V, 4, 2>(xt, kpad, m, chunks, vp, yt, n_rows); break;
            case 5: tile_avx512<V, 5, 1>(xt, kpad, m, chunks, vp, yt, n_rows); break;
            case 6: tile_avx512<V, 6, 1>(xt, kpad, m, chunks, vp, yt, n_rows); break;
            default: tile_avx512<V, 7, 1>(xt, kpad, m, chunks, vp, yt, n_rows); break;
        }
    }
}

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

template <typename V>
void run(int64_t isa, const float* x, int64_t tokens, int64_t kpad, const uint8_t* mask, int64_t stride,
         const V* values, const int64_t* offsets, float* y, int64_t n_rows) {
    const int64_t grain = std::max<int64_t>(1, n_rows / (8 * std::max(1, at::get_num_threads())));
    at::parallel_for(0, n_rows, grain, [&](int64_t row0, int64_t row1) {
        if (isa == kAvx512) {
            rows_avx512(x, tokens, kpad, mask, stride, values, offsets, y, n_rows, row0, row1);
        } else if (isa == kAvx2) {
            rows_avx2(x, tokens, kpad, mask, stride, values, offsets, y, n_rows, row0, row1);
        } else {
            rows_scalar(x, tokens, kpad, mask, stride, values, offsets, y, n_rows, row0, row1);
        }
    });
}

// ---------------------------------------------------------------------------------------------------- unpack
// Rows row0..row1 of the dense (N, kpad) float32 weight, written from the mask and the values: for a prefill, where
// one dense product of many tokens beats the kernel, the weight exists only for that product.
template <typename V>
void unpack_scalar(const uint8_t* mask, int64_t stride, const V* values, const int64_t* offsets, float* out,
                   int64_t row0, int64_t row1) {
    const int64_t kpad = stride * 8;
    for (int64_t r = row0; r < row1; ++r) {
        float* dst = out + r * kpad;
        std::memset(dst, 0, sizeof(float) * kpad);
        int64_t vi = offsets[r];
        const uint8_t* m = mask + r * stride;
        for (int64_t byte = 0; byte < stride; ++byte) {
            uint32_t bits = m[byte];
            while (bits) {
                dst[byte * 8 + __builtin_ctz(bits)] = value_at(values, vi++);
                bits &= bits - 1;
            }
        }
    }
}

template <typename V>
__attribute__((target("avx512f,avx512bw,popcnt"))) void unpack_avx512(const uint8_t* mask, int64_t stride,
                                                                     const V* values, const int64_t* offsets,
                                                                     float* out, int64_t row0, int64_t row1) {
    const int64_t chunks = stride / 2, kpad = stride * 8;
    for (int64_t r = row0; r < row1; ++r) {
        const uint16_t* m = reinterpret_cast<const uint16_t*>(mask + r * stride);
        const V* vp = values + offsets[r];
        float* dst = out + r * kpad;
        for (int64_t c = 0; c < chunks; ++c) {
            uint16_t bits;
            std::memcpy(&bits, m + c, sizeof(bits));
            _mm512_storeu_ps(dst + c * 16, _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16(vp)));
            vp += _mm_popcnt_u32(bits);
        }
    }
}

}  // namespace

// The best instruction set this CPU runs: 2 AVX-512 (F, BW), 1 AVX2 with FMA, 0 scalar.
int64_t best_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
    return kScalar;
}

// y (tokens, rows) float32 = x (tokens, kpad) float32 times the bitmask weight, with instruction set ``isa``.
torch::Tensor bitmask_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor offsets,
                             int64_t isa) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous (B, K) fp32");
    TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kUInt8 && mask.is_contiguous(), "mask: (N, stride) u8");
    TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.numel() == mask.size(0) + 1, "offsets: (N + 1) i64");
    TORCH_CHECK(values.is_contiguous() && values.dim() == 1, "values: contiguous 1-D");
    const int64_t stride = mask.size(1), kpad = x.size(1), tokens = x.size(0), n_rows = mask.size(0);
    TORCH_CHECK(stride % 2 == 0 && kpad == stride * 8, "x must be padded to the mask's columns");
    TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "this CPU cannot run the instruction set asked for");
    auto y = torch::empty({tokens, n_rows}, x.options());
    const auto* xp = x.data_ptr<float>();
    const auto* mp = mask.data_ptr<uint8_t>();
    const auto* op = offsets.data_ptr<int64_t>();
    if (values.scalar_type() == torch::kFloat32) {
        run(isa, xp, tokens, kpad, mp, stride, values.data_ptr<float>(), op, y.data_ptr<float>(), n_rows);
    } else {
        TORCH_CHECK(values.scalar_type() == torch::kBFloat16, "values: float32 or bfloat16");
        const auto* vp = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
        run(isa, xp, tokens, kpad, mp, stride, vp, op, y.data_ptr<float>(), n_rows);
    }
    return y;
}

// The dense (N, kpad) float32 weight of a bitmask weight (columns past the weight's width are zeros), written into
// ``out`` (a scratch buffer reused from one product to the next: a fresh one would be page-faulted in every time).
torch::Tensor bitmask_unpack(torch::Tensor mask, torch::Tensor values, torch::Tensor offsets, int64_t isa,
                             torch::Tensor out) {
    TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kUInt8 && mask.is_contiguous(), "mask: (N, stride) u8");
    TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.numel() == mask.size(0) + 1, "offsets: (N + 1) i64");
    TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "this CPU cannot run the instruction set asked for");
    const int64_t n_rows = mask.size(0), stride = mask.size(1);
    TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(0) == n_rows &&
                    out.size(1) == stride * 8,
                "out: contiguous (N, kpad) float32");
    const auto* mp = mask.data_ptr<uint8_t>();
    const auto* op = offsets.data_ptr<int64_t>();
    float* dst = out.data_ptr<float>();
    auto work = [&](auto* vp) {
        at::parallel_for(0, n_rows, 16, [&](int64_t row0, int64_t row1) {
            if (isa == kAvx512) {
                unpack_avx512(mp, stride, vp, op, dst, row0, row1);
            } else {
                unpack_scalar(mp, stride, vp, op, dst, row0, row1);
            }
        });
    };
    if (values.scalar_type() == torch::kFloat32) {
        work(values.data_ptr<float>());
    } else {
        TORCH_CHECK(values.scalar_type() == torch::kBFloat16, "values: float32 or bfloat16");
        work(reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()));
    }
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("best_isa", &best_isa, "the best instruction set this CPU runs (0 scalar, 1 AVX2, 2 AVX-512)");
    m.def("bitmask_matmul", &bitmask_matmul, "y = x . W^T for a bitmask weight");
    m.def("bitmask_unpack", &bitmask_unpack, "the dense (N, kpad) float32 weight of a bitmask weight");
}
