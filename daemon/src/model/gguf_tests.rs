//! Tests for `gguf.rs`: synthetic files from a small writer below, and the real SmolLM2 file
//! checked against values derived with gguf-py (`smollm2_derived.json`, made by `make_derived.py`).

use std::path::PathBuf;

use edgelora_kernels::{Q4Kind, Weight};
use half::f16;
use serde_json::Value;

use crate::model::gguf::{GgufError, GgufFile, GgufValue, unpermute_qk};

/// Fixture root, relative to this crate's manifest. Repoint here when the crate moves.
const FIXTURES_DIR: &str = "../tests/fixtures";

/// `rel` under the fixture root, e.g. `smollm2/golden.json` or
/// `smollm2-derived/smollm2_derived.json`.
pub(crate) fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(FIXTURES_DIR)
        .join(rel)
}

pub(crate) fn derived() -> Value {
    let p = fixture_path("smollm2-derived/smollm2_derived.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("derived fixture is JSON")
}

/// The real SmolLM2 GGUF, or `None` (after a loud note) when it is not on this machine.
pub(crate) fn real_model() -> Option<GgufFile> {
    let path = crate::default_model::model_path();
    if !path.exists() {
        eprintln!(
            "SKIPPED: SmolLM2 GGUF not found at {} (set EDGELORA_SMOLLM2_GGUF)",
            path.display()
        );
        return None;
    }
    Some(GgufFile::open(&path).expect("real SmolLM2 GGUF opens"))
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("u32") as u32)
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

// ---- a minimal GGUF writer -------------------------------------------------------------------------

pub(crate) struct TestTensor {
    pub name: &'static str,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(b: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => b.push(*x),
        GgufValue::I8(x) => b.extend(x.to_le_bytes()),
        GgufValue::U16(x) => b.extend(x.to_le_bytes()),
        GgufValue::I16(x) => b.extend(x.to_le_bytes()),
        GgufValue::U32(x) => b.extend(x.to_le_bytes()),
        GgufValue::I32(x) => b.extend(x.to_le_bytes()),
        GgufValue::F32(x) => b.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => b.push(*x as u8),
        GgufValue::String(s) => put_str(b, s),
        GgufValue::Array(a) => {
            b.extend(a.first().map_or(0, value_type).to_le_bytes());
            b.extend((a.len() as u64).to_le_bytes());
            a.iter().for_each(|e| put_value(b, e));
        }
        GgufValue::U64(x) => b.extend(x.to_le_bytes()),
        GgufValue::I64(x) => b.extend(x.to_le_bytes()),
        GgufValue::F64(x) => b.extend(x.to_le_bytes()),
    }
}

/// A GGUF image: header, metadata, tensor infos, then each tensor's data at the next multiple of
/// the alignment (`general.alignment` if given as u32, else 32). The file ends with the last tensor.
pub(crate) fn write_gguf(
    version: u32,
    kvs: &[(&str, GgufValue)],
    tensors: &[TestTensor],
) -> Vec<u8> {
    let align = kvs
        .iter()
        .find_map(|(k, v)| match (*k, v) {
            ("general.alignment", GgufValue::U32(a)) => Some(*a as usize),
            _ => None,
        })
        .unwrap_or(32);
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        b.extend(value_type(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut b, t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(t.ty.to_le_bytes());
        b.extend((offset as u64).to_le_bytes());
        offset = (offset + t.data.len()).div_ceil(align) * align;
    }
    for t in tensors {
        b.resize(b.len().div_ceil(align) * align, 0);
        b.extend(&t.data);
    }
    b
}

/// Deterministic pseudo-random bytes and small f16 values.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn f16_bits(&mut self, scale: f32) -> [u8; 2] {
        let x = (self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * scale;
        f16::from_f32(x).to_bits().to_le_bytes()
    }
}

fn f16v(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Nibble `k` (0..32) of a 16-byte ggml Q4 code array, written out longhand.
fn nibble(qs: &[u8], k: usize) -> u8 {
    if k < 16 {
        qs[k] & 0x0F
    } else {
        qs[k - 16] >> 4
    }
}

fn weight_f32(w: &Weight) -> Vec<f32> {
    let mut out = vec![0f32; w.rows() * w.cols()];
    for (n, row) in out.chunks_mut(w.cols()).enumerate() {
        w.dequantize_row(n, row);
    }
    out
}

fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g}, want {w}");
    }
}

// ---- synthetic files ---------------------------------------------------------------------------------

#[test]
fn metadata_of_every_type_round_trips() {
    use GgufValue::*;
    let kvs = vec![
        ("t.u8", U8(200)),
        ("t.i8", I8(-100)),
        ("t.u16", U16(60000)),
        ("t.i16", I16(-30000)),
        ("t.u32", U32(4_000_000_000)),
        ("t.i32", I32(-7)),
        ("t.f32", F32(1e-5)),
        ("t.bool", Bool(true)),
        ("t.string", String("héllo 🦀".into())),
        ("t.u64", U64(u64::MAX)),
        ("t.i64", I64(i64::MIN)),
        ("t.f64", F64(0.1)),
        (
            "t.strs",
            Array(vec![
                String("a".into()),
                String("".into()),
                String("ĠĠ".into()),
            ]),
        ),
        ("t.ints", Array(vec![U32(1), U32(3), U32(4)])),
        ("t.floats", Array(vec![F32(-1.5), F32(2.25)])),
        (
            "t.nested",
            Array(vec![Array(vec![I16(1), I16(-2)]), Array(vec![I16(3)])]),
        ),
        ("t.empty", Array(vec![])),
        ("t.small", I32(42)),
        ("t.negative", I32(-1)),
    ];
    let f = GgufFile::from_bytes(write_gguf(3, &kvs, &[])).expect("parses");
    let got: Vec<(&str, &GgufValue)> = f.metadata().collect();
    assert_eq!(got.len(), kvs.len());
    for ((gk, gv), (k, v)) in got.iter().zip(&kvs) {
        assert_eq!((gk, *gv), (k, v));
    }
    // Typed getters widen/narrow where the value fits, and name the key when not.
    assert_eq!(f.get_u32("t.u8").unwrap(), 200);
    assert_eq!(f.get_u32("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u32("t.small").unwrap(), 42);
    assert_eq!(f.get_u64("t.u64").unwrap(), u64::MAX);
    for bad in ["t.negative", "t.u64", "t.f32", "t.string"] {
        let e = f.get_u32(bad).unwrap_err();
        assert!(
            matches!(&e, GgufError::WrongType { key, .. } if key == bad),
            "{e}"
        );
        assert!(e.to_string().contains(bad), "{e}");
    }
    assert_eq!(f.get_f32("t.f32").unwrap(), 1e-5);
    assert_eq!(f.get_f32("t.f64").unwrap(), 0.1f32);
    assert_eq!(f.get_str("t.string").unwrap(), "héllo 🦀");
    assert!(f.get_bool("t.bool").unwrap());
    assert_eq!(f.get_str_array("t.strs").unwrap(), ["a", "", "ĠĠ"]);
    assert_eq!(f.get_i32_array("t.ints").unwrap(), [1, 3, 4]);
    assert_eq!(f.get_f32_array("t.floats").unwrap(), [-1.5, 2.25]);
    assert!(f.get_str_array("t.empty").unwrap().is_empty());
    assert!(matches!(
        f.get_str_array("t.ints"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        f.get_str("t.u8"),
        Err(GgufError::WrongType { .. })
    ));
    // Optional getters: absent → None, present with the wrong type → error.
    assert_eq!(f.get_u32_opt("t.absent").unwrap(), None);
    assert_eq!(f.get_str_opt("t.absent").unwrap(), None);
    assert_eq!(f.get_bool_opt("t.bool").unwrap(), Some(true));
    assert_eq!(f.get_f32_opt("t.f32").unwrap(), Some(1e-5));
    assert!(f.get_bool_opt("t.u8").is_err());
    let e = f.get_str("t.absent").unwrap_err();
    assert!(matches!(&e, GgufError::MissingKey { key } if key == "t.absent"));
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.tensors().len(), 0);
}

/// `rows` × `cols` blocks of a ggml 32-element type, built from random codes and small scales.
fn q_blocks(ty: u32, rows: usize, cols: usize, rng: &mut Lcg) -> Vec<u8> {
    let mut data = Vec::new();
    for _ in 0..rows * cols / 32 {
        match ty {
            2 => {
                data.extend(rng.f16_bits(0.05));
                data.extend((0..16).map(|_| rng.byte()));
            }
            3 => {
                data.extend(rng.f16_bits(0.05));
                data.extend(rng.f16_bits(1.0));
                data.extend((0..16).map(|_| rng.byte()));
            }
            8 => {
                data.extend(rng.f16_bits(0.01));
                data.extend((0..32).map(|_| rng.byte()));
            }
            _ => unreachable!(),
        }
    }
    data
}

#[test]
fn small_block_types_convert_exactly_and_match_an_independent_dequantization() {
    let (rows, cols) = (3, 64);
    let mut rng = Lcg(99);
    let q4_0 = q_blocks(2, rows, cols, &mut rng);
    let q4_1 = q_blocks(3, rows, cols, &mut rng);
    let q8_0 = q_blocks(8, rows, cols, &mut rng);
    let f16s: Vec<u8> = (0..rows * cols).flat_map(|_| rng.f16_bits(3.0)).collect();
    let f32s: Vec<u8> = (0..rows * cols)
        .flat_map(|i| (i as f32 * 0.37 - 20.0).to_le_bytes())
        .collect();
    let dims = vec![cols as u64, rows as u64];
    let t = |name, ty, data: &Vec<u8>| TestTensor {
        name,
        dims: dims.clone(),
        ty,
        data: data.clone(),
    };
    let tensors = [
        t("q4_0", 2, &q4_0),
        t("q4_1", 3, &q4_1),
        t("q8_0", 8, &q8_0),
        t("f16", 1, &f16s),
        t("f32", 0, &f32s),
    ];
    let f = GgufFile::from_bytes(write_gguf(3, &[], &tensors)).expect("parses");

    // Independent per-block definitions (ggml): Q4_0 (q-8)*d, Q4_1 d*q+m, Q8_0 q*d.
    let want_q4_0: Vec<f32> = q4_0
        .chunks(18)
        .flat_map(|b| (0..32).map(move |k| (nibble(&b[2..], k) as f32 - 8.0) * f16v(b, 0)))
        .collect();
    let want_q4_1: Vec<f32> = q4_1
        .chunks(20)
        .flat_map(|b| (0..32).map(move |k| f16v(b, 0) * nibble(&b[4..], k) as f32 + f16v(b, 2)))
        .collect();
    let want_q8_0: Vec<f32> = q8_0
        .chunks(34)
        .flat_map(|b| (0..32).map(move |k| (b[2 + k] as i8) as f32 * f16v(b, 0)))
        .collect();
    let want_f16: Vec<f32> = f16s.chunks(2).map(|b| f16v(b, 0)).collect();
    let want_f32: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.37 - 20.0).collect();

    for (name, want) in [
        ("q4_0", &want_q4_0),
        ("q4_1", &want_q4_1),
        ("q8_0", &want_q8_0),
        ("f16", &want_f16),
        ("f32", &want_f32),
    ] {
        let (data, got_dims) = f.load_f32(name).unwrap();
        assert_eq!(got_dims, [cols, rows]);
        assert_bits_eq(&data, want, &format!("load_f32({name})"));
        let w = f.load_weight(name, rows, cols).unwrap();
        assert_eq!((w.rows(), w.cols()), (rows, cols));
        assert_bits_eq(&weight_f32(&w), want, &format!("load_weight({name})"));
        let format = match name {
            "q4_0" | "q4_1" => "int4",
            "q8_0" => "q8",
            _ => "f32",
        };
        assert_eq!(w.format_name(), format, "{name} keeps its format");
    }
    // The 4-bit formats are copied, not requantized: block fields equal the file's bytes.
    let Weight::Q4(m) = f.load_weight("q4_1", rows, cols).unwrap() else {
        panic!("q4_1 → Q4")
    };
    assert_eq!(m.kind(), Q4Kind::Affine);
    let b1 = m.to_blocks()[5];
    assert_eq!(b1.d.to_le_bytes(), [q4_1[100], q4_1[101]]);
    assert_eq!(b1.m.to_le_bytes(), [q4_1[102], q4_1[103]]);
    assert_eq!(b1.qs, q4_1[104..120]);
    let Weight::Q4(m) = f.load_weight("q4_0", rows, cols).unwrap() else {
        panic!("q4_0 → Q4")
    };
    assert_eq!((m.kind(), m.to_blocks()[2].m), (Q4Kind::ZeroPoint, 8));
}

/// k-quant and BF16 blocks compared with gguf-py's own dequantization of the same bytes.
#[test]
fn k_quants_and_bf16_match_gguf_py_bitwise() {
    let fx = &derived()["gguf_py_synthetic"];
    let q4k = hex(fx["q4_k"]["bytes_hex"].as_str().unwrap());
    let q6k = hex(fx["q6_k"]["bytes_hex"].as_str().unwrap());
    let bf16 = hex(fx["bf16"]["bytes_hex"].as_str().unwrap());
    let t = |name, ty, data: &Vec<u8>, dims: Vec<u64>| TestTensor {
        name,
        dims,
        ty,
        data: data.clone(),
    };
    let f = GgufFile::from_bytes(write_gguf(
        3,
        &[],
        &[
            t("q4_k", 12, &q4k, vec![256, 2]),
            t("q6_k", 14, &q6k, vec![512, 1]),
            t("bf16", 30, &bf16, vec![16, 4]),
        ],
    ))
    .unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for name in ["q4_k", "q6_k", "bf16"] {
        let (data, _) = f.load_f32(name).unwrap();
        assert_eq!(bits(&data), u32s(&fx[name]["dequant_bits"]), "{name}");
    }
    // Q6_K and BF16 are dequantized exactly into dense weights.
    let w = f.load_weight("q6_k", 1, 512).unwrap();
    assert_eq!(w.format_name(), "f32");
    assert_eq!(bits(&weight_f32(&w)), u32s(&fx["q6_k"]["dequant_bits"]));
    // Q4_K keeps its codes; per sub-block scale/offset are f16(d*sc) and f16(-(dmin*m)).
    let Weight::Q4(m) = f.load_weight("q4_k", 2, 256).unwrap() else {
        panic!("q4_k → Q4")
    };
    assert_eq!(m.kind(), Q4Kind::Affine);
    let d: Vec<u32> = m.to_blocks().iter().map(|b| b.d as u32).collect();
    let mm: Vec<u32> = m.to_blocks().iter().map(|b| b.m as u32).collect();
    assert_eq!(d, u32s(&fx["q4_k"]["affine_d_f16_bits"]));
    assert_eq!(mm, u32s(&fx["q4_k"]["affine_m_f16_bits"]));
    let exact = f.load_f32("q4_k").unwrap().0;
    let approx = weight_f32(&Weight::Q4(m.clone()));
    for (i, (a, e)) in approx.iter().zip(&exact).enumerate() {
        let b = &m.to_blocks()[i / 32];
        // Rounding d*sc and dmin*m to f16 costs at most half an f16 ulp (2^-11 relative) of each.
        let bound = (f16::from_bits(b.d).to_f32().abs() * 15.0
            + f16::from_bits(b.m).to_f32().abs())
            * 2f32.powi(-10);
        assert!((a - e).abs() <= bound, "q4_k[{i}]: {a} vs exact {e}");
    }
}

#[test]
fn q4_k_with_scales_beyond_f16_falls_back_to_exact_f32() {
    let mut block = vec![0u8; 144];
    block[0..2].copy_from_slice(&f16::from_f32(60000.0).to_bits().to_le_bytes());
    block[4] = 63; // sub-block 0 scale 63: 60000 * 63 overflows f16
    block[16] = 0x21;
    let f = GgufFile::from_bytes(write_gguf(
        3,
        &[],
        &[TestTensor {
            name: "big",
            dims: vec![256, 1],
            ty: 12,
            data: block,
        }],
    ))
    .unwrap();
    let w = f.load_weight("big", 1, 256).unwrap();
    assert_eq!(w.format_name(), "f32");
    assert_eq!(weight_f32(&w)[0], 60000.0 * 63.0);
}

fn three_tensor_file() -> Vec<u8> {
    let mut rng = Lcg(5);
    let tensors = [
        TestTensor {
            name: "first",
            dims: vec![64, 2],
            ty: 3,
            data: q_blocks(3, 2, 64, &mut rng),
        },
        TestTensor {
            name: "second",
            dims: vec![32, 4],
            ty: 8,
            data: q_blocks(8, 4, 32, &mut rng),
        },
        TestTensor {
            name: "third.norm",
            dims: vec![8],
            ty: 0,
            data: vec![0; 32],
        },
    ];
    write_gguf(
        3,
        &[("general.name", GgufValue::String("t".into()))],
        &tensors,
    )
}

#[test]
fn truncated_file_names_the_first_tensor_that_does_not_fit() {
    let full = three_tensor_file();
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let second = f.data_offset() + f.tensor_info("second").unwrap().offset;
    let e = GgufFile::from_bytes(full[..second + 10].to_vec()).unwrap_err();
    assert!(
        matches!(&e, GgufError::TensorOutOfBounds { name, .. } if name == "second"),
        "{e}"
    );
    assert!(e.to_string().contains("`second`"), "{e}");
    // Every shorter prefix is an error, never a panic.
    for len in 0..full.len() {
        assert!(
            GgufFile::from_bytes(full[..len].to_vec()).is_err(),
            "prefix {len}"
        );
    }
}

#[test]
fn corrupted_headers_never_panic() {
    let full = three_tensor_file();
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let mut rng = Lcg(17);
    for pos in 4..f.data_offset() {
        for _ in 0..3 {
            let mut bad = full.clone();
            bad[pos] = rng.byte();
            let _ = GgufFile::from_bytes(bad).map(|g| {
                for name in g.tensor_names().map(String::from).collect::<Vec<_>>() {
                    let _ = g.load_f32(&name);
                }
            });
        }
    }
}

#[test]
fn unsupported_tensor_type_is_named() {
    for (ty, type_name) in [(13u32, "Q5_K"), (99, "unknown")] {
        let img = write_gguf(
            3,
            &[],
            &[TestTensor {
                name: "blk.0.ffn_up.weight",
                dims: vec![256, 1],
                ty,
                data: vec![0; 176],
            }],
        );
        let e = GgufFile::from_bytes(img).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, GgufError::UnsupportedTensorType { name, type_id, .. }
                if name == "blk.0.ffn_up.weight" && *type_id == ty),
            "{msg}"
        );
        assert!(
            msg.contains("blk.0.ffn_up.weight") && msg.contains(type_name),
            "{msg}"
        );
    }
}

#[test]
fn bad_magic_and_versions_are_rejected() {
    let mut img = three_tensor_file();
    img[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes(img),
        Err(GgufError::BadMagic { .. })
    ));
    assert!(matches!(
        GgufFile::from_bytes(vec![]),
        Err(GgufError::BadMagic { .. })
    ));
    for v in [1u32, 4, 3u32.swap_bytes()] {
        let e = GgufFile::from_bytes(write_gguf(v, &[], &[])).unwrap_err();
        assert!(matches!(e, GgufError::UnsupportedVersion { version, .. } if version == v));
        if v == 3u32.swap_bytes() {
            assert!(e.to_string().contains("big-endian"), "{e}");
        }
    }
    assert_eq!(
        GgufFile::from_bytes(write_gguf(2, &[], &[]))
            .unwrap()
            .version(),
        2
    );
}

#[test]
fn shape_mismatch_and_missing_tensor_are_named() {
    let f = GgufFile::from_bytes(three_tensor_file()).unwrap();
    // "first" is [ne0 = 64, ne1 = 2]: 2 rows of 64 inputs. Asking for 64 × 2 is wrong.
    let e = f.load_weight("first", 64, 2).unwrap_err();
    match &e {
        GgufError::ShapeMismatch {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "first");
            assert_eq!(expected, &[2, 64]);
            assert_eq!(found, &[64, 2]);
        }
        other => panic!("wrong error {other}"),
    }
    assert!(f.load_weight("first", 2, 64).is_ok());
    let e = f.load_weight("nope", 1, 1).unwrap_err();
    assert!(matches!(&e, GgufError::MissingTensor { name } if name == "nope"));
    assert!(
        f.load_weight("third.norm", 1, 8).is_ok(),
        "a 1-D tensor is one row"
    );
}

#[test]
fn alignment_partial_blocks_and_misaligned_offsets() {
    let norm = |name| TestTensor {
        name,
        dims: vec![4],
        ty: 0,
        data: vec![0; 16],
    };
    let kv = [("general.alignment", GgufValue::U32(64))];
    let f = GgufFile::from_bytes(write_gguf(3, &kv, &[norm("a"), norm("b")])).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    // A non-power-of-two alignment is refused.
    let kv = [("general.alignment", GgufValue::U32(48))];
    assert!(GgufFile::from_bytes(write_gguf(3, &kv, &[])).is_err());
    // ne0 = 48 is not a whole number of 32-element Q8_0 blocks.
    let img = write_gguf(
        3,
        &[],
        &[TestTensor {
            name: "odd",
            dims: vec![48, 1],
            ty: 8,
            data: vec![0; 68],
        }],
    );
    let e = GgufFile::from_bytes(img).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadTensor { name, .. } if name == "odd"),
        "{e}"
    );
    // Offset 16 is not a multiple of 32.
    let mut img = write_gguf(3, &[], &[norm("a"), norm("b")]);
    let f = GgufFile::from_bytes(img.clone()).unwrap();
    // "b"'s offset field (32) is the last 8 bytes of the tensor infos.
    let at = (0..f.data_offset() - 8)
        .rev()
        .find(|&i| img[i..i + 8] == 32u64.to_le_bytes())
        .expect("offset field of b");
    img[at..at + 8].copy_from_slice(&16u64.to_le_bytes());
    let e = GgufFile::from_bytes(img).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadTensor { name, .. } if name == "b"),
        "{e}"
    );
}

#[test]
fn open_maps_a_file_and_reports_io_errors() {
    let path = std::env::temp_dir().join(format!("helper-gguf-test-{}.gguf", std::process::id()));
    std::fs::write(&path, three_tensor_file()).unwrap();
    let f = GgufFile::open(&path);
    let _ = std::fs::remove_file(&path);
    let f = f.unwrap();
    assert_eq!(
        f.tensor_names().collect::<Vec<_>>(),
        ["first", "second", "third.norm"]
    );
    assert_eq!(f.tensor_data("second").unwrap().len(), 4 * 34);
    let e = GgufFile::open("/nonexistent/x.gguf").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x.gguf"), "{e}");
}

/// HF row `h*hd + j*hd/2 + i` must hold GGUF row `h*hd + 2*i + j`, for every weight format.
#[test]
fn unpermute_qk_reorders_rows_for_every_format() {
    let (n_head, hd, cols) = (3, 8, 32);
    let rows = n_head * hd;
    let mut rng = Lcg(3);
    let mk = |ty: u32, data: Vec<u8>| TestTensor {
        name: match ty {
            0 => "f32",
            3 => "q4_1",
            _ => "q8_0",
        },
        dims: vec![cols as u64, rows as u64],
        ty,
        data,
    };
    let f32s = (0..rows * cols)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let f = GgufFile::from_bytes(write_gguf(
        3,
        &[],
        &[
            mk(0, f32s),
            mk(3, q_blocks(3, rows, cols, &mut rng)),
            mk(8, q_blocks(8, rows, cols, &mut rng)),
        ],
    ))
    .unwrap();
    for name in ["f32", "q4_1", "q8_0"] {
        let w = f.load_weight(name, rows, cols).unwrap();
        let before = weight_f32(&w);
        let after = weight_f32(&unpermute_qk(w, n_head).unwrap());
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let (hf, gg) = (h * hd + j * hd / 2 + i, h * hd + 2 * i + j);
                    assert_eq!(
                        after[hf * cols..(hf + 1) * cols],
                        before[gg * cols..(gg + 1) * cols],
                        "{name}: hf row {hf} <- gguf row {gg}"
                    );
                }
            }
        }
    }
    let w = f.load_weight("f32", rows, cols).unwrap();
    assert!(matches!(unpermute_qk(w, 5), Err(GgufError::Permute { .. })));
}

// ---- the real SmolLM2 file -------------------------------------------------------------------------------

#[test]
fn real_smollm2_metadata_facts() {
    let Some(f) = real_model() else { return };
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("general.file_type").unwrap(), 3);
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_u32("llama.rope.dimension_count").unwrap(), 64);
    assert_eq!(f.get_u32("llama.context_length").unwrap(), 8192);
    assert_eq!(f.get_u32("llama.vocab_size").unwrap(), 49152);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(
        f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        1e-5 // stored as f32 9.9999997e-06
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    let count = |ty: &str| {
        f.tensors()
            .iter()
            .filter(|t| t.ggml_type.name() == ty)
            .count()
    };
    assert_eq!(f.tensors().len(), 272);
    assert_eq!((count("Q4_1"), count("Q8_0"), count("F32")), (210, 1, 61));
    assert!(!f.has_tensor("output.weight"), "embeddings are tied");
    assert_eq!(
        f.tensor_info("blk.0.ffn_down.weight").unwrap().dims,
        [1536, 576]
    );
    assert_eq!(
        f.file_len() as u64,
        derived()["model_file_size"].as_u64().unwrap()
    );
}

#[test]
fn real_smollm2_dequantization_equals_gguf_py() {
    let Some(f) = real_model() else { return };
    let fx = derived();
    for case in fx["dequant"].as_array().unwrap() {
        let name = case["tensor"].as_str().unwrap();
        let shape = u32s(&case["shape_rows_cols"]);
        let (rows, cols) = (shape[0] as usize, shape[1] as usize);
        let (exact, dims) = f.load_f32(name).unwrap();
        assert_eq!(dims, [cols, rows]);
        let w = f.load_weight(name, rows, cols).unwrap();
        assert_eq!(
            w.format_name(),
            if name == "token_embd.weight" {
                "q8"
            } else {
                "int4"
            }
        );
        let mut row = vec![0f32; cols];
        let sel_cols = u32s(&case["cols"]);
        for (k, r) in u32s(&case["rows"]).into_iter().enumerate() {
            let r = r as usize;
            w.dequantize_row(r, &mut row);
            let want = u32s(&case["values_bits"][k]);
            for (c, wb) in sel_cols.iter().zip(&want) {
                let c = *c as usize;
                assert_eq!(row[c].to_bits(), *wb, "{name}[{r}, {c}] via load_weight");
                assert_eq!(
                    exact[r * cols + c].to_bits(),
                    *wb,
                    "{name}[{r}, {c}] via load_f32"
                );
            }
            let sum: f64 = row.iter().map(|&x| x as f64).sum();
            let want_sum = case["row_sums"][k].as_f64().unwrap();
            assert!(
                (sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0),
                "{name} row {r} sum"
            );
        }
    }
    let norm = &fx["f32_norm"];
    let (data, dims) = f.load_f32(norm["tensor"].as_str().unwrap()).unwrap();
    assert_eq!(dims, [576]);
    let got: Vec<u32> = data[..8].iter().map(|x| x.to_bits()).collect();
    assert_eq!(got, u32s(&norm["first8_bits"]));
}

#[test]
fn real_smollm2_unpermuted_qk_equals_transformers_reverse_permute() {
    let Some(f) = real_model() else { return };
    for case in derived()["unpermute"].as_array().unwrap() {
        let name = case["tensor"].as_str().unwrap();
        let n_head = case["n_head"].as_u64().unwrap() as usize;
        let sums = case["row_sums"].as_array().unwrap();
        let (rows, cols) = (sums.len(), 576);
        // Both the quantized path and the dense path must give the same rows.
        let q = unpermute_qk(f.load_weight(name, rows, cols).unwrap(), n_head).unwrap();
        assert_eq!(q.format_name(), "int4");
        let (dense, _) = f.load_f32(name).unwrap();
        let d = Weight::F32(edgelora_kernels::DenseMatrix::new(rows, cols, dense).unwrap());
        let d = unpermute_qk(d, n_head).unwrap();
        let (qv, dv) = (weight_f32(&q), weight_f32(&d));
        assert_bits_eq(&qv, &dv, name);
        for (r, want) in sums.iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got: f64 = qv[r * cols..(r + 1) * cols].iter().map(|&x| x as f64).sum();
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{name} row {r}: {got} vs {want}"
            );
        }
        for (k, r) in u32s(&case["rows"]).into_iter().enumerate() {
            let r = r as usize;
            let got: Vec<u32> = qv[r * cols..r * cols + 8]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(got, u32s(&case["first8_bits"][k]), "{name} row {r}");
        }
        // And it really moved rows: HF row 1 is GGUF row 2.
        let stored = weight_f32(&f.load_weight(name, rows, cols).unwrap());
        assert_eq!(case["hf_row_from_gguf_row"]["1"].as_u64(), Some(2));
        assert_eq!(qv[cols..2 * cols], stored[2 * cols..3 * cols]);
        assert_ne!(qv[cols..2 * cols], stored[cols..2 * cols]);
    }
}
