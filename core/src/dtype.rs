//! Element types.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The element types devccl reduces and moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// IEEE 754 binary64.
    F64 = 1,
    /// IEEE 754 binary16.
    F16 = 2,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16 = 3,
    /// Signed 8-bit integer.
    I8 = 4,
    /// Unsigned 8-bit integer.
    U8 = 5,
    /// Signed 32-bit integer.
    I32 = 6,
    /// Signed 64-bit integer.
    I64 = 7,
    /// Unsigned 32-bit integer.
    U32 = 8,
    /// Unsigned 64-bit integer.
    U64 = 9,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, no infinities (OCP E4M3, torch
    /// `float8_e4m3fn`, NCCL `ncclFloat8e4m3`).
    F8E4M3 = 10,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits, IEEE-like (torch `float8_e5m2`,
    /// NCCL `ncclFloat8e5m2`).
    F8E5M2 = 11,
}

impl DType {
    /// Every dtype, in wire-code order.
    pub const ALL: [DType; 12] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::U8,
        DType::I32,
        DType::I64,
        DType::U32,
        DType::U64,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// The name nccl-tests prints in its `type` column.
    pub const fn nccl_name(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::F16 => "half",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
        }
    }

    /// The short name (`f32`, `u64`, `f8e4m3`, ...), as accepted by `FromStr`.
    pub const fn short_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
        }
    }

    /// True for floating-point types.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2)
    }

    /// Decode the wire code.
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.get(code as usize).copied()
    }

    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.nccl_name())
    }
}

impl FromStr for DType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float" | "float32" => DType::F32,
            "f64" | "double" | "float64" => DType::F64,
            "f16" | "half" | "float16" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "i8" | "int8" => DType::I8,
            "u8" | "uint8" => DType::U8,
            "i32" | "int32" | "int" => DType::I32,
            "i64" | "int64" => DType::I64,
            "u32" | "uint32" => DType::U32,
            "u64" | "uint64" => DType::U64,
            "f8e4m3" | "fp8_e4m3" | "float8_e4m3fn" | "e4m3" => DType::F8E4M3,
            "f8e5m2" | "fp8_e5m2" | "float8_e5m2" | "e5m2" => DType::F8E5M2,
            _ => {
                return Err(Error::usage(format!(
                    "unknown dtype '{s}' (expected one of {})",
                    DType::ALL.map(|d| d.short_name()).join(" ")
                )));
            }
        })
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that maps to a [`DType`]. Sealed: implemented for exactly the dtypes above.
pub trait Element: bytemuck::Pod + Send + Sync + PartialEq + fmt::Debug + 'static + sealed::Sealed {
    /// The matching dtype.
    const DTYPE: DType;
}

macro_rules! element {
    ($t:ty, $d:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = $d;
        }
    };
}
element!(f32, DType::F32);
element!(f64, DType::F64);
element!(half::f16, DType::F16);
element!(half::bf16, DType::BF16);
element!(i8, DType::I8);
element!(u8, DType::U8);
element!(i32, DType::I32);
element!(i64, DType::I64);
element!(u32, DType::U32);
element!(u64, DType::U64);
element!(F8E4M3, DType::F8E4M3);
element!(F8E5M2, DType::F8E5M2);

/// Round an f32 to an 8-bit float with `man` mantissa bits and exponent `bias`, to nearest
/// even (once). NaN becomes `0x7f` (with the sign); overflow becomes NaN for E4M3 (it has no
/// infinity, like torch's `float8_e4m3fn` and CUDA's non-saturating conversion) and
/// infinity for E5M2.
const fn f32_to_f8(x: f32, man: u32, bias: i32, has_inf: bool) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7fff_ffff;
    let (max_finite, overflow) = if has_inf { (0x7b_u32, 0x7c_u8) } else { (0x7e_u32, 0x7f_u8) };
    if abs > 0x7f80_0000 {
        return sign | 0x7f;
    }
    if abs == 0x7f80_0000 {
        return sign | overflow;
    }
    if abs < 0x0080_0000 {
        // f32 subnormals are far below the smallest 8-bit subnormal: they round to zero.
        return sign;
    }
    let e = (abs >> 23) as i32 - 127;
    let m = ((abs & 0x7f_ffff) | 0x80_0000) as u64;
    let emin = 1 - bias;
    if e > 16 {
        return sign | overflow;
    }
    let shift = if e >= emin { (23 - man) as i32 } else { (23 - man) as i32 + (emin - e) };
    if shift > 40 {
        return sign;
    }
    let shift = shift as u32;
    let mut q = m >> shift;
    let rem = m & ((1u64 << shift) - 1);
    let half = 1u64 << (shift - 1);
    if rem > half || (rem == half && q & 1 == 1) {
        q += 1;
    }
    let mag = if e >= emin { (((e - emin) as u64) << man) + q } else { q };
    if mag > max_finite as u64 {
        return sign | overflow;
    }
    sign | mag as u8
}

/// Widen an 8-bit float to f32 (exact).
fn f8_to_f32(b: u8, man: u32, bias: i32, has_inf: bool) -> f32 {
    let neg = b & 0x80 != 0;
    let mag = b & 0x7f;
    let emax_field = (1u8 << (7 - man)) - 1;
    let e_field = mag >> man;
    let m = (mag & ((1 << man) - 1)) as f32;
    let v = if has_inf && e_field == emax_field {
        if m == 0.0 { f32::INFINITY } else { f32::NAN }
    } else if !has_inf && mag == 0x7f {
        f32::NAN
    } else if e_field == 0 {
        m * 2f32.powi(1 - bias - man as i32)
    } else {
        (1.0 + m / (1u32 << man) as f32) * 2f32.powi(e_field as i32 - bias)
    };
    if neg { -v } else { v }
}

macro_rules! fp8 {
    ($name:ident, $man:expr, $bias:expr, $inf:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
        #[repr(transparent)]
        pub struct $name(pub u8);

        impl $name {
            /// Round to nearest even from f32.
            pub const fn from_f32(x: f32) -> Self {
                $name(f32_to_f8(x, $man, $bias, $inf))
            }
            /// Widen to f32 (exact).
            pub fn to_f32(self) -> f32 {
                f8_to_f32(self.0, $man, $bias, $inf)
            }
            /// The raw bits.
            pub const fn to_bits(self) -> u8 {
                self.0
            }
            /// From raw bits.
            pub const fn from_bits(b: u8) -> Self {
                $name(b)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#04x})", self.to_f32(), self.0)
            }
        }
    };
}
fp8!(F8E4M3, 3, 7, false, "An OCP FP8 E4M3 value (torch `float8_e4m3fn`): max 448, NaN = `0x7f`, no infinity.");
fp8!(F8E5M2, 2, 15, true, "An FP8 E5M2 value (torch `float8_e5m2`): max 57344, IEEE infinities and NaNs.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_sizes() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(d.nccl_name().parse::<DType>().unwrap(), d);
        }
        assert_eq!(DType::from_code(12), None);
        assert_eq!(DType::BF16.size(), 2);
        assert_eq!(<half::bf16 as Element>::DTYPE, DType::BF16);
        assert!("f128".parse::<DType>().is_err());
        for d in DType::ALL {
            assert_eq!(d.short_name().parse::<DType>().unwrap(), d);
        }
    }

    #[test]
    fn fp8_round_trips_every_code() {
        for b in 0..=255u8 {
            let (x, y) = (F8E4M3(b), F8E5M2(b));
            if !x.to_f32().is_nan() {
                assert_eq!(F8E4M3::from_f32(x.to_f32()), x, "e4m3 {b:#x}");
            }
            if !y.to_f32().is_nan() {
                assert_eq!(F8E5M2::from_f32(y.to_f32()), y, "e5m2 {b:#x}");
            }
        }
    }

    #[test]
    fn fp8_rounding_and_overflow_match_torch() {
        // Values checked against torch 2.11 `.to(torch.float8_e4m3fn / float8_e5m2)`.
        assert_eq!(F8E4M3::from_f32(448.0).0, 0x7e);
        assert_eq!(F8E4M3::from_f32(464.0).0, 0x7e, "tie rounds to even (448)");
        assert_eq!(F8E4M3::from_f32(470.0).0, 0x7f, "past the tie: NaN (no infinity)");
        assert_eq!(F8E4M3::from_f32(-1e9).0, 0xff);
        assert_eq!(F8E4M3::from_f32(1.0).0, 0x38);
        assert_eq!(F8E4M3::from_f32(2f32.powi(-9)).0, 0x01, "smallest subnormal");
        assert_eq!(F8E4M3::from_f32(2f32.powi(-10)).0, 0x00, "half of it ties to even: zero");
        assert_eq!(F8E4M3::from_f32(1.0625).0, 0x38, "1 + 1/16 ties to even");
        assert_eq!(F8E4M3::from_f32(1.1875).0, 0x3a, "1 + 3/16 ties up to 1.25");
        assert_eq!(F8E5M2::from_f32(57344.0).0, 0x7b);
        assert_eq!(F8E5M2::from_f32(61440.0).0, 0x7c, "tie at the top rounds to infinity");
        assert_eq!(F8E5M2::from_f32(f32::INFINITY).0, 0x7c);
        assert_eq!(F8E5M2::from_f32(f32::NAN).0, 0x7f);
        assert_eq!(F8E5M2::from_f32(2f32.powi(-16)).0, 0x01);
        assert!(F8E5M2(0x7d).to_f32().is_nan());
        assert_eq!(F8E5M2(0xfc).to_f32(), f32::NEG_INFINITY);
        assert!(F8E4M3(0x7f).to_f32().is_nan());
    }
}
