//! ZeRO with FP8 (level O3): whole tensors are assigned to ranks (FP8 tensors are not
//! split: each keeps one scale), largest first, each to the rank with the fewest
//! elements assigned so far (FP8-LM's Algorithm 1). The owner alone keeps the FP16
//! master and the optimizer state of its tensors and sends the updated weights to all.

/// Owner rank of each tensor, given the tensors' sizes. Ties: the earlier tensor goes
/// first; among equally loaded ranks, the lowest rank wins.
pub fn partition(sizes: &[usize], ranks: usize) -> Vec<usize> {
    assert!(ranks > 0, "partition over zero ranks");
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; ranks];
    let mut owner = vec![0usize; sizes.len()];
    for t in order {
        let r = (0..ranks).min_by_key(|&r| (load[r], r)).expect("at least one rank");
        owner[t] = r;
        load[r] += sizes[t];
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_example() {
        // Sorted: 10 (t0), 7 (t1), 7 (t2), 5 (t3), 3 (t4), 2 (t5).
        // t0 -> r0 (0,0: lowest rank) = 10 | t1 -> r1 = 7 | t2 -> r1 (7 < 10) = 14 |
        // t3 -> r0 (10 < 14) = 15 | t4 -> r1 (14 < 15) = 17 | t5 -> r0 (15 < 17) = 17.
        assert_eq!(partition(&[10, 7, 7, 5, 3, 2], 2), vec![0, 1, 1, 0, 1, 0]);
        // Three ranks: 10 -> r0, 7 -> r1, 7 -> r2, 5 -> r1 (7, lower than r2), 3 -> r2, 2 -> r0.
        assert_eq!(partition(&[10, 7, 7, 5, 3, 2], 3), vec![0, 1, 2, 1, 2, 0]);
        assert_eq!(partition(&[4, 4], 1), vec![0, 0]);
    }

    #[test]
    fn loads_are_balanced_on_a_gpt_like_list() {
        let sizes = [16384, 4096, 64, 64, 12288, 192, 4096, 64, 64, 64, 16384, 256, 16384, 64, 64, 64];
        for ranks in [2, 4] {
            let owner = partition(&sizes, ranks);
            let mut load = vec![0; ranks];
            for (t, &r) in owner.iter().enumerate() {
                load[r] += sizes[t];
            }
            let (lo, hi) = (*load.iter().min().unwrap(), *load.iter().max().unwrap());
            assert!(hi - lo <= 16384, "{load:?}");
        }
    }
}
