//! One process per run folder: an exclusive `flock` on `RUN/.lock`, taken before
//! anything in the folder is written and held until the process ends. The kernel drops
//! the lock when its holder dies (even by kill -9), so a lock is never stale: a file
//! left by a dead run is simply taken over (and said so).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Holds the run folder until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    /// The pid written by an earlier holder that ended without releasing it.
    pub taken_over_from: Option<u32>,
}

impl RunLock {
    pub fn acquire(run_dir: &Path) -> Result<RunLock, String> {
        let path = run_dir.join(".lock");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open the run folder's lock {}: {e}", path.display()))?;
        let mut old = String::new();
        let _ = f.read_to_string(&mut old);
        let holder: Option<u32> = old.trim().parse().ok();
        // SAFETY: flock on a descriptor this File owns; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                format!(
                    "run folder {} is in use by another fp8train process{}; wait for it to finish, or train into \
                     another folder (--name)",
                    run_dir.display(),
                    holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
                )
            } else {
                format!("cannot lock the run folder {}: {err}", run_dir.display())
            });
        }
        let me = std::process::id();
        let _ = f.set_len(0).and_then(|_| f.rewind()).and_then(|_| writeln!(f, "{me}"));
        Ok(RunLock { _file: f, taken_over_from: holder.filter(|&p| p != me) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_a_dead_holder_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".lock"), "not a pid\n").unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(first.taken_over_from, None, "an unparsable pid is no holder");
        // flock locks belong to the open file: a second open in this process conflicts
        // just as another process would.
        let e = RunLock::acquire(dir.path()).unwrap_err();
        assert!(e.contains("in use by another fp8train process") && e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        std::fs::write(dir.path().join(".lock"), "12345\n").unwrap();
        let again = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(again.taken_over_from, Some(12345));
    }
}
