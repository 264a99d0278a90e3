// Exact binary64 arithmetic on u64 bit patterns (needs shaderFloat64 and shaderInt64); the
// same scheme as f32.wgsl: the hardware operation is trusted only for normal inputs with a
// normal result, every other element takes the integer path, division is always integer.
// The module's header defines DEFAULT_NAN64.
//
// Soft-float convention: leading one of `m` at bit 55 (53-bit significand, then guard, round
// and sticky bits); value = m * 2^(e - 1023 - 55).

const F64_SIGN: u64 = 0x8000000000000000lu;
const F64_ABS: u64 = 0x7ffffffffffffffflu;
const F64_INF: u64 = 0x7ff0000000000000lu;
const F64_QUIET: u64 = 0x0008000000000000lu;
const F64_MAN: u64 = 0x000ffffffffffffflu;

fn clz64(x: u64) -> u32 {
    let hi = u32(x >> 32u);
    if (hi != 0u) {
        return countLeadingZeros(hi);
    }
    return 32u + countLeadingZeros(u32(x & 0xfffffffflu));
}

fn sticky64(x: u64) -> u64 {
    return select(0lu, 1lu, x != 0lu);
}

fn f64_is_nan(x: u64) -> bool {
    return (x & F64_ABS) > F64_INF;
}

fn f64_field(x: u64) -> u32 {
    return u32((x >> 52u) & 0x7fflu);
}

fn f64_normal(x: u64) -> bool {
    return f64_field(x) - 1u < 2046u;
}

fn f64_key(x: u64) -> u64 {
    if ((x & F64_SIGN) != 0lu) {
        return ~x;
    }
    return x | F64_SIGN;
}

fn f64_lt(a: u64, b: u64) -> bool {
    if (f64_is_nan(a) || f64_is_nan(b) || ((a | b) & F64_ABS) == 0lu) {
        return false;
    }
    return f64_key(a) < f64_key(b);
}

fn f64_min(a: u64, b: u64) -> u64 {
    if (f64_lt(a, b) || f64_is_nan(a)) {
        return a;
    }
    return b;
}

fn f64_max(a: u64, b: u64) -> u64 {
    if (f64_lt(b, a) || f64_is_nan(a)) {
        return a;
    }
    return b;
}

fn f64_exp(x: u64) -> i32 {
    return i32(max(f64_field(x), 1u));
}

fn f64_sig(x: u64) -> u64 {
    let m = x & F64_MAN;
    if ((x & F64_INF) == 0lu) {
        return m;
    }
    return m | (F64_MAN + 1lu);
}

fn f64_pack(s: u64, e_in: i32, m_in: u64) -> u64 {
    var e = e_in;
    var m = m_in;
    if (e <= 0) {
        let sh = u32(1 - e);
        if (sh >= 56u) {
            m = sticky64(m);
        } else {
            m = (m >> sh) | sticky64(m & ((1lu << sh) - 1lu));
        }
        e = 0;
    }
    let g = m & 7lu;
    m = m >> 3u;
    if (g > 4lu || (g == 4lu && (m & 1lu) != 0lu)) {
        m += 1lu;
    }
    if (e == 0) {
        return s | m;
    }
    if (m == 0x20000000000000lu) {
        m = 0x10000000000000lu;
        e += 1;
    }
    if (e >= 2047) {
        return s | F64_INF;
    }
    return s | (u64(u32(e)) << 52u) | (m & F64_MAN);
}

fn f64_round(s: u64, e: i32, m: u64) -> u64 {
    let lead = 63 - i32(clz64(m));
    if (lead > 55) {
        return f64_pack(s, e + 1, (m >> 1u) | (m & 1lu));
    }
    let sh = 55 - lead;
    return f64_pack(s, e - sh, m << u32(sh));
}

fn f64_add_soft(a: u64, b: u64) -> u64 {
    if (f64_is_nan(a)) {
        return a | F64_QUIET;
    }
    if (f64_is_nan(b)) {
        return b | F64_QUIET;
    }
    let aa = a & F64_ABS;
    let ba = b & F64_ABS;
    if (aa == F64_INF) {
        if (ba == F64_INF && a != b) {
            return DEFAULT_NAN64;
        }
        return a;
    }
    if (ba == F64_INF) {
        return b;
    }
    if (aa == 0lu) {
        if (ba == 0lu) {
            return a & b;
        }
        return b;
    }
    if (ba == 0lu) {
        return a;
    }
    var x = a;
    var y = b;
    if (ba > aa) {
        x = b;
        y = a;
    }
    let ex = f64_exp(x);
    let mx = f64_sig(x) << 3u;
    var my = f64_sig(y) << 3u;
    let d = u32(ex - f64_exp(y));
    if (d >= 56u) {
        my = 1lu;
    } else if (d != 0u) {
        my = (my >> d) | sticky64(my & ((1lu << d) - 1lu));
    }
    var m: u64;
    if (((x ^ y) & F64_SIGN) == 0lu) {
        m = mx + my;
    } else {
        m = mx - my;
    }
    if (m == 0lu) {
        return 0lu;
    }
    return f64_round(x & F64_SIGN, ex, m);
}

struct F64Parts {
    e: i32,
    m: u64,
}

fn f64_parts(x: u64) -> F64Parts {
    var p: F64Parts;
    p.e = f64_exp(x);
    p.m = f64_sig(x);
    let z = i32(clz64(p.m)) - 11;
    p.m = p.m << u32(z);
    p.e = p.e - z;
    return p;
}

fn f64_mul_soft(a: u64, b: u64) -> u64 {
    if (f64_is_nan(a)) {
        return a | F64_QUIET;
    }
    if (f64_is_nan(b)) {
        return b | F64_QUIET;
    }
    let s = (a ^ b) & F64_SIGN;
    let aa = a & F64_ABS;
    let ba = b & F64_ABS;
    if (aa == F64_INF || ba == F64_INF) {
        if (aa == 0lu || ba == 0lu) {
            return DEFAULT_NAN64;
        }
        return s | F64_INF;
    }
    if (aa == 0lu || ba == 0lu) {
        return s;
    }
    let pa = f64_parts(a);
    let pb = f64_parts(b);
    // The 106-bit product of two 53-bit significands as hi * 2^64 + lo, from 32-bit halves.
    let a1 = pa.m >> 32u;
    let a0 = pa.m & 0xfffffffflu;
    let b1 = pb.m >> 32u;
    let b0 = pb.m & 0xfffffffflu;
    let p00 = a0 * b0;
    let mid = a1 * b0 + a0 * b1;
    let lo = p00 + (mid << 32u);
    let hi = a1 * b1 + (mid >> 32u) + select(0lu, 1lu, lo < p00);
    var e = pa.e + pb.e - 1023;
    var m: u64;
    if (hi >= 0x20000000000lu) {
        m = (hi << 14u) | (lo >> 50u) | sticky64(lo & 0x3fffffffffffflu);
        e += 1;
    } else {
        m = (hi << 15u) | (lo >> 49u) | sticky64(lo & 0x1fffffffffffflu);
    }
    return f64_pack(s, e, m);
}

// As f32_hw.
fn f64_hw(r: u64) -> u64 {
    if ((pc.flags & FLAG_FLUSH) != 0u && (r & F64_INF) == 0lu) {
        return r & F64_SIGN;
    }
    return r;
}

// As f32_add.
fn f64_add(a: u64, b: u64) -> u64 {
    let za = (a & F64_ABS) == 0lu;
    let zb = (b & F64_ABS) == 0lu;
    if ((pc.flags & FLAG_SOFT) == 0u && (f64_normal(a) || za) && (f64_normal(b) || zb)) {
        var r = f64_hw(bitcast<u64>(bitcast<f64>(a) + bitcast<f64>(b)));
        r = select(r, b, za);
        r = select(r, a, zb);
        r = select(r, a & b, za && zb);
        if (f64_normal(r) || za || zb) {
            return r;
        }
    }
    return f64_add_soft(a, b);
}

// As f32_mul.
fn f64_mul(a: u64, b: u64) -> u64 {
    let z = (a & F64_ABS) == 0lu || (b & F64_ABS) == 0lu;
    if ((pc.flags & FLAG_SOFT) == 0u && (f64_normal(a) || (a & F64_ABS) == 0lu)
        && (f64_normal(b) || (b & F64_ABS) == 0lu)) {
        let r = select(f64_hw(bitcast<u64>(bitcast<f64>(a) * bitcast<f64>(b))), (a ^ b) & F64_SIGN, z);
        if (f64_normal(r) || z) {
            return r;
        }
    }
    return f64_mul_soft(a, b);
}

// x / d, correctly rounded; d positive and normal (`n as f64`, n > 1). Long division with
// 64-bit integer division, 11 quotient bits a step.
fn f64_div(x: u64, d: u64) -> u64 {
    if (f64_is_nan(x)) {
        return x | F64_QUIET;
    }
    let xa = x & F64_ABS;
    if (xa == F64_INF || xa == 0lu) {
        return x;
    }
    let px = f64_parts(x);
    var mx = px.m;
    var ex = px.e;
    let md = (d & F64_MAN) | (F64_MAN + 1lu);
    let ed = i32(f64_field(d));
    if (mx < md) {
        mx = mx << 1u;
        ex -= 1;
    }
    var q = 1lu;
    var r = mx - md;
    for (var i = 0u; i < 5u; i++) {
        r = r << 11u;
        q = (q << 11u) | (r / md);
        r = r % md;
    }
    return f64_pack(x & F64_SIGN, ex - ed + 1023, q | sticky64(r));
}
