// Entry points for dtypes of 1, 2 or 4 bytes. The dtype's module defines `EB` (element bytes),
// `EMASK` (the element's bits), `elem_combine(op, a, b)` and `elem_div(a)` on one element's bits
// (in the low bits of a u32). Byte offsets are multiples of `EB`, so elements never straddle
// words. Each entry point loops over the destination words with the grid's stride (the host
// caps the grid); each word is handled by exactly one invocation.

// Combine the elements in bytes lo..hi of two words.
fn combine_word(op: u32, a: u32, b: u32, lo: u32, hi: u32) -> u32 {
    if (EB == 4u) {
        return elem_combine(op, a, b);
    }
    let m = EMASK;
    var r = 0u;
    for (var k = lo; k < hi; k += EB) {
        let s = k * 8u;
        r |= (elem_combine(op, (a >> s) & m, (b >> s) & m) & m) << s;
    }
    return r;
}

// Divide the elements in bytes lo..hi of a word by n.
fn div_word(a: u32, lo: u32, hi: u32) -> u32 {
    if (EB == 4u) {
        return elem_div(a);
    }
    let m = EMASK;
    var r = 0u;
    for (var k = lo; k < hi; k += EB) {
        let s = k * 8u;
        r |= (elem_div((a >> s) & m) & m) << s;
    }
    return r;
}

// dst = a op b (then / n when FLAG_FINISH).
fn reduce_unit(u: Unit) {
    let n = u.hi - u.lo;
    let sh = u.lo * 8u;
    let a = fetch_a(pc.a_off + u.rel, n) << sh;
    let b = fetch_b(pc.b_off + u.rel, n) << sh;
    var r = combine_word(pc.op, a, b, u.lo, u.hi);
    if ((pc.flags & FLAG_FINISH) != 0u) {
        r = div_word(r, u.lo, u.hi);
    }
    store_word(u.w, r, u.lo, u.hi);
}

@compute @workgroup_size(256)
fn reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let step = nwg.x * nwg.y * WG;
    for (var i = invocation(wg, nwg, li); ; i += step) {
        let u = unit_of(i);
        if (!u.ok) {
            break;
        }
        reduce_unit(u);
    }
}

// dst /= n.
fn finish_unit(u: Unit) {
    store_word(u.w, div_word(dst[u.w], u.lo, u.hi), u.lo, u.hi);
}

@compute @workgroup_size(256)
fn finish_avg(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let step = nwg.x * nwg.y * WG;
    for (var i = invocation(wg, nwg, li); ; i += step) {
        let u = unit_of(i);
        if (!u.ok) {
            break;
        }
        finish_unit(u);
    }
}

// dst = base op gathered (base in `opa`, the fragments' pool in `opb`), then / n when
// FLAG_FINISH.
fn gather_reduce_unit(u: Unit) {
    let n = u.hi - u.lo;
    let sh = u.lo * 8u;
    let a = fetch_a(pc.a_off + u.rel, n) << sh;
    let b = gathered(u.rel, n) << sh;
    var r = combine_word(pc.op, a, b, u.lo, u.hi);
    if ((pc.flags & FLAG_FINISH) != 0u) {
        r = div_word(r, u.lo, u.hi);
    }
    store_word(u.w, r, u.lo, u.hi);
}

@compute @workgroup_size(256)
fn gather_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let step = nwg.x * nwg.y * WG;
    for (var i = invocation(wg, nwg, li); ; i += step) {
        let u = unit_of(i);
        if (!u.ok) {
            break;
        }
        gather_reduce_unit(u);
    }
}
