// f16, bf16 and fp8 <-> f32 conversions in integer code, bit-identical to the host: the
// `half` crate's to_f32/from_f32 (which match the x86 F16C instructions it uses when
// present) and devccl's fp8 rules (core/src/dtype.rs): round to nearest even once,
// subnormals kept, NaN payloads and overflow handled the host's way.

fn f16_to_f32(h: u32) -> u32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0x1fu) {
        if (m == 0u) {
            return s | 0x7f800000u;
        }
        return s | 0x7fc00000u | (m << 13u);
    }
    if (e == 0u) {
        if (m == 0u) {
            return s;
        }
        // Subnormal: m * 2^-24 with its leading one at bit p.
        let p = 31u - countLeadingZeros(m);
        return s | ((p + 103u) << 23u) | ((m << (23u - p)) & 0x7fffffu);
    }
    return s | ((e + 112u) << 23u) | (m << 13u);
}

fn f32_to_f16(x: u32) -> u32 {
    let s = (x >> 16u) & 0x8000u;
    let ex = x & 0x7f800000u;
    let man = x & 0x7fffffu;
    if (ex == 0x7f800000u) {
        return s | 0x7c00u | select(0u, 0x200u, man != 0u) | (man >> 13u);
    }
    let he = i32(ex >> 23u) - 127 + 15;
    if (he >= 31) {
        return s | 0x7c00u;
    }
    if (he <= 0) {
        if (14 - he > 24) {
            return s;
        }
        let m = man | 0x800000u;
        var hm = m >> u32(14 - he);
        let rb = 1u << u32(13 - he);
        if ((m & rb) != 0u && (m & (3u * rb - 1u)) != 0u) {
            hm += 1u;
        }
        return s | hm;
    }
    let r = s | (u32(he) << 10u) | (man >> 13u);
    if ((man & 0x1000u) != 0u && (man & 0x2fffu) != 0u) {
        return r + 1u;
    }
    return r;
}

fn bf16_to_f32(h: u32) -> u32 {
    if ((h & 0x7fffu) > 0x7f80u) {
        return (h | 0x40u) << 16u;
    }
    return h << 16u;
}

fn f32_to_bf16(x: u32) -> u32 {
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return ((x >> 16u) | 0x40u) & 0xffffu;
    }
    if ((x & 0x8000u) != 0u && (x & 0x17fffu) != 0u) {
        return (x >> 16u) + 1u;
    }
    return x >> 16u;
}

// An 8-bit float with `man` mantissa bits and exponent `bias` to f32 (exact); `has_inf`:
// E5M2 (IEEE-like), else E4M3 (no infinity, NaN = 0x7f / 0xff).
fn f8_to_f32(b: u32, man: u32, bias: i32, has_inf: bool) -> u32 {
    let s = (b & 0x80u) << 24u;
    let mag = b & 0x7fu;
    let ef = mag >> man;
    let m = mag & ((1u << man) - 1u);
    if (has_inf && ef == (1u << (7u - man)) - 1u) {
        if (m == 0u) {
            return s | 0x7f800000u;
        }
        return s | 0x7fc00000u;
    }
    if (!has_inf && mag == 0x7fu) {
        return s | 0x7fc00000u;
    }
    if (ef == 0u) {
        if (m == 0u) {
            return s;
        }
        let p = 31u - countLeadingZeros(m);
        let e = i32(p) + 1 - bias - i32(man) + 127;
        return s | (u32(e) << 23u) | ((m << (23u - p)) & 0x7fffffu);
    }
    return s | (u32(i32(ef) - bias + 127) << 23u) | (m << (23u - man));
}

// f32 to an 8-bit float, round to nearest even once (a port of dtype.rs's f32_to_f8).
fn f32_to_f8(x: u32, man: u32, bias: i32, has_inf: bool) -> u32 {
    let s = (x >> 24u) & 0x80u;
    let ax = x & 0x7fffffffu;
    var max_finite = 0x7eu;
    var overflow = 0x7fu;
    if (has_inf) {
        max_finite = 0x7bu;
        overflow = 0x7cu;
    }
    if (ax > 0x7f800000u) {
        return s | 0x7fu;
    }
    if (ax == 0x7f800000u) {
        return s | overflow;
    }
    if (ax < 0x800000u) {
        return s;
    }
    let e = i32(ax >> 23u) - 127;
    let m = (ax & 0x7fffffu) | 0x800000u;
    let emin = 1 - bias;
    if (e > 16) {
        return s | overflow;
    }
    var shift = i32(23u - man);
    if (e < emin) {
        shift += emin - e;
    }
    // The host allows shifts up to 40; from 25 on, everything rounds to zero.
    if (shift > 24) {
        return s;
    }
    let sh = u32(shift);
    var q = m >> sh;
    let rem = m & ((1u << sh) - 1u);
    let tie = 1u << (sh - 1u);
    if (rem > tie || (rem == tie && (q & 1u) == 1u)) {
        q += 1u;
    }
    var mag = q;
    if (e >= emin) {
        mag = (u32(e - emin) << man) + q;
    }
    if (mag > max_finite) {
        return s | overflow;
    }
    return s | mag;
}
