// Sparse matrix products over a bitmask layout, for decoding pruned models on the CPU.
//
// A weight (N rows, K columns) is held in groups of 8 rows (the last group padded with empty rows), cut into chunks
// of 16 columns (K_pad = 16 * chunks, the columns past K empty):
//   mask    uint8 (groups, 16 * chunks): for group g, chunk c and row i of the group, the 16-bit word at word
//           c * 8 + i has bit j set when column 16 c + j of row 8 g + i is kept;
//   values  float32 or bfloat16 (nnz + 16): the kept weights group after group, within a group chunk after chunk,
//           within a chunk row after row, in column order; then 16 zeros (a vector load may reach past the end);
//   offsets int64 (groups + 1): where each group's values start.
// The 8 rows of a group are interleaved chunk by chunk so that one product streams through the mask and the values
// once, in order, and one load of x serves 8 rows. y (B, N) = x (B, K_pad) . W^T reads only the mask and the kept
// values: 16 (or 8) columns at a time the kept values are loaded contiguously and spread to their columns
// (AVX-512: vexpandps; AVX2: a permutation from a table), then multiplied with x. Groups are split over torch's
// threads. The scalar path is the reference and the fallback.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

namespace {

constexpr int kGroup = 8;       // rows per group
constexpr int kMaxTokens = 8;   // tokens multiplied per pass over a group's values

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

// Kept values of the rows [from, to) of a group in one chunk (``words``: the chunk's 8 mask words).
inline int64_t kept(const uint16_t* words, int from, int to) {
    int64_t n = 0;
    for (int i = from; i < to; ++i) n += __builtin_popcount(words[i]);
    return n;
}

// One product's operands, shared by every path.
template <typename V>
struct Operands {
    const float* x;       // (tokens, kpad)
    int64_t tokens, kpad, chunks;
    const uint16_t* mask;  // (groups, chunks, 8) words
    const V* values;
    const int64_t* offsets;
    float* y;              // (tokens, n_rows)
    int64_t n_rows;
};

// ---------------------------------------------------------------------------------------------------- scalar
template <typename V>
void group_scalar(const Operands<V>& o, int64_t g) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    for (int i = 0; i < kGroup && g * kGroup + i < o.n_rows; ++i) {
        for (int64_t t0 = 0; t0 < o.tokens; t0 += kMaxTokens) {
            const int64_t nt = std::min<int64_t>(kMaxTokens, o.tokens - t0);
            float acc[kMaxTokens] = {0.f};
            const V* chunk = o.values + o.offsets[g];
            for (int64_t c = 0; c < o.chunks; ++c) {
                const uint16_t* words = mg + c * kGroup;
                const V* p = chunk + kept(words, 0, i);
                for (uint32_t bits = words[i]; bits; bits &= bits - 1) {
                    const int64_t col = c * 16 + __builtin_ctz(bits);
                    const float w = value_at(p++, 0);
                    for (int64_t t = 0; t < nt; ++t) acc[t] += w * o.x[(t0 + t) * o.kpad + col];
                }
                chunk += kept(words, 0, kGroup);
            }
            for (int64_t t = 0; t < nt; ++t) o.y[(t0 + t) * o.n_rows + g * kGroup + i] = acc[t];
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

// The 8 kept-or-zero weights of ``bits`` (8 columns) from the values at ``p``, which it advances.
template <typename V>
__attribute__((target("avx2,fma,popcnt"))) inline __m256 spread8(const Avx2Tables& tab, uint32_t bits, const V*& p) {
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.perm[bits]));
    const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tab.keep[bits])));
    const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(load8(p), perm), keep);
    p += _mm_popcnt_u32(bits);
    return w;
}

// Rows [i0, i0 + RS) of group ``g`` times tokens [t0, t0 + NT).
template <typename V, int NT, int RS>
__attribute__((target("avx2,fma,popcnt"))) void tile_avx2(const Operands<V>& o, int64_t g, int i0, int64_t t0) {
    const Avx2Tables& tab = avx2_tables();
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const float* x = o.x + t0 * o.kpad;
    __m256 acc[RS][NT];
    for (int i = 0; i < RS; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
    const V* chunk = o.values + o.offsets[g];
    for (int64_t c = 0; c < o.chunks; ++c) {
        const uint16_t* words = mg + c * kGroup;
        const V* p = RS == kGroup ? chunk : chunk + kept(words, 0, i0);
        const float* xc = x + c * 16;
        for (int i = 0; i < RS; ++i) {
            const uint32_t bits = words[i0 + i];
            const __m256 lo = spread8(tab, bits & 0xff, p);
            const __m256 hi = spread8(tab, bits >> 8, p);
            for (int t = 0; t < NT; ++t) {
                acc[i][t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xc + t * o.kpad), acc[i][t]);
                acc[i][t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xc + t * o.kpad + 8), acc[i][t]);
            }
        }
        chunk = RS == kGroup ? p : p + kept(words, i0 + RS, kGroup);
    }
    for (int i = 0; i < RS; ++i) {
        const int64_t row = g * kGroup + i0 + i;
        if (row < o.n_rows)
            for (int t = 0; t < NT; ++t) o.y[(t0 + t) * o.n_rows + row] = hsum256(acc[i][t]);
    }
}

// ---------------------------------------------------------------------------------------------------- AVX-512
__attribute__((target("avx512f,avx512bw,popcnt"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f,avx512bw,popcnt"))) inline __m512 load16(const uint16_t* p) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Rows [i0, i0 + RS) of group ``g`` times tokens [t0, t0 + NT): each chunk of x is loaded once for RS rows.
template <typename V, int NT, int RS>
__attribute__((target("avx512f,avx512bw,popcnt"))) void tile_avx512(const Operands<V>& o, int64_t g, int i0,
                                                                    int64_t t0) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const float* x = o.x + t0 * o.kpad;
    __m512 acc[RS][NT];
    for (int i = 0; i < RS; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
    const V* chunk = o.values + o.offsets[g];
    for (int64_t c = 0; c < o.chunks; ++c) {
        const uint16_t* words = mg + c * kGroup;
        const V* p = RS == kGroup ? chunk : chunk + kept(words, 0, i0);
        __m512 xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * o.kpad + c * 16);
        for (int i = 0; i < RS; ++i) {
            const uint32_t bits = words[i0 + i];
            const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16(p));
            p += _mm_popcnt_u32(bits);
            for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_fmadd_ps(w, xv[t], acc[i][t]);
        }
        chunk = RS == kGroup ? p : p + kept(words, i0 + RS, kGroup);
    }
    for (int i = 0; i < RS; ++i) {
        const int64_t row = g * kGroup + i0 + i;
        if (row < o.n_rows)
            for (int t = 0; t < NT; ++t) o.y[(t0 + t) * o.n_rows + row] = _mm512_reduce_add_ps(acc[i][t]);
    }
}

// Every row of group ``g`` times ``nt`` tokens from t0, RS rows at a time (RS * NT accumulators fit the registers).
template <typename V, int NT, int RS, bool Wide>
void rows_of(const Operands<V>& o, int64_t g, int64_t t0) {
    for (int i0 = 0; i0 < kGroup && g * kGroup + i0 < o.n_rows; i0 += RS) {
        if constexpr (Wide) tile_avx512<V, NT, RS>(o, g, i0, t0);
        else tile_avx2<V, NT, RS>(o, g, i0, t0);
    }
}

template <typename V, bool Wide>
void group_simd(const Operands<V>& o, int64_t g) {
    int64_t t0 = 0;
    for (; t0 + kMaxTokens <= o.tokens; t0 += kMaxTokens) rows_of<V, 8, Wide ? 2 : 1, Wide>(o, g, t0);
    switch (o.tokens - t0) {
        case 0: break;
        case 1: rows_of<V, 1, 8, Wide>(o, g, t0); break;
        case 2: rows_of<V, 2, Wide ? 8 : 4, Wide>(o, g, t0); break;
        case 3: rows_of<V, 3, Wide ? 4 : 2, Wide>(o, g, t0); break;
        case 4: rows_of<V, 4, Wide ? 4 : 2, Wide>(o, g, t0); break;
        case 5: rows_of<V, 5, Wide ? 2 : 1, Wide>(o, g, t0); break;
        case 6: rows_of<V, 6, Wide ? 2 : 1, Wide>(o, g, t0); break;
        default: rows_of<V, 7, Wide ? 2 : 1, Wide>(o, g, t0); break;
    }
}

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

template <typename V>
void run(int64_t isa, const Operands<V>& o, int64_t groups) {
    const int64_t grain = std::max<int64_t>(1, groups / (8 * std::max(1, at::get_num_threads())));
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
            if (isa == kAvx512) group_simd<V, true>(o, g);
            else if (isa == kAvx2) group_simd<V, false>(o, g);
            else group_scalar(o, g);
        }
    });
}

// ---------------------------------------------------------------------------------------------------- unpack
// The rows of group ``g`` of the dense (N, kpad) float32 weight, written from the mask and the values: for a
// prefill, where one dense product of many tokens beats the kernel, the weight exists only for that product.
template <typename V>
void unpack_scalar(const Operands<V>& o, int64_t g, float* out) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const int rows = static_cast<int>(std::min<int64_t>(kGroup, o.n_rows - g * kGroup));
    std::memset(out + g * kGroup * o.kpad, 0, sizeof(float) * rows * o.kpad);
    const V* p = o.values + o.offsets[g];
    for (int64_t c = 0; c < o.chunks; ++c) {
        for (int i = 0; i < kGroup; ++i) {
            for (uint32_t bits = mg[c * kGroup + i]; bits; bits &= bits - 1)
                out[(g * kGroup + i) * o.kpad + c * 16 + __builtin_ctz(bits)] = value_at(p++, 0);
        }
    }
}

template <typename V>
__attribute__((target("avx512f,avx512bw,popcnt"))) void unpack_avx512(const Operands<V>& o, int64_t g, float* out) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const V* p = o.values + o.offsets[g];
    for (int64_t c = 0; c < o.chunks; ++c) {
        for (int i = 0; i < kGroup; ++i) {
            const uint32_t bits = mg[c * kGroup + i];
            const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16(p));
            p += _mm_popcnt_u32(bits);
            if (g * kGroup + i < o.n_rows) _mm512_storeu_ps(out + (g * kGroup + i) * o.kpad + c * 16, w);
        }
    }
}

template <typename F>
void with_values(const torch::Tensor& values, F&& fn) {
    if (values.scalar_type() == torch::kFloat32) {
        fn(values.data_ptr<float>());
    } else {
        TORCH_CHECK(values.scalar_type() == torch::kBFloat16, "values: float32 or bfloat16");
        fn(reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()));
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

void check_layout(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& offsets, int64_t rows,
                  int64_t isa) {
    TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kUInt8 && mask.is_contiguous() &&
                    mask.size(1) % 16 == 0, "mask: contiguous uint8 (groups, 16 * chunks)");
    TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous() &&
                    offsets.numel() == mask.size(0) + 1, "offsets: int64 (groups + 1)");
    TORCH_CHECK(rows > (mask.size(0) - 1) * kGroup && rows <= mask.size(0) * kGroup, "rows: the weight's, in 8-row groups");
    TORCH_CHECK(values.is_contiguous() && values.dim() == 1, "values: contiguous 1-D");
    TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "this CPU cannot run the instruction set asked for");
}

// y (tokens, rows) float32 = x (tokens, kpad) float32 times the bitmask weight, with instruction set ``isa``.
torch::Tensor bitmask_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor offsets,
                             int64_t rows, int64_t isa) {
    check_layout(mask, values, offsets, rows, isa);
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous (B, K) fp32");
    TORCH_CHECK(x.size(1) == mask.size(1), "x must be padded to the mask's columns");
    auto y = torch::empty({x.size(0), rows}, x.options());
    const int64_t kpad = mask.size(1);
    with_values(values, [&](auto* vp) {
        using V = std::remove_const_t<std::remove_pointer_t<decltype(vp)>>;
        const Operands<V> o{x.data_ptr<float>(), x.size(0), kpad, kpad / 16,
                            reinterpret_cast<const uint16_t*>(mask.data_ptr<uint8_t>()), vp,
                            offsets.data_ptr<int64_t>(), y.data_ptr<float>(), rows};
        run(isa, o, mask.size(0));
    });
    return y;
}

// ``x (..., K) . W^T + bias`` in x's dtype, with the padding and the casts done here rather than in Python: the
// whole forward of ``SparseLinear`` at decode, where a few microseconds of per-call work are a share of the product.
torch::Tensor bitmask_linear(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor offsets,
                             int64_t rows, c10::optional<torch::Tensor> bias, int64_t isa) {
    const int64_t k = x.size(-1), kpad = mask.size(1);
    TORCH_CHECK(k <= kpad && k > kpad - 16, "x: the weight's ", kpad, " padded columns, got ", k);
    auto flat = x.reshape({-1, k}).to(torch::kFloat32).contiguous();
    if (k != kpad) {
        auto padded = torch::zeros({flat.size(0), kpad}, flat.options());
        padded.narrow(1, 0, k).copy_(flat);
        flat = padded;
    }
    auto y = bitmask_matmul(flat, mask, values, offsets, rows, isa);
    if (bias.has_value() && bias->defined()) y.add_(*bias);
    auto sizes = x.sizes().vec();
    sizes.back() = rows;
    return y.to(x.scalar_type()).reshape(sizes);
}

// The dense (N, kpad) float32 weight of a bitmask weight (columns past the weight's width are zeros), written into
// ``out`` (a scratch buffer reused from one product to the next: a fresh one would be page-faulted in every time).
torch::Tensor bitmask_unpack(torch::Tensor mask, torch::Tensor values, torch::Tensor offsets, int64_t rows,
                             int64_t isa, torch::Tensor out) {
    check_layout(mask, values, offsets, rows, isa);
    const int64_t kpad = mask.size(1);
    TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
                    out.size(1) == kpad, "out: contiguous (N, kpad) float32");
    with_values(values, [&](auto* vp) {
        using V = std::remove_const_t<std::remove_pointer_t<decltype(vp)>>;
        const Operands<V> o{nullptr, 0, kpad, kpad / 16, reinterpret_cast<const uint16_t*>(mask.data_ptr<uint8_t>()),
                            vp, offsets.data_ptr<int64_t>(), nullptr, rows};
        float* dst = out.data_ptr<float>();
        at::parallel_for(0, mask.size(0), 2, [&](int64_t g0, int64_t g1) {
            for (int64_t g = g0; g < g1; ++g) {
                if (isa == kAvx512) unpack_avx512(o, g, dst);
                else unpack_scalar(o, g, dst);
            }
        });
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("best_isa", &best_isa, "the best instruction set this CPU runs (0 scalar, 1 AVX2, 2 AVX-512)");
    m.def("bitmask_matmul", &bitmask_matmul, "y = x . W^T for a bitmask weight, x padded float32 (B, kpad)");
    m.def("bitmask_linear", &bitmask_linear, "x . W^T + bias for a bitmask weight, any leading shape and dtype");
    m.def("bitmask_unpack", &bitmask_unpack, "the dense (N, kpad) float32 weight of a bitmask weight");
}
