// Sparse matrix products over a bitmask layout, for decoding pruned models on the CPU.
//
// A weight (N rows, K columns) is held in groups of 8 rows (the last group padded with empty rows), cut into chunks
// of 16 columns (K_pad = 16 * chunks, the columns past K empty):
//   mask    uint8 (groups, 16 * chunks): for group g, chunk c and row i of the group, the 16-bit word at word
//           c * 8 + i has bit j set when column 16 c + j of row 8 g + i is kept;
//   values  the kept weights group after group, within a group chunk after chunk, within a chunk row after row, in
//           column order; then 16 bytes or more of zeros (a vector load may reach past the end). Four codecs:
//           float32; bfloat16; int8 codes, one byte each; int4 codes, two a byte (low nibble first), each row's
//           codes of a chunk padded to whole bytes;
//   offsets int64 (groups + 1): where each group's values start, in elements of ``values``;
//   for codes, scales and zeros float32 (8 * groups, column groups): the weight is (code - zero) * scale, the
//           column group of chunk c being c / group_chunks (group_chunks = the quantization group size / 16).
// The 8 rows of a group are interleaved chunk by chunk so that one product streams through the mask and the values
// once, in order, and one load of x serves 8 rows. y (B, N) = x (B, K_pad) . W^T reads only the mask and the kept
// values: 16 (or 8) columns at a time the kept values are loaded contiguously (codes turned into floats) and spread
// to their columns (AVX-512: vexpandps, or for float values with VPOPCNTDQ a vpermps by bit counts; AVX2: a
// permutation from a table), then multiplied with x; 4-bit codes, where the CPU has AVX512-VBMI2, are spread as
// bytes and looked up in a table of their 16 weights. Groups are split over torch's threads. The scalar path is the
// reference and the fallback. For many tokens (prefill, AVX-512), ``bitmask_spmm`` multiplies each kept weight with
// a block of tokens instead.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

namespace {

constexpr int kGroup = 8;      // rows per group
constexpr int kMaxTokens = 8;  // tokens multiplied per pass over a group's values
// How far ahead of the product the values and the mask are prefetched, in bytes. The hardware prefetchers alone
// kept a decode product at about half the speed it ran from the cache: on Intel Sapphire Rapids, one thread, weights
// from memory, random masks of SmolLM2's shapes ran 1.2x faster at 50% and 1.6-1.7x at 70% with these distances
// (1 and 2 KiB ahead: 1.2x and 1.4x).
constexpr int kAheadValues = 4096;
constexpr int kAheadMask = 2048;

__attribute__((always_inline)) inline void prefetch(const void* p, int ahead) {
    _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T0);
}

enum Codec : int64_t { kF32 = 0, kBF16 = 1, kInt8 = 2, kInt4 = 3 };

// One product's operands, shared by every path.
struct Operands {
    const float* x;  // (tokens, kpad)
    int64_t tokens, kpad, chunks;
    const uint16_t* mask;  // (groups, chunks, 8) words
    const uint8_t* values;
    const int64_t* offsets;
    float* y;  // (tokens, n_rows)
    int64_t n_rows;
    const float* scales;  // codes only: (8 * groups, col_groups)
    const float* zeros;
    int64_t col_groups, group_chunks;
};

template <int C>
struct Traits;
template <>
struct Traits<kF32> {
    using T = float;
    static constexpr bool quantized = false;
    static int64_t units(uint32_t n) { return n; }
};
template <>
struct Traits<kBF16> {
    using T = uint16_t;
    static constexpr bool quantized = false;
    static int64_t units(uint32_t n) { return n; }
};
template <>
struct Traits<kInt8> {
    using T = uint8_t;
    static constexpr bool quantized = true;
    static int64_t units(uint32_t n) { return n; }
};
template <>
struct Traits<kInt4> {
    using T = uint8_t;
    static constexpr bool quantized = true;
    static int64_t units(uint32_t n) { return (n + 1) / 2; }
};

// Elements of ``values`` that rows [from, to) of a group take in one chunk (``words``: the chunk's 8 mask words).
template <int C>
inline int64_t span(const uint16_t* words, int from, int to) {
    int64_t n = 0;
    for (int i = from; i < to; ++i) n += Traits<C>::units(__builtin_popcount(words[i]));
    return n;
}

template <int C>
inline const typename Traits<C>::T* values_of(const Operands& o, int64_t g) {
    return reinterpret_cast<const typename Traits<C>::T*>(o.values) + o.offsets[g];
}

// (scale, zero) of row ``row`` (of the padded rows) in chunk ``c``; (1, 0) for float values.
template <int C>
inline void grid(const Operands& o, int64_t row, int64_t c, float& scale, float& zero) {
    if constexpr (Traits<C>::quantized) {
        const int64_t at = row * o.col_groups + c / o.group_chunks;
        scale = o.scales[at];
        zero = o.zeros[at];
    } else {
        scale = 1.f;
        zero = 0.f;
    }
}

// The k-th stored value (or code) of a row's block in a chunk, as a float.
template <int C>
inline float scalar_at(const typename Traits<C>::T* p, int k) {
    if constexpr (C == kF32) {
        return p[k];
    } else if constexpr (C == kBF16) {
        uint32_t bits = static_cast<uint32_t>(p[k]) << 16;
        float out;
        std::memcpy(&out, &bits, sizeof(out));
        return out;
    } else if constexpr (C == kInt8) {
        return static_cast<float>(p[k]);
    } else {
        return static_cast<float>((p[k >> 1] >> ((k & 1) * 4)) & 15);
    }
}

template <int C>
inline float weight_at(const typename Traits<C>::T* p, int k, float scale, float zero) {
    if constexpr (Traits<C>::quantized) return (scalar_at<C>(p, k) - zero) * scale;
    else return scalar_at<C>(p, k);
}

// ---------------------------------------------------------------------------------------------------- scalar
template <int C>
void group_scalar(const Operands& o, int64_t g) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    for (int i = 0; i < kGroup && g * kGroup + i < o.n_rows; ++i) {
        const int64_t row = g * kGroup + i;
        for (int64_t t0 = 0; t0 < o.tokens; t0 += kMaxTokens) {
            const int64_t nt = std::min<int64_t>(kMaxTokens, o.tokens - t0);
            float acc[kMaxTokens] = {0.f};
            const auto* chunk = values_of<C>(o, g);
            for (int64_t c = 0; c < o.chunks; ++c) {
                const uint16_t* words = mg + c * kGroup;
                const auto* p = chunk + span<C>(words, 0, i);
                float scale, zero;
                grid<C>(o, row, c, scale, zero);
                int k = 0;
                for (uint32_t bits = words[i]; bits; bits &= bits - 1, ++k) {
                    const int64_t col = c * 16 + __builtin_ctz(bits);
                    const float w = weight_at<C>(p, k, scale, zero);
                    for (int64_t t = 0; t < nt; ++t) acc[t] += w * o.x[(t0 + t) * o.kpad + col];
                }
                chunk += span<C>(words, 0, kGroup);
            }
            for (int64_t t = 0; t < nt; ++t) o.y[(t0 + t) * o.n_rows + row] = acc[t];
        }
    }
}

// ---------------------------------------------------------------------------------------------------- codes
// 16 codes from ``p`` as 16 bytes (int4: nibbles, low first). SSE2 only and always inlined: a target attribute here
// that the AVX-512 callers' did not include would keep GCC from inlining it, a call (and spilled accumulators) per
// row and chunk.
template <int C>
__attribute__((always_inline)) inline __m128i codes16(const uint8_t* p) {
    if constexpr (C == kInt8) {
        return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
        uint64_t packed;
        std::memcpy(&packed, p, sizeof(packed));
        const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(packed));
        const __m128i low = _mm_set1_epi8(0x0f);
        return _mm_unpacklo_epi8(_mm_and_si128(v, low), _mm_and_si128(_mm_srli_epi16(v, 4), low));
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

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// The first 8 stored weights from ``p`` + ``k`` as floats (codes: dequantized with ``scale``, ``zero``).
template <int C>
__attribute__((target("avx2,fma,popcnt"))) inline __m256 load8(const typename Traits<C>::T* p, int k, __m256 scale,
                                                              __m256 zero, const float* deq) {
    if constexpr (C == kF32) {
        return _mm256_loadu_ps(p + k);
    } else if constexpr (C == kBF16) {
        const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    } else {
        return _mm256_loadu_ps(deq + k);  // the chunk's codes, dequantized once
    }
}

// The 8 kept-or-zero weights of ``bits`` (8 columns): the stored values from index ``k`` spread to their columns.
template <int C>
__attribute__((target("avx2,fma,popcnt"))) inline __m256 spread8(const Avx2Tables& tab, uint32_t bits,
                                                                const typename Traits<C>::T* p, int k, __m256 scale,
                                                                __m256 zero, const float* deq) {
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.perm[bits]));
    const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tab.keep[bits])));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(load8<C>(p, k, scale, zero, deq), perm), keep);
}

// Rows [i0, i0 + RS) of group ``g`` times tokens [t0, t0 + NT).
template <int C, int NT, int RS>
__attribute__((target("avx2,fma,popcnt"))) void tile_avx2(const Operands& o, int64_t g, int i0, int64_t t0) {
    const Avx2Tables& tab = avx2_tables();
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const float* x = o.x + t0 * o.kpad;
    __m256 acc[RS][NT];
    for (int i = 0; i < RS; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
    const auto* chunk = values_of<C>(o, g);
    alignas(32) float deq[24] = {0.f};
    for (int64_t c = 0; c < o.chunks; ++c) {
        const uint16_t* words = mg + c * kGroup;
        const auto* p = RS == kGroup ? chunk : chunk + span<C>(words, 0, i0);
        const float* xc = x + c * 16;
        prefetch(words, kAheadMask);
        for (int i = 0; i < RS; ++i) {
            prefetch(p, kAheadValues);
            const uint32_t bits = words[i0 + i];
            const int low = __builtin_popcount(bits & 0xff);
            float s, z;
            grid<C>(o, g * kGroup + i0 + i, c, s, z);
            const __m256 scale = _mm256_set1_ps(s), zero = _mm256_set1_ps(z);
            if constexpr (Traits<C>::quantized) {
                const __m128i bytes = codes16<C>(p);
                const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
                _mm256_store_ps(deq, _mm256_mul_ps(_mm256_sub_ps(a, zero), scale));
                _mm256_store_ps(deq + 8, _mm256_mul_ps(_mm256_sub_ps(b, zero), scale));
            }
            const __m256 lo = spread8<C>(tab, bits & 0xff, p, 0, scale, zero, deq);
            const __m256 hi = spread8<C>(tab, bits >> 8, p, low, scale, zero, deq);
            p += Traits<C>::units(__builtin_popcount(bits));
            for (int t = 0; t < NT; ++t) {
                acc[i][t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xc + t * o.kpad), acc[i][t]);
                acc[i][t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xc + t * o.kpad + 8), acc[i][t]);
            }
        }
        chunk = RS == kGroup ? p : p + span<C>(words, i0 + RS, kGroup);
    }
    for (int i = 0; i < RS; ++i) {
        const int64_t row = g * kGroup + i0 + i;
        if (row < o.n_rows)
            for (int t = 0; t < NT; ++t) o.y[(t0 + t) * o.n_rows + row] = hsum256(acc[i][t]);
    }
}

// ---------------------------------------------------------------------------------------------------- AVX-512
// The first 16 stored weights from ``p`` as floats (codes: dequantized with ``scale``, ``zero``).
template <int C>
__attribute__((target("avx512f,avx512bw,popcnt"))) inline __m512 load16(const typename Traits<C>::T* p, __m512 scale,
                                                                       __m512 zero) {
    if constexpr (C == kF32) {
        return _mm512_loadu_ps(p);
    } else if constexpr (C == kBF16) {
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    } else {
        const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes16<C>(p)));
        return _mm512_mul_ps(_mm512_sub_ps(codes, zero), scale);
    }
}

// The 16 kept-or-zero weights of a chunk's row: its stored values ``v`` (from index 0) spread to the set bits of
// ``bits``. ``vexpandps`` does it in one instruction, but a slow one: on AMD Zen 4 it bounds the product, which took
// about the same time per row and chunk hot or cold, 50% or 90% sparse. With AVX512-VPOPCNTDQ each column's index
// among the stored values is the count of set bits below it, and one ``vpermps`` (masked to zero the pruned
// columns) does the same spread in fewer cycles: on SmolLM2's shapes, one thread, weights from memory, float32
// values 1.03-1.07x faster at 50% (near the memory roofline already) and 1.16-1.31x at 70%, bfloat16 1.30-1.36x
// (two threads: float32 0.90-1.01x and 1.16-1.33x, bfloat16 1.27-1.40x). 8-bit codes keep ``vexpandps``: their
// conversion already loads the vector ports, and the bit counts made them 0.85x as fast (4-bit codes have VBMI2's
// own path). Both spreads give the same weights in the same lanes, bit for bit.
__attribute__((target("avx512f,avx512bw,popcnt"), always_inline)) inline __m512 spread16_expand(uint32_t bits,
                                                                                               __m512 v) {
    return _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), v);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt"), always_inline)) inline __m512
spread16_popcnt(uint32_t bits, __m512 v) {
    const __m512i below = _mm512_set_epi32(0x7fff, 0x3fff, 0x1fff, 0xfff, 0x7ff, 0x3ff, 0x1ff, 0xff, 0x7f, 0x3f,
                                           0x1f, 0xf, 0x7, 0x3, 0x1, 0x0);  // lane j: the columns below j
    const __m512i index = _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(static_cast<int>(bits)), below));
    return _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(bits), index, v);
}

// Rows [i0, i0 + RS) of group ``g`` times tokens [t0, t0 + NT): each chunk of x is loaded once for RS rows. Written
// once, compiled twice (a macro: a function's target attribute cannot differ between instances of one template, and
// the plain AVX-512 path must not be compiled with VPOPCNTDQ, which CPUs without it run): ``tile_avx512`` spreads
// with ``vexpandps``, ``tile_avx512_popcnt`` (float values) with the bit counts.
#define BESA_TILE_AVX512(NAME, TARGET, SPREAD)                                                                       \
    template <int C, int NT, int RS>                                                                                  \
    __attribute__((target(TARGET))) void NAME(const Operands& o, int64_t g, int i0, int64_t t0) {                     \
        const uint16_t* mg = o.mask + g * o.chunks * kGroup;                                                          \
        const float* x = o.x + t0 * o.kpad;                                                                           \
        __m512 acc[RS][NT];                                                                                           \
        for (int i = 0; i < RS; ++i)                                                                                  \
            for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();                                             \
        const auto* chunk = values_of<C>(o, g);                                                                       \
        for (int64_t c = 0; c < o.chunks; ++c) {                                                                      \
            const uint16_t* words = mg + c * kGroup;                                                                  \
            prefetch(words, kAheadMask);                                                                              \
            const auto* p = RS == kGroup ? chunk : chunk + span<C>(words, 0, i0);                                     \
            __m512 xv[NT];                                                                                            \
            for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * o.kpad + c * 16);                           \
            for (int i = 0; i < RS; ++i) {                                                                            \
                const uint32_t bits = words[i0 + i];                                                                  \
                float s, z;                                                                                           \
                grid<C>(o, g * kGroup + i0 + i, c, s, z);                                                             \
                prefetch(p, kAheadValues);                                                                            \
                const __m512 w = SPREAD(bits, load16<C>(p, _mm512_set1_ps(s), _mm512_set1_ps(z)));                   \
                p += Traits<C>::units(_mm_popcnt_u32(bits));                                                          \
                for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_fmadd_ps(w, xv[t], acc[i][t]);                        \
            }                                                                                                         \
            chunk = RS == kGroup ? p : p + span<C>(words, i0 + RS, kGroup);                                           \
        }                                                                                                             \
        for (int i = 0; i < RS; ++i) {                                                                                \
            const int64_t row = g * kGroup + i0 + i;                                                                  \
            if (row < o.n_rows)                                                                                       \
                for (int t = 0; t < NT; ++t) o.y[(t0 + t) * o.n_rows + row] = _mm512_reduce_add_ps(acc[i][t]);       \
        }                                                                                                             \
    }

BESA_TILE_AVX512(tile_avx512, "avx512f,avx512bw,popcnt", spread16_expand)
BESA_TILE_AVX512(tile_avx512_popcnt, "avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt", spread16_popcnt)
#undef BESA_TILE_AVX512

// ---------------------------------------------------------------------------------------------------- AVX-512 VBMI2
// 4-bit codes with byte expansion (AVX512-VBMI2): a row's (up to) 16 codes of a chunk are split into bytes, spread to
// their columns by one 16-byte ``vpexpandb``, widened to 32-bit lanes and looked up in the row's table of the 16
// weights its codes stand for, ``(code - zero) * scale``, with one ``vpermps`` that also zeroes the pruned columns.
// No conversion, no per-chunk arithmetic: five vector operations and an FMA per row and chunk instead of about ten
// (1.4x faster on SmolLM2's linears, AMD Zen 4). ``vpermps`` reads the low 4 bits of each index, so the bytes are
// not masked to their nibble. The tables are made once per column group; the weights are bit-for-bit those of the
// other paths. Its own function rather than a case of ``tile_avx512``: its target attribute adds VBMI2, which the
// plain AVX-512 path must not be compiled with (CPUs without VBMI2 run it).
template <int NT, int RS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt"))) void tile_int4_vbmi2(const Operands& o,
                                                                                           int64_t g, int i0,
                                                                                           int64_t t0) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const float* x = o.x + t0 * o.kpad;
    const __m512 codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 acc[RS][NT], table[RS];
    for (int i = 0; i < RS; ++i)
        for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
    const uint8_t* chunk = values_of<kInt4>(o, g);
    const int64_t first = (g * kGroup + i0) * o.col_groups;  // the grid of the tile's first row, column group 0
    for (int64_t c = 0, cg = 0, left = 0; c < o.chunks; ++c, --left) {
        const uint16_t* words = mg + c * kGroup;
        const uint8_t* p = RS == kGroup ? chunk : chunk + span<kInt4>(words, 0, i0);
        prefetch(words, kAheadMask);
        prefetch(p, kAheadValues);
        if (left == 0) {  // a new column group: counted, not divided, at every chunk
            for (int i = 0; i < RS; ++i) {
                const int64_t at = first + i * o.col_groups + cg;
                table[i] = _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(o.zeros[at])), _mm512_set1_ps(o.scales[at]));
            }
            left = o.group_chunks;
            ++cg;
        }
        __m512 xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * o.kpad + c * 16);
        for (int i = 0; i < RS; ++i) {
            const uint32_t bits = words[i0 + i];
            uint64_t packed;
            std::memcpy(&packed, p, sizeof(packed));
            const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(packed));
            const __m128i bytes = _mm_unpacklo_epi8(v, _mm_srli_epi16(v, 4));  // code k in the low nibble of byte k
            const __m128i spread = _mm_maskz_expand_epi8(static_cast<__mmask16>(bits), bytes);
            const __m512 w = _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(bits), _mm512_cvtepu8_epi32(spread),
                                                         table[i]);
            p += Traits<kInt4>::units(_mm_popcnt_u32(bits));
            for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_fmadd_ps(w, xv[t], acc[i][t]);
        }
        chunk = RS == kGroup ? p : p + span<kInt4>(words, i0 + RS, kGroup);
    }
    for (int i = 0; i < RS; ++i) {
        const int64_t row = g * kGroup + i0 + i;
        if (row < o.n_rows)
            for (int t = 0; t < NT; ++t) o.y[(t0 + t) * o.n_rows + row] = _mm512_reduce_add_ps(acc[i][t]);
    }
}

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vbmi2 = 3, kAvx512Popcnt = 4 };

// Every row of group ``g`` times ``NT`` tokens from t0, RS rows at a time (RS * NT accumulators fit the registers).
template <int C, int NT, int RS, int P>
void rows_of(const Operands& o, int64_t g, int64_t t0) {
    for (int i0 = 0; i0 < kGroup && g * kGroup + i0 < o.n_rows; i0 += RS) {
        if constexpr (P >= kAvx512Vbmi2 && C == kInt4) tile_int4_vbmi2<NT, RS>(o, g, i0, t0);
        else if constexpr (P == kAvx512Popcnt && !Traits<C>::quantized) tile_avx512_popcnt<C, NT, RS>(o, g, i0, t0);
        else if constexpr (P >= kAvx512) tile_avx512<C, NT, RS>(o, g, i0, t0);
        else tile_avx2<C, NT, RS>(o, g, i0, t0);
    }
}

template <int C, int P>
void group_simd(const Operands& o, int64_t g) {
    constexpr bool Wide = P >= kAvx512;
    int64_t t0 = 0;
    for (; t0 + kMaxTokens <= o.tokens; t0 += kMaxTokens) rows_of<C, 8, Wide ? 2 : 1, P>(o, g, t0);
    switch (o.tokens - t0) {
        case 0: break;
        case 1: rows_of<C, 1, 8, P>(o, g, t0); break;
        case 2: rows_of<C, 2, Wide ? 8 : 4, P>(o, g, t0); break;
        case 3: rows_of<C, 3, Wide ? 4 : 2, P>(o, g, t0); break;
        case 4: rows_of<C, 4, Wide ? 4 : 2, P>(o, g, t0); break;
        case 5: rows_of<C, 5, Wide ? 2 : 1, P>(o, g, t0); break;
        case 6: rows_of<C, 6, Wide ? 2 : 1, P>(o, g, t0); break;
        default: rows_of<C, 7, Wide ? 2 : 1, P>(o, g, t0); break;
    }
}

template <int C>
void run(int64_t isa, const Operands& o, int64_t groups) {
    const int64_t grain = std::max<int64_t>(1, groups / (8 * std::max(1, at::get_num_threads())));
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
            if (isa == kAvx512Popcnt) group_simd<C, kAvx512Popcnt>(o, g);
            else if (isa == kAvx512Vbmi2) group_simd<C, kAvx512Vbmi2>(o, g);
            else if (isa == kAvx512) group_simd<C, kAvx512>(o, g);
            else if (isa == kAvx2) group_simd<C, kAvx2>(o, g);
            else group_scalar<C>(o, g);
        }
    });
}

// ---------------------------------------------------------------------------------------------------- prefill
// Many tokens at once (prefill): the product turned around. Each kept weight is broadcast and multiplied with 16 * RT
// tokens of its column of x, the inputs transposed so that those tokens sit side by side: a multiply-add per kept
// weight and token, where the dense product and the decode kernel do one per weight, kept or not. Span by span of
// 32 columns, a group's 8 rows take turns, so the span's inputs (16 KiB for 128 tokens) stay in the L1 cache for
// the 8 rows; each row walks the set bits of its 32 columns in one loop (the loop's exit, the one branch it
// mispredicts, comes once per 32 columns rather than once per 16). On Intel Sapphire Rapids, one thread, 128 tokens,
// SmolLM2's shapes: 1.1-1.3x dense fp32 at 70%, 0.9-1.0x at 50% and 2:4 (the dense product runs near the FMA peak;
// this one is bound by the loads, one per multiply-add): ``SparseLinear``'s plan runs it only where it was faster.
constexpr int kSpan = 2;     // chunks a row's kept weights are walked over in one loop (32 columns)
constexpr int kBlockRT = 8;  // vectors of 16 tokens a block of inputs holds (128 tokens)

// The rows of a group times one block of 16 * RT tokens over one span of columns: ``w`` each row's kept weights of
// the span (floats, column order), ``bits`` where they sit, ``xc`` the block's inputs from the span's first column
// (16 * RT tokens a column), ``y`` the first row's outputs of the block (rows ``tpad`` apart), added to unless
// ``first``.
template <int RT>
__attribute__((target("avx512f,avx512bw,popcnt"))) void spmm_span(const float (*w)[16 * kSpan + 16],
                                                                 const uint64_t* bits, int rows, const float* xc,
                                                                 float* y, int64_t tpad, bool first) {
    for (int i = 0; i < rows; ++i, y += tpad) {
        __m512 a[RT];
        for (int r = 0; r < RT; ++r) a[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + 16 * r);
        const float* wi = w[i];
        for (uint64_t m = bits[i]; m; m &= m - 1) {
            const float* x = xc + __builtin_ctzll(m) * (16 * RT);
            const __m512 wv = _mm512_set1_ps(*wi++);
            for (int r = 0; r < RT; ++r) a[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 16 * r), a[r]);
        }
        for (int r = 0; r < RT; ++r) _mm512_storeu_ps(y + 16 * r, a[r]);
    }
}

// Group ``g`` times every token: span by span, the span's kept weights turned into floats once, then multiplied
// with each block of tokens. ``xt``: the inputs in blocks of 128 tokens (the last one fewer, a multiple of 16), each
// block (K_pad, its tokens), so that the tokens a span reads lie together rather than a row of tokens apart (a
// power-of-two stride would crowd them into a few sets of the L1 cache); ``yt`` (N, tpad).
template <int C>
__attribute__((target("avx512f,avx512bw,popcnt"))) void spmm_group(const Operands& o, const float* xt, int64_t tpad,
                                                                  float* yt, int64_t g) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const int rows = static_cast<int>(std::min<int64_t>(kGroup, o.n_rows - g * kGroup));
    alignas(64) float w[kGroup][16 * kSpan + 16];
    const auto* p = values_of<C>(o, g);
    for (int64_t c0 = 0; c0 < o.chunks; c0 += kSpan) {
        const int span_chunks = static_cast<int>(std::min<int64_t>(kSpan, o.chunks - c0));
        uint64_t bits[kGroup] = {0};
        int held[kGroup] = {0};
        for (int q = 0; q < span_chunks; ++q) {
            const uint16_t* words = mg + (c0 + q) * kGroup;
            for (int i = 0; i < kGroup; ++i) {
                float s, z;
                grid<C>(o, g * kGroup + i, c0 + q, s, z);
                _mm512_storeu_ps(w[i] + held[i], load16<C>(p, _mm512_set1_ps(s), _mm512_set1_ps(z)));
                const int n = _mm_popcnt_u32(words[i]);
                bits[i] |= static_cast<uint64_t>(words[i]) << (16 * q);
                held[i] += n;
                p += Traits<C>::units(n);
            }
        }
        float* y = yt + g * kGroup * tpad;
        int64_t t0 = 0;
        for (; t0 + 16 * kBlockRT <= tpad; t0 += 16 * kBlockRT)
            spmm_span<kBlockRT>(w, bits, rows, xt + t0 * o.kpad + c0 * 16 * 16 * kBlockRT, y + t0, tpad, c0 == 0);
        const int64_t left = tpad - t0, at = t0 * o.kpad + c0 * 16 * left;
        switch (left / 16) {
            case 7: spmm_span<7>(w, bits, rows, xt + at, y + t0, tpad, c0 == 0); break;
            case 6: spmm_span<6>(w, bits, rows, xt + at, y + t0, tpad, c0 == 0); break;
            case 5: spmm_span<5>(w, bits, rows, xt + at, y + t0, tpad, c0 == 0); break;
            case 4: spmm_span<4>(w, bits, rows, xt + at, y + t0, tpad, c0 == 0); break;
            case 3: spmm_span<3>(w, bits, rows, xt + at, y + t0, tpad, c0 == 0); break;
            case 2: spmm_span<2>(w, bits, rows, xt + at, y + t0, tpad, c0 == 0); break;
            case 1: spmm_span<1>(w, bits, rows, xt + at, y + t0, tpad, c0 == 0); break;
            default: break;
        }
    }
}

template <int C>
void spmm(const Operands& o, const float* xt, int64_t tpad, float* yt, int64_t groups) {
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) spmm_group<C>(o, xt, tpad, yt, g);
    });
}

// ---------------------------------------------------------------------------------------------------- unpack
// The rows of group ``g`` of the dense (N, kpad) float32 weight, written from the mask and the values: for a
// prefill, where one dense product of many tokens beats the kernel, the weight exists only for that product.
template <int C>
void unpack_scalar(const Operands& o, int64_t g, float* out) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const int rows = static_cast<int>(std::min<int64_t>(kGroup, o.n_rows - g * kGroup));
    std::memset(out + g * kGroup * o.kpad, 0, sizeof(float) * rows * o.kpad);
    const auto* p = values_of<C>(o, g);
    for (int64_t c = 0; c < o.chunks; ++c) {
        for (int i = 0; i < kGroup; ++i) {
            const uint32_t word = mg[c * kGroup + i];
            if (g * kGroup + i < o.n_rows) {
                float scale, zero;
                grid<C>(o, g * kGroup + i, c, scale, zero);
                int k = 0;
                for (uint32_t bits = word; bits; bits &= bits - 1, ++k)
                    out[(g * kGroup + i) * o.kpad + c * 16 + __builtin_ctz(bits)] = weight_at<C>(p, k, scale, zero);
            }
            p += Traits<C>::units(__builtin_popcount(word));
        }
    }
}

template <int C>
__attribute__((target("avx512f,avx512bw,popcnt"))) void unpack_avx512(const Operands& o, int64_t g, float* out) {
    const uint16_t* mg = o.mask + g * o.chunks * kGroup;
    const auto* p = values_of<C>(o, g);
    for (int64_t c = 0; c < o.chunks; ++c) {
        for (int i = 0; i < kGroup; ++i) {
            const uint32_t bits = mg[c * kGroup + i];
            float s = 1.f, z = 0.f;
            if (g * kGroup + i < o.n_rows) grid<C>(o, g * kGroup + i, c, s, z);
            const __m512 w =
                _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16<C>(p, _mm512_set1_ps(s), _mm512_set1_ps(z)));
            p += Traits<C>::units(_mm_popcnt_u32(bits));
            if (g * kGroup + i < o.n_rows) _mm512_storeu_ps(out + (g * kGroup + i) * o.kpad + c * 16, w);
        }
    }
}

template <int C>
void unpack(int64_t isa, const Operands& o, int64_t groups, float* out) {
    at::parallel_for(0, groups, 2, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
            if (isa >= kAvx512) unpack_avx512<C>(o, g, out);
            else unpack_scalar<C>(o, g, out);
        }
    });
}

}  // namespace

// The best instruction set this CPU runs: 4 the same as 3 and VPOPCNTDQ, 3 AVX-512 with VBMI2 (VL), 2 AVX-512 (F,
// BW), 1 AVX2 with FMA, 0 scalar.
int64_t best_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vbmi2"))
        return __builtin_cpu_supports("avx512vpopcntdq") ? kAvx512Popcnt : kAvx512Vbmi2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
    return kScalar;
}

// The operands of one product, checked: ``codec`` 0 float32, 1 bfloat16, 2 int8 codes, 3 int4 codes; ``scales`` and
// ``zeros`` (codes only, else empty) float32 (8 * groups, column groups), ``group_chunks`` chunks per column group.
Operands operands(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& offsets, int64_t rows,
                  int64_t codec, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t group_chunks,
                  int64_t isa) {
    TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == torch::kUInt8 && mask.is_contiguous() &&
                    mask.size(1) % 16 == 0, "mask: contiguous uint8 (groups, 16 * chunks)");
    TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous() &&
                    offsets.numel() == mask.size(0) + 1, "offsets: int64 (groups + 1)");
    TORCH_CHECK(rows > (mask.size(0) - 1) * kGroup && rows <= mask.size(0) * kGroup, "rows: the weight's, in 8-row groups");
    TORCH_CHECK(values.is_contiguous() && values.dim() == 1, "values: contiguous 1-D");
    TORCH_CHECK(mask.device().is_cpu() && values.device().is_cpu() && offsets.device().is_cpu(), "CPU tensors only");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(mask.data_ptr()) % 2 == 0, "mask: 2-byte aligned (16-bit words)");
    TORCH_CHECK(values.numel() >= offsets.data_ptr<int64_t>()[mask.size(0)] + 16,
                "values: the kept values then 16 elements of padding");
    TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "this CPU cannot run the instruction set asked for");
    const auto want = codec == kF32 ? torch::kFloat32 : codec == kBF16 ? torch::kBFloat16 : torch::kUInt8;
    TORCH_CHECK(codec >= kF32 && codec <= kInt4 && values.scalar_type() == want, "values: the codec's dtype");
    const int64_t kpad = mask.size(1), chunks = kpad / 16;
    Operands o{nullptr, 0, kpad, chunks, reinterpret_cast<const uint16_t*>(mask.data_ptr<uint8_t>()),
               static_cast<const uint8_t*>(values.data_ptr()), offsets.data_ptr<int64_t>(), nullptr, rows,
               nullptr, nullptr, 1, std::max<int64_t>(group_chunks, 1)};
    if (codec >= kInt8) {
        TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && zeros.scalar_type() == torch::kFloat32 &&
                        scales.is_contiguous() && zeros.is_contiguous() && scales.dim() == 2 &&
                        scales.sizes() == zeros.sizes() && scales.size(0) == mask.size(0) * kGroup &&
                        scales.size(1) == (chunks + o.group_chunks - 1) / o.group_chunks,
                    "scales, zeros: float32 (8 * groups, column groups)");
        o.scales = scales.data_ptr<float>();
        o.zeros = zeros.data_ptr<float>();
        o.col_groups = scales.size(1);
    }
    return o;
}

template <typename F>
void dispatch(int64_t codec, F&& fn) {
    switch (codec) {
        case kF32: fn(std::integral_constant<int, kF32>()); break;
        case kBF16: fn(std::integral_constant<int, kBF16>()); break;
        case kInt8: fn(std::integral_constant<int, kInt8>()); break;
        default: fn(std::integral_constant<int, kInt4>()); break;
    }
}

// ``x (..., K) . W^T + bias`` in x's dtype, the padding and the casts done here rather than in Python: the whole
// forward of ``SparseLinear`` at decode, where a few microseconds of per-call work are a share of the product.
torch::Tensor bitmask_linear(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor offsets,
                             int64_t rows, int64_t codec, torch::Tensor scales, torch::Tensor zeros,
                             int64_t group_chunks, c10::optional<torch::Tensor> bias, int64_t isa) {
    Operands o = operands(mask, values, offsets, rows, codec, scales, zeros, group_chunks, isa);
    const int64_t k = x.size(-1), kpad = mask.size(1);
    TORCH_CHECK(k <= kpad && k > kpad - 16, "x: the weight's ", kpad, " padded columns, got ", k);
    auto flat = x.reshape({-1, k}).to(torch::kFloat32).contiguous();
    if (k != kpad) {
        auto padded = torch::zeros({flat.size(0), kpad}, flat.options());
        padded.narrow(1, 0, k).copy_(flat);
        flat = padded;
    }
    auto y = torch::empty({flat.size(0), rows}, flat.options());
    o.x = flat.data_ptr<float>();
    o.tokens = flat.size(0);
    o.y = y.data_ptr<float>();
    dispatch(codec, [&](auto c) { run<decltype(c)::value>(isa, o, mask.size(0)); });
    if (bias.has_value() && bias->defined()) y.add_(*bias);
    auto sizes = x.sizes().vec();
    sizes.back() = rows;
    return y.to(x.scalar_type()).reshape(sizes);
}

// ``bitmask_linear`` for many tokens (AVX-512): the inputs padded to 16 tokens and transposed in blocks of 128, one
// multiply-add per kept weight and token (see ``spmm_group``).
torch::Tensor bitmask_spmm(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor offsets,
                           int64_t rows, int64_t codec, torch::Tensor scales, torch::Tensor zeros,
                           int64_t group_chunks, c10::optional<torch::Tensor> bias, int64_t isa) {
    Operands o = operands(mask, values, offsets, rows, codec, scales, zeros, group_chunks, isa);
    TORCH_CHECK(isa >= kAvx512, "the prefill kernel needs AVX-512");
    const int64_t k = x.size(-1), kpad = mask.size(1);
    TORCH_CHECK(k <= kpad && k > kpad - 16, "x: the weight's ", kpad, " padded columns, got ", k);
    auto flat = x.reshape({-1, k});
    const int64_t tokens = flat.size(0), tpad = (tokens + 15) / 16 * 16;
    auto padded = torch::zeros({tpad, kpad}, flat.options().dtype(torch::kFloat32));
    padded.narrow(0, 0, tokens).narrow(1, 0, k).copy_(flat);
    const int64_t block = 16 * kBlockRT, full = tpad / block * block;
    auto xt = torch::cat({padded.narrow(0, 0, full).view({full / block, block, kpad}).transpose(1, 2).reshape(-1),
                          padded.narrow(0, full, tpad - full).t().reshape(-1)});
    auto yt = torch::empty({rows, tpad}, xt.options());
    dispatch(codec, [&](auto c) {
        spmm<decltype(c)::value>(o, xt.data_ptr<float>(), tpad, yt.data_ptr<float>(), mask.size(0));
    });
    auto y = yt.narrow(1, 0, tokens).t();
    if (bias.has_value() && bias->defined()) y = y + *bias;
    auto sizes = x.sizes().vec();
    sizes.back() = rows;
    return y.to(x.scalar_type()).contiguous().reshape(sizes);
}

// The dense (N, kpad) float32 weight of a bitmask weight (columns past the weight's width are zeros), written into
// ``out`` (a scratch buffer reused from one product to the next: a fresh one would be page-faulted in every time).
torch::Tensor bitmask_unpack(torch::Tensor mask, torch::Tensor values, torch::Tensor offsets, int64_t rows,
                             int64_t codec, torch::Tensor scales, torch::Tensor zeros, int64_t group_chunks,
                             int64_t isa, torch::Tensor out) {
    const Operands o = operands(mask, values, offsets, rows, codec, scales, zeros, group_chunks, isa);
    TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
                    out.size(1) == mask.size(1), "out: contiguous (N, kpad) float32");
    dispatch(codec, [&](auto c) { unpack<decltype(c)::value>(isa, o, mask.size(0), out.data_ptr<float>()); });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("best_isa", &best_isa,
          "the best instruction set this CPU runs (0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 with VBMI2, 4 and VPOPCNTDQ)");
    m.def("bitmask_linear", &bitmask_linear, "x . W^T + bias for a bitmask weight, any leading shape and dtype");
    m.def("bitmask_spmm", &bitmask_spmm, "bitmask_linear for many tokens (AVX-512): one multiply-add per kept weight");
    m.def("bitmask_unpack", &bitmask_unpack, "the dense (N, kpad) float32 weight of a bitmask weight");
}
