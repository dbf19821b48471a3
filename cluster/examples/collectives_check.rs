//! Run under mpirun by the test suite: `fp8cluster::check::check_collectives` on MPI,
//! and with a tensor-parallel size argument (`collectives_check 2`) the tensor-parallel
//! groups and FP8 collectives (`check_tp_collectives`) too. Prints "collectives ok on N
//! ranks" (with ", tp T") or exits non-zero with the failing check.

use fp8cluster::world::World;

fn main() {
    let tp: usize = std::env::args().nth(1).map(|a| a.parse().expect("tp: a number")).unwrap_or(1);
    let w = World::init(tp).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let r = fp8cluster::check::check_collectives(&w).and_then(|_| {
        if tp > 1 {
            fp8cluster::check::check_tp_collectives(&w)
        } else {
            Ok(())
        }
    });
    match r {
        Ok(()) if w.rank == 0 => {
            let tp = if tp > 1 { format!(", tp {tp}") } else { String::new() };
            println!("collectives ok on {} ranks{tp}", w.size)
        }
        Ok(()) => {}
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
