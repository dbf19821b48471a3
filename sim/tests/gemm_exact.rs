//! The blocked, vectorised, multithreaded exact GEMM equals the specification (the
//! naive triple loop of sequential fmas) bit for bit: every operand type, every
//! transpose layout, odd shapes, every kernel of this CPU, 1, 2 and 4 threads.

use fp8sim::fp8::{encode, Fp8Format};
use fp8sim::half16::{bf16, to_bf16};
use fp8sim::ops::gemm::{self, gemm_exact_isa, gemm_naive, GemmError, Isa, MatRef, Operand};
use fp8sim::rng;

fn normals(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    rng::fill_normal(seed, 0, 0, 0.0, std, &mut v);
    v
}

/// Operand storage of one type.
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    Fp8(Vec<u8>, Fp8Format),
}

impl Store {
    fn new(kind: &str, n: usize, seed: u64) -> Store {
        let x = normals(n, seed, 2.0);
        match kind {
            "f32" => Store::F32(x),
            "bf16" => Store::Bf16(x.iter().map(|&v| to_bf16(v)).collect()),
            "e4m3" => Store::Fp8(x.iter().map(|&v| encode(Fp8Format::E4M3, v * 64.0, true)).collect(), Fp8Format::E4M3),
            "e5m2" => Store::Fp8(x.iter().map(|&v| encode(Fp8Format::E5M2, v * 64.0, true)).collect(), Fp8Format::E5M2),
            _ => unreachable!(),
        }
    }
    fn op(&self) -> Operand<'_> {
        match self {
            Store::F32(v) => Operand::F32(v),
            Store::Bf16(v) => Operand::Bf16(v),
            Store::Fp8(v, f) => Operand::Fp8(v, *f),
        }
    }
}

/// A logical `rows x cols` view of `store`, stored row-major or transposed.
fn view(store: &Store, rows: usize, cols: usize, transposed: bool) -> MatRef<'_> {
    if transposed {
        MatRef::row_major(store.op(), cols, rows).t()
    } else {
        MatRef::row_major(store.op(), rows, cols)
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn blocked_equals_naive_for_every_type_layout_kernel_and_thread_count() {
    let pools: Vec<_> =
        [1, 2, 4].iter().map(|&t| (t, rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap())).collect();
    // (m, n, k): not multiples of any tile or block, k crossing the k-block of 256,
    // n crossing several slivers, and degenerate ones.
    let shapes = [(1, 1, 1), (7, 13, 5), (33, 65, 300), (97, 47, 513), (130, 200, 64), (5, 300, 257), (3, 4, 0)];
    let type_pairs = [("f32", "f32"), ("bf16", "bf16"), ("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e4m3", "e5m2")];
    let mut cases = 0;
    for (si, &(m, n, k)) in shapes.iter().enumerate() {
        for (ti, &(ta, tb)) in type_pairs.iter().enumerate() {
            let sa = Store::new(ta, m * k, (si * 10 + ti) as u64);
            let sb = Store::new(tb, k * n, (si * 10 + ti + 100) as u64);
            for (ta_t, tb_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = view(&sa, m, k, ta_t);
                let b = view(&sb, k, n, tb_t);
                let scale = if ta == "f32" { 1.0 } else { 1.0 / 4096.0 };
                let want = bits(&gemm_naive(a, b, scale).unwrap());
                for isa in Isa::available() {
                    for (t, pool) in &pools {
                        let mut c = vec![f32::NAN; m * n];
                        pool.install(|| gemm_exact_isa(isa, a, b, scale, &mut c)).unwrap();
                        assert!(
                            bits(&c) == want,
                            "mismatch: {m}x{n}x{k} {ta}{}x{tb}{} kernel {isa:?} threads {t}",
                            if ta_t { "^T" } else { "" },
                            if tb_t { "^T" } else { "" }
                        );
                        cases += 1;
                    }
                }
            }
        }
    }
    eprintln!("{cases} GEMM cases bit-identical to the naive loop (kernels {:?})", Isa::available());
}

#[test]
fn the_fma_chain_is_observable() {
    // Summing the same products with separate multiply and add (or another order)
    // changes bits on this input, so the equality above really pins the order.
    let (m, n, k) = (16, 16, 300);
    let a = normals(m * k, 1, 1.0);
    let b = normals(k * n, 2, 1.0);
    let c =
        gemm_naive(MatRef::row_major(Operand::F32(&a), m, k), MatRef::row_major(Operand::F32(&b), k, n), 1.0).unwrap();
    let mut differs = 0;
    for i in 0..m {
        for j in 0..n {
            let unfused = (0..k).fold(0f32, |acc, p| acc + a[i * k + p] * b[p * n + j]);
            let reversed = (0..k).rev().fold(0f32, |acc, p| a[i * k + p].mul_add(b[p * n + j], acc));
            differs += usize::from(unfused.to_bits() != c[i * n + j].to_bits());
            differs += usize::from(reversed.to_bits() != c[i * n + j].to_bits());
        }
    }
    assert!(differs > 100, "only {differs} of 512 alternatives differ");
}

#[test]
fn linear_layer_products() {
    // forward Y = X W^T, dgrad dX = dY W, wgrad dW = dY^T X against naive loops.
    let (m, n, k) = (37, 29, 41);
    let q = |v: &[f32], f| v.iter().map(|&x| encode(f, x * 32.0, true)).collect::<Vec<u8>>();
    let x = q(&normals(m * k, 3, 1.0), Fp8Format::E4M3);
    let w = q(&normals(n * k, 4, 1.0), Fp8Format::E4M3);
    let dy = q(&normals(m * n, 5, 1.0), Fp8Format::E5M2);
    let d = |c: &[u8], f, i: usize| fp8sim::fp8::decode(f, c[i]);
    let s = 1.0 / 1024.0;
    let (e4, e5) = (Fp8Format::E4M3, Fp8Format::E5M2);

    let mut y = vec![0f32; m * n];
    gemm::forward(Operand::Fp8(&x, e4), Operand::Fp8(&w, e4), m, n, k, s, &mut y).unwrap();
    let mut dx = vec![0f32; m * k];
    gemm::dgrad(Operand::Fp8(&dy, e5), Operand::Fp8(&w, e4), m, n, k, s, &mut dx).unwrap();
    let mut dw = vec![0f32; n * k];
    gemm::wgrad(Operand::Fp8(&dy, e5), Operand::Fp8(&x, e4), m, n, k, s, &mut dw).unwrap();
    for i in 0..m {
        for j in 0..n {
            let acc = (0..k).fold(0f32, |acc, p| d(&x, e4, i * k + p).mul_add(d(&w, e4, j * k + p), acc));
            assert_eq!(y[i * n + j].to_bits(), (acc * s).to_bits());
        }
        for j in 0..k {
            let acc = (0..n).fold(0f32, |acc, p| d(&dy, e5, i * n + p).mul_add(d(&w, e4, p * k + j), acc));
            assert_eq!(dx[i * k + j].to_bits(), (acc * s).to_bits());
        }
    }
    for i in 0..n {
        for j in 0..k {
            let acc = (0..m).fold(0f32, |acc, p| d(&dy, e5, p * n + i).mul_add(d(&x, e4, p * k + j), acc));
            assert_eq!(dw[i * k + j].to_bits(), (acc * s).to_bits());
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let a = vec![0f32; 6];
    let e = vec![0u8; 6];
    let mut c = vec![0f32; 4];
    let f = |d| MatRef::row_major(Operand::F32(d), 2, 3);
    let err = gemm_exact_isa(Isa::Portable, f(&a), f(&a), 1.0, &mut c).unwrap_err();
    assert!(matches!(err, GemmError::Shape(ref s) if s.contains("inner dimensions")), "{err}");
    let err = gemm_exact_isa(Isa::Portable, f(&a), f(&a).t(), 1.0, &mut c[..3]).unwrap_err();
    assert!(matches!(err, GemmError::Shape(ref s) if s.contains("output has 3")), "{err}");
    let e5 = MatRef::row_major(Operand::Fp8(&e, Fp8Format::E5M2), 2, 3);
    let err = gemm_exact_isa(Isa::Portable, e5, e5.t(), 1.0, &mut c).unwrap_err();
    assert_eq!(err, GemmError::Types("e5m2", "e5m2"));
    let err = gemm_exact_isa(Isa::Portable, f(&a), e5.t(), 1.0, &mut c).unwrap_err();
    assert_eq!(err, GemmError::Types("f32", "e5m2"));
    let short = MatRef { row_stride: 4, ..f(&a) };
    assert!(gemm_naive(short, f(&a).t(), 1.0).is_err());
}
