// Entry points for 8-byte dtypes. The dtype's module defines `elem64_combine(op, a, b)` and
// `elem64_div(a)` on u64 bits. Offsets are multiples of 8 and every binding window starts on
// a 16-byte boundary, so each element is two whole words.

fn join64(lo: u32, hi: u32) -> u64 {
    return u64(lo) | (u64(hi) << 32u);
}

fn store64(w: u32, v: u64) {
    dst[w] = u32(v & 0xfffffffflu);
    dst[w + 1u] = u32(v >> 32u);
}

// dst = a op b (then / n when FLAG_FINISH).
@compute @workgroup_size(256)
fn reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let step = nwg.x * nwg.y * WG;
    for (var idx = invocation(wg, nwg, li); idx < pc.nbytes / 8u; idx += step) {
        let rel = idx * 8u;
        let pa = (pc.a_off + rel) >> 2u;
        let pb = (pc.b_off + rel) >> 2u;
        var r = elem64_combine(pc.op, join64(opa[pa], opa[pa + 1u]), join64(opb[pb], opb[pb + 1u]));
        if ((pc.flags & FLAG_FINISH) != 0u) {
            r = elem64_div(r);
        }
        store64((pc.dst_off + rel) >> 2u, r);
    }
}

// dst /= n.
@compute @workgroup_size(256)
fn finish_avg(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let step = nwg.x * nwg.y * WG;
    for (var idx = invocation(wg, nwg, li); idx < pc.nbytes / 8u; idx += step) {
        let w = (pc.dst_off + idx * 8u) >> 2u;
        store64(w, elem64_div(join64(dst[w], dst[w + 1u])));
    }
}

// dst = base op gathered (base in `opa`, the pool in `opb`), then / n when FLAG_FINISH.
@compute @workgroup_size(256)
fn gather_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let step = nwg.x * nwg.y * WG;
    for (var idx = invocation(wg, nwg, li); idx < pc.nbytes / 8u; idx += step) {
        let rel = idx * 8u;
        let pa = (pc.a_off + rel) >> 2u;
        let b = join64(gathered(rel, 4u), gathered(rel + 4u, 4u));
        var r = elem64_combine(pc.op, join64(opa[pa], opa[pa + 1u]), b);
        if ((pc.flags & FLAG_FINISH) != 0u) {
            r = elem64_div(r);
        }
        store64((pc.dst_off + rel) >> 2u, r);
    }
}
