//! Byte-level encoding of segment headers and records (see the module docs for the layout).

use ring::digest;

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CITYJRNL";
/// On-disk format version written in every segment header.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the segment header; the first record starts at this offset.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Length of a record header (`len`, `crc`, `seq`, `batch_start`, `prev_hash`).
pub const RECORD_HEADER_LEN: usize = 56;
/// Largest payload accepted by [`super::Journal::append`].
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Default segment size (64 MiB).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Smallest accepted segment size.
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest accepted segment size (every offset in a segment then fits the u32 of a `Pos`).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// Hash of a record's header and payload (SHA-256).
pub type RecordHash = [u8; 32];

/// Size a record with `payload_len` bytes of payload occupies on disk, padding included.
pub const fn record_size(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len + 7) & !7
}

/// Largest payload that fits into an empty segment of `segment_bytes`.
pub fn max_payload_for(segment_bytes: u64) -> usize {
    let room = segment_bytes.saturating_sub(SEGMENT_HEADER_LEN + RECORD_HEADER_LEN as u64);
    usize::try_from(room).map_or(MAX_PAYLOAD, |room| room.min(MAX_PAYLOAD))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    // Callers check `at + 4 <= b.len()` before calling.
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    // Callers check `at + 8 <= b.len()` before calling.
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Encodes the fixed header written at offset 0 of every segment when it is preallocated.
pub fn encode_segment_header(segment_bytes: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&segment_bytes.to_le_bytes());
    // 24..28 reserved, zero.
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Validates a segment's header, given its first bytes (the header, or all of a shorter file)
/// and the file's length; returns a reason on failure.
pub fn check_segment_header_of(head: &[u8], file_len: u64) -> Result<(), String> {
    let hl = SEGMENT_HEADER_LEN as usize;
    if file_len < hl as u64 || head.len() < hl {
        return Err(format!("segment is {file_len} bytes, shorter than its header"));
    }
    let h = &head[..hl];
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic".into());
    }
    if le_u32(h, 28) != crc32c::crc32c(&h[0..28]) {
        return Err("segment header crc mismatch".into());
    }
    let version = le_u32(h, 8);
    if version != FORMAT_VERSION {
        return Err(format!("unsupported format version {version}"));
    }
    if le_u32(h, 12) != SEGMENT_HEADER_LEN as u32 {
        return Err(format!("unexpected header length {}", le_u32(h, 12)));
    }
    let size = le_u64(h, 16);
    if size != file_len {
        return Err(format!("header says {size} bytes but the file has {file_len}"));
    }
    if !size.is_multiple_of(8) {
        return Err(format!("segment size {size} is not a multiple of 8"));
    }
    Ok(())
}

/// Appends one encoded record (header, payload, zero padding) to `out` and returns its hash.
pub fn encode_record(
    out: &mut Vec<u8>,
    seq: u64,
    batch_start: u64,
    prev_hash: &RecordHash,
    payload: &[u8],
) -> RecordHash {
    let start = out.len();
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&batch_start.to_le_bytes());
    out.extend_from_slice(prev_hash);
    out.extend_from_slice(payload);
    let end = out.len();
    let crc = crc32c::crc32c(&out[start + 8..end]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    let hash = record_hash(&out[start..end]);
    out.resize(start + record_size(payload.len()), 0);
    hash
}

/// SHA-256 of a record's header and payload bytes (padding excluded).
pub fn record_hash(bytes: &[u8]) -> RecordHash {
    let d = digest::digest(&digest::SHA256, bytes);
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    h
}

/// A CRC-valid record found in a segment buffer.
#[derive(Debug)]
pub struct RecordView<'a> {
    pub seq: u64,
    pub batch_start: u64,
    pub prev_hash: RecordHash,
    pub payload: &'a [u8],
    /// Header and payload, i.e. the bytes covered by the record hash.
    pub bytes: &'a [u8],
    /// Bytes occupied on disk including padding.
    pub size: usize,
}

/// Result of trying to decode a record at some offset.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// `len == 0` or not enough room left for a record header: end of data (if nothing follows).
    End,
    /// Something is there but it is not a valid record.
    Bad(String),
    Record(RecordView<'a>),
}

/// Decodes the record at `off` in a whole-segment buffer. Never panics on arbitrary input.
pub fn parse_record(buf: &[u8], off: usize) -> Parsed<'_> {
    let Some(hdr_end) = off.checked_add(RECORD_HEADER_LEN) else {
        return Parsed::End;
    };
    if hdr_end > buf.len() {
        return Parsed::End;
    }
    let len = le_u32(buf, off) as usize;
    if len == 0 {
        return Parsed::End;
    }
    if len > MAX_PAYLOAD {
        return Parsed::Bad(format!("payload length {len} exceeds the maximum {MAX_PAYLOAD}"));
    }
    let end = hdr_end + len;
    if end > buf.len() {
        return Parsed::Bad(format!("record of {len} bytes extends past the end of the segment"));
    }
    let stored = le_u32(buf, off + 4);
    let actual = crc32c::crc32c(&buf[off + 8..end]);
    if stored != actual {
        return Parsed::Bad(format!(
            "crc mismatch (stored {stored:#010x}, computed {actual:#010x})"
        ));
    }
    let mut prev_hash = [0u8; 32];
    prev_hash.copy_from_slice(&buf[off + 24..off + 56]);
    Parsed::Record(RecordView {
        seq: le_u64(buf, off + 8),
        batch_start: le_u64(buf, off + 16),
        prev_hash,
        payload: &buf[hdr_end..end],
        bytes: &buf[off..end],
        size: record_size(len),
    })
}
