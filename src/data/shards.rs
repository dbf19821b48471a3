//! llm.c token shards: a header of 256 little-endian int32 (`[0]` magic 20240520,
//! `[1]` version: 1 = uint16 tokens, 2 = uint32 tokens, `[2]` token count), then the
//! tokens, little-endian.

pub const MAGIC: i32 = 20240520;
const HEADER_BYTES: usize = 256 * 4;

/// Read one shard; errors name the file and what is wrong with it.
pub fn read(path: &str) -> Result<Vec<u32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("token shard {path}: cannot read: {e}"))?;
    if bytes.len() < HEADER_BYTES {
        return Err(format!("token shard {path}: {} bytes is shorter than the 1024-byte header", bytes.len()));
    }
    let h = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if h(0) != MAGIC {
        return Err(format!("token shard {path}: bad magic {} (expected {MAGIC}; not an llm.c .bin file?)", h(0)));
    }
    let width = match h(1) {
        1 => 2,
        2 => 4,
        v => return Err(format!("token shard {path}: unsupported version {v} (supported: 1 = uint16, 2 = uint32)")),
    };
    let n = usize::try_from(h(2)).map_err(|_| format!("token shard {path}: negative token count {}", h(2)))?;
    let want = HEADER_BYTES + n * width;
    if bytes.len() != want {
        return Err(format!(
            "token shard {path}: header says {n} tokens ({want} bytes in all) but the file has {} bytes (truncated?)",
            bytes.len()
        ));
    }
    let body = &bytes[HEADER_BYTES..];
    Ok(if width == 2 {
        body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect()
    } else {
        body.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    })
}

/// Read and concatenate comma-separated shards.
pub fn read_many(paths: &str) -> Result<Vec<u32>, String> {
    let mut all = Vec::new();
    for p in paths.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        all.extend(read(p)?);
    }
    Ok(all)
}

/// Write a version-1 (uint16) shard (tests and tools).
pub fn write_u16(path: &std::path::Path, tokens: &[u16]) -> std::io::Result<()> {
    let mut header = [0i32; 256];
    header[0] = MAGIC;
    header[1] = 1;
    header[2] = tokens.len() as i32;
    let mut out: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    std::fs::write(path, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x_train.bin");
        write_u16(&p, &[1, 2, 50256]).unwrap();
        let ps = p.to_str().unwrap();
        assert_eq!(read(ps).unwrap(), vec![1, 2, 50256]);
        assert_eq!(read_many(&format!("{ps},{ps}")).unwrap().len(), 6);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.pop();
        std::fs::write(&p, &bytes).unwrap();
        assert!(read(ps).unwrap_err().contains("truncated"));
        bytes[0] = 0;
        std::fs::write(&p, &bytes).unwrap();
        assert!(read(ps).unwrap_err().contains("bad magic"));
        assert!(read("/nonexistent.bin").unwrap_err().contains("cannot read"));
    }
}
