// Element operations of the 1- and 4-byte integer dtypes: wrapping sum and product (the caller
// keeps the element's low bits), min/max by the header's `ilt`, truncating division by
// `idiv` (pc.div_lo = n, or 0 when n does not fit the type: the quotient is then 0).

fn elem_combine(op: u32, a: u32, b: u32) -> u32 {
    if (op == OP_SUM) {
        return a + b;
    }
    if (op == OP_PROD) {
        return a * b;
    }
    if (op == OP_MIN) {
        if (ilt(b, a)) {
            return b;
        }
        return a;
    }
    if (ilt(a, b)) {
        return b;
    }
    return a;
}

fn elem_div(a: u32) -> u32 {
    if (pc.div_lo == 0u) {
        return 0u;
    }
    return idiv(a, pc.div_lo);
}
