//! Checkpoints: one folder per saved step, `RUN/checkpoints/step-NNNNNN/`, holding
//!
//! - `model.safetensors`: the weights as f32 (exact values of the masters), loadable by
//!   Python's `safetensors` + PyTorch; tensor names are listed in the README;
//! - `state.safetensors`: everything else a bit-identical resume needs, in its stored
//!   formats (FP16 masters, E4M3/FP16 or f32 Adam moments) with the scales, amax
//!   histories, gradient scale mu, step counters and the run config in its metadata
//!   (floats as their bit patterns);
//! - `manifest.json`: size and SHA-256 of both files, written last.
//!
//! A tensor-parallel run (tp > 1) writes whole tensors into `model.safetensors` (the
//! pieces gathered in rank order) and one state file per piece, `state-tp{r}.safetensors`,
//! each in its stored formats with its own scales; `manifest.json` records `tp`. Resuming
//! at the same tensor-parallel size loads each rank's piece as written (bit-identical);
//! at another size (or on one rank) the loader decodes every piece, rebuilds the whole
//! tensors and cuts the new pieces, re-encoding scaled state with fresh power-of-two
//! scales (exact unless a value falls below the new scale's FP16/E4M3 range).
//!
//! A checkpoint is written into a temporary folder, every file fsynced, then renamed
//! into place (and the parent fsynced), so a crash leaves either the old state or the
//! new one. Loading verifies sizes and checksums before parsing anything.

use super::config::Config;
use super::dist::Grid;
use crate::backend::Backend;
use crate::model::linear::LinearScaling;
use crate::model::params::{read_scale, scale_pair, GradStore, Master, Moments};
use crate::model::tp::TpPlace;
use crate::model::{params, shard};
use crate::model::{Gpt, Level};
use fp8cluster::world::Collectives;
use fp8sim::half16::f16;
use fp8sim::scaling::DelayedScaling;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Training-loop state that a resume restores besides the model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Steps completed (the next step to run, 0-based).
    pub step: u64,
    /// Optimizer steps taken (skipped steps excluded).
    pub opt_steps: u64,
    /// Gradient scale mu, as bits.
    pub mu_bits: u32,
    /// Clean steps since mu last changed.
    pub good_steps: u64,
}

#[derive(Serialize, Deserialize)]
struct ScalingRecord {
    scale_bits: u32,
    history_bits: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct ParamScales {
    master: u32,
    grad: u32,
    m: u32,
    v: u32,
}

#[derive(Serialize, Deserialize)]
struct StateMeta {
    level: Level,
    loop_state: LoopState,
    params: Vec<ParamScales>,
    act: Vec<ScalingRecord>,
    grad: Vec<ScalingRecord>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    bytes: u64,
    sha256: String,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    step: u64,
    /// Ranks of the run that wrote it (O3 shards need the same number to resume).
    #[serde(default = "one")]
    world_size: usize,
    /// Tensor-parallel size of the run that wrote it (state pieces `state-tp{r}`).
    #[serde(default = "one")]
    tp: usize,
    files: BTreeMap<String, FileEntry>,
}

fn one() -> usize {
    1
}

const FORMAT: &str = "fp8train-checkpoint-1";

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bytes_f16(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

fn record(ds: &DelayedScaling) -> ScalingRecord {
    ScalingRecord { scale_bits: ds.scale().to_bits(), history_bits: ds.history().map(f32::to_bits).collect() }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), String> {
    let err = |e: std::io::Error| format!("checkpoint: cannot write {}: {e}", path.display());
    let mut f = File::create(path).map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

fn sync_dir(path: &Path) {
    // Directory fsync makes the rename durable; not every filesystem supports it.
    if let Ok(d) = File::open(path) {
        let _ = d.sync_all();
    }
}

/// A safetensors file written tensor by tensor: the header (names, dtypes, shapes,
/// offsets, metadata) first, then each tensor's bytes as they come, hashed on the way,
/// so no more than one tensor is ever held in host memory (a 13B model's f32 weights
/// alone are 51 GB). The layout is the format's: an 8-byte little-endian header length,
/// the JSON header padded with spaces to a multiple of 8, the tensors back to back in
/// header order.
struct Streamed {
    path: PathBuf,
    out: std::io::BufWriter<File>,
    hash: Sha256,
    bytes: u64,
    sizes: Vec<usize>,
    next: usize,
}

fn dtype_name(d: Dtype) -> (&'static str, usize) {
    match d {
        Dtype::F32 => ("F32", 4),
        Dtype::F16 => ("F16", 2),
        Dtype::BF16 => ("BF16", 2),
        Dtype::F8_E4M3 => ("F8_E4M3", 1),
        other => unreachable!("checkpoints hold no {other:?} tensors"),
    }
}

impl Streamed {
    fn create(
        path: &Path,
        meta: &HashMap<String, String>,
        tensors: &[(String, Dtype, Vec<usize>)],
    ) -> Result<Self, String> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(meta).expect("strings serialise"));
        let (mut at, mut sizes) = (0usize, Vec::with_capacity(tensors.len()));
        for (name, dtype, shape) in tensors {
            let (dname, width) = dtype_name(*dtype);
            let len = shape.iter().product::<usize>() * width;
            header.insert(
                name.clone(),
                serde_json::json!({ "dtype": dname, "shape": shape, "data_offsets": [at, at + len] }),
            );
            at += len;
            sizes.push(len);
        }
        let mut text = serde_json::to_vec(&header).expect("header serialises");
        text.resize(text.len().next_multiple_of(8), b' ');
        let err = |e: std::io::Error| format!("checkpoint: cannot write {}: {e}", path.display());
        let f = File::create(path).map_err(err)?;
        let mut w = Streamed {
            path: path.to_path_buf(),
            out: std::io::BufWriter::with_capacity(8 << 20, f),
            hash: Sha256::new(),
            bytes: 0,
            sizes,
            next: 0,
        };
        w.put(&(text.len() as u64).to_le_bytes())?;
        w.put(&text)?;
        Ok(w)
    }
    fn put(&mut self, b: &[u8]) -> Result<(), String> {
        self.out.write_all(b).map_err(|e| format!("checkpoint: cannot write {}: {e}", self.path.display()))?;
        self.hash.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }
    /// The next tensor's bytes (in header order).
    fn tensor(&mut self, b: &[u8]) -> Result<(), String> {
        assert_eq!(b.len(), self.sizes[self.next], "checkpoint: tensor {} has the header's size", self.next);
        self.next += 1;
        self.put(b)
    }
    /// Flush and sync; the file's size and SHA-256 digest.
    fn finish(mut self) -> Result<(u64, [u8; 32]), String> {
        assert_eq!(self.next, self.sizes.len(), "checkpoint: every tensor written");
        let err = |e: std::io::Error| format!("checkpoint: cannot write {}: {e}", self.path.display());
        self.out.flush().map_err(err)?;
        self.out.get_ref().sync_all().map_err(err)?;
        Ok((self.bytes, self.hash.finalize().into()))
    }
}

/// Where a state-file tensor comes from.
enum StateSrc<'a, B: Backend> {
    F32(&'a B::Buf<f32>),
    F16(&'a B::Buf<f16>),
    U8(&'a B::Buf<u8>),
}

/// The state file of the parameters this rank holds (all of them below O3), written
/// tensor by tensor into `path`.
fn write_state_file<'a, B: Backend>(
    be: &B,
    path: &Path,
    model: &'a Gpt<B>,
    cfg: &Config,
    state: LoopState,
) -> Result<(u64, [u8; 32]), String> {
    let mut tensors: Vec<(String, Dtype, Vec<usize>)> = Vec::new();
    let mut srcs: Vec<StateSrc<'a, B>> = Vec::new();
    let mut scales = Vec::new();
    for p in &model.params {
        let (shape, name) = (p.spec.shape.clone(), &p.spec.name);
        let mut add = |n: String, d: Dtype, src: StateSrc<'a, B>| {
            tensors.push((n, d, shape.clone()));
            srcs.push(src);
        };
        let mut sc = ParamScales { master: 1f32.to_bits(), grad: 1f32.to_bits(), m: 1f32.to_bits(), v: 1f32.to_bits() };
        match &p.master {
            Master::F32(w) => add(format!("master.{name}"), Dtype::F32, StateSrc::F32(w)),
            Master::F16 { codes, scale } => {
                add(format!("master.{name}"), Dtype::F16, StateSrc::F16(codes));
                sc.master = read_scale(be, scale)?.to_bits();
            }
            Master::Remote => {}
        }
        if let GradStore::Fp8 { scale, .. } = &p.grad {
            sc.grad = read_scale(be, scale)?.to_bits();
        }
        match &p.moments {
            Moments::F32 { m, v } => {
                add(format!("adam_m.{name}"), Dtype::F32, StateSrc::F32(m));
                add(format!("adam_v.{name}"), Dtype::F32, StateSrc::F32(v));
            }
            Moments::Scaled { m, v, scales } => {
                add(format!("adam_m.{name}"), Dtype::F8_E4M3, StateSrc::U8(m));
                add(format!("adam_v.{name}"), Dtype::F16, StateSrc::F16(v));
                let s = be.download(scales)?;
                sc.m = s[1].to_bits();
                sc.v = s[3].to_bits();
            }
            Moments::Remote => {}
        }
        scales.push(sc);
    }
    let linears = model.delayed.to_host(be)?;
    let smeta = StateMeta {
        level: model.level,
        loop_state: state,
        params: scales,
        act: linears.iter().map(|s| record(&s.act)).collect(),
        grad: linears.iter().map(|s| record(&s.grad)).collect(),
    };
    let mut meta = HashMap::new();
    meta.insert("fp8train_state".to_string(), serde_json::to_string(&smeta).expect("state serialises"));
    meta.insert("fp8train_config".to_string(), cfg.to_toml());
    let mut w = Streamed::create(path, &meta, &tensors)?;
    for src in srcs {
        let bytes = match src {
            StateSrc::F32(x) => bytes_f32(&be.download(x)?),
            StateSrc::F16(x) => bytes_f16(&be.download(x)?),
            StateSrc::U8(x) => be.download(x)?,
        };
        w.tensor(&bytes)?;
    }
    w.finish()
}

/// The metadata of `model.safetensors` (PyTorch's format tag and the run's settings).
fn model_meta(cfg: &Config) -> HashMap<String, String> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("fp8train_config".to_string(), cfg.to_toml());
    meta
}

/// Write the manifest, then move the folder into place.
fn finish(tmp: &Path, ckpts: &Path, name: &str, manifest: &Manifest) -> Result<PathBuf, String> {
    write_synced(&tmp.join("manifest.json"), serde_json::to_string_pretty(manifest).expect("json").as_bytes())?;
    sync_dir(tmp);
    let dest = ckpts.join(name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| format!("checkpoint: cannot replace {}: {e}", dest.display()))?;
    }
    std::fs::rename(tmp, &dest).map_err(|e| format!("checkpoint: cannot move into place {}: {e}", dest.display()))?;
    sync_dir(ckpts);
    Ok(dest)
}

/// Write a checkpoint of `model` at `state.step` under `run_dir/checkpoints/`. Below
/// O3 every data-parallel rank holds the same state and rank 0 writes it (at tp > 1 the
/// first tensor-parallel group: each rank its piece's state, rank 0 the gathered
/// weights); at O3 with several ranks each rank writes its shard
/// (`state-rank{r}.safetensors`) into the same folder and rank 0 writes the weights and
/// the manifest. Returns the folder on rank 0.
pub fn save<B: Backend>(
    be: &B,
    run_dir: &Path,
    model: &Gpt<B>,
    cfg: &Config,
    state: LoopState,
    grid: &Grid<'_>,
) -> Result<Option<PathBuf>, String> {
    let (world, tp) = (grid.world, &grid.tp);
    let ckpts = run_dir.join("checkpoints");
    let name = format!("step-{:06}", state.step);
    let lead = world.rank() == 0;
    let sharded = model.level == Level::O3 && grid.dp.size > 1;
    let pieces = tp.size > 1;
    if !sharded && (grid.dp.rank != 0 || (!pieces && !lead)) {
        return Ok(None);
    }
    let tmp = ckpts.join(format!(".{name}.tmp"));
    if lead {
        std::fs::create_dir_all(&ckpts).map_err(|e| format!("checkpoint: cannot create {}: {e}", ckpts.display()))?;
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| format!("checkpoint: cannot create {}: {e}", tmp.display()))?;
    }
    if sharded {
        world.barrier();
    } else if pieces {
        tp.barrier();
    }
    // Weights as f32, one tensor at a time: each owner sends its masters (all local
    // below O3), the pieces of a tensor-parallel group are put together; rank 0 writes
    // them as they come, as whole tensors.
    let mut weights = if lead {
        let tensors: Vec<(String, Dtype, Vec<usize>)> =
            params::specs(&model.cfg).into_iter().map(|s| (s.name, Dtype::F32, s.shape)).collect();
        Some(Streamed::create(&tmp.join("model.safetensors"), &model_meta(cfg), &tensors)?)
    } else {
        None
    };
    super::dist::gather_weights(be, model, &grid.dp, tp, |_, v| match weights.as_mut() {
        Some(w) => w.tensor(&bytes_f32(&v)),
        None => Ok(()),
    })?;
    let model_entry = weights.map(Streamed::finish).transpose()?;
    let state_name = if sharded {
        format!("state-rank{}.safetensors", world.rank())
    } else if pieces {
        format!("state-tp{}.safetensors", tp.rank)
    } else {
        "state.safetensors".to_string()
    };
    let mine = write_state_file(be, &tmp.join(&state_name), model, cfg, state)?;
    let mut files = BTreeMap::new();
    if sharded {
        // Every shard's size and digest to rank 0.
        for (r, (bytes, sha)) in super::dist::gather_digests(world, mine).into_iter().enumerate() {
            files.insert(format!("state-rank{r}.safetensors"), FileEntry { bytes, sha256: hex(&sha) });
        }
    } else if pieces {
        for (r, (bytes, sha)) in super::dist::gather_digests(tp, mine).into_iter().enumerate() {
            files.insert(format!("state-tp{r}.safetensors"), FileEntry { bytes, sha256: hex(&sha) });
        }
    } else {
        files.insert(state_name, FileEntry { bytes: mine.0, sha256: hex(&mine.1) });
    }
    let mut dest = None;
    if let Some((bytes, sha)) = model_entry {
        files.insert("model.safetensors".to_string(), FileEntry { bytes, sha256: hex(&sha) });
        let manifest =
            Manifest { format: FORMAT.into(), step: state.step, world_size: world.size(), tp: tp.size, files };
        dest = Some(finish(&tmp, &ckpts, &name, &manifest)?);
    }
    if sharded {
        world.barrier();
    } else if pieces {
        tp.barrier();
    }
    Ok(dest)
}

/// The step number of a checkpoint folder name `step-N` (any number of digits).
pub fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-").filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
}

/// A checkpoint folder's manifest, parsed and of a known format.
fn manifest_of(dir: &Path) -> Result<Manifest, String> {
    let mtext = std::fs::read_to_string(dir.join("manifest.json"))
        .map_err(|e| format!("checkpoint {}: cannot read manifest.json: {e}", dir.display()))?;
    let manifest: Manifest = serde_json::from_str(&mtext)
        .map_err(|e| format!("checkpoint {}: manifest.json is not valid: {e}", dir.display()))?;
    if manifest.format != FORMAT {
        return Err(format!("checkpoint {}: unknown format '{}' (expected {FORMAT})", dir.display(), manifest.format));
    }
    Ok(manifest)
}

/// Files already hashed by this process: (path, bytes, modified) -> matched its entry.
static VERIFIED: std::sync::Mutex<Vec<(PathBuf, u64, std::time::SystemTime)>> = std::sync::Mutex::new(Vec::new());

/// Check one file of a checkpoint against its manifest entry: size first (from the
/// file system, before reading anything), then SHA-256. Returns the file's bytes when
/// `keep`. A file verified before by this process (same size and time) is not hashed again.
fn verify_file(dir: &Path, manifest: &Manifest, name: &str, keep: bool) -> Result<Option<memmap2::Mmap>, String> {
    let entry = manifest
        .files
        .get(name)
        .ok_or_else(|| format!("checkpoint {}: manifest does not list {name}", dir.display()))?;
    let path = dir.join(name);
    let meta =
        std::fs::metadata(&path).map_err(|e| format!("checkpoint {}: cannot read {name}: {e}", dir.display()))?;
    if meta.len() != entry.bytes {
        return Err(format!(
            "checkpoint {}: {name} has {} bytes, the manifest says {} (truncated or replaced)",
            dir.display(),
            meta.len(),
            entry.bytes
        ));
    }
    let stamp = (path.clone(), meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
    let known = VERIFIED.lock().map(|v| v.contains(&stamp)).unwrap_or(false);
    if known && !keep {
        return Ok(None);
    }
    let data = map_file(&path).map_err(|e| format!("checkpoint {}: cannot read {name}: {e}", dir.display()))?;
    if data.len() as u64 != entry.bytes {
        return Err(format!("checkpoint {}: {name} changed while being read", dir.display()));
    }
    if !known {
        if hex(&Sha256::digest(&data)) != entry.sha256 {
            return Err(format!("checkpoint {}: {name} fails its SHA-256 check (corrupt)", dir.display()));
        }
        if let Ok(mut v) = VERIFIED.lock() {
            v.push(stamp);
        }
    }
    Ok(keep.then_some(data))
}

/// `path` mapped into memory: checkpoint files are read through the page cache, never
/// copied whole into one buffer (a 13B model's O2 state is 77 GB, its f32 weights 51).
fn map_file(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let f = File::open(path)?;
    // SAFETY: a checkpoint's files are written once, into a temporary folder renamed
    // into place, and never written again; the mapping is read-only. (Another process
    // truncating a file while it is mapped would fault on access; the size and digest
    // checks cannot exclude that, as they cannot for any reader.)
    unsafe { memmap2::Mmap::map(&f) }
}

/// A checkpoint folder whose manifest is valid and whose every file has the size and
/// checksum it lists.
fn verify(dir: &Path) -> Result<Manifest, String> {
    let manifest = manifest_of(dir)?;
    for name in manifest.files.keys() {
        verify_file(dir, &manifest, name, false)?;
    }
    Ok(manifest)
}

/// The checkpoint a path means, and the newer ones that were passed over.
#[derive(Debug)]
pub struct Resolved {
    pub dir: PathBuf,
    pub step: u64,
    /// Newer or unreadable entries of `checkpoints/` that were skipped, each with why.
    pub skipped: Vec<String>,
}

/// The checkpoint folder meant by `path`, verified (sizes, then checksums): a checkpoint
/// itself, or a run folder: its complete checkpoint of the highest step (by the number
/// in `step-N`, not by name order), passing over, and naming, incomplete or damaged
/// ones and stray entries.
pub fn resolve(path: &Path) -> Result<Resolved, String> {
    if path.join("manifest.json").is_file() {
        let m = verify(path)?;
        return Ok(Resolved { dir: path.to_path_buf(), step: m.step, skipped: Vec::new() });
    }
    let ckpts = path.join("checkpoints");
    let entries = std::fs::read_dir(&ckpts).map_err(|_| {
        format!("{}: not a checkpoint (no manifest.json) nor a run folder with checkpoints", path.display())
    })?;
    let mut skipped = Vec::new();
    let mut steps: Vec<(u64, PathBuf)> = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        match step_of(&name) {
            Some(n) => steps.push((n, e.path())),
            // Temporary folders of a checkpoint being written (or killed while written).
            None if name.starts_with('.') => {}
            None => skipped.push(format!("{name}: not a checkpoint name (step-N)")),
        }
    }
    steps.sort();
    while let Some((n, dir)) = steps.pop() {
        match verify(&dir) {
            Ok(m) if m.step == n => return Ok(Resolved { dir, step: n, skipped }),
            Ok(m) => skipped.push(format!("step-{n}: its manifest says step {}", m.step)),
            Err(e) => skipped.push(e),
        }
    }
    let why = if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join("; ")) };
    Err(format!(
        "{}: the run folder has no complete checkpoint{why}; a run stopped before its first checkpoint \
         cannot be continued: train it again into another folder (--name)",
        path.display()
    ))
}

/// The config a checkpoint was written with (from its weights file's metadata, after
/// the file's size and checksum are checked).
pub fn peek_config(path: &Path) -> Result<Config, String> {
    let dir = resolve(path)?.dir;
    config_of(&dir)
}

/// The config in the verified checkpoint folder `dir`.
fn config_of(dir: &Path) -> Result<Config, String> {
    let bytes =
        verify_file(dir, &manifest_of(dir)?, "model.safetensors", true)?.ok_or("checkpoint: weights not read")?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("checkpoint {}: model.safetensors: {e}", dir.display()))?;
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("fp8train_config").cloned())
        .ok_or_else(|| format!("checkpoint {}: model.safetensors carries no config", dir.display()))?;
    Config::from_toml(&text).map_err(|e| format!("checkpoint {}: {e}", dir.display()))
}

fn tensor_bytes<'a>(st: &'a SafeTensors, name: &str, dtype: Dtype, numel: usize) -> Result<&'a [u8], String> {
    let t = st.tensor(name).map_err(|e| format!("checkpoint: tensor {name}: {e}"))?;
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 => 2,
        _ => 1,
    };
    if t.dtype() != dtype || t.data().len() != numel * width {
        return Err(format!(
            "checkpoint: tensor {name} has dtype {:?} and {} bytes, expected {dtype:?} x {numel}",
            t.dtype(),
            t.data().len()
        ));
    }
    Ok(t.data())
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn f16s(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect()
}

/// Load a checkpoint: its config, the model with all optimizer and scaling state,
/// and the loop state, for data-parallel rank `rank` of `ranks` holding tensor-parallel
/// piece `tp` (whatever layout wrote it; see the module's notes).
pub fn load<B: Backend>(
    be: &B,
    path: &Path,
    rank: usize,
    ranks: usize,
    tp: TpPlace,
) -> Result<(Config, Gpt<B>, LoopState), String> {
    let dir = resolve(path)?.dir;
    let manifest = manifest_of(&dir)?;
    let saved_tp = manifest.tp.max(1);
    let o3_shards = manifest.files.contains_key("state-rank0.safetensors");
    if o3_shards && (manifest.world_size != ranks * tp.size || saved_tp != tp.size) {
        return Err(format!(
            "checkpoint {}: written by {} ranks as O3 shards at --tp {saved_tp}; resume it with {} ranks and \
             --tp {saved_tp} (mpirun -np {}), or read it in one process with eval / sample",
            dir.display(),
            manifest.world_size,
            manifest.world_size,
            manifest.world_size
        ));
    }
    if saved_tp != tp.size {
        return load_relayout(be, &dir, &manifest, rank, ranks, tp);
    }
    let state_name = if o3_shards {
        // World rank: tensor-parallel groups are consecutive ranks.
        format!("state-rank{}.safetensors", rank * tp.size + tp.rank)
    } else if saved_tp > 1 {
        format!("state-tp{}.safetensors", tp.rank)
    } else {
        "state.safetensors".to_string()
    };
    let state_bytes = verify_file(&dir, &manifest, &state_name, true)?.ok_or("checkpoint: state not read")?;
    let (cfg, smeta, st) = parse_state(&state_bytes, &state_name)?;
    weights_fit_config(&dir, &manifest, &cfg)?;
    let mut model = Gpt::new_tp(be, &cfg.model, smeta.level, cfg.train.seed, cfg.train.amax_window, rank, ranks, tp)?;
    if smeta.params.len() != model.params.len() || smeta.act.len() != 4 * model.cfg.n_layer {
        return Err("checkpoint: parameter or layer count does not match its config".into());
    }
    for (p, sc) in model.params.iter_mut().zip(&smeta.params) {
        let n = p.spec.numel();
        let name = &p.spec.name;
        match &mut p.master {
            Master::F32(w) => *w = be.upload(&f32s(tensor_bytes(&st, &format!("master.{name}"), Dtype::F32, n)?))?,
            Master::F16 { codes, scale } => {
                *codes = be.upload(&f16s(tensor_bytes(&st, &format!("master.{name}"), Dtype::F16, n)?))?;
                *scale = scale_pair(be, f32::from_bits(sc.master))?;
            }
            Master::Remote => {}
        }
        if let GradStore::Fp8 { scale, .. } = &mut p.grad {
            *scale = scale_pair(be, f32::from_bits(sc.grad))?;
        }
        match &mut p.moments {
            Moments::F32 { m, v } => {
                *m = be.upload(&f32s(tensor_bytes(&st, &format!("adam_m.{name}"), Dtype::F32, n)?))?;
                *v = be.upload(&f32s(tensor_bytes(&st, &format!("adam_v.{name}"), Dtype::F32, n)?))?;
            }
            Moments::Scaled { m, v, scales } => {
                *m = be.upload(tensor_bytes(&st, &format!("adam_m.{name}"), Dtype::F8_E4M3, n)?)?;
                *v = be.upload(&f16s(tensor_bytes(&st, &format!("adam_v.{name}"), Dtype::F16, n)?))?;
                let (ms, vs) = (f32::from_bits(sc.m), f32::from_bits(sc.v));
                *scales = be.upload(&[1.0 / ms, ms, 1.0 / vs, vs])?;
            }
            Moments::Remote => {}
        }
    }
    restore_scaling(be, &mut model, &smeta)?;
    Ok((cfg, model, smeta.loop_state))
}

/// [`load`] of a checkpoint written at another tensor-parallel size: every saved piece's
/// state decoded to values, the whole tensors rebuilt (`shard::gather`), this rank's
/// piece cut (`shard::shard`) and stored in its level's formats with fresh power-of-two
/// scales (the optimizer's own just-in-time rule). The scaling histories, identical on
/// every piece, come from the first.
fn load_relayout<B: Backend>(
    be: &B,
    dir: &Path,
    manifest: &Manifest,
    rank: usize,
    ranks: usize,
    tp: TpPlace,
) -> Result<(Config, Gpt<B>, LoopState), String> {
    // (O3 shards never come here: `load` resumes them at their own layout only.)
    let saved_tp = manifest.tp.max(1);
    let names: Vec<String> = if saved_tp == 1 {
        vec!["state.safetensors".to_string()]
    } else {
        (0..saved_tp).map(|r| format!("state-tp{r}.safetensors")).collect()
    };
    let maps = names
        .iter()
        .map(|n| verify_file(dir, manifest, n, true)?.ok_or_else(|| format!("checkpoint: {n} not read")))
        .collect::<Result<Vec<_>, String>>()?;
    let parsed = maps.iter().zip(&names).map(|(m, n)| parse_state(m, n)).collect::<Result<Vec<_>, String>>()?;
    let (cfg, smeta, _) = &parsed[0];
    weights_fit_config(dir, manifest, cfg)?;
    shard::check(&cfg.model, tp.size)
        .map_err(|e| format!("checkpoint {} (saved at tp = {saved_tp}): cannot resume here: {e}", dir.display()))?;
    let mut model = Gpt::new_tp(be, &cfg.model, smeta.level, cfg.train.seed, cfg.train.amax_window, rank, ranks, tp)?;
    for (_, m, _) in &parsed {
        if m.params.len() != model.params.len() || m.act.len() != 4 * model.cfg.n_layer || m.level != smeta.level {
            return Err("checkpoint: parameter or layer count or level differs between its state pieces".into());
        }
    }
    let whole = params::specs(&cfg.model);
    for (i, p) in model.params.iter_mut().enumerate() {
        let split = shard::split_of(&cfg.model, i);
        let shape = &whole[i].shape;
        let saved_n: usize = shard::shard_shape(shape, split, saved_tp).iter().product();
        let name = &whole[i].name;
        // This rank's piece of one stored tensor, as values: each saved piece decoded
        // with its own scale (`value = code * (1 / scale)`), then re-cut.
        let piece = |kind: &str, dtype: Dtype, scale_of: &dyn Fn(&ParamScales) -> u32| -> Result<Vec<f32>, String> {
            let mut pieces = Vec::with_capacity(parsed.len());
            for (_, m, st) in &parsed {
                let b = tensor_bytes(st, &format!("{kind}.{name}"), dtype, saved_n)?;
                let inv = 1.0 / f32::from_bits(scale_of(&m.params[i]));
                pieces.push(match dtype {
                    Dtype::F32 => f32s(b),
                    Dtype::F16 => decode_f16(&f16s(b), inv),
                    _ => b.iter().map(|&q| fp8sim::fp8::decode(fp8sim::Fp8Format::E4M3, q) * inv).collect(),
                });
            }
            let full =
                if saved_tp == 1 { pieces.pop().expect("one piece") } else { shard::gather(&pieces, shape, split) };
            Ok(if tp.size == 1 { full } else { shard::shard(&full, shape, split, tp.rank, tp.size) })
        };
        let sc0 = &smeta.params[i];
        let f16_of = |v: &[f32], prev: u32| encode_f16(v, f32::from_bits(prev));
        match &mut p.master {
            Master::F32(w) => *w = be.upload(&piece("master", Dtype::F32, &|_| 1f32.to_bits())?)?,
            Master::F16 { codes, scale } => {
                let (c, s) = f16_of(&piece("master", Dtype::F16, &|sc| sc.master)?, sc0.master);
                *codes = be.upload(&c)?;
                *scale = scale_pair(be, s)?;
            }
            Master::Remote => unreachable!("O3 shards are refused above"),
        }
        if let GradStore::Fp8 { scale, .. } = &mut p.grad {
            *scale = scale_pair(be, f32::from_bits(sc0.grad))?;
        }
        match &mut p.moments {
            Moments::F32 { m, v } => {
                *m = be.upload(&piece("adam_m", Dtype::F32, &|_| 1f32.to_bits())?)?;
                *v = be.upload(&piece("adam_v", Dtype::F32, &|_| 1f32.to_bits())?)?;
            }
            Moments::Scaled { m, v, scales } => {
                let mv = piece("adam_m", Dtype::F8_E4M3, &|sc| sc.m)?;
                let (mut mc, mut ms) = (vec![0u8; mv.len()], f32::from_bits(sc0.m));
                fp8sim::ops::adamw::encode_e4m3_jit(&mv, &mut mc, &mut ms);
                let (vc, vs) = f16_of(&piece("adam_v", Dtype::F16, &|sc| sc.v)?, sc0.v);
                *m = be.upload(&mc)?;
                *v = be.upload(&vc)?;
                *scales = be.upload(&[1.0 / ms, ms, 1.0 / vs, vs])?;
            }
            Moments::Remote => unreachable!("O3 shards are refused above"),
        }
    }
    restore_scaling(be, &mut model, smeta)?;
    Ok((cfg.clone(), model, smeta.loop_state))
}

/// Scaled FP16 codes as values (`code * inv_scale`, the masters' and moments' decoding).
fn decode_f16(codes: &[f16], inv_scale: f32) -> Vec<f32> {
    codes.iter().map(|h| h.to_f32() * inv_scale).collect()
}

/// Values as FP16 codes with a fresh power-of-two scale (the optimizer's just-in-time
/// rule; `prev` kept when the values are all zero): codes and scale.
fn encode_f16(values: &[f32], prev: f32) -> (Vec<f16>, f32) {
    let (mut codes, mut scale) = (vec![f16::from_bits(0); values.len()], prev);
    fp8sim::ops::adamw::encode_f16_jit(values, &mut codes, &mut scale);
    (codes, scale)
}

/// The model a config describes must be the one the verified weights file holds (all
/// parameters as f32): a damaged or foreign config never makes the loader allocate more
/// than the files justify.
fn weights_fit_config(dir: &Path, manifest: &Manifest, cfg: &Config) -> Result<(), String> {
    let params = params::whole_count(&cfg.model) as u64;
    let have = manifest.files.get("model.safetensors").map_or(0, |e| e.bytes);
    if have < 4 * params {
        return Err(format!(
            "checkpoint {}: its config describes {params} parameters but model.safetensors holds {have} bytes \
             (fewer than 4 per parameter): the config and the weights are of different models",
            dir.display()
        ));
    }
    Ok(())
}

/// The config, training state and tensors of a state file (`name` for messages).
fn parse_state<'a>(bytes: &'a [u8], name: &str) -> Result<(Config, StateMeta, SafeTensors<'a>), String> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format!("checkpoint: {name}: {e}"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let cfg_text = meta.get("fp8train_config").ok_or_else(|| format!("checkpoint: {name} has no config"))?;
    let cfg = Config::from_toml(cfg_text)?;
    cfg.validate()?;
    let smeta: StateMeta = serde_json::from_str(meta.get("fp8train_state").ok_or("checkpoint: no training state")?)
        .map_err(|e| format!("checkpoint: training state is not valid: {e}"))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("checkpoint: {name}: {e}"))?;
    Ok((cfg, smeta, st))
}

/// The delayed-scaling histories and scales of every linear layer.
fn restore_scaling<B: Backend>(be: &B, model: &mut Gpt<B>, smeta: &StateMeta) -> Result<(), String> {
    let hist = |r: &ScalingRecord| r.history_bits.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>();
    let window = model.delayed.window();
    let linears: Vec<LinearScaling> = smeta
        .act
        .iter()
        .zip(&smeta.grad)
        .map(|(a, g)| {
            let mut s = LinearScaling::new(window);
            s.act = DelayedScaling::restore(s.act.config, &hist(a), f32::from_bits(a.scale_bits));
            s.grad = DelayedScaling::restore(s.grad.config, &hist(g), f32::from_bits(g.scale_bits));
            s
        })
        .collect();
    model.delayed.restore(be, &linears)?;
    Ok(())
}

/// A checkpoint for evaluation or sampling in one process, whatever wrote it: a
/// whole-state checkpoint as [`load`]; O3 shards of any number of ranks by gathering
/// every shard's masters (their exact FP16 codes and scales) into an O2 model — O3 is O2
/// with the state sharded, so the forward pass is the same. Returns the step too.
pub fn load_for_inference<B: Backend>(be: &B, path: &Path) -> Result<(Config, Gpt<B>, u64), String> {
    let dir = resolve(path)?.dir;
    let manifest = manifest_of(&dir)?;
    if !manifest.files.contains_key("state-rank0.safetensors") {
        let (cfg, model, ls) = load(be, &dir, 0, 1, TpPlace::ONE)?;
        return Ok((cfg, model, ls.step));
    }
    let cfg = config_of(&dir)?;
    cfg.validate()?;
    weights_fit_config(&dir, &manifest, &cfg)?;
    let saved_tp = manifest.tp.max(1);
    if !manifest.world_size.is_multiple_of(saved_tp) {
        return Err(format!(
            "checkpoint {}: {} ranks at tp = {saved_tp} in its manifest",
            dir.display(),
            manifest.world_size
        ));
    }
    let mut model = Gpt::new(be, &cfg.model, Level::O2, cfg.train.seed, cfg.train.amax_window, 0, 1)?;
    let whole = params::specs(&cfg.model);
    // At tp > 1: each tensor's master pieces as values, by tensor-parallel rank.
    let mut pieces: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; saved_tp]; model.params.len()];
    let mut filled = vec![false; model.params.len()];
    for r in 0..manifest.world_size {
        let name = format!("state-rank{r}.safetensors");
        let bytes = verify_file(&dir, &manifest, &name, true)?.ok_or("checkpoint: file not read")?;
        let (_, smeta, st) = parse_state(&bytes, &name)?;
        if smeta.params.len() != model.params.len() || smeta.act.len() != 4 * model.cfg.n_layer {
            return Err(format!("checkpoint: {name}: parameter or layer count does not match its config"));
        }
        if r == 0 {
            restore_scaling(be, &mut model, &smeta)?;
        }
        for (i, (p, sc)) in model.params.iter_mut().zip(&smeta.params).enumerate() {
            let tname = format!("master.{}", p.spec.name);
            if st.tensor(&tname).is_err() {
                continue; // held by another rank
            }
            let n: usize =
                shard::shard_shape(&whole[i].shape, shard::split_of(&cfg.model, i), saved_tp).iter().product();
            let codes = f16s(tensor_bytes(&st, &tname, Dtype::F16, n)?);
            if saved_tp > 1 {
                pieces[i][r % saved_tp] = Some(decode_f16(&codes, 1.0 / f32::from_bits(sc.master)));
            } else if let Master::F16 { codes: c, scale } = &mut p.master {
                // One piece: the exact codes and scale.
                *c = be.upload(&codes)?;
                *scale = scale_pair(be, f32::from_bits(sc.master))?;
                filled[i] = true;
            }
        }
    }
    if saved_tp > 1 {
        // Whole tensors from the pieces, re-encoded with the whole tensor's scale.
        for (i, p) in model.params.iter_mut().enumerate() {
            let Some(got) = pieces[i].iter().cloned().collect::<Option<Vec<_>>>() else { continue };
            let full = shard::gather(&got, &whole[i].shape, shard::split_of(&cfg.model, i));
            if let Master::F16 { codes, scale } = &mut p.master {
                let (c, s) = encode_f16(&full, 1.0);
                *codes = be.upload(&c)?;
                *scale = scale_pair(be, s)?;
                filled[i] = true;
            }
        }
    }
    if let Some(i) = filled.iter().position(|f| !f) {
        return Err(format!(
            "checkpoint {}: no shard holds the master of {}",
            dir.display(),
            model.params[i].spec.name
        ));
    }
    Ok((cfg, model, manifest.step))
}
