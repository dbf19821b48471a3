//! How each parameter splits over the ranks of a tensor-parallel group (Megatron-style,
//! issue "FP8 tensor and sequence parallelism"): the QKV layer column-parallel by heads
//! (rank r takes its heads' rows of q, of k and of v), the MLP-up layer column-parallel
//! (rows of the weight and of the bias), the attention and MLP projections row-parallel
//! (columns of the weight; their bias is added once, after the reduce-scatter, so it is
//! replicated), the token embedding vocabulary-parallel (rows), the rest (layernorms,
//! position embedding) replicated.
//!
//! A checkpoint holds whole tensors whatever the layout: [`gather`] rebuilds a tensor
//! from its shards in rank order and [`shard`] cuts rank r's piece, so a run saved at
//! one tensor-parallel size resumes at another, and `model.safetensors` stays what a
//! PyTorch user loads.

use super::config::ModelConfig;
use super::params::{self, ParamSpec};

/// The split of one tensor over `tp` ranks (the first dimension is the row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds the whole tensor.
    Replicated,
    /// The rows form `blocks` equal blocks (QKV: q, k, v); rank r holds the r-th
    /// `1/tp` of each block's rows, the blocks in order.
    Rows { blocks: usize },
    /// Rank r holds the r-th `1/tp` of every row's columns.
    Cols,
}

/// The split of parameter `i` of `cfg` (index as in `params::specs`).
pub fn split_of(cfg: &ModelConfig, i: usize) -> Split {
    if i == params::WTE {
        return Split::Rows { blocks: 1 };
    }
    if i < 2 || i >= params::lnf_w(cfg) {
        return Split::Replicated;
    }
    match (i - 2) % params::PER_LAYER {
        params::QKV_W | params::QKV_B => Split::Rows { blocks: 3 },
        params::FC_W | params::FC_B => Split::Rows { blocks: 1 },
        params::PROJ_W | params::FCPROJ_W => Split::Cols,
        _ => Split::Replicated,
    }
}

/// Whether `cfg` can run at tensor-parallel size `tp`, with an error naming what does
/// not divide: heads (attention is split by heads), the vocabulary (in 32-class chunks
/// per rank: the parallel cross-entropy's chunks must not straddle ranks), the
/// sequence (sequence-parallel regions hold `seq_len / tp` positions per rank).
pub fn check(cfg: &ModelConfig, tp: usize) -> Result<(), String> {
    if tp == 0 {
        return Err("tensor-parallel size 0: give at least 1".into());
    }
    if !cfg.n_head.is_multiple_of(tp) {
        return Err(format!("--tp {tp} does not divide model.n_head = {} (attention is split by heads)", cfg.n_head));
    }
    if !cfg.vocab_size.is_multiple_of(32 * tp) {
        return Err(format!(
            "--tp {tp}: model.vocab_size = {} must be a multiple of 32 x {tp} = {} (the vocabulary-parallel \
             cross-entropy splits it in 32-class chunks per rank; pad the vocabulary, as GPT-2's 50304)",
            cfg.vocab_size,
            32 * tp
        ));
    }
    if !cfg.seq_len.is_multiple_of(tp) {
        return Err(format!(
            "--tp {tp} does not divide model.seq_len = {} (sequence-parallel regions hold seq_len / tp positions)",
            cfg.seq_len
        ));
    }
    Ok(())
}

/// The shape of rank r's piece of a tensor of `shape` under `split` (`tp` dividing the
/// split dimension; see [`check`]).
pub fn shard_shape(shape: &[usize], split: Split, tp: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    match split {
        Split::Replicated => {}
        Split::Rows { .. } => s[0] /= tp,
        Split::Cols => {
            let last = s.len() - 1;
            s[last] /= tp;
        }
    }
    s
}

/// The runs of consecutive elements of the whole tensor (row-major, `shape`) that rank
/// r's piece holds, as (first element, length), in the piece's order: a piece is these
/// runs one after another. Row splits give one run per block, column splits one per row.
pub fn piece_runs(shape: &[usize], split: Split, r: usize, tp: usize) -> Vec<(usize, usize)> {
    assert!(r < tp, "piece_runs: rank {r} of {tp}");
    let n: usize = shape.iter().product();
    match split {
        Split::Replicated => vec![(0, n)],
        Split::Rows { blocks } => {
            let (rows, row) = (shape[0], n / shape[0].max(1));
            let per_block = rows / blocks;
            let mine = per_block / tp;
            (0..blocks).map(|b| ((b * per_block + r * mine) * row, mine * row)).collect()
        }
        Split::Cols => {
            let cols = shape[shape.len() - 1];
            let mine = cols / tp;
            (0..n / cols.max(1)).map(|i| (i * cols + r * mine, mine)).collect()
        }
    }
}

/// Rank r's piece of the whole tensor `full` (row-major, `shape`).
pub fn shard<T: Copy>(full: &[T], shape: &[usize], split: Split, r: usize, tp: usize) -> Vec<T> {
    assert_eq!(full.len(), shape.iter().product::<usize>(), "shard: the data is not of its shape");
    piece_runs(shape, split, r, tp).into_iter().flat_map(|(at, len)| full[at..at + len].iter().copied()).collect()
}

/// The whole tensor from its `tp` pieces in rank order (the inverse of [`shard`];
/// a replicated tensor is rank 0's copy).
pub fn gather<T: Copy + Default>(pieces: &[Vec<T>], shape: &[usize], split: Split) -> Vec<T> {
    let tp = pieces.len();
    assert!(tp > 0, "gather: no pieces");
    let n: usize = shape.iter().product();
    if split == Split::Replicated {
        return pieces[0].clone();
    }
    let mut full = vec![T::default(); n];
    for (r, piece) in pieces.iter().enumerate() {
        assert_eq!(piece.len(), n / tp, "gather: piece {r} has the wrong size");
        let mut from = 0;
        for (at, len) in piece_runs(shape, split, r, tp) {
            full[at..at + len].copy_from_slice(&piece[from..from + len]);
            from += len;
        }
    }
    full
}

/// The whole tensor from every rank's piece over a tensor-parallel group (the checkpoint
/// writer's gather: a checkpoint holds whole tensors whatever the layout), on every rank:
/// the pieces all-gathered in rank order, then [`gather`]. A replicated tensor is this
/// rank's own (every rank holds the same).
pub fn gather_pieces<T, C>(g: &C, piece: &[T], shape: &[usize], split: Split) -> Vec<T>
where
    T: Copy + Default + fp8cluster::world::Equivalence + bytemuck::Pod,
    C: fp8cluster::world::Collectives,
{
    if split == Split::Replicated || g.size() == 1 {
        return piece.to_vec();
    }
    let mut all = vec![T::default(); piece.len() * g.size()];
    g.all_gather(piece, &mut all);
    let pieces: Vec<Vec<T>> = all.chunks(piece.len()).map(<[T]>::to_vec).collect();
    gather(&pieces, shape, split)
}

/// Every parameter's split and its shard shape at `tp`, in `params::specs` order.
pub fn layout(cfg: &ModelConfig, tp: usize) -> Vec<(ParamSpec, Split, Vec<usize>)> {
    params::specs(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let split = split_of(cfg, i);
            let shape = shard_shape(&spec.shape, split, tp);
            (spec, split, shape)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig { n_layer: 2, n_embd: 16, n_head: 4, seq_len: 8, vocab_size: 128 }
    }

    #[test]
    fn every_parameter_shards_and_gathers_back_at_every_size() {
        let cfg = cfg();
        for tp in [1, 2, 4] {
            check(&cfg, tp).unwrap();
            for (i, (spec, split, shape)) in layout(&cfg, tp).into_iter().enumerate() {
                let full: Vec<u32> = (0..spec.numel() as u32).collect();
                let pieces: Vec<Vec<u32>> = (0..tp).map(|r| shard(&full, &spec.shape, split, r, tp)).collect();
                for p in &pieces {
                    assert_eq!(p.len(), shape.iter().product::<usize>(), "{}: piece size", spec.name);
                }
                assert_eq!(gather(&pieces, &spec.shape, split), full, "{} (param {i}) at tp = {tp}", spec.name);
                if split != Split::Replicated && tp > 1 {
                    // The pieces are disjoint: every element in exactly one.
                    let mut seen: Vec<u32> = pieces.concat();
                    seen.sort_unstable();
                    assert_eq!(seen, full, "{}: pieces overlap or miss", spec.name);
                }
            }
        }
    }

    /// Over a group of 1, 2 and 4 thread ranks, every parameter's pieces gather back into
    /// the whole tensor on every rank (what the checkpoint writer needs).
    #[test]
    fn pieces_gather_over_a_group_on_every_rank() {
        let cfg = cfg();
        for tp in [1, 2, 4] {
            for (i, (spec, split, _)) in layout(&cfg, tp).into_iter().enumerate() {
                let full: Vec<f32> = (0..spec.numel()).map(|k| k as f32 * 0.5 - i as f32).collect();
                let got = fp8cluster::local::run_group(tp, |g| {
                    let piece = shard(&full, &spec.shape, split, fp8cluster::world::Collectives::rank(g), tp);
                    gather_pieces(g, &piece, &spec.shape, split)
                });
                for (r, whole) in got.iter().enumerate() {
                    assert_eq!(whole, &full, "{} at tp = {tp}, rank {r}", spec.name);
                }
            }
        }
    }

    /// A piece's initial values drawn by themselves (`params::init_runs` over the piece's
    /// runs) are the piece of the whole tensor's initial values: a tensor-parallel rank
    /// initializes its parameters without making the whole model.
    #[test]
    fn a_piece_initializes_as_the_piece_of_the_whole_tensor() {
        let cfg = cfg();
        for tp in [1, 2, 4] {
            for (i, (spec, split, _)) in layout(&cfg, tp).into_iter().enumerate() {
                let full = params::init_values(&spec, 11, i);
                for r in 0..tp {
                    let runs = piece_runs(&spec.shape, split, r, tp);
                    let piece = params::init_runs(&spec, 11, i, &runs);
                    let want = shard(&full, &spec.shape, split, r, tp);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&piece), bits(&want), "{} at tp = {tp}, rank {r}", spec.name);
                }
            }
        }
    }

    /// What the column-parallel layers rely on: a rank's product with its piece of a
    /// row-split weight (QKV's three blocks, MLP-up's one) is, bit for bit, the columns of
    /// the unsplit product that the piece's rows make (each output element is its own fma
    /// chain over k), in the forward product and in the weight gradient (the piece's rows
    /// of dW from the output gradient's matching columns); FP8 operands too.
    #[test]
    fn a_column_parallel_product_is_the_unsplit_products_columns() {
        use crate::backend::sim::Sim;
        use crate::backend::{Backend, Operand, Product};
        use fp8sim::fp8::{encode_scaled, Fp8Format};
        let be = Sim;
        let (m, k, n, tp) = (10, 24, 36, 2);
        let val = |i: usize, s: usize| (((i * 2654435761 + s) % 997) as f32 - 498.0) / 256.0;
        let x: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| val(i, 2)).collect();
        let dy: Vec<f32> = (0..m * n).map(|i| val(i, 3)).collect();
        let codes = |v: &[f32]| {
            let mut q = vec![0u8; v.len()];
            encode_scaled(Fp8Format::E4M3, v, 64.0, &mut q);
            q
        };
        for blocks in [1, 3] {
            let split = Split::Rows { blocks };
            let wshape = vec![n, k];
            let run = |wv: &[f32], dv: &[f32], nn: usize, fp8: bool| {
                let (xb, wb, db) = (be.upload(&x).unwrap(), be.upload(wv).unwrap(), be.upload(dv).unwrap());
                let (xq, wq) = (be.upload(&codes(&x)).unwrap(), be.upload(&codes(wv)).unwrap());
                let (xa, wa) = if fp8 {
                    (Operand::Fp8(&xq, Fp8Format::E4M3, 1.0.into()), Operand::Fp8(&wq, Fp8Format::E4M3, 1.0.into()))
                } else {
                    (Operand::F32(&xb), Operand::F32(&wb))
                };
                let mut y = be.zeros::<f32>(m * nn).unwrap();
                be.matmul(&mut y, xa, wa, Product::Forward, m, nn, k, 1.0).unwrap();
                let mut dw = be.zeros::<f32>(nn * k).unwrap();
                be.matmul(&mut dw, Operand::F32(&db), Operand::F32(&xb), Product::Wgrad, m, nn, k, 1.0).unwrap();
                (be.download(&y).unwrap(), be.download(&dw).unwrap())
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for fp8 in [false, true] {
                let (y, dw) = run(&w, &dy, n, fp8);
                // The output's columns as a [n, m] tensor's rows, to cut them like the weight's rows.
                let yt: Vec<f32> = (0..n * m).map(|i| y[(i % m) * n + i / m]).collect();
                let dyt: Vec<f32> = (0..n * m).map(|i| dy[(i % m) * n + i / m]).collect();
                for r in 0..tp {
                    let wp = shard(&w, &wshape, split, r, tp);
                    let dyp_t = shard(&dyt, &[n, m], split, r, tp);
                    let np = n / tp;
                    let dyp: Vec<f32> = (0..m * np).map(|i| dyp_t[(i % np) * m + i / np]).collect();
                    let (yp, dwp) = run(&wp, &dyp, np, fp8);
                    let want_t = shard(&yt, &[n, m], split, r, tp);
                    let got_t: Vec<f32> = (0..np * m).map(|i| yp[(i % m) * np + i / m]).collect();
                    assert_eq!(bits(&got_t), bits(&want_t), "forward, blocks {blocks}, fp8 {fp8}, rank {r}");
                    assert_eq!(bits(&dwp), bits(&shard(&dw, &wshape, split, r, tp)), "weight gradient, rank {r}");
                }
            }
        }
    }

    #[test]
    fn a_qkv_shard_holds_its_heads_q_k_and_v_rows() {
        let cfg = cfg();
        let (c, tp) = (cfg.n_embd, 2);
        let hs = c / cfg.n_head;
        let i = params::layer_param(1, params::QKV_W);
        let spec = &params::specs(&cfg)[i];
        assert_eq!(split_of(&cfg, i), Split::Rows { blocks: 3 });
        // Element value = its row: a piece's rows are then readable.
        let full: Vec<usize> = (0..3 * c).flat_map(|row| std::iter::repeat_n(row, c)).collect();
        for r in 0..tp {
            let piece = shard(&full, &spec.shape, Split::Rows { blocks: 3 }, r, tp);
            let rows: Vec<usize> = piece.chunks(c).map(|row| row[0]).collect();
            let heads = cfg.n_head / tp;
            let want: Vec<usize> =
                (0..3).flat_map(|part| (r * heads * hs..(r + 1) * heads * hs).map(move |k| part * c + k)).collect();
            assert_eq!(rows, want, "rank {r}: q, k and v rows of heads {}..{}", r * heads, (r + 1) * heads);
        }
    }

    #[test]
    fn the_splits_are_megatrons() {
        let cfg = cfg();
        let at = |k: usize| split_of(&cfg, params::layer_param(0, k));
        assert_eq!(split_of(&cfg, params::WTE), Split::Rows { blocks: 1 });
        assert_eq!(split_of(&cfg, params::WPE), Split::Replicated);
        assert_eq!(at(params::FC_W), Split::Rows { blocks: 1 });
        assert_eq!(at(params::FC_B), Split::Rows { blocks: 1 });
        assert_eq!(at(params::PROJ_W), Split::Cols);
        assert_eq!(at(params::FCPROJ_W), Split::Cols);
        for k in [params::LN1_W, params::LN1_B, params::PROJ_B, params::LN2_W, params::LN2_B, params::FCPROJ_B] {
            assert_eq!(at(k), Split::Replicated, "block parameter {k}");
        }
        assert_eq!(split_of(&cfg, params::lnf_w(&cfg)), Split::Replicated);
        assert_eq!(split_of(&cfg, params::lnf_w(&cfg) + 1), Split::Replicated);
    }

    #[test]
    fn sizes_that_do_not_divide_are_errors_naming_the_field() {
        let cfg = cfg();
        assert!(check(&cfg, 3).unwrap_err().contains("n_head"));
        assert!(check(&cfg, 0).is_err());
        let odd_vocab = ModelConfig { vocab_size: 96, ..cfg.clone() };
        assert!(check(&odd_vocab, 2).unwrap_err().contains("vocab_size"));
        let short = ModelConfig { seq_len: 6, ..cfg.clone() };
        assert!(check(&short, 4).unwrap_err().contains("seq_len"));
        assert!(check(&ModelConfig { n_head: 8, ..cfg }, 8).unwrap_err().contains("vocab_size"));
    }
}
