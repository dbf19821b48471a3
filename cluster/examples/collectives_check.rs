//! Run under mpirun by the test suite: `fp8cluster::check::check_collectives` on MPI.
//! Prints "collectives ok on N ranks" or exits non-zero with the failing check.

use fp8cluster::world::World;

fn main() {
    let w = World::init(1).expect("join");
    match fp8cluster::check::check_collectives(&w) {
        Ok(()) if w.rank == 0 => println!("collectives ok on {} ranks", w.size),
        Ok(()) => {}
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
