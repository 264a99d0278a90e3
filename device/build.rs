//! Build script: compiles the Vulkan backend's WGSL compute shaders (`shaders/`) to SPIR-V with
//! naga (feature `vulkan`), one module per dtype, into `$OUT_DIR/<dtype>.spv`.
//!
//! Each module is assembled from shared pieces plus a small dtype header (element size, the
//! element <-> f32 codec or the integer comparisons), parsed, validated with exactly the
//! capabilities it needs (f64 and the 64-bit integers are separate modules, so a device
//! without shaderFloat64 / shaderInt64 still runs the others) and written as SPIR-V 1.0.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "vulkan")]
    shaders::build();
}

#[cfg(feature = "vulkan")]
mod shaders {
    use std::path::{Path, PathBuf};

    use naga::valid::{Capabilities, ValidationFlags, Validator};

    /// One dtype's module: name (the file stem), header, pieces, capabilities.
    struct Variant {
        name: &'static str,
        header: String,
        pieces: &'static [&'static str],
        caps: Capabilities,
    }

    const NARROW_FLOAT: &[&str] = &["common", "f32", "narrow", "float", "word"];
    const INT32: &[&str] = &["common", "int", "word"];
    const INT64: &[&str] = &["common", "wide", "int64"];

    fn elem_consts(eb: u32) -> String {
        format!("const EB: u32 = {eb}u;\nconst EMASK: u32 = {:#x}u;\n", u32::MAX >> (32 - 8 * eb))
    }

    fn float_header(eb: u32, dec: &str, enc: &str) -> String {
        elem_consts(eb)
            + &format!("fn dec(x: u32) -> u32 {{ return {dec}; }}\nfn enc(x: u32) -> u32 {{ return {enc}; }}\n")
    }

    fn int_header(eb: u32, lt: &str, div: &str) -> String {
        elem_consts(eb)
            + &format!(
                "fn ilt(x: u32, y: u32) -> bool {{ return {lt}; }}\nfn idiv(x: u32, d: u32) -> u32 {{ return {div}; }}\n"
            )
    }

    fn int64_header(lt: &str, div: &str) -> String {
        format!(
            "fn lt64(x: u64, y: u64) -> bool {{ return {lt}; }}\nfn div64(x: u64, d: u64) -> u64 {{ return {div}; }}\n"
        )
    }

    fn variants() -> Vec<Variant> {
        let base = Capabilities::IMMEDIATES;
        let i64c = base | Capabilities::SHADER_INT64;
        let sext8 = |v: &str| format!("(bitcast<i32>({v} << 24u) >> 24u)");
        vec![
            Variant { name: "f32", header: float_header(4, "x", "x"), pieces: NARROW_FLOAT, caps: base },
            Variant {
                name: "f16",
                header: float_header(2, "f16_to_f32(x)", "f32_to_f16(x)"),
                pieces: NARROW_FLOAT,
                caps: base,
            },
            Variant {
                name: "bf16",
                header: float_header(2, "bf16_to_f32(x)", "f32_to_bf16(x)"),
                pieces: NARROW_FLOAT,
                caps: base,
            },
            Variant {
                name: "f8e4m3",
                header: float_header(1, "f8_to_f32(x, 3u, 7, false)", "f32_to_f8(x, 3u, 7, false)"),
                pieces: NARROW_FLOAT,
                caps: base,
            },
            Variant {
                name: "f8e5m2",
                header: float_header(1, "f8_to_f32(x, 2u, 15, true)", "f32_to_f8(x, 2u, 15, true)"),
                pieces: NARROW_FLOAT,
                caps: base,
            },
            Variant {
                name: "i8",
                header: int_header(
                    1,
                    &format!("{} < {}", sext8("x"), sext8("y")),
                    &format!("bitcast<u32>({} / bitcast<i32>(d))", sext8("x")),
                ),
                pieces: INT32,
                caps: base,
            },
            Variant { name: "u8", header: int_header(1, "x < y", "x / d"), pieces: INT32, caps: base },
            Variant {
                name: "i32",
                header: int_header(
                    4,
                    "bitcast<i32>(x) < bitcast<i32>(y)",
                    "bitcast<u32>(bitcast<i32>(x) / bitcast<i32>(d))",
                ),
                pieces: INT32,
                caps: base,
            },
            Variant { name: "u32", header: int_header(4, "x < y", "x / d"), pieces: INT32, caps: base },
            Variant {
                name: "i64",
                header: int64_header(
                    "bitcast<i64>(x) < bitcast<i64>(y)",
                    "bitcast<u64>(bitcast<i64>(x) / bitcast<i64>(d))",
                ),
                pieces: INT64,
                caps: i64c,
            },
            Variant { name: "u64", header: int64_header("x < y", "x / d"), pieces: INT64, caps: i64c },
            Variant {
                name: "f64",
                header: String::new(),
                pieces: &["common", "wide", "f64", "float64"],
                caps: i64c | Capabilities::FLOAT64,
            },
        ]
    }

    /// The NaN the host CPU produces for invalid operations (inf - inf, 0 * inf): x86's
    /// "default NaN" has the sign bit set, other architectures' does not.
    fn default_nans(with64: bool) -> String {
        let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
        let x86 = arch == "x86_64" || arch == "x86";
        let mut s = format!("const DEFAULT_NAN32: u32 = {};\n", if x86 { "0xffc00000u" } else { "0x7fc00000u" });
        if with64 {
            let n = if x86 { "0xfff8000000000000lu" } else { "0x7ff8000000000000lu" };
            s += &format!("const DEFAULT_NAN64: u64 = {n};\n");
        }
        s
    }

    fn compile(dir: &Path, out: &Path, v: &Variant) {
        let mut src = format!("// devccl Vulkan shader module `{}` (generated by build.rs).\n", v.name);
        src += &default_nans(v.caps.contains(Capabilities::SHADER_INT64));
        src += &v.header;
        for piece in v.pieces {
            let path = dir.join(format!("{piece}.wgsl"));
            src += &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            src.push('\n');
        }
        let name = format!("{}.wgsl", v.name);
        std::fs::write(out.join(&name), &src).expect("write generated WGSL");
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("shader {}:\n{}", v.name, e.emit_to_string_with_path(&src, &name)));
        let info = Validator::new(ValidationFlags::all(), v.caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("shader {}:\n{}", v.name, e.emit_to_string_with_path(&src, &name)));
        let mut opts = naga::back::spv::Options {
            lang_version: (1, 0),
            flags: naga::back::spv::WriterFlags::empty(),
            force_loop_bounding: false,
            ..Default::default()
        };
        // Clamp indices: every access is in bounds by construction, this is a second fence.
        opts.bounds_check_policies.index = naga::proc::BoundsCheckPolicy::Restrict;
        opts.bounds_check_policies.buffer = naga::proc::BoundsCheckPolicy::Restrict;
        let words = naga::back::spv::write_vec(&module, &info, &opts, None)
            .unwrap_or_else(|e| panic!("shader {}: SPIR-V output: {e}", v.name));
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(out.join(format!("{}.spv", v.name)), bytes).expect("write SPIR-V");
    }

    pub fn build() {
        let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let dir = manifest.join("shaders");
        println!("cargo:rerun-if-changed={}", dir.display());
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        for v in variants() {
            compile(&dir, &out, &v);
        }
    }
}
