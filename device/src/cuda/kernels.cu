// devccl's CUDA kernels (DESIGN §4a): element-wise reductions with the avg epilogue, the avg
// epilogue alone, the devmem fragment gather and the fused gather-and-reduce, for every dtype.
//
// Header-free on purpose: NVRTC 13 has no built-in cuda_fp16.h / cuda_bf16.h, so f16, bf16 and
// the fp8 types are converted with integer bit code that reproduces the host's conversions
// (half 2.7's software paths, devccl-core's fp8 code) bit for bit, including subnormals,
// overflow and NaN payloads. Arithmetic is IEEE in the element's own precision with explicit
// round-to-nearest intrinsics; compile with --fmad=false --ftz=false and no fast math.
//
// NaN results follow the host (x86-64 SSE) rules so that results match byte for byte: an
// operation with a NaN operand returns the first NaN operand, quieted; an invalid operation
// (inf - inf, 0 * inf) returns the host's default NaN (DEVCCL_NEG_DEFAULT_NAN: negative on
// x86-64, positive elsewhere).
//
// Kernels are grid-stride loops with no shared memory, barriers or warp intrinsics, so the
// same source also runs on the CPU (threads executed one after another) in devccl's tests,
// with a small shim defining the CUDA built-ins.
//
// Kernel parameters (every pointer is a device address, UVA, possibly pinned host memory):
//   devccl_reduce_<t>(dst, a, b, n, op, epi, idiv, fdiv, ddiv)
//   devccl_finish_<t>(dst, n, idiv, fdiv, ddiv)
//   devccl_gather(dst, pool, table, entries)
//   devccl_gather_reduce_<t>(dst, base, pool, table, entries, op, epi, idiv, fdiv, ddiv)
// n counts elements; op is 0 sum, 1 prod, 2 min, 3 max; epi != 0 applies `/ n` after the op
// (integers: idiv, 0 meaning "the count does not fit the type": the quotient is 0; f64: ddiv;
// every other float: fdiv). The table holds `Frag` entries sorted by dst_off that cover the
// destination exactly once; an element belongs to the entry holding its first byte.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;
typedef int i32;
typedef long long i64;

#ifndef DEVCCL_NEG_DEFAULT_NAN
#define DEVCCL_NEG_DEFAULT_NAN 1
#endif

#define DEVCCL_SUM 0
#define DEVCCL_PROD 1
#define DEVCCL_MIN 2
#define DEVCCL_MAX 3

#define DEV static __device__ __forceinline__

// One fragment of a receive pool (24 bytes, little-endian, as devccl's host code writes it).
struct Frag {
    u64 src_off;
    u64 dst_off;
    u32 len;
    u32 pad;
};

// The avg epilogue's divisor in every representation.
struct DivArgs {
    u64 i;
    float f;
    double d;
};

// ---------------------------------------------------------------------------------------------
// f32 and f64 bit helpers
// ---------------------------------------------------------------------------------------------

DEV bool f32_nan(u32 x) { return (x & 0x7fffffffu) > 0x7f800000u; }

DEV bool f64_nan(u64 x) { return (x & 0x7fffffffffffffffull) > 0x7ff0000000000000ull; }

DEV float f32_of(u32 x) { return __uint_as_float(x); }

DEV u32 f32_bits(float x) { return __float_as_uint(x); }

DEV double f64_of(u64 x) { return __longlong_as_double((long long)x); }

DEV u64 f64_bits(double x) { return (u64)__double_as_longlong(x); }

// The host's NaN result for `a op b` once the IEEE result is NaN.
DEV u32 f32_nan_result(u32 a, u32 b) {
    if (f32_nan(a)) return a | 0x00400000u;
    if (f32_nan(b)) return b | 0x00400000u;
    return DEVCCL_NEG_DEFAULT_NAN ? 0xffc00000u : 0x7fc00000u;
}

DEV u64 f64_nan_result(u64 a, u64 b) {
    if (f64_nan(a)) return a | 0x0008000000000000ull;
    if (f64_nan(b)) return b | 0x0008000000000000ull;
    return DEVCCL_NEG_DEFAULT_NAN ? 0xfff8000000000000ull : 0x7ff8000000000000ull;
}

// Sum or product of two f32 bit patterns, IEEE round-to-nearest-even, host NaN rules.
DEV u32 f32_arith(int op, u32 a, u32 b) {
    float r = op == DEVCCL_SUM ? __fadd_rn(f32_of(a), f32_of(b)) : __fmul_rn(f32_of(a), f32_of(b));
    u32 rb = f32_bits(r);
    return f32_nan(rb) ? f32_nan_result(a, b) : rb;
}

DEV u32 f32_div(u32 a, float n) {
    u32 rb = f32_bits(__fdiv_rn(f32_of(a), n));
    return f32_nan(rb) ? f32_nan_result(a, f32_bits(n)) : rb;
}

DEV u64 f64_arith(int op, u64 a, u64 b) {
    double r = op == DEVCCL_SUM ? __dadd_rn(f64_of(a), f64_of(b)) : __dmul_rn(f64_of(a), f64_of(b));
    u64 rb = f64_bits(r);
    return f64_nan(rb) ? f64_nan_result(a, b) : rb;
}

DEV u64 f64_div(u64 a, double n) {
    u64 rb = f64_bits(__ddiv_rn(f64_of(a), n));
    return f64_nan(rb) ? f64_nan_result(a, f64_bits(n)) : rb;
}

// ---------------------------------------------------------------------------------------------
// Narrow float conversions (bit-exact ports of the host code)
// ---------------------------------------------------------------------------------------------

// half 2.7 f16_to_f32_fallback.
DEV u32 f16_to_f32(u16 h) {
    u32 x = h;
    if ((x & 0x7fffu) == 0) return x << 16;
    u32 sign = (x & 0x8000u) << 16;
    u32 exp = x & 0x7c00u;
    u32 man = x & 0x03ffu;
    if (exp == 0x7c00u) return man == 0 ? (sign | 0x7f800000u) : (sign | 0x7fc00000u | (man << 13));
    if (exp == 0) {
        int e = __clz((int)man) - 16 - 6;
        return sign | ((u32)(127 - 15 - e) << 23) | ((man << (14 + e)) & 0x7fffffu);
    }
    return sign | ((u32)((int)(exp >> 10) - 15 + 127) << 23) | (man << 13);
}

// half 2.7 f32_to_f16_fallback: round to nearest even, NaN keeps its top payload bits quieted.
DEV u16 f32_to_f16(u32 x) {
    u32 sign = x & 0x80000000u;
    u32 exp = x & 0x7f800000u;
    u32 man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        u32 nan_bit = man == 0 ? 0 : 0x0200u;
        return (u16)((sign >> 16) | 0x7c00u | nan_bit | (man >> 13));
    }
    u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (u16)(half_sign | 0x7c00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (u16)half_sign;
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3 * round_bit - 1)) != 0) half_man += 1;
        return (u16)(half_sign | half_man);
    }
    u32 r = half_sign | ((u32)half_exp << 10) | (man >> 13);
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0) r += 1;
    return (u16)r;
}

// half 2.7 bf16_to_f32 / f32_to_bf16.
DEV u32 bf16_to_f32(u16 h) {
    u32 x = h;
    return (x & 0x7fffu) > 0x7f80u ? ((x | 0x0040u) << 16) : (x << 16);
}

DEV u16 f32_to_bf16(u32 x) {
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x0040u);
    u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3 * round_bit - 1)) != 0) return (u16)((x >> 16) + 1);
    return (u16)(x >> 16);
}

// devccl-core dtype.rs f8_to_f32: exact widening; NaN is the f32 NaN with the code's sign.
DEV u32 f8_to_f32(u8 b, int man, int bias, bool has_inf) {
    u32 neg = (b & 0x80u) ? 0x80000000u : 0u;
    u32 mag = b & 0x7fu;
    u32 emax_field = (1u << (7 - man)) - 1;
    u32 e_field = mag >> man;
    u32 m = mag & ((1u << man) - 1);
    u32 v;
    if (has_inf && e_field == emax_field) {
        v = m == 0 ? 0x7f800000u : 0x7fc00000u;
    } else if (!has_inf && mag == 0x7fu) {
        v = 0x7fc00000u;
    } else if (e_field == 0) {
        // m * 2^(1 - bias - man): exact.
        v = f32_bits(__fmul_rn((float)m, f32_of((u32)(127 + 1 - bias - man) << 23)));
    } else {
        v = ((u32)((int)e_field - bias + 127) << 23) | (m << (23 - man));
    }
    return v ^ neg;
}

// devccl-core dtype.rs f32_to_f8: round to nearest even once; NaN is 0x7f with the sign;
// overflow is NaN (E4M3, no infinity) or infinity (E5M2).
DEV u8 f32_to_f8(u32 bits, int man, int bias, bool has_inf) {
    u32 sign = (bits >> 24) & 0x80u;
    u32 ab = bits & 0x7fffffffu;
    u32 max_finite = has_inf ? 0x7bu : 0x7eu;
    u32 overflow = has_inf ? 0x7cu : 0x7fu;
    if (ab > 0x7f800000u) return (u8)(sign | 0x7fu);
    if (ab == 0x7f800000u) return (u8)(sign | overflow);
    if (ab < 0x00800000u) return (u8)sign;
    int e = (int)(ab >> 23) - 127;
    u64 m = (u64)((ab & 0x7fffffu) | 0x800000u);
    int emin = 1 - bias;
    if (e > 16) return (u8)(sign | overflow);
    int shift = e >= emin ? (23 - man) : (23 - man) + (emin - e);
    if (shift > 40) return (u8)sign;
    u64 q = m >> shift;
    u64 rem = m & ((1ull << shift) - 1);
    u64 half = 1ull << (shift - 1);
    if (rem > half || (rem == half && (q & 1) == 1)) q += 1;
    u64 mag = e >= emin ? ((u64)(e - emin) << man) + q : q;
    if (mag > max_finite) return (u8)(sign | overflow);
    return (u8)(sign | (u32)mag);
}

// ---------------------------------------------------------------------------------------------
// Element types: storage bits B, the arithmetic ops, the order and the epilogue.
// ---------------------------------------------------------------------------------------------

struct TF32 {
    typedef u32 B;
    DEV B arith(int op, B a, B b) { return f32_arith(op, a, b); }
    DEV bool lt(B a, B b) { return f32_of(a) < f32_of(b); }
    DEV bool is_nan(B a) { return f32_nan(a); }
    DEV B div(B a, const DivArgs& d) { return f32_div(a, d.f); }
};

struct TF64 {
    typedef u64 B;
    DEV B arith(int op, B a, B b) { return f64_arith(op, a, b); }
    DEV bool lt(B a, B b) { return f64_of(a) < f64_of(b); }
    DEV bool is_nan(B a) { return f64_nan(a); }
    DEV B div(B a, const DivArgs& d) { return f64_div(a, d.d); }
};

// A narrow float computed in f32 and rounded back once: W widens, N narrows.
template <class Bits, u32 (*W)(Bits), Bits (*N)(u32)>
struct TNarrow {
    typedef Bits B;
    DEV B arith(int op, B a, B b) { return N(f32_arith(op, W(a), W(b))); }
    DEV bool lt(B a, B b) { return f32_of(W(a)) < f32_of(W(b)); }
    DEV bool is_nan(B a) { return f32_nan(W(a)); }
    DEV B div(B a, const DivArgs& d) { return N(f32_div(W(a), d.f)); }
};

DEV u32 e4m3_to_f32(u8 b) { return f8_to_f32(b, 3, 7, false); }
DEV u8 f32_to_e4m3(u32 x) { return f32_to_f8(x, 3, 7, false); }
DEV u32 e5m2_to_f32(u8 b) { return f8_to_f32(b, 2, 15, true); }
DEV u8 f32_to_e5m2(u32 x) { return f32_to_f8(x, 2, 15, true); }

typedef TNarrow<u16, f16_to_f32, f32_to_f16> TF16;
typedef TNarrow<u16, bf16_to_f32, f32_to_bf16> TBF16;
typedef TNarrow<u8, e4m3_to_f32, f32_to_e4m3> TE4M3;
typedef TNarrow<u8, e5m2_to_f32, f32_to_e5m2> TE5M2;

// Integers: storage Bits, compare/divide as S; sums and products wrap.
template <class Bits, class S>
struct TInt {
    typedef Bits B;
    DEV B arith(int op, B a, B b) { return op == DEVCCL_SUM ? (B)(a + b) : (B)(a * b); }
    DEV bool lt(B a, B b) { return (S)a < (S)b; }
    DEV bool is_nan(B) { return false; }
    DEV B div(B a, const DivArgs& d) { return d.i == 0 ? (B)0 : (B)((S)a / (S)d.i); }
};

typedef TInt<u8, i8> TI8;
typedef TInt<u8, u8> TU8;
typedef TInt<u32, i32> TI32;
typedef TInt<u32, u32> TU32;
typedef TInt<u64, i64> TI64;
typedef TInt<u64, u64> TU64;

// `a op b` exactly as the host: min/max return an operand's own bits, a NaN `a` wins.
template <class T, int OP>
DEV typename T::B elem(typename T::B a, typename T::B b) {
    if (OP == DEVCCL_SUM || OP == DEVCCL_PROD) return T::arith(OP, a, b);
    bool take_a = (OP == DEVCCL_MIN ? T::lt(a, b) : T::lt(b, a)) || T::is_nan(a);
    return take_a ? a : b;
}

template <class T, int OP>
DEV typename T::B elem_epi(typename T::B a, typename T::B b, bool epi, const DivArgs& d) {
    typename T::B r = elem<T, OP>(a, b);
    return epi ? T::div(r, d) : r;
}

// ---------------------------------------------------------------------------------------------
// Memory access: aligned, unaligned (byte-assembled, little-endian) and 16-byte vectors.
// ---------------------------------------------------------------------------------------------

struct alignas(16) Q16 {
    u64 lo;
    u64 hi;
};

template <class B>
union V16 {
    Q16 q;
    B e[16 / sizeof(B)];
};

template <class B>
DEV B load_bytes(const u8* p) {
    B v = 0;
    for (u32 k = 0; k < sizeof(B); k++) v |= (B)((B)p[k] << (8 * k));
    return v;
}

template <class B>
DEV void store_bytes(u8* p, B v) {
    for (u32 k = 0; k < sizeof(B); k++) p[k] = (u8)(v >> (8 * k));
}

template <class B>
DEV B load(const u8* p) {
    return ((u64)p & (sizeof(B) - 1)) == 0 ? *(const B*)p : load_bytes<B>(p);
}

template <class B>
DEV void store(u8* p, B v) {
    if (((u64)p & (sizeof(B) - 1)) == 0) {
        *(B*)p = v;
    } else {
        store_bytes<B>(p, v);
    }
}

DEV u64 thread_index() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }

DEV u64 thread_count() { return (u64)gridDim.x * blockDim.x; }

// ---------------------------------------------------------------------------------------------
// dst = a op b (then / n)
// ---------------------------------------------------------------------------------------------

template <class T, int OP>
DEV void reduce_run(u8* dst, const u8* a, const u8* b, u64 n, bool epi, const DivArgs& d) {
    typedef typename T::B B;
    const u64 E = sizeof(B);
    const u64 V = 16 / E;
    const u64 addr = (u64)dst | (u64)a | (u64)b;
    u64 i = thread_index();
    const u64 stride = thread_count();
    if ((addr & 15) == 0) {
        const u64 nv = n / V;
        for (u64 v = i; v < nv; v += stride) {
            V16<B> x, y, r;
            x.q = ((const Q16*)a)[v];
            y.q = ((const Q16*)b)[v];
            for (u32 k = 0; k < V; k++) r.e[k] = elem_epi<T, OP>(x.e[k], y.e[k], epi, d);
            ((Q16*)dst)[v] = r.q;
        }
        i += nv * V;
    }
    for (; i < n; i += stride) {
        B x = load<B>(a + i * E);
        B y = load<B>(b + i * E);
        store<B>(dst + i * E, elem_epi<T, OP>(x, y, epi, d));
    }
}

template <class T>
DEV void reduce_kernel(u8* dst, const u8* a, const u8* b, u64 n, int op, int epi, u64 idiv, float fdiv,
                       double ddiv) {
    DivArgs d;
    d.i = idiv;
    d.f = fdiv;
    d.d = ddiv;
    switch (op) {
        case DEVCCL_SUM: reduce_run<T, DEVCCL_SUM>(dst, a, b, n, epi != 0, d); break;
        case DEVCCL_PROD: reduce_run<T, DEVCCL_PROD>(dst, a, b, n, epi != 0, d); break;
        case DEVCCL_MIN: reduce_run<T, DEVCCL_MIN>(dst, a, b, n, epi != 0, d); break;
        default: reduce_run<T, DEVCCL_MAX>(dst, a, b, n, epi != 0, d); break;
    }
}

// ---------------------------------------------------------------------------------------------
// dst /= n
// ---------------------------------------------------------------------------------------------

template <class T>
DEV void finish_kernel(u8* dst, u64 n, u64 idiv, float fdiv, double ddiv) {
    typedef typename T::B B;
    const u64 E = sizeof(B);
    const u64 V = 16 / E;
    DivArgs d;
    d.i = idiv;
    d.f = fdiv;
    d.d = ddiv;
    u64 i = thread_index();
    const u64 stride = thread_count();
    if (((u64)dst & 15) == 0) {
        const u64 nv = n / V;
        for (u64 v = i; v < nv; v += stride) {
            V16<B> x;
            x.q = ((const Q16*)dst)[v];
            for (u32 k = 0; k < V; k++) x.e[k] = T::div(x.e[k], d);
            ((Q16*)dst)[v] = x.q;
        }
        i += nv * V;
    }
    for (; i < n; i += stride) store<B>(dst + i * E, T::div(load<B>(dst + i * E), d));
}

// ---------------------------------------------------------------------------------------------
// Gather: copy each fragment from the pool to its place (one block per table entry).
// ---------------------------------------------------------------------------------------------

template <class W>
DEV void copy_words(u8* d, const u8* s, u64 len) {
    // d and s are congruent modulo sizeof(W): bytes up to d's alignment, words, then bytes.
    u64 head = (sizeof(W) - ((u64)d & (sizeof(W) - 1))) & (sizeof(W) - 1);
    if (head > len) head = len;
    u64 words = (len - head) / sizeof(W);
    for (u64 k = threadIdx.x; k < head; k += blockDim.x) d[k] = s[k];
    const W* sw = (const W*)(s + head);
    W* dw = (W*)(d + head);
    for (u64 k = threadIdx.x; k < words; k += blockDim.x) dw[k] = sw[k];
    for (u64 k = head + words * sizeof(W) + threadIdx.x; k < len; k += blockDim.x) d[k] = s[k];
}

DEV void copy_fragment(u8* d, const u8* s, u64 len) {
    u64 skew = (u64)d ^ (u64)s;
    if ((skew & 15) == 0) {
        copy_words<Q16>(d, s, len);
    } else if ((skew & 3) == 0) {
        copy_words<u32>(d, s, len);
    } else {
        copy_words<u8>(d, s, len);
    }
}

// ---------------------------------------------------------------------------------------------
// Fused gather-and-reduce: dst = base op gathered, fragments read straight from the pool.
// ---------------------------------------------------------------------------------------------

// The element at destination byte `pos`, which starts in entry `f` and spills into later ones.
template <class B>
DEV B load_split(const u8* pool, const Frag* table, u64 f, u64 pos) {
    B v = 0;
    for (u32 k = 0; k < sizeof(B); k++) {
        u64 p = pos + k;
        while (p >= table[f].dst_off + table[f].len) f++;
        v |= (B)((B)pool[table[f].src_off + (p - table[f].dst_off)] << (8 * k));
    }
    return v;
}

template <class T, int OP>
DEV void gather_reduce_run(u8* dst, const u8* base, const u8* pool, const Frag* table, u64 entries, bool epi,
                           const DivArgs& d) {
    typedef typename T::B B;
    const u64 E = sizeof(B);
    for (u64 f = blockIdx.x; f < entries; f += gridDim.x) {
        const u64 doff = table[f].dst_off;
        const u64 soff = table[f].src_off;
        const u64 end = doff + table[f].len;
        // Elements whose first byte lies in [doff, end).
        const u64 j0 = (doff + E - 1) / E;
        const u64 j1 = (end + E - 1) / E;
        for (u64 j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
            const u64 pos = j * E;
            B g = pos + E <= end ? load<B>(pool + soff + (pos - doff)) : load_split<B>(pool, table, f, pos);
            store<B>(dst + pos, elem_epi<T, OP>(load<B>(base + pos), g, epi, d));
        }
    }
}

template <class T>
DEV void gather_reduce_kernel(u8* dst, const u8* base, const u8* pool, const Frag* table, u64 entries, int op,
                              int epi, u64 idiv, float fdiv, double ddiv) {
    DivArgs d;
    d.i = idiv;
    d.f = fdiv;
    d.d = ddiv;
    switch (op) {
        case DEVCCL_SUM: gather_reduce_run<T, DEVCCL_SUM>(dst, base, pool, table, entries, epi != 0, d); break;
        case DEVCCL_PROD: gather_reduce_run<T, DEVCCL_PROD>(dst, base, pool, table, entries, epi != 0, d); break;
        case DEVCCL_MIN: gather_reduce_run<T, DEVCCL_MIN>(dst, base, pool, table, entries, epi != 0, d); break;
        default: gather_reduce_run<T, DEVCCL_MAX>(dst, base, pool, table, entries, epi != 0, d); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

// Every dtype: X(short name, element type). The names are devccl's DType short names.
#define DEVCCL_FOR_EACH_DTYPE(X)                                                                       \
    X(f32, TF32) X(f64, TF64) X(f16, TF16) X(bf16, TBF16) X(i8, TI8) X(u8, TU8) X(i32, TI32) X(i64, TI64) \
        X(u32, TU32) X(u64, TU64) X(f8e4m3, TE4M3) X(f8e5m2, TE5M2)

#define DEVCCL_ENTRIES(name, T)                                                                          \
    extern "C" __global__ void devccl_reduce_##name(u8* dst, const u8* a, const u8* b, u64 n, int op, int epi, \
                                                     u64 idiv, float fdiv, double ddiv) {                   \
        reduce_kernel<T>(dst, a, b, n, op, epi, idiv, fdiv, ddiv);                                          \
    }                                                                                                       \
    extern "C" __global__ void devccl_finish_##name(u8* dst, u64 n, u64 idiv, float fdiv, double ddiv) {      \
        finish_kernel<T>(dst, n, idiv, fdiv, ddiv);                                                          \
    }                                                                                                       \
    extern "C" __global__ void devccl_gather_reduce_##name(u8* dst, const u8* base, const u8* pool,          \
                                                            const Frag* table, u64 entries, int op, int epi,   \
                                                            u64 idiv, float fdiv, double ddiv) {             \
        gather_reduce_kernel<T>(dst, base, pool, table, entries, op, epi, idiv, fdiv, ddiv);                \
    }

DEVCCL_FOR_EACH_DTYPE(DEVCCL_ENTRIES)

extern "C" __global__ void devccl_gather(u8* dst, const u8* pool, const Frag* table, u64 entries) {
    for (u64 f = blockIdx.x; f < entries; f += gridDim.x) {
        copy_fragment(dst + table[f].dst_off, pool + table[f].src_off, table[f].len);
    }
}
