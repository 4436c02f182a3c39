//! Next-token selection from a row of logits.
//!
//! The processing order follows Hugging Face `generate` (and llama.cpp's penalties stage):
//!
//! 1. repetition penalty over every distinct token in `history` (the CTRL rule: a positive
//!    logit is divided by the penalty, a negative one multiplied, so the token always
//!    becomes less likely);
//! 2. `temperature == 0` → greedy argmax, ties to the lowest id, no randomness consumed;
//! 3. otherwise temperature scaling, top-k, top-p (nucleus), renormalisation and one draw
//!    from a seeded ChaCha8 stream.
//!
//! Determinism matters for an appliance: a request that carries a `seed` must reproduce
//! the same tokens, so every draw comes from the sampler's own [`ChaCha8Rng`] and the
//! candidate order used for the draw depends only on the logits.
//!
//! Cost matters too: this runs once per generated token over the whole vocabulary (49k for
//! SmolLM2, 128k+ for newer models). Greedy decoding without a penalty touches the logits
//! once and allocates nothing; top-k uses partial selection (`select_nth_unstable`) instead
//! of sorting the vocabulary, and top-p without top-k grows a sorted prefix only as far as
//! the nucleus needs.

use std::cmp::Ordering;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Per-request sampling settings, with the OpenAI / HF meaning of each field.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` selects greedy decoding (and ignores `seed`).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables the filter.
    pub top_k: usize,
    /// Nucleus sampling mass in `(0, 1]`; `1.0` disables the filter.
    pub top_p: f32,
    /// CTRL-style repetition penalty (> 0); `1.0` disables it, values > 1 discourage
    /// repeating tokens from `history`.
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling; `None` seeds from the operating system.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Greedy decoding with every filter off: the deterministic behaviour a test harness or
    /// a client that sends no sampling options expects.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

/// A sampling parameter outside its domain. The message names the field as the API does so
/// it can be returned to the client unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("repetition_penalty must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
}

impl SamplingParams {
    /// Checks every field; NaN and infinities are rejected because they would silently turn
    /// into "always token 0" or uniform noise further down.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        Ok(())
    }

    /// True when sampling reduces to argmax and no random numbers are used.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Stateful sampler for one generation stream: it owns the random stream (so successive
/// draws of a seeded request are reproducible) and scratch buffers reused across tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// (token id, logit) pairs; reused to avoid a vocabulary-sized allocation per token.
    candidates: Vec<(u32, f32)>,
    /// Distinct, in-range history ids for the repetition penalty.
    penalized: Vec<u32>,
}

/// Candidates that the nucleus search sorts outright (first the best ones, finally the
/// range around the boundary); beyond that it partitions instead of sorting.
const NUCLEUS_SMALL: usize = 64;

impl Sampler {
    /// Validates `params` and seeds the random stream (`seed`, or OS entropy if `None`).
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => rand::make_rng::<ChaCha8Rng>(),
        };
        Ok(Self {
            params,
            rng,
            candidates: Vec::new(),
            penalized: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token id from `logits` (one row, vocabulary-sized).
    ///
    /// `history` is what the repetition penalty looks at. transformers penalises every
    /// token of `input_ids`, i.e. the prompt plus everything generated so far; llama.cpp
    /// only the last `penalty_last_n` tokens. Pass whichever window the caller wants; ids
    /// outside the vocabulary are ignored and repeats count once.
    ///
    /// NaN logits are treated as `-inf`. An empty row returns 0.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let penalty = self.params.repetition_penalty;
        let apply_penalty = penalty != 1.0 && !history.is_empty();

        if self.params.is_greedy() && !apply_penalty {
            return argmax(logits);
        }

        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, nan_to_neg_inf(l))),
        );
        if apply_penalty {
            self.penalized.clear();
            self.penalized.extend(
                history
                    .iter()
                    .copied()
                    .filter(|&id| (id as usize) < logits.len()),
            );
            self.penalized.sort_unstable();
            self.penalized.dedup();
            for &id in &self.penalized {
                let logit = &mut self.candidates[id as usize].1;
                *logit = if *logit > 0.0 {
                    *logit / penalty
                } else {
                    *logit * penalty
                };
            }
        }

        if self.params.is_greedy() {
            return argmax_pairs(&self.candidates);
        }
        self.sample_candidates()
    }

    /// Temperature, top-k, top-p and the draw over `self.candidates` (already penalised).
    fn sample_candidates(&mut self) -> u32 {
        let SamplingParams {
            temperature,
            top_k,
            top_p,
            ..
        } = self.params;
        let cands = &mut self.candidates;
        if cands.is_empty() {
            return 0;
        }

        // Top-k: partial selection puts the k best (by logit, ties to lower id) first.
        // Temperature is monotonic, so selecting on raw logits is the same as on scaled ones.
        if top_k > 0 && top_k < cands.len() {
            cands.select_nth_unstable_by(top_k - 1, rank);
            cands.truncate(top_k);
        }

        // Softmax numerators exp((l - max) / T): subtracting the max before dividing keeps
        // every exponent <= 0, so nothing overflows even for tiny temperatures.
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // Every candidate is impossible; fall back to a deterministic pick.
            return argmax_pairs(cands);
        }
        let inv_t = 1.0 / temperature;
        for c in cands.iter_mut() {
            c.1 = if max == f32::INFINITY {
                // inf - inf is NaN; the +inf logits share all the mass.
                if c.1 == f32::INFINITY { 1.0 } else { 0.0 }
            } else {
                ((c.1 - max) * inv_t).exp()
            };
        }
        let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();

        // Top-p: the smallest set of most likely tokens whose mass reaches top_p (>= 1 token).
        let kept = if top_p < 1.0 {
            nucleus_len(cands, total, f64::from(top_p))
        } else {
            cands.len()
        };
        let kept_cands = &cands[..kept];
        let kept_total: f64 = if kept == cands.len() {
            total
        } else {
            kept_cands.iter().map(|c| f64::from(c.1)).sum()
        };

        // One uniform draw on the renormalised kept mass.
        let target = self.rng.random::<f64>() * kept_total;
        let mut acc = 0.0f64;
        for &(id, p) in kept_cands {
            acc += f64::from(p);
            if target < acc {
                return id;
            }
        }
        // Rounding left `target` at the very top of the range: take the last token with
        // non-zero probability.
        kept_cands
            .iter()
            .rev()
            .find(|c| c.1 > 0.0)
            .map_or(kept_cands[0].0, |c| c.0)
    }
}

/// Moves the nucleus to the front of `cands` and returns its length: the smallest `m` such
/// that the `m` best candidates (descending probability, ties to the lower id) hold at least
/// `top_p` of `total`, the unnormalised mass of all of them. The prefix is not sorted.
///
/// Peaked distributions (the usual case) have small nuclei, so the first step sorts only
/// the best [`NUCLEUS_SMALL`] candidates. Flat ones (high temperature) can need most of the
/// vocabulary; sorting 50k-150k entries per token would cost milliseconds, so the rest is a
/// quickselect on cumulative mass: partition around a median, keep the half that contains
/// the boundary, O(n) expected.
fn nucleus_len(cands: &mut [(u32, f32)], total: f64, top_p: f64) -> usize {
    let target = top_p * total;
    let n = cands.len();
    // Invariant: cands[..lo] are the `lo` best candidates with mass `acc` < target, and
    // cands[lo..hi] are exactly the next `hi - lo` best ones, with the boundary among them.
    let first = NUCLEUS_SMALL.min(n);
    if first < n {
        cands.select_nth_unstable_by(first - 1, rank);
    }
    cands[..first].sort_unstable_by(rank);
    let mut acc = 0.0f64;
    for (i, c) in cands[..first].iter().enumerate() {
        acc += f64::from(c.1);
        if acc >= target {
            return i + 1;
        }
    }
    let mut lo = first;
    let mut hi = n;

    while hi - lo > NUCLEUS_SMALL {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by(mid - lo, rank);
        let upper: f64 = cands[lo..=mid].iter().map(|c| f64::from(c.1)).sum();
        if acc + upper >= target {
            hi = mid + 1;
        } else {
            acc += upper;
            lo = mid + 1;
        }
    }
    cands[lo..hi].sort_unstable_by(rank);
    for (i, c) in cands[lo..hi].iter().enumerate() {
        acc += f64::from(c.1);
        if acc >= target {
            return lo + i + 1;
        }
    }
    // Only reachable through rounding (the sums above are taken in different orders):
    // everything up to `hi` is in the nucleus.
    hi
}

fn nan_to_neg_inf(x: f32) -> f32 {
    if x.is_nan() { f32::NEG_INFINITY } else { x }
}

/// Descending by value, ties (including `-0.0` vs `0.0`) to the lower id; NaN ranks last.
fn rank(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    nan_to_neg_inf(b.1)
        .partial_cmp(&nan_to_neg_inf(a.1))
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// First candidate in [`rank`] order (highest value, ties to the lower id).
fn argmax_pairs(cands: &[(u32, f32)]) -> u32 {
    cands
        .iter()
        .copied()
        .reduce(|best, c| {
            if rank(&c, &best) == Ordering::Less {
                c
            } else {
                best
            }
        })
        .map_or(0, |c| c.0)
}

/// Index of the largest logit; ties go to the lowest id (what HF's `torch.argmax` and the
/// golden fixtures use). NaN never wins; a row with nothing above `-inf` (or an empty row)
/// returns 0. Called once per greedy token over the whole vocabulary: the largest value first,
/// sixteen lanes at a time (a compare and a select per lane, which the compiler turns into
/// vector maxima), then the first index holding it. The one-pass scan ([`argmax_reference`])
/// carries a compare and a branch through every logit: 42 us per SmolLM2 row (49152 logits)
/// here, against 3 us, which was 3% of a batch-16 decode step and 1% of a batch-1 one.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        if v > best {
            best = v;
        }
    }
    if best == f32::NEG_INFINITY {
        return 0;
    }
    // `==` also matches the other zero: -0.0 and 0.0 tie, as they do for `>`.
    logits.iter().position(|&v| v == best).unwrap_or(0) as u32
}

/// [`argmax`] as one scan: the definition it is tested against.
pub fn argmax_reference(logits: &[f32]) -> u32 {
    let mut best_idx = 0usize;
    let mut best = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best {
            best = v;
            best_idx = i;
        }
    }
    best_idx as u32
}

/// Log-probability of every logit is `(l - max) - ln(sum(exp(l - max)))`. Returns the two
/// parts separately instead of one `logsumexp`: with logits around 1000 an f32 `logsumexp`
/// has an ulp of 6e-5, while `l - max` is exact for nearby values and the log-sum is small.
///
/// `None` when the row is empty, contains NaN, or every logit is `-inf` (no distribution).
fn log_normalizer(logits: &[f32]) -> Option<(f32, f32)> {
    if logits.iter().any(|x| x.is_nan()) {
        return None;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return None;
    }
    if max == f32::INFINITY {
        // exp(inf - inf) is NaN; the +inf entries share all the mass.
        let count = logits.iter().filter(|&&l| l == f32::INFINITY).count();
        return Some((max, (count as f64).ln() as f32));
    }
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    Some((max, sum.ln() as f32))
}

fn log_prob(logit: f32, norm: Option<(f32, f32)>) -> f32 {
    match norm {
        // Only the +inf entries carry probability (each 1/count).
        Some((max, ln_count)) if max == f32::INFINITY && logit == f32::INFINITY => -ln_count,
        Some((max, _)) if max == f32::INFINITY => f32::NEG_INFINITY,
        Some((max, ln_sum)) => (logit - max) - ln_sum,
        None if logit.is_nan() => f32::NAN,
        None => f32::NEG_INFINITY,
    }
}

/// Log-probabilities of the whole row, as returned by the OpenAI `logprobs` option.
/// Softmax is computed in f32 after subtracting the maximum, so large logits cannot
/// overflow; the normaliser is accumulated in f64. A row with a NaN yields NaN for the NaN
/// entries; an all `-inf` row yields `-inf` everywhere.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let norm = log_normalizer(logits);
    logits.iter().map(|&l| log_prob(l, norm)).collect()
}

/// The log-probability of one token: `log_softmax(logits)[tok]` without building the whole row.
pub fn log_softmax_at(logits: &[f32], tok: u32) -> f32 {
    log_prob(logits[tok as usize], log_normalizer(logits))
}

/// The `n` most likely tokens with their log-probabilities, highest first, ties to the
/// lower id. Uses partial selection, so asking for a handful of alternatives does not sort
/// the vocabulary.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let norm = log_normalizer(logits);
    let mut pairs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if n < pairs.len() {
        pairs.select_nth_unstable_by(n - 1, rank);
        pairs.truncate(n);
    }
    pairs.sort_unstable_by(rank);
    for p in &mut pairs {
        p.1 = log_prob(p.1, norm);
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).expect("valid params")
    }

    fn seeded(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        sampler(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        })
    }

    /// A deterministic, bumpy logit row for "realistic vocabulary" tests.
    fn fake_logits(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as f32 * 0.618_034).fract();
                8.0 * x * x - 3.0 + ((i * 7919) % 13) as f32 * 0.05
            })
            .collect()
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = logits.iter().map(|&l| f64::from(l - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn frequencies(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits, &[]) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn argmax_equals_its_one_scan_reference_with_ties_nans_infinities_and_zeros() {
        let mut seed = 11u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        // Few distinct values, so that maxima repeat across lanes and chunks; lengths around
        // the sixteen lanes and a vocabulary's.
        let palette = [
            -1.5,
            0.25,
            2.0,
            -0.0,
            0.0,
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ];
        for len in [0usize, 1, 5, 15, 16, 17, 31, 33, 64, 100, 1000, 49152] {
            for trial in 0..20 {
                // Some rows without infinities or NaN, some of -inf and NaN only.
                let pick = match trial % 4 {
                    0 => 5,
                    1 => 8,
                    2 => 3,
                    _ => 2,
                };
                let row: Vec<f32> = (0..len)
                    .map(|_| match trial % 4 {
                        3 => [f32::NEG_INFINITY, f32::NAN][(next() % 2) as usize],
                        _ => palette[(next() % pick) as usize],
                    })
                    .collect();
                assert_eq!(
                    argmax(&row),
                    argmax_reference(&row),
                    "len {len} trial {trial}: {:?}",
                    &row[..len.min(40)]
                );
            }
        }
    }

    #[test]
    fn argmax_ties_go_to_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0, 5.0]), 0);
        assert_eq!(argmax(&[f32::NAN, -1.0, 0.5, 0.5]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_is_default_and_ignores_seed() {
        assert!(SamplingParams::default().is_greedy());
        let logits = fake_logits(1000);
        let expected = argmax(&logits);
        for seed in [None, Some(1), Some(2)] {
            let mut s = sampler(SamplingParams {
                seed,
                top_k: 5,
                top_p: 0.5,
                ..SamplingParams::default()
            });
            for _ in 0..10 {
                assert_eq!(s.sample(&logits, &[]), expected);
            }
        }
    }

    #[test]
    fn same_seed_same_draws_different_seed_different_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.1).collect();
        let run = |seed| {
            let mut s = seeded(1.0, 0, 1.0, seed);
            (0..100)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<u32>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        // Unseeded samplers still work (OS entropy).
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        });
        assert!(s.sample(&logits, &[]) < 50);
    }

    #[test]
    fn top_k_one_is_argmax_at_any_temperature() {
        let logits = fake_logits(49152);
        let expected = argmax(&logits);
        for t in [0.1, 1.0, 5.0, 100.0] {
            let mut s = seeded(t, 1, 1.0, 7);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]), expected, "temperature {t}");
            }
        }
    }

    #[test]
    fn tiny_top_p_is_argmax() {
        let logits = fake_logits(49152);
        let expected = argmax(&logits);
        for t in [0.5, 1.0, 3.0] {
            let mut s = seeded(t, 0, 1e-6, 11);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]), expected, "temperature {t}");
            }
        }
    }

    #[test]
    fn top_k_and_top_p_keep_draws_inside_the_filtered_set() {
        let logits = fake_logits(49152);
        let top40: Vec<u32> = top_logprobs(&logits, 40).iter().map(|p| p.0).collect();
        let mut s = seeded(1.5, 40, 0.9, 3);
        for _ in 0..200 {
            assert!(top40.contains(&s.sample(&logits, &[])));
        }
    }

    #[test]
    fn repetition_penalty_demotes_repeated_tokens() {
        let greedy_penalized = |logits: &[f32], history: &[u32]| {
            sampler(SamplingParams {
                repetition_penalty: 1.3,
                ..SamplingParams::default()
            })
            .sample(logits, history)
        };
        // Positive logits are divided: 2.0 / 1.3 = 1.54 < 1.8.
        assert_eq!(greedy_penalized(&[2.0, 1.8, 0.0], &[]), 0);
        assert_eq!(greedy_penalized(&[2.0, 1.8, 0.0], &[0]), 1);
        // Negative logits are multiplied: -1.0 * 1.3 = -1.3 < -1.2.
        assert_eq!(greedy_penalized(&[-1.0, -1.2, -5.0], &[0]), 1);
        // A repeated id is penalised once (2.0 / 1.3 = 1.54 > 1.2), not once per occurrence
        // (2.0 / 1.3^3 = 0.91 < 1.2), and out-of-vocabulary ids are ignored.
        assert_eq!(greedy_penalized(&[2.0, 1.2, 0.0], &[0, 0, 0, 99]), 0);
        // Under sampling the penalised token becomes (much) rarer.
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            repetition_penalty: 4.0,
            seed: Some(5),
            ..SamplingParams::default()
        });
        let hits = (0..2000)
            .filter(|_| s.sample(&[3.0, 2.0], &[0]) == 0)
            .count();
        // p(0) = softmax([0.75, 2.0])[0] ≈ 0.223
        assert!((hits as f64 / 2000.0 - 0.223).abs() < 0.03, "{hits}");
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        let logits = [1.0f32, 2.0, 0.5];
        let draws = 20_000;

        let expected = softmax(&logits);
        let got = frequencies(&mut seeded(1.0, 0, 1.0, 1234), &logits, draws);
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 0.02, "got {got:?}, expected {expected:?}");
        }

        // Temperature 0.5 sharpens: softmax(logits / 0.5).
        let scaled: Vec<f32> = logits.iter().map(|l| l / 0.5).collect();
        let expected = softmax(&scaled);
        let got = frequencies(&mut seeded(0.5, 0, 1.0, 99), &logits, draws);
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 0.02, "got {got:?}, expected {expected:?}");
        }

        // top_k = 2 drops token 2 and renormalises the other two.
        let p = softmax(&logits[..2]);
        let got = frequencies(&mut seeded(1.0, 2, 1.0, 5), &logits, draws);
        assert_eq!(got[2], 0.0);
        assert!(
            (got[0] - p[0]).abs() < 0.02 && (got[1] - p[1]).abs() < 0.02,
            "{got:?}"
        );

        // Probabilities 0.5 / 0.3 / 0.2 with top_p = 0.7: the nucleus is {0, 1}
        // (0.5 < 0.7 <= 0.8), renormalised to 0.625 / 0.375.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let got = frequencies(&mut seeded(1.0, 0, 0.7, 77), &logits, draws);
        assert_eq!(got[2], 0.0);
        assert!(
            (got[0] - 0.625).abs() < 0.02 && (got[1] - 0.375).abs() < 0.02,
            "{got:?}"
        );
    }

    #[test]
    fn nucleus_grows_past_the_first_chunk() {
        // A flat distribution over 1000 tokens: top_p = 0.5 needs 500 of them, more than
        // the first sorted chunk.
        let logits = vec![0.0f32; 1000];
        let mut s = seeded(1.0, 0, 0.5, 8);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            let id = s.sample(&logits, &[]);
            assert!(
                id < 500,
                "ties rank by id, so the nucleus is ids 0..500, got {id}"
            );
            seen.insert(id);
        }
        assert!(seen.len() > 400);
    }

    #[test]
    fn nucleus_matches_a_full_sort() {
        for (n, spread) in [
            (10usize, 1.0f32),
            (500, 0.01),
            (5000, 0.001),
            (5000, 3.0),
            (49152, 0.0005),
        ] {
            let probs: Vec<f32> = fake_logits(n).iter().map(|l| (l * spread).exp()).collect();
            let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
            let mut sorted: Vec<(u32, f32)> = probs
                .iter()
                .enumerate()
                .map(|(i, &p)| (i as u32, p))
                .collect();
            sorted.sort_by(rank);
            for top_p in [1e-6, 0.1, 0.5, 0.9, 0.999] {
                let mut acc = 0.0f64;
                let expected = sorted
                    .iter()
                    .position(|c| {
                        acc += f64::from(c.1);
                        acc >= top_p * total
                    })
                    .map_or(n, |i| i + 1);
                let mut cands: Vec<(u32, f32)> = probs
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| (i as u32, p))
                    .collect();
                let m = nucleus_len(&mut cands, total, top_p);
                // Allow one token of slack for summation-order rounding at the boundary.
                assert!(
                    m.abs_diff(expected) <= 1,
                    "n={n} top_p={top_p}: {m} vs {expected}"
                );
                let mut got: Vec<u32> = cands[..m].iter().map(|c| c.0).collect();
                got.sort_unstable();
                let mut want: Vec<u32> = sorted[..m].iter().map(|c| c.0).collect();
                want.sort_unstable();
                assert_eq!(got, want, "n={n} top_p={top_p}");
            }
        }
    }

    #[test]
    fn extreme_temperatures_do_not_produce_nan() {
        let logits = fake_logits(4096);
        let mut cold = seeded(1e-6, 0, 1.0, 1);
        assert_eq!(cold.sample(&logits, &[]), argmax(&logits));
        let mut hot = seeded(1e6, 0, 1.0, 1);
        assert!(hot.sample(&logits, &[]) < 4096);
        let mut impossible = seeded(1.0, 0, 0.9, 1);
        assert_eq!(impossible.sample(&[f32::NEG_INFINITY; 3], &[]), 0);
        assert_eq!(impossible.sample(&[f32::NAN, 1.0], &[]), 1);
        assert_eq!(impossible.sample(&[0.0, f32::INFINITY, 1.0], &[]), 1);
        let lp = log_softmax(&[0.0, f32::INFINITY, f32::INFINITY]);
        assert_eq!(lp[0], f32::NEG_INFINITY);
        assert!((lp[1] - 0.5f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn validate_names_the_field() {
        let check = |p: SamplingParams, field: &str| {
            let err = p.validate().expect_err(field);
            assert!(err.to_string().starts_with(field), "{err}");
            assert!(Sampler::new(p).is_err());
        };
        let base = SamplingParams::default;
        check(
            SamplingParams {
                temperature: -0.1,
                ..base()
            },
            "temperature",
        );
        check(
            SamplingParams {
                temperature: f32::NAN,
                ..base()
            },
            "temperature",
        );
        check(
            SamplingParams {
                temperature: f32::INFINITY,
                ..base()
            },
            "temperature",
        );
        check(
            SamplingParams {
                top_p: 0.0,
                ..base()
            },
            "top_p",
        );
        check(
            SamplingParams {
                top_p: 1.01,
                ..base()
            },
            "top_p",
        );
        check(
            SamplingParams {
                top_p: f32::NAN,
                ..base()
            },
            "top_p",
        );
        check(
            SamplingParams {
                repetition_penalty: 0.0,
                ..base()
            },
            "repetition_penalty",
        );
        check(
            SamplingParams {
                repetition_penalty: -1.0,
                ..base()
            },
            "repetition_penalty",
        );
        assert!(base().validate().is_ok());
        assert!(
            SamplingParams {
                temperature: 0.7,
                top_k: 50,
                top_p: 1.0,
                repetition_penalty: 0.5,
                seed: Some(1)
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn log_softmax_normalises() {
        for logits in [
            fake_logits(49152),
            vec![1000.0, 999.0, -1000.0],
            vec![0.0; 7],
        ] {
            let lp = log_softmax(&logits);
            let total: f64 = lp.iter().map(|&x| f64::from(x).exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "{total}");
            assert!(lp.iter().all(|x| *x <= 0.0));
        }
        assert_eq!(
            log_softmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY])[0],
            f32::NEG_INFINITY
        );
        assert!(log_softmax(&[]).is_empty());
    }

    #[test]
    fn top_logprobs_order_and_values() {
        let logits = [0.5f32, 2.0, -1.0, 2.0, 1.0];
        let lp = log_softmax(&logits);
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3, 4]);
        for &(id, v) in &top {
            assert!((v - lp[id as usize]).abs() < 1e-6);
        }
        assert_eq!(top_logprobs(&logits, 10).len(), 5);
        assert!(top_logprobs(&logits, 0).is_empty());
        // Agrees with a full sort on a large row.
        let big = fake_logits(49152);
        let mut order: Vec<u32> = (0..big.len() as u32).collect();
        order.sort_by(|&a, &b| big[b as usize].total_cmp(&big[a as usize]).then(a.cmp(&b)));
        let top = top_logprobs(&big, 20);
        assert_eq!(
            top.iter().map(|p| p.0).collect::<Vec<_>>(),
            order[..20].to_vec()
        );
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}
