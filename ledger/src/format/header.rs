//! The segment header: the first `HEADER_LEN` bytes of every `seg-<first seq>.log`.
//!
//! ```text
//! offset size field
//!      0    8 magic            b"EDGLEDGR"
//!      8    2 version          u16 LE, = 1
//!     10    2 flags            u16 LE, reserved, 0
//!     12    4 epoch            u32 LE, Merkle tree epoch of the events in this segment
//!     16    8 segment_index    u64 LE, strictly increasing across segments
//!     24    8 first_seq        u64 LE, sequence number of the segment's first event
//!     32    8 epoch_first_seq  u64 LE, sequence number of the epoch's leaf 0
//!     40    8 created_ms       u64 LE, Unix ms; base of the first event's time delta
//!     48   32 prev_chain       chain value at the end of the previous segment
//!     80    4 header_crc       crc32c of bytes 0..80
//! ```

pub const MAGIC: [u8; 8] = *b"EDGLEDGR";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 84;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub epoch: u32,
    pub segment_index: u64,
    pub first_seq: u64,
    pub epoch_first_seq: u64,
    pub created_ms: u64,
    pub prev_chain: [u8; 32],
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadHeader {
    /// Fewer than `HEADER_LEN` bytes.
    Short(usize),
    /// Every byte present is zero (a file created but never written).
    Zeroed,
    BadMagic,
    /// The magic is ours but the version is not one this build reads.
    UnsupportedVersion(u16),
    Crc,
    /// Reserved flag bits are set.
    Flags(u16),
}

impl std::fmt::Display for BadHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadHeader::Short(n) => {
                write!(f, "segment header truncated ({n} of {HEADER_LEN} bytes)")
            }
            BadHeader::Zeroed => write!(f, "segment header is all zeros"),
            BadHeader::BadMagic => write!(f, "not a ledger segment (bad magic)"),
            BadHeader::UnsupportedVersion(v) => write!(f, "unsupported segment version {v}"),
            BadHeader::Crc => write!(f, "segment header CRC mismatch"),
            BadHeader::Flags(x) => write!(f, "unknown header flags {x:#x}"),
        }
    }
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&0u16.to_le_bytes());
        b[12..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment_index.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.epoch_first_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.created_ms.to_le_bytes());
        b[48..80].copy_from_slice(&self.prev_chain);
        let crc = crc32c::crc32c(&b[0..80]);
        b[80..84].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses the header at the start of `buf`. The version is checked before the CRC so that a
    /// segment from a newer writer (whose header may be laid out differently) is refused as
    /// unsupported, never mistaken for damage.
    pub fn decode(buf: &[u8]) -> Result<SegmentHeader, BadHeader> {
        let head = &buf[..buf.len().min(HEADER_LEN)];
        if head.iter().all(|&b| b == 0) {
            return Err(BadHeader::Zeroed);
        }
        if head.len() < 10 {
            return Err(if head.len() >= 8 && head[0..8] != MAGIC {
                BadHeader::BadMagic
            } else {
                BadHeader::Short(head.len())
            });
        }
        if head[0..8] != MAGIC {
            return Err(BadHeader::BadMagic);
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version != VERSION {
            return Err(BadHeader::UnsupportedVersion(version));
        }
        if head.len() < HEADER_LEN {
            return Err(BadHeader::Short(head.len()));
        }
        let crc = u32::from_le_bytes(buf[80..84].try_into().expect("4 bytes"));
        if crc32c::crc32c(&buf[0..80]) != crc {
            return Err(BadHeader::Crc);
        }
        let flags = u16::from_le_bytes([buf[10], buf[11]]);
        if flags != 0 {
            return Err(BadHeader::Flags(flags));
        }
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
        Ok(SegmentHeader {
            epoch: u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes")),
            segment_index: u64_at(16),
            first_seq: u64_at(24),
            epoch_first_seq: u64_at(32),
            created_ms: u64_at(40),
            prev_chain: buf[48..80].try_into().expect("32 bytes"),
        })
    }
}

/// `seg-<first seq, 20 digits>.log`
pub fn segment_file_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

/// The first sequence number encoded in a segment file name, if the name is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
