use super::*;

/// SplitMix64: a tiny deterministic PRNG so tests need no `rand`.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn geom(page_size: usize, n_layers: usize, n_kv_heads: usize, head_dim: usize) -> KvGeometry {
    KvGeometry {
        page_size,
        n_layers,
        n_kv_heads,
        head_dim,
    }
}

const DTYPES: [KvDtype; 3] = [KvDtype::F32, KvDtype::F16, KvDtype::Int4];

#[test]
fn dtype_parse_and_display_round_trip() {
    for d in DTYPES {
        assert_eq!(d.to_string().parse::<KvDtype>(), Ok(d));
    }
    assert_eq!("INT4".parse::<KvDtype>(), Ok(KvDtype::Int4));
    assert_eq!(
        "q4".parse::<KvDtype>(),
        Err(KvError::UnknownDtype("q4".into()))
    );
}

#[test]
fn new_rejects_bad_geometry() {
    assert!(matches!(
        KvPool::new(geom(0, 1, 1, 8), KvDtype::F32, 4),
        Err(KvError::Geometry(_))
    ));
    assert!(matches!(
        KvPool::new(geom(4, 0, 1, 8), KvDtype::F32, 4),
        Err(KvError::Geometry(_))
    ));
    assert!(matches!(
        KvPool::new(geom(4, 1, 0, 8), KvDtype::F32, 4),
        Err(KvError::Geometry(_))
    ));
    assert!(matches!(
        KvPool::new(geom(4, 1, 1, 7), KvDtype::Int4, 4),
        Err(KvError::Geometry(_))
    ));
    let huge = geom(usize::MAX / 2, 1, 1, 8);
    assert!(matches!(
        KvPool::new(huge, KvDtype::F32, 4),
        Err(KvError::TooLarge(4))
    ));
    let empty = KvPool::new(geom(4, 1, 1, 8), KvDtype::F16, 0).unwrap();
    assert_eq!((empty.capacity(), empty.free_count()), (0, 0));
}

#[test]
fn alloc_free_exhaustion() {
    let mut pool = KvPool::new(geom(4, 2, 2, 8), KvDtype::F32, 3).unwrap();
    assert_eq!((pool.capacity(), pool.free_count()), (3, 3));
    let pages: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(pages, vec![0, 1, 2]);
    assert_eq!(pool.free_count(), 0);
    assert_eq!(pool.alloc(), None);
    pool.free(1);
    assert_eq!(pool.free_count(), 1);
    assert_eq!(pool.alloc(), Some(1));
    assert_eq!(pool.alloc(), None);
    for p in pages {
        pool.free(p);
    }
    assert_eq!(pool.free_count(), 3);
}

#[test]
fn free_resets_page_state() {
    for dtype in DTYPES {
        let mut pool = KvPool::new(geom(4, 2, 2, 8), dtype, 1).unwrap();
        let mut rng = Rng::new(7);
        let p = pool.alloc().unwrap();
        for slot in 0..4 {
            pool.write(1, p, slot, &rng.vec(16), &rng.vec(16));
        }
        pool.seal(1, p);
        pool.free(p);
        let p = pool.alloc().unwrap();
        assert!(!pool.is_sealed(1, p) && pool.filled(1, p) == 0, "{dtype}");
        let (lo, hi) = pool.key_bounds(1, p, 1);
        assert!(
            lo.iter().all(|&x| x == f32::INFINITY) && hi.iter().all(|&x| x == f32::NEG_INFINITY)
        );
        let (mut k, mut v) = (vec![1.0; 16], vec![1.0; 16]);
        pool.read_token(1, p, 2, &mut k, &mut v);
        assert!(
            k.iter().chain(&v).all(|&x| x == 0.0),
            "{dtype}: stale data after free"
        );
        // The page is open again: an INT4 write reads back exactly.
        let (k0, v0) = (rng.vec(16), rng.vec(16));
        pool.write(1, p, 0, &k0, &v0);
        pool.read_token(1, p, 0, &mut k, &mut v);
        if dtype != KvDtype::F16 {
            assert_eq!((k, v), (k0, v0), "{dtype}");
        }
    }
}

/// Writes `n` random tokens to layer `layer` of a fresh page, returning the page and the tokens.
fn fill(
    pool: &mut KvPool,
    rng: &mut Rng,
    layer: usize,
    n: usize,
) -> (PageId, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let w = pool.geometry().token_width();
    let p = pool.alloc().unwrap();
    let ks: Vec<_> = (0..n).map(|_| rng.vec(w)).collect();
    let vs: Vec<_> = (0..n).map(|_| rng.vec(w)).collect();
    for (slot, (k, v)) in ks.iter().zip(&vs).enumerate() {
        pool.write(layer, p, slot, k, v);
    }
    (p, ks, vs)
}

fn read(pool: &KvPool, layer: usize, p: PageId, slot: usize) -> (Vec<f32>, Vec<f32>) {
    let w = pool.geometry().token_width();
    let (mut k, mut v) = (vec![0.0; w], vec![0.0; w]);
    pool.read_token(layer, p, slot, &mut k, &mut v);
    (k, v)
}

#[test]
fn f32_round_trip_is_exact() {
    let mut pool = KvPool::new(geom(5, 3, 2, 16), KvDtype::F32, 2).unwrap();
    let (p, ks, vs) = fill(&mut pool, &mut Rng::new(1), 2, 5);
    pool.seal(2, p);
    for slot in 0..5 {
        assert_eq!(
            read(&pool, 2, p, slot),
            (ks[slot].clone(), vs[slot].clone())
        );
    }
}

#[test]
fn f16_round_trip_within_rounding() {
    let mut pool = KvPool::new(geom(5, 3, 2, 16), KvDtype::F16, 2).unwrap();
    let (p, ks, vs) = fill(&mut pool, &mut Rng::new(2), 0, 4);
    let round = |x: &Vec<f32>| {
        x.iter()
            .map(|&x| f16::from_f32(x).to_f32())
            .collect::<Vec<_>>()
    };
    for slot in 0..4 {
        let (k, v) = read(&pool, 0, p, slot);
        assert_eq!((k, v), (round(&ks[slot]), round(&vs[slot])));
    }
}

/// Half a quantization step of the range `[lo, hi]`, with slack for the f16 rounding of min/scale.
fn half_step(lo: f32, hi: f32) -> f32 {
    let range = hi - lo + lo.abs() / 1024.0;
    0.5 * range / 15.0 * (1.0 + 1.0 / 512.0) + 1e-6
}

#[test]
fn int4_open_page_exact_sealed_within_half_step() {
    let (n_kv, d) = (3, 16);
    for n in [1, 5, 8] {
        let mut pool = KvPool::new(geom(8, 2, n_kv, d), KvDtype::Int4, 1).unwrap();
        let mut rng = Rng::new(3 + n as u64);
        let (p, mut ks, vs) = fill(&mut pool, &mut rng, 1, n);
        // Shift one channel so key ranges differ per channel (and exercise a far-from-zero min).
        for k in &mut ks {
            k[5] += 40.0;
        }
        for (slot, (k, v)) in ks.iter().zip(&vs).enumerate() {
            pool.write(1, p, slot, k, v);
        }
        for slot in 0..n {
            assert_eq!(
                read(&pool, 1, p, slot),
                (ks[slot].clone(), vs[slot].clone()),
                "open page not exact"
            );
        }
        pool.seal(1, p);
        assert!(pool.is_sealed(1, p));
        let mut worst = 0.0f32;
        for slot in 0..n {
            let (k, v) = read(&pool, 1, p, slot);
            for i in 0..n_kv * d {
                let col: Vec<f32> = ks.iter().map(|k| k[i]).collect();
                let lo = col.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let err = (k[i] - ks[slot][i]).abs();
                assert!(
                    err <= half_step(lo, hi),
                    "key n={n} slot={slot} i={i}: err {err} range [{lo}, {hi}]"
                );
                worst = worst.max(err / half_step(lo, hi));
            }
            for h in 0..n_kv {
                let row = &vs[slot][h * d..(h + 1) * d];
                let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for c in 0..d {
                    let err = (v[h * d + c] - row[c]).abs();
                    assert!(
                        err <= half_step(lo, hi),
                        "value n={n} slot={slot} h={h} c={c}: err {err}"
                    );
                }
            }
        }
        // Quantization is not a no-op: some element is off by a sizeable part of a step.
        assert!(n == 1 || worst > 0.3, "n={n}: worst relative error {worst}");
    }
}

#[test]
fn int4_constant_channel_is_exact() {
    let mut pool = KvPool::new(geom(4, 1, 1, 4), KvDtype::Int4, 1).unwrap();
    let p = pool.alloc().unwrap();
    for slot in 0..4 {
        pool.write(
            0,
            p,
            slot,
            &[0.5, -2.0, 0.0, slot as f32],
            &[1.0, 1.0, 1.0, 1.0],
        );
    }
    pool.seal(0, p);
    for slot in 0..4 {
        // Constant key channels and constant value rows have scale 0 and reconstruct exactly; the
        // varying channel 3 only within half a step.
        let (k, v) = read(&pool, 0, p, slot);
        assert_eq!((&k[..3], v), (&[0.5, -2.0, 0.0][..], vec![1.0; 4]));
        assert!((k[3] - slot as f32).abs() <= half_step(0.0, 3.0));
    }
}

#[test]
fn int4_write_after_seal_reopens() {
    let mut pool = KvPool::new(geom(4, 1, 2, 8), KvDtype::Int4, 1).unwrap();
    let mut rng = Rng::new(11);
    let (p, _, _) = fill(&mut pool, &mut rng, 0, 3);
    pool.seal(0, p);
    let sealed: Vec<_> = (0..3).map(|s| read(&pool, 0, p, s)).collect();
    let (k, v) = (rng.vec(16), rng.vec(16));
    pool.write(0, p, 3, &k, &v);
    assert!(!pool.is_sealed(0, p));
    assert_eq!(pool.filled(0, p), 4);
    for (s, tok) in sealed.iter().enumerate() {
        assert_eq!(&read(&pool, 0, p, s), tok, "reopened slot {s} changed");
    }
    assert_eq!(read(&pool, 0, p, 3), (k, v));
}

#[test]
fn key_bounds_are_min_max_of_written() {
    for dtype in DTYPES {
        let mut pool = KvPool::new(geom(6, 2, 2, 8), dtype, 2).unwrap();
        let _ = pool.alloc();
        let (p, ks, _) = fill(&mut pool, &mut Rng::new(5), 1, 4);
        pool.seal(1, p);
        for h in 0..2 {
            let (lo, hi) = pool.key_bounds(1, p, h);
            for c in 0..8 {
                let col = ks.iter().map(|k| k[h * 8 + c]);
                assert_eq!(lo[c], col.clone().fold(f32::INFINITY, f32::min), "{dtype}");
                assert_eq!(hi[c], col.fold(f32::NEG_INFINITY, f32::max), "{dtype}");
            }
            // Other layers of the page are untouched.
            assert!(
                pool.key_bounds(0, p, h)
                    .0
                    .iter()
                    .all(|&x| x == f32::INFINITY)
            );
        }
    }
}

#[test]
fn tile_matches_read_token() {
    for dtype in DTYPES {
        for seal in [false, true] {
            let mut pool = KvPool::new(geom(4, 2, 2, 8), dtype, 2).unwrap();
            let (p, _, _) = fill(&mut pool, &mut Rng::new(9), 1, 3);
            if seal {
                pool.seal(1, p);
            }
            let mut scratch = vec![f32::NAN; pool.tile_scratch_len()];
            for h in 0..2 {
                let (kt, vt) = pool.tile_f32(1, p, h, 3, &mut scratch);
                let (kt, vt) = (kt.to_vec(), vt.to_vec());
                assert_eq!(kt.len(), 24);
                for s in 0..3 {
                    let (k, v) = read(&pool, 1, p, s);
                    assert_eq!(
                        &kt[s * 8..(s + 1) * 8],
                        &k[h * 8..(h + 1) * 8],
                        "{dtype} seal={seal}"
                    );
                    assert_eq!(
                        &vt[s * 8..(s + 1) * 8],
                        &v[h * 8..(h + 1) * 8],
                        "{dtype} seal={seal}"
                    );
                }
            }
        }
    }
}

#[test]
fn bytes_per_page_per_dtype() {
    // 2 layers x 4 kv heads, page of 16 tokens, head_dim 64; key bounds: 2 * 64 * 4 = 512 B per tile.
    let g = geom(16, 2, 4, 64);
    let bytes = |d| KvPool::new(g, d, 1).unwrap().bytes_per_page();
    assert_eq!(bytes(KvDtype::F32), 8 * (2 * 16 * 64 * 4 + 512)); // 69_632
    assert_eq!(bytes(KvDtype::F16), 8 * (2 * 16 * 64 * 2 + 512)); // 36_864
    // Codes 2 * 16 * 64 / 2 = 1024, key scale+min 64 * 4 = 256, value scale+min 16 * 4 = 64.
    assert_eq!(bytes(KvDtype::Int4), 8 * (1024 + 256 + 64 + 512)); // 14_848
}

#[test]
fn f16_round_helpers_bracket() {
    let mut rng = Rng::new(13);
    for _ in 0..10_000 {
        let x = rng.f32() * 1000.0 * rng.f32().abs();
        let (lo, hi) = (f16_round(x, false).to_f32(), f16_round(x, true).to_f32());
        assert!(lo <= x && x <= hi, "{x}: [{lo}, {hi}]");
        assert!(
            hi - lo <= x.abs() / 1000.0 + 1e-7,
            "{x}: [{lo}, {hi}] not adjacent"
        );
    }
    assert_eq!(f16_round(1e9, true), f16::MAX);
    assert_eq!(f16_round(-1e9, false), f16::MIN);
    assert!(f16_round(-1e-9, false).to_f32() < 0.0 && f16_round(1e-9, true).to_f32() > 0.0);
}
