// Element operations of the float dtypes computed in f32 (f32, f16, bf16, fp8): the module's
// header defines `dec` (element bits to f32 bits, exact) and `enc` (f32 bits to the element,
// rounded once). Min and max compare the widened values and return an operand's own bits.

fn elem_combine(op: u32, a: u32, b: u32) -> u32 {
    let x = dec(a);
    let y = dec(b);
    if (op == OP_SUM) {
        return enc(f32_add(x, y));
    }
    if (op == OP_PROD) {
        return enc(f32_mul(x, y));
    }
    if (op == OP_MIN) {
        if (f32_lt(x, y) || f32_is_nan(x)) {
            return a;
        }
        return b;
    }
    if (f32_lt(y, x) || f32_is_nan(x)) {
        return a;
    }
    return b;
}

// a / n: f32 division (pc.div_lo holds `n as f32`), rounded once to the element type.
fn elem_div(a: u32) -> u32 {
    return enc(f32_div(dec(a), pc.div_lo));
}
