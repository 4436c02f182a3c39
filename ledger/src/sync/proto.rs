//! The sync protocol, version 1: how a device ships its log to the fleet's collector.
//!
//! Transport: TLS 1.3 with mutual authentication (the device presents its fleet certificate;
//! the collector takes the device id from it, never from the messages), ALPN `edgelora-sync/1`.
//! Messages are `postcard` encodings of [`ClientMsg`] / [`ServerMsg`], each framed as
//! `len: u32 LE | payload[len]` with `len` ≤ [`MAX_FRAME`].
//!
//! ```text
//! device                                          collector
//!   Hello { magic, version, device_id }     →
//!                                            ←     Welcome { next_seq, epoch, checkpoint_size }
//!   Upload { events next_seq.., checkpoint,  →     verify signature, Merkle consistency,
//!            batch_proof, prev_proof }              store (device, seq) exactly once
//!                                            ←     Ack { next_seq }   |   Refused { code }
//!   Upload ...                               →
//! ```
//!
//! - `Welcome.next_seq` is the collector's acknowledgement: every event below it is stored.
//!   The device sends from there, so a dropped connection costs at most one resend, and a
//!   resend of stored events is recognised (same leaf hashes) and not stored again.
//! - An upload carries contiguous events `first_seq..` of one epoch, a checkpoint the device
//!   signed whose tree covers them (tree size ≥ last event's leaf index + 1), and two
//!   RFC 6962 consistency proofs: `batch_proof` from the tree ending at the batch's last event
//!   to the checkpoint's tree, and `prev_proof` from the last checkpoint the collector accepted
//!   in this epoch (`Welcome.checkpoint_size` / the previous `Ack`) to the new one. The collector
//!   rebuilds the tree from the events it stores, so a changed, dropped or reordered event, or
//!   a history rewritten under the same key, contradicts something the device signed.
//! - A new epoch (the device's log was damaged and it started a new tree) is announced by an
//!   upload whose `epoch` is higher; sequence numbers the collector never received below the new
//!   epoch's first one are recorded as a gap.
//! - `Refused` is final for the connection. `code.retryable()` says whether trying again later
//!   can help (a busy or failing collector) or not (the device is flagged as suspect, not
//!   enrolled, or sent something malformed).

use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::merkle::Hash;

/// `Hello.magic`.
pub const MAGIC: [u8; 8] = *b"ELSYNC\0\0";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The TLS ALPN protocol id.
pub const ALPN: &[u8] = b"edgelora-sync/1";
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 32 << 20;
/// Most events one upload may carry.
pub const MAX_BATCH_EVENTS: usize = 16_384;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    Hello(Hello),
    Upload(Upload),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u16,
    /// Must equal the id in the device's certificate.
    pub device_id: String,
    /// Free text for the collector's logs ("edgelorad 0.1.0").
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub epoch: u32,
    /// Sequence number of the epoch's leaf 0 (equals the checkpoint's `first-seq`).
    pub epoch_first_seq: u64,
    /// Sequence number of `events[0]`; the events are contiguous.
    pub first_seq: u64,
    pub events: Vec<Event>,
    /// The signed checkpoint note (`Checkpoint::note`).
    pub checkpoint: String,
    /// Consistency proof from the tree of the leaves up to the batch's last event to the
    /// checkpoint's tree (empty when they are the same size).
    pub batch_proof: Vec<Hash>,
    /// Consistency proof from the collector's last accepted checkpoint of this epoch to this
    /// one (empty when there is none, or they are the same size).
    pub prev_proof: Vec<Hash>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    Welcome(Welcome),
    Ack(Ack),
    Refused(Refused),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u16,
    /// Every event of this device below this sequence number is stored.
    pub next_seq: u64,
    /// The epoch the collector is in for this device.
    pub epoch: u32,
    /// Tree size of the last checkpoint accepted in that epoch (0 if none).
    pub checkpoint_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// As `Welcome::next_seq`, after this upload.
    pub next_seq: u64,
    pub epoch: u32,
    pub checkpoint_size: u64,
    /// Events of the upload stored now.
    pub stored: u32,
    /// Events of the upload that were already stored (a resend).
    pub duplicates: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub code: RefuseCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    /// Unknown magic or version.
    BadVersion,
    /// The certificate's device is not registered (or revoked) in the fleet.
    NotEnrolled,
    /// `Hello.device_id` differs from the certificate's.
    WrongDevice,
    /// A message that does not follow the protocol (bad frame, upload before hello, ...).
    Protocol,
    /// The checkpoint does not parse, is not for this device, or its signature fails.
    BadCheckpoint,
    /// The upload contradicts what the device signed before or now (tampered, reordered,
    /// removed or rewritten events). The device is flagged.
    Tampered,
    /// The device is flagged as suspect; nothing more is accepted from it.
    Suspect,
    /// An epoch older than the collector's, or a checkpoint older than the last accepted one.
    Stale,
    /// The collector failed (storage error); try again later.
    Unavailable,
}

impl RefuseCode {
    /// Whether the same upload might be accepted later.
    pub fn retryable(self) -> bool {
        matches!(self, RefuseCode::Unavailable | RefuseCode::Stale)
    }
}

/// Frames and unframes messages over any async byte stream.
pub mod frame {
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::MAX_FRAME;

    #[derive(Debug, thiserror::Error)]
    pub enum FrameError {
        #[error("connection: {0}")]
        Io(#[from] std::io::Error),
        #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
        TooLarge(usize),
        #[error("malformed message: {0}")]
        Decode(String),
        #[error("the peer closed the connection")]
        Closed,
    }

    /// Writes one framed message and flushes.
    pub async fn write<W: AsyncWrite + Unpin, M: Serialize>(
        w: &mut W,
        msg: &M,
    ) -> Result<usize, FrameError> {
        let payload = postcard::to_allocvec(msg).map_err(|e| FrameError::Decode(e.to_string()))?;
        if payload.len() > MAX_FRAME {
            return Err(FrameError::TooLarge(payload.len()));
        }
        let mut buf = Vec::with_capacity(4 + payload.len());
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&payload);
        w.write_all(&buf).await?;
        w.flush().await?;
        Ok(buf.len())
    }

    /// Reads one framed message; `Closed` on a clean end of stream before a frame starts.
    pub async fn read<R: AsyncRead + Unpin, M: DeserializeOwned>(
        r: &mut R,
    ) -> Result<(M, usize), FrameError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Closed);
            }
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        let msg = postcard::from_bytes(&payload).map_err(|e| FrameError::Decode(e.to_string()))?;
        Ok((msg, 4 + len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let hello = ClientMsg::Hello(Hello {
            magic: MAGIC,
            version: VERSION,
            device_id: "box-1".into(),
            agent: "test".into(),
        });
        let mut buf = Vec::new();
        frame::write(&mut buf, &hello).await.unwrap();
        let (back, n): (ClientMsg, usize) = frame::read(&mut buf.as_slice()).await.unwrap();
        assert_eq!(back, hello);
        assert_eq!(n, buf.len());

        // A length over the limit is refused before anything is allocated.
        let mut big = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 16]);
        let r: Result<(ClientMsg, usize), _> = frame::read(&mut big.as_slice()).await;
        assert!(matches!(r, Err(frame::FrameError::TooLarge(_))), "{r:?}");

        // Garbage inside a well-formed frame is a decode error, not a panic.
        let mut junk = 3u32.to_le_bytes().to_vec();
        junk.extend_from_slice(&[0xff, 0xff, 0xff]);
        let r: Result<(ClientMsg, usize), _> = frame::read(&mut junk.as_slice()).await;
        assert!(matches!(r, Err(frame::FrameError::Decode(_))), "{r:?}");

        // A clean end of stream is `Closed`; a torn frame is an I/O error.
        let r: Result<(ClientMsg, usize), _> = frame::read(&mut [].as_slice()).await;
        assert!(matches!(r, Err(frame::FrameError::Closed)), "{r:?}");
        let r: Result<(ClientMsg, usize), _> = frame::read(&mut &buf[..buf.len() - 1]).await;
        assert!(matches!(r, Err(frame::FrameError::Io(_))), "{r:?}");
    }
}
