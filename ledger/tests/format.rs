//! Frame, header and interning layer.

mod common;

use edgelora_ledger::format::frame::{
    BadFrame, FRAME_HEADER_LEN, FrameKind, encode_frame, read_frame, resync,
};
use edgelora_ledger::format::header::{
    BadHeader, HEADER_LEN, SegmentHeader, VERSION, parse_segment_file_name, segment_file_name,
};
use edgelora_ledger::format::wire::{Def, Interner, SymbolTable, WireEvent, decode_exact, encode};
use edgelora_ledger::{Attribution, Event, EventBody, Outcome};

#[test]
fn frame_round_trips_with_layout_len_crc_kind_payload() {
    let mut buf = Vec::new();
    encode_frame(&mut buf, FrameKind::Event, b"hello");
    encode_frame(&mut buf, FrameKind::Define, &[1, 2, 3]);
    assert_eq!(&buf[0..4], &5u32.to_le_bytes());
    assert_eq!(buf[8], FrameKind::Event as u8);
    assert_eq!(&buf[9..14], b"hello");
    let a = read_frame(&buf, 0).unwrap().unwrap();
    assert_eq!(
        (a.kind, a.payload, a.frame_len()),
        (FrameKind::Event, &b"hello"[..], FRAME_HEADER_LEN + 5)
    );
    let b = read_frame(&buf, a.end()).unwrap().unwrap();
    assert_eq!((b.kind, b.payload), (FrameKind::Define, &[1u8, 2, 3][..]));
    assert!(read_frame(&buf, b.end()).unwrap().is_none());
}

#[test]
fn every_single_bit_flip_in_a_frame_is_detected() {
    let mut clean = Vec::new();
    encode_frame(&mut clean, FrameKind::Checkpoint, b"some payload bytes");
    for bit in 0..clean.len() * 8 {
        let mut b = clean.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(
            read_frame(&b, 0).is_err(),
            "flip of bit {bit} went unnoticed"
        );
    }
}

#[test]
fn short_unknown_and_oversized_frames_are_refused() {
    let mut buf = Vec::new();
    encode_frame(&mut buf, FrameKind::Event, b"0123456789");
    assert!(matches!(
        read_frame(&buf[..buf.len() - 1], 0),
        Err(BadFrame::Incomplete { .. })
    ));
    assert!(matches!(
        read_frame(&buf[..4], 0),
        Err(BadFrame::Incomplete { .. })
    ));
    let mut huge = buf.clone();
    huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(read_frame(&huge, 0), Err(BadFrame::TooLong(_))));
    // A kind byte we do not know, with a CRC that matches it, is still refused.
    let mut unknown = buf.clone();
    unknown[8] = 9;
    let crc = edgelora_ledger::format::frame::frame_crc(9, &unknown[9..]);
    unknown[4..8].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        read_frame(&unknown, 0).unwrap_err(),
        BadFrame::UnknownKind(9)
    );
}

#[test]
fn resync_finds_the_next_intact_frame_after_garbage_and_nothing_in_zeros() {
    let mut buf = vec![0xffu8; 37];
    let at = buf.len();
    encode_frame(&mut buf, FrameKind::Event, b"after the damage");
    assert_eq!(resync(&buf, 0), Some(at));
    let zeros = vec![0u8; 4096];
    assert_eq!(resync(&zeros, 0), None);
}

#[test]
fn header_round_trips_and_unknown_versions_are_refused_before_the_crc() {
    let h = SegmentHeader {
        epoch: 2,
        segment_index: 9,
        first_seq: 1234,
        epoch_first_seq: 1000,
        created_ms: 1_700_000_000_000,
        prev_chain: [3; 32],
    };
    let b = h.encode();
    assert_eq!(b.len(), HEADER_LEN);
    assert_eq!(&b[0..8], b"EDGLEDGR");
    assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
    let mut v2 = b;
    v2[8..10].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert_eq!(
        SegmentHeader::decode(&v2).unwrap_err(),
        BadHeader::UnsupportedVersion(VERSION + 1)
    );
    let mut flipped = b;
    flipped[30] ^= 0x10;
    assert_eq!(SegmentHeader::decode(&flipped).unwrap_err(), BadHeader::Crc);
    assert_eq!(
        SegmentHeader::decode(&[0u8; 40]).unwrap_err(),
        BadHeader::Zeroed
    );
    assert_eq!(
        SegmentHeader::decode(&b[..50]).unwrap_err(),
        BadHeader::Short(50)
    );
    assert_eq!(
        SegmentHeader::decode(b"not a ledger segment at all, sorry").unwrap_err(),
        BadHeader::BadMagic
    );
}

#[test]
fn segment_file_names_carry_twenty_digit_sequence_numbers() {
    assert_eq!(segment_file_name(42), "seg-00000000000000000042.log");
    assert_eq!(
        parse_segment_file_name("seg-00000000000000000042.log"),
        Some(42)
    );
    assert_eq!(parse_segment_file_name("seg-42.log"), None);
    assert_eq!(
        parse_segment_file_name("seg-00000000000000000042.log.quarantined"),
        None
    );
}

#[test]
fn interning_round_trips_and_defines_each_string_once_per_segment() {
    let bodies = common::bodies(500, 3);
    let mut interner = Interner::default();
    let mut table = SymbolTable::default();
    let mut prev = 1_000u64;
    let mut total_defs = 0;
    for (seq, body) in bodies.into_iter().enumerate() {
        let ev = Event {
            seq: seq as u64,
            body,
        };
        let mut defs = Vec::new();
        let wire = interner.encode_event(&ev, prev, &mut defs);
        total_defs += defs.len();
        for d in defs {
            // Definitions survive their own encoding.
            let d2: Def = decode_exact(&encode(&d), "def").unwrap();
            table.define(d2).unwrap();
        }
        let wire2: WireEvent = decode_exact(&encode(&wire), "event").unwrap();
        assert_eq!(wire2, wire);
        assert_eq!(table.resolve(&wire2, prev).unwrap(), ev);
        prev = ev.body.time_ms;
    }
    assert_eq!(total_defs, interner.len());
    assert_eq!(table.len(), interner.len());
    // A second encoding of a seen event defines nothing new.
    let again = common::bodies(1, 3).remove(0);
    let mut defs = Vec::new();
    interner.encode_event(
        &Event {
            seq: 0,
            body: again,
        },
        0,
        &mut defs,
    );
    assert!(defs.is_empty());
}

#[test]
fn symbol_table_refuses_out_of_order_ids_and_dangling_references() {
    let mut t = SymbolTable::default();
    let bad_id = Def {
        id: 1,
        sym: edgelora_ledger::format::wire::SymbolDef::Str("x".into()),
    };
    assert!(t.define(bad_id).is_err());
    let dangling = Def {
        id: 0,
        sym: edgelora_ledger::format::wire::SymbolDef::Pair(0, 5),
    };
    assert!(t.define(dangling).is_err());
}

#[test]
fn a_typical_interned_event_is_small() {
    let body = EventBody {
        time_ms: 1_700_000_000_123,
        request_digest: [9; 32],
        base_model: Attribution::new("llama", "meta"),
        adapter: Some(Attribution::new("skill-1", "alice")),
        prompt_template: None,
        data_chunks: vec![],
        tools: vec![],
        prompt_tokens: 700,
        completion_tokens: 120,
        latency_ms: 900,
        outcome: Outcome::Stop,
    };
    let mut interner = Interner::default();
    let mut defs = Vec::new();
    let ev = Event { seq: 100_000, body };
    interner.encode_event(&ev, 1_700_000_000_000, &mut defs);
    let wire = interner.encode_event(&ev, 1_700_000_000_000, &mut Vec::new());
    let bytes = encode(&wire).len();
    // seq 3 + delta 2 + digest 32 + base 1 + adapter 2 + options/lists 3 + tokens 2+1+2 + outcome 1
    assert!(bytes <= 50, "interned event is {bytes} bytes");
    println!("interned payload of a base+adapter event: {bytes} bytes (+9 frame header)");
}
