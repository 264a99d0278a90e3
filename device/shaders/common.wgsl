// Shared by every dtype module: push constants, bindings, invocation index, byte-level loads
// and stores on `array<u32>` bindings, and the fragment lookup of the fused gather-and-reduce.
//
// Storage is bound as 32-bit words only (no 8/16-bit storage features needed). Offsets and
// lengths arrive as byte counts relative to each binding's window; an operand that does not
// start on a word boundary is read by funnel-shifting two words. Each invocation owns one
// destination word (8-byte dtypes: one 8-byte element); a word only partly inside the
// destination is read-modify-written by exactly that invocation, so neighbouring bytes
// outside the destination are written back unchanged.

struct Params {
    // First destination byte, relative to the `dst` binding.
    dst_off: u32,
    // Destination bytes in this dispatch (> 0).
    nbytes: u32,
    // First byte of operand `a` (reduce: a; gather_reduce: base), relative to its binding.
    a_off: u32,
    // First byte of operand `b` (reduce), relative to its binding.
    b_off: u32,
    // Combining operator: 0 sum, 1 prod, 2 min, 3 max.
    op: u32,
    // FLAG_FINISH: divide by n afterwards; FLAG_SOFT: exact integer float paths only;
    // FLAG_FLUSH: act like a device that flushes subnormal results (the last two for tests).
    flags: u32,
    // The divisor n: floats get the bits of `n as f32` / `n as f64`, integers n itself
    // (0 when n does not fit the type: the quotient is then 0).
    div_lo: u32,
    div_hi: u32,
    // gather_reduce: this dispatch's fragment table (entries of 4 words: dst byte relative to
    // `dst_off`, pool byte relative to the `opb` binding, length, unused).
    frag_first: u32,
    nfrag: u32,
}

var<immediate> pc: Params;

@group(0) @binding(0) var<storage, read_write> dst: array<u32>;
@group(0) @binding(1) var<storage, read> opa: array<u32>;
@group(0) @binding(2) var<storage, read> opb: array<u32>;
@group(0) @binding(3) var<storage, read> frags: array<u32>;

const OP_SUM: u32 = 0u;
const OP_PROD: u32 = 1u;
const OP_MIN: u32 = 2u;
const FLAG_FINISH: u32 = 1u;
const FLAG_SOFT: u32 = 2u;
const FLAG_FLUSH: u32 = 4u;
const WG: u32 = 256u;

// Linear invocation index of a (possibly 2-D) dispatch.
fn invocation(wg: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + li;
}

// The low `n` bytes set (n in 1..=4).
fn lowmask(n: u32) -> u32 {
    if (n >= 4u) {
        return 0xffffffffu;
    }
    return (1u << (n * 8u)) - 1u;
}

// `n` bytes (1..=4) of `opa` from byte `p`, in the low bytes of the result.
fn fetch_a(p: u32, n: u32) -> u32 {
    let w = p >> 2u;
    let s = (p & 3u) * 8u;
    var v = opa[w] >> s;
    if (s != 0u && (p & 3u) + n > 4u) {
        v |= opa[w + 1u] << (32u - s);
    }
    return v & lowmask(n);
}

// As `fetch_a`, from `opb`.
fn fetch_b(p: u32, n: u32) -> u32 {
    let w = p >> 2u;
    let s = (p & 3u) * 8u;
    var v = opb[w] >> s;
    if (s != 0u && (p & 3u) + n > 4u) {
        v |= opb[w + 1u] << (32u - s);
    }
    return v & lowmask(n);
}

// Write bytes lo..hi (within the word) of `v` into destination word `w`.
fn store_word(w: u32, v: u32, lo: u32, hi: u32) {
    if (lo == 0u && hi == 4u) {
        dst[w] = v;
        return;
    }
    let m = lowmask(hi - lo) << (lo * 8u);
    dst[w] = (dst[w] & ~m) | (v & m);
}

// The destination word an invocation owns and the bytes of it inside the destination.
struct Unit {
    ok: bool,
    // Word index in `dst`.
    w: u32,
    // Byte range inside the word.
    lo: u32,
    hi: u32,
    // Destination byte of `lo`, relative to the first destination byte.
    rel: u32,
}

fn unit_of(idx: u32) -> Unit {
    var u: Unit;
    let first = pc.dst_off >> 2u;
    let end = pc.dst_off + pc.nbytes;
    let last = (end - 1u) >> 2u;
    u.ok = idx <= last - first;
    if (!u.ok) {
        return u;
    }
    u.w = first + idx;
    let wb = u.w * 4u;
    let lo = max(pc.dst_off, wb);
    let hi = min(end, wb + 4u);
    u.lo = lo - wb;
    u.hi = hi - wb;
    u.rel = lo - pc.dst_off;
    return u;
}

// `n` bytes (1..=4) of the gathered stream from destination-relative byte `rel`: find the
// fragment holding `rel` (binary search; the table is sorted by destination byte and covers
// the dispatch exactly once) and read on through the following fragments.
fn gathered(rel: u32, n: u32) -> u32 {
    var lo = 0u;
    var hi = pc.nfrag;
    while (hi - lo > 1u) {
        let mid = (lo + hi) >> 1u;
        if (frags[(pc.frag_first + mid) * 4u] <= rel) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    var i = lo;
    var got = 0u;
    var out = 0u;
    while (got < n && i < pc.nfrag) {
        let e = (pc.frag_first + i) * 4u;
        let off = rel + got - frags[e];
        let take = min(frags[e + 2u] - off, n - got);
        out |= fetch_b(frags[e + 1u] + off, take) << (got * 8u);
        got += take;
        i += 1u;
    }
    return out;
}
