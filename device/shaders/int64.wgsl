// Element operations of i64 and u64 (needs shaderInt64): wrapping sum and product, min/max by
// the header's `lt64`, truncating division by `div64` (n in div_lo/div_hi; 0 when n does not
// fit the type).

fn elem64_combine(op: u32, a: u64, b: u64) -> u64 {
    if (op == OP_SUM) {
        return a + b;
    }
    if (op == OP_PROD) {
        return a * b;
    }
    if (op == OP_MIN) {
        if (lt64(b, a)) {
            return b;
        }
        return a;
    }
    if (lt64(a, b)) {
        return b;
    }
    return a;
}

fn elem64_div(a: u64) -> u64 {
    let n = join64(pc.div_lo, pc.div_hi);
    if (n == 0lu) {
        return 0lu;
    }
    return div64(a, n);
}
