//! Frames: `len u32 LE | crc32c u32 LE | kind u8 | payload[len]`.
//!
//! The CRC (Castagnoli) covers `len || kind || payload`, so a damaged length field is caught at
//! the frame it belongs to instead of sending the reader off into the middle of the next frame.

/// Bytes before the payload.
pub const FRAME_HEADER_LEN: usize = 9;
/// Largest payload a reader accepts. Anything longer is damage, not data.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Interns one string or (id, contributor) pair for the rest of the segment.
    Define = 1,
    /// One attribution event; a Merkle leaf.
    Event = 2,
    /// A signed checkpoint note (tlog checkpoint text with its signature line).
    Checkpoint = 3,
    /// Counters and Merkle right edge, so that open need not replay the whole log.
    Snapshot = 4,
}

impl FrameKind {
    pub fn from_u8(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Define),
            2 => Some(FrameKind::Event),
            3 => Some(FrameKind::Checkpoint),
            4 => Some(FrameKind::Snapshot),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Define => "define",
            FrameKind::Event => "event",
            FrameKind::Checkpoint => "checkpoint",
            FrameKind::Snapshot => "snapshot",
        }
    }
}

/// The CRC a frame must carry.
pub fn frame_crc(kind: u8, payload: &[u8]) -> u32 {
    let len = (payload.len() as u32).to_le_bytes();
    let c = crc32c::crc32c(&len);
    let c = crc32c::crc32c_append(c, &[kind]);
    crc32c::crc32c_append(c, payload)
}

/// Appends one frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, kind: FrameKind, payload: &[u8]) {
    assert!(
        payload.len() <= MAX_PAYLOAD,
        "frame payload over MAX_PAYLOAD"
    );
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_crc(kind as u8, payload).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
}

/// A frame that passed its length and CRC checks.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    pub offset: usize,
    pub kind: FrameKind,
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    /// Total bytes the frame occupies.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload.len()
    }

    /// Offset of the byte after the frame.
    pub fn end(&self) -> usize {
        self.offset + self.frame_len()
    }
}

/// Why the bytes at an offset are not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadFrame {
    /// Fewer than 9 bytes left, or the payload runs past the end of the data.
    Incomplete { needed: usize, available: usize },
    /// The length field exceeds `MAX_PAYLOAD`.
    TooLong(usize),
    /// The kind byte names no frame kind.
    UnknownKind(u8),
    /// The checksum does not match.
    Crc { stored: u32, computed: u32 },
}

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadFrame::Incomplete { needed, available } => write!(
                f,
                "incomplete frame: needs {needed} bytes, {available} left"
            ),
            BadFrame::TooLong(n) => write!(f, "length field {n} exceeds the {MAX_PAYLOAD} limit"),
            BadFrame::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            BadFrame::Crc { stored, computed } => write!(
                f,
                "CRC mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
        }
    }
}

/// Reads the frame at `offset` of `buf`. `Ok(None)` at exactly the end of `buf`.
pub fn read_frame(buf: &[u8], offset: usize) -> Result<Option<RawFrame<'_>>, BadFrame> {
    let available = buf.len().saturating_sub(offset);
    if available == 0 {
        return Ok(None);
    }
    if available < FRAME_HEADER_LEN {
        return Err(BadFrame::Incomplete {
            needed: FRAME_HEADER_LEN,
            available,
        });
    }
    let h = &buf[offset..offset + FRAME_HEADER_LEN];
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let stored = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let kind_byte = h[8];
    if len > MAX_PAYLOAD {
        return Err(BadFrame::TooLong(len));
    }
    if available < FRAME_HEADER_LEN + len {
        return Err(BadFrame::Incomplete {
            needed: FRAME_HEADER_LEN + len,
            available,
        });
    }
    let payload = &buf[offset + FRAME_HEADER_LEN..offset + FRAME_HEADER_LEN + len];
    let computed = frame_crc(kind_byte, payload);
    if computed != stored {
        return Err(BadFrame::Crc { stored, computed });
    }
    let kind = FrameKind::from_u8(kind_byte).ok_or(BadFrame::UnknownKind(kind_byte))?;
    Ok(Some(RawFrame {
        offset,
        kind,
        payload,
    }))
}

/// The offset of the first frame after `from` (exclusive) that passes length, kind and CRC
/// checks, searching byte by byte. Used to tell a torn tail (nothing valid follows) from damage
/// inside the sealed region (valid frames follow). The kind and length filters reject almost
/// every offset before a CRC is computed, so a long garbage tail scans quickly.
pub fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let mut off = from + 1;
    while off + FRAME_HEADER_LEN <= buf.len() {
        let h = &buf[off..off + FRAME_HEADER_LEN];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if FrameKind::from_u8(h[8]).is_some()
            && len <= MAX_PAYLOAD
            && off + FRAME_HEADER_LEN + len <= buf.len()
            && let Ok(Some(_)) = read_frame(buf, off)
        {
            return Some(off);
        }
        off += 1;
    }
    None
}
