//! GGUF block decoding: the ggml quantized block layouts (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16,
//! BF16, F32) mapped to our INT4 / Q8 blocks where the format maps directly, and dequantized to
//! f32 bit-exactly with gguf-py otherwise.

use super::gguf::{GgmlType, QK_K};
use edgelora_kernels::{BlockQ4, BlockQ8, QK};
use half::f16;

// Callers hand these exact-size chunks (`chunks_exact` of the type's block size), so the fixed
// indexing below cannot go out of bounds.

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(le16(b, at)).to_f32()
}

pub(crate) fn q4_1_block(b: &[u8]) -> BlockQ4 {
    let mut qs = [0u8; 16];
    qs.copy_from_slice(&b[4..20]);
    BlockQ4 {
        d: le16(b, 0),
        m: le16(b, 2),
        qs,
    }
}

pub(crate) fn q4_0_block(b: &[u8]) -> BlockQ4 {
    let mut qs = [0u8; 16];
    qs.copy_from_slice(&b[2..18]);
    BlockQ4 {
        d: le16(b, 0),
        m: 8,
        qs,
    }
}

pub(crate) fn q8_0_block(b: &[u8]) -> BlockQ8 {
    BlockQ8 {
        d: le16(b, 0),
        qs: std::array::from_fn(|i| b[2 + i] as i8),
    }
}

/// Q4_K sub-block `j`'s 6-bit scale and min from the 12 packed scale bytes.
fn q4_k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K super-block layout: `d` f16, `dmin` f16, 12 scale bytes, 128 code bytes. Sub-block `s`
/// (32 elements) takes its codes from bytes `32*(s/2)..+32`: low nibbles for even `s`, high for odd.
fn q4_k_code(qs: &[u8], s: usize, l: usize) -> u8 {
    (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F
}

/// Q4_K → affine INT4 blocks; `None` when a rounded scale or offset is not finite in f16.
pub(crate) fn q4_k_blocks(data: &[u8]) -> Option<Vec<BlockQ4>> {
    let mut out = Vec::with_capacity(data.len() / 144 * 8);
    for sb in data.chunks_exact(144) {
        let (d, dmin) = (f16_at(sb, 0), f16_at(sb, 2));
        let (scales, qs) = (&sb[4..16], &sb[16..144]);
        for s in 0..8 {
            let (sc, m) = q4_k_scale_min(s, scales);
            let scale = f16::from_f32(d * sc as f32);
            let offset = f16::from_f32(-(dmin * m as f32));
            if !scale.is_finite() || !offset.is_finite() {
                return None;
            }
            let mut blk = BlockQ4 {
                d: scale.to_bits(),
                m: offset.to_bits(),
                qs: [0; 16],
            };
            for j in 0..16 {
                blk.qs[j] = q4_k_code(qs, s, j) | (q4_k_code(qs, s, 16 + j) << 4);
            }
            out.push(blk);
        }
    }
    Some(out)
}

/// Exact dequantization of whole blocks of `ty`, matching gguf-py bit for bit.
pub(crate) fn dequantize(ty: GgmlType, data: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len() / ty.block_bytes() * ty.block_size());
    let blocks = data.chunks_exact(ty.block_bytes());
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| f16_at(b, 0))),
        GgmlType::BF16 => out.extend(blocks.map(|b| f32::from_bits((le16(b, 0) as u32) << 16))),
        GgmlType::Q4_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let code = |j: usize| (b[2 + j % 16] >> (4 * (j / 16))) & 0x0F;
                out.extend((0..QK).map(|j| d * (code(j) as i32 - 8) as f32));
            }
        }
        GgmlType::Q4_1 => {
            for b in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let code = |j: usize| (b[4 + j % 16] >> (4 * (j / 16))) & 0x0F;
                out.extend((0..QK).map(|j| d * code(j) as f32 + m));
            }
        }
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                out.extend((0..QK).map(|j| d * (b[2 + j] as i8) as f32));
            }
        }
        GgmlType::Q4_K => {
            for b in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..144]);
                for s in 0..8 {
                    let (sc, m) = q4_k_scale_min(s, scales);
                    let (ds, dm) = (d * sc as f32, dmin * m as f32);
                    out.extend((0..32).map(|l| ds * q4_k_code(qs, s, l) as f32 - dm));
                }
            }
        }
        GgmlType::Q6_K => {
            // ql[128] (low 4 bits), qh[64] (high 2 bits), 16 i8 scales (one per 16 elements), d.
            for b in blocks {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                out.extend((0..QK_K).map(|e| {
                    let (h, r) = (e / 128, e % 128);
                    let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
                    let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
                    let q = (lo | (hi << 4)) as i32 - 32;
                    (d * (sc[e / 16] as i8) as f32) * q as f32
                }));
            }
        }
    }
    out
}
