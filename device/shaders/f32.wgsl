// Exact binary32 arithmetic on bit patterns, bit-identical to the host (IEEE 754,
// round-to-nearest-even, subnormals kept, no fused multiply-add).
//
// Devices may flush subnormals (lavapipe does) and need not keep NaN, infinity or signed zero
// without a float-controls execution mode, so the hardware operation is trusted only when both
// inputs and the result are normal, finite and nonzero; every other element takes an integer
// (soft-float) path. Division is always done in integers: Vulkan allows OpFDiv an error of
// 2.5 ULP. The module's header defines DEFAULT_NAN32, the NaN the host CPU produces for
// invalid operations (x86: 0xffc00000).
//
// Soft-float convention: a significand `m` carries its leading one at bit 26 and three extra
// bits below the last kept bit (guard, round, sticky); `e` is the biased exponent, so the value
// is m * 2^(e - 127 - 26).

const F32_SIGN: u32 = 0x80000000u;
const F32_ABS: u32 = 0x7fffffffu;
const F32_INF: u32 = 0x7f800000u;
const F32_QUIET: u32 = 0x00400000u;

fn f32_is_nan(x: u32) -> bool {
    return (x & F32_ABS) > F32_INF;
}

// Normal: finite, nonzero and not subnormal.
fn f32_normal(x: u32) -> bool {
    return ((x >> 23u) & 0xffu) - 1u < 254u;
}

fn f32_key(x: u32) -> u32 {
    if ((x & F32_SIGN) != 0u) {
        return ~x;
    }
    return x | F32_SIGN;
}

// IEEE `a < b` (false when either is NaN; -0 equals +0).
fn f32_lt(a: u32, b: u32) -> bool {
    if (f32_is_nan(a) || f32_is_nan(b) || ((a | b) & F32_ABS) == 0u) {
        return false;
    }
    return f32_key(a) < f32_key(b);
}

// Host min: `if a < b || a.is_nan() { a } else { b }`.
fn f32_min(a: u32, b: u32) -> u32 {
    if (f32_lt(a, b) || f32_is_nan(a)) {
        return a;
    }
    return b;
}

// Host max: `if a > b || a.is_nan() { a } else { b }`.
fn f32_max(a: u32, b: u32) -> u32 {
    if (f32_lt(b, a) || f32_is_nan(a)) {
        return a;
    }
    return b;
}

// Biased exponent (1 for subnormals) and significand with its implicit bit.
fn f32_exp(x: u32) -> i32 {
    return i32(max((x >> 23u) & 0xffu, 1u));
}

fn f32_sig(x: u32) -> u32 {
    let m = x & 0x7fffffu;
    if ((x & F32_INF) == 0u) {
        return m;
    }
    return m | 0x800000u;
}

// Round to nearest even and pack (leading one of `m_in` at bit 26; `e_in` may be <= 0 for
// results in the subnormal range, or >= 255 for overflow).
fn f32_pack(s: u32, e_in: i32, m_in: u32) -> u32 {
    var e = e_in;
    var m = m_in;
    if (e <= 0) {
        let sh = u32(1 - e);
        if (sh >= 27u) {
            m = select(0u, 1u, m != 0u);
        } else {
            m = (m >> sh) | select(0u, 1u, (m & ((1u << sh) - 1u)) != 0u);
        }
        e = 0;
    }
    let g = m & 7u;
    m = m >> 3u;
    if (g > 4u || (g == 4u && (m & 1u) != 0u)) {
        m += 1u;
    }
    if (e == 0) {
        // Subnormal, or rounded up into the smallest normal (bit 23 is the exponent's 1).
        return s | m;
    }
    if (m == 0x1000000u) {
        m = 0x800000u;
        e += 1;
    }
    if (e >= 255) {
        return s | F32_INF;
    }
    return s | (u32(e) << 23u) | (m & 0x7fffffu);
}

// Normalise a nonzero `m` (leading one anywhere up to bit 27) to bit 26, then pack.
fn f32_round(s: u32, e: i32, m: u32) -> u32 {
    let lead = 31 - i32(countLeadingZeros(m));
    if (lead > 26) {
        return f32_pack(s, e + 1, (m >> 1u) | (m & 1u));
    }
    let sh = 26 - lead;
    return f32_pack(s, e - sh, m << u32(sh));
}

fn f32_add_soft(a: u32, b: u32) -> u32 {
    if (f32_is_nan(a)) {
        return a | F32_QUIET;
    }
    if (f32_is_nan(b)) {
        return b | F32_QUIET;
    }
    let aa = a & F32_ABS;
    let ba = b & F32_ABS;
    if (aa == F32_INF) {
        if (ba == F32_INF && a != b) {
            return DEFAULT_NAN32;
        }
        return a;
    }
    if (ba == F32_INF) {
        return b;
    }
    if (aa == 0u) {
        if (ba == 0u) {
            // -0 + -0 = -0; any other sum of zeros is +0.
            return a & b;
        }
        return b;
    }
    if (ba == 0u) {
        return a;
    }
    var x = a;
    var y = b;
    if (ba > aa) {
        x = b;
        y = a;
    }
    let ex = f32_exp(x);
    let mx = f32_sig(x) << 3u;
    var my = f32_sig(y) << 3u;
    let d = u32(ex - f32_exp(y));
    if (d >= 27u) {
        my = 1u;
    } else if (d != 0u) {
        my = (my >> d) | select(0u, 1u, (my & ((1u << d) - 1u)) != 0u);
    }
    var m: u32;
    if (((x ^ y) & F32_SIGN) == 0u) {
        m = mx + my;
    } else {
        m = mx - my;
    }
    if (m == 0u) {
        return 0u;
    }
    return f32_round(x & F32_SIGN, ex, m);
}

// Significand normalised to bit 23 (subnormals shifted up, exponent lowered to match).
struct F32Parts {
    e: i32,
    m: u32,
}

fn f32_parts(x: u32) -> F32Parts {
    var p: F32Parts;
    p.e = f32_exp(x);
    p.m = f32_sig(x);
    let z = i32(countLeadingZeros(p.m)) - 8;
    p.m = p.m << u32(z);
    p.e = p.e - z;
    return p;
}

fn f32_mul_soft(a: u32, b: u32) -> u32 {
    if (f32_is_nan(a)) {
        return a | F32_QUIET;
    }
    if (f32_is_nan(b)) {
        return b | F32_QUIET;
    }
    let s = (a ^ b) & F32_SIGN;
    let aa = a & F32_ABS;
    let ba = b & F32_ABS;
    if (aa == F32_INF || ba == F32_INF) {
        if (aa == 0u || ba == 0u) {
            return DEFAULT_NAN32;
        }
        return s | F32_INF;
    }
    if (aa == 0u || ba == 0u) {
        return s;
    }
    let pa = f32_parts(a);
    let pb = f32_parts(b);
    // The 48-bit product of two 24-bit significands as hi * 2^24 + lo, from 12-bit halves.
    let a1 = pa.m >> 12u;
    let a0 = pa.m & 0xfffu;
    let b1 = pb.m >> 12u;
    let b0 = pb.m & 0xfffu;
    let mid = a1 * b0 + a0 * b1;
    let lo_full = a0 * b0 + ((mid & 0xfffu) << 12u);
    let lo = lo_full & 0xffffffu;
    let hi = a1 * b1 + (mid >> 12u) + (lo_full >> 24u);
    var e = pa.e + pb.e - 127;
    var m: u32;
    if (hi >= 0x800000u) {
        m = (hi << 3u) | (lo >> 21u) | select(0u, 1u, (lo & 0x1fffffu) != 0u);
        e += 1;
    } else {
        m = (hi << 4u) | (lo >> 20u) | select(0u, 1u, (lo & 0xfffffu) != 0u);
    }
    return f32_pack(s, e, m);
}

fn f32_soft() -> bool {
    return (pc.flags & FLAG_SOFT) != 0u;
}

// A hardware result as a device that flushes subnormals would return it, when FLAG_FLUSH asks
// for that (tests of the path selection on devices that keep subnormals).
fn f32_hw(r: u32) -> u32 {
    if ((pc.flags & FLAG_FLUSH) != 0u && (r & F32_INF) == 0u) {
        return r & F32_SIGN;
    }
    return r;
}

// a + b, exactly as the host computes it. The hardware handles normal operands with a normal
// result; zero operands are resolved with selects (0 + b = b; -0 + -0 = -0; zeros otherwise
// +0), so common zeros do not diverge into the integer path.
fn f32_add(a: u32, b: u32) -> u32 {
    let za = (a & F32_ABS) == 0u;
    let zb = (b & F32_ABS) == 0u;
    if (!f32_soft() && (f32_normal(a) || za) && (f32_normal(b) || zb)) {
        var r = f32_hw(bitcast<u32>(bitcast<f32>(a) + bitcast<f32>(b)));
        r = select(r, b, za);
        r = select(r, a, zb);
        r = select(r, a & b, za && zb);
        if (f32_normal(r) || za || zb) {
            return r;
        }
    }
    return f32_add_soft(a, b);
}

// a * b, exactly as the host computes it (a zero operand gives the signed zero).
fn f32_mul(a: u32, b: u32) -> u32 {
    let z = (a & F32_ABS) == 0u || (b & F32_ABS) == 0u;
    if (!f32_soft() && (f32_normal(a) || (a & F32_ABS) == 0u) && (f32_normal(b) || (b & F32_ABS) == 0u)) {
        let r = select(f32_hw(bitcast<u32>(bitcast<f32>(a) * bitcast<f32>(b))), (a ^ b) & F32_SIGN, z);
        if (f32_normal(r) || z) {
            return r;
        }
    }
    return f32_mul_soft(a, b);
}

// x / d, correctly rounded; d is positive and normal (the bits of `n as f32`, n > 1).
// Long division of the significands with 32-bit integer division, 8 quotient bits a step.
fn f32_div(x: u32, d: u32) -> u32 {
    if (f32_is_nan(x)) {
        return x | F32_QUIET;
    }
    let xa = x & F32_ABS;
    if (xa == F32_INF || xa == 0u) {
        return x;
    }
    let px = f32_parts(x);
    var mx = px.m;
    var ex = px.e;
    let md = (d & 0x7fffffu) | 0x800000u;
    let ed = i32(d >> 23u);
    if (mx < md) {
        mx = mx << 1u;
        ex -= 1;
    }
    // mx / md is in [1, 2): q = floor(mx * 2^26 / md) has its leading one at bit 26.
    var q = 1u;
    var r = mx - md;
    for (var i = 0u; i < 3u; i++) {
        r = r << 8u;
        q = (q << 8u) | (r / md);
        r = r % md;
    }
    r = r << 2u;
    q = (q << 2u) | (r / md);
    r = r % md;
    return f32_pack(x & F32_SIGN, ex - ed + 127, q | select(0u, 1u, r != 0u));
}
