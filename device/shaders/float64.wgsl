// Element operations of f64 (exact, see f64.wgsl).

fn elem64_combine(op: u32, a: u64, b: u64) -> u64 {
    if (op == OP_SUM) {
        return f64_add(a, b);
    }
    if (op == OP_PROD) {
        return f64_mul(a, b);
    }
    if (op == OP_MIN) {
        return f64_min(a, b);
    }
    return f64_max(a, b);
}

// a / n (pc.div_lo/div_hi hold the bits of `n as f64`).
fn elem64_div(a: u64) -> u64 {
    return f64_div(a, join64(pc.div_lo, pc.div_hi));
}
