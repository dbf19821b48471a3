//! FP8 encode/decode against independent golden vectors: `tests/golden/fp8_*.tsv`,
//! written from ml_dtypes by `scripts/golden_fp8.py`; the polynomial exponential and the
//! cross-entropy's exponential against `tests/golden/exp*.tsv`, written by
//! `scripts/golden_exp2.py` from the contract's text with exact rational arithmetic
//! (both run by hand, output committed).

use fp8sim::fp8::{decode, encode, Fp8Format};
use std::path::PathBuf;

fn golden(name: &str) -> Vec<Vec<u32>> {
    golden_n(name, 3)
}

fn golden_n(name: &str, fields: usize) -> Vec<Vec<u32>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("golden file {} is required by this test: {e}", path.display()));
    let rows: Vec<Vec<u32>> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(|f| u32::from_str_radix(f, 16).expect("hex field")).collect())
        .collect();
    assert!(rows.iter().all(|r| r.len() == fields), "{name}: every row has {fields} fields");
    rows
}

#[test]
fn decode_matches_every_golden_row() {
    let rows = golden("fp8_decode.tsv");
    assert_eq!(rows.len(), 256);
    for r in rows {
        let code = r[0] as u8;
        assert_eq!(decode(Fp8Format::E4M3, code).to_bits(), r[1], "e4m3 code {code:#04x}");
        assert_eq!(decode(Fp8Format::E5M2, code).to_bits(), r[2], "e5m2 code {code:#04x}");
    }
}

fn is_nan_code(fmt: Fp8Format, code: u8) -> bool {
    decode(fmt, code).is_nan()
}

#[test]
fn encode_matches_every_golden_row() {
    let rows = golden("fp8_encode.tsv");
    assert!(rows.len() > 10_000, "golden encode file looks truncated ({} rows)", rows.len());
    let mut checked = 0;
    for r in &rows {
        let x = f32::from_bits(r[0]);
        for (fmt, want) in [(Fp8Format::E4M3, r[1] as u8), (Fp8Format::E5M2, r[2] as u8)] {
            let got = encode(fmt, x, false);
            if x.is_nan() {
                assert!(is_nan_code(fmt, got), "{fmt}: NaN input {:#010x} gave {got:#04x}", r[0]);
            } else {
                assert_eq!(got, want, "{fmt}: input {:#010x} ({x:e})", r[0]);
            }
            // Saturating = the same rounding applied to the input clipped to +-max.
            let sat = encode(fmt, x, true);
            if x.is_nan() {
                assert_eq!(sat, 0x7f);
            } else {
                let clipped = x.clamp(-fmt.max(), fmt.max());
                assert_eq!(sat, encode(fmt, clipped, false), "{fmt} saturating: input {x:e}");
                if x.abs() <= fmt.max() {
                    assert_eq!(sat, want);
                }
            }
            checked += 1;
        }
    }
    eprintln!("checked {checked} encodings");
}

#[test]
fn exp2_fast_matches_every_golden_row() {
    let rows = golden_n("exp2_fast.tsv", 2);
    assert!(rows.len() > 9000, "golden exp2_fast file looks truncated ({} rows)", rows.len());
    for r in rows {
        let got = fp8sim::math::exp2_fast(f32::from_bits(r[0])).to_bits();
        assert_eq!(got, r[1], "exp2_fast({:#010x} = {:e}): {got:#010x}", r[0], f32::from_bits(r[0]));
    }
}

#[test]
fn the_cross_entropy_exponential_matches_every_golden_row() {
    use fp8sim::math::{exp_from_max, LOG2E};
    let rows = golden_n("exp_from_max.tsv", 3);
    assert_eq!(rows.len(), 6000);
    for r in rows {
        let (l, m) = (f32::from_bits(r[0]), f32::from_bits(r[1]));
        let got = exp_from_max(l, m * LOG2E).to_bits();
        assert_eq!(got, r[2], "e^({l:e} - {m:e}): {got:#010x}");
    }
}
