//! Byte-level tests of the frame and body codec: every malformed kind of PROTOCOL.md section
//! 5.2 with its exact `DecodeError`, error code and request id; incremental input; encode
//! limits; and property tests (round trips of every message, no panics on arbitrary bytes).
#![allow(clippy::unwrap_used)]

use bytes::{BufMut, Bytes, BytesMut};
use citycard_protocol::frame::{decode_frame, encode_frame, HEADER_LEN, MAX_BODY_LEN};
use citycard_protocol::*;
use proptest::prelude::*;

const RID: u32 = 0x0102_0304;

/// A header with every field under the test's control.
fn header(
    magic: &[u8; 2],
    version: u8,
    t: u8,
    flags: u16,
    reserved: u16,
    rid: u32,
    len: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(magic);
    h.push(version);
    h.push(t);
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&reserved.to_be_bytes());
    h.extend_from_slice(&rid.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// A well-formed header followed by `body`.
fn frame(t: u8, body: &[u8]) -> BytesMut {
    let mut f = header(b"CC", 1, t, 0, 0, RID, body.len() as u32);
    f.extend_from_slice(body);
    BytesMut::from(&f[..])
}

fn auth_bytes() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&42u64.to_be_bytes());
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&9u64.to_be_bytes());
    b.extend_from_slice(&[0xab; 16]);
    b
}

fn purchase_body() -> Vec<u8> {
    let mut b = auth_bytes();
    b.extend_from_slice(&250i64.to_be_bytes());
    b
}

fn card_result_bytes(status: u8) -> Vec<u8> {
    let mut b = vec![status];
    b.extend_from_slice(&42u64.to_be_bytes());
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&100i64.to_be_bytes());
    b.extend_from_slice(&5u64.to_be_bytes());
    b.extend_from_slice(&[0xcd; 16]);
    b
}

/// Asserts the error of decoding `buf` as a request (or response), its code, request id and
/// whether the server closes the connection after it.
#[track_caller]
fn expect_request_err(mut buf: BytesMut, expected: DecodeError, code: ErrorCode, rid: Option<u32>) {
    let err = decode_request(&mut buf).unwrap_err();
    check_err(err, expected, code, rid);
}

#[track_caller]
fn expect_response_err(
    mut buf: BytesMut,
    expected: DecodeError,
    code: ErrorCode,
    rid: Option<u32>,
) {
    let err = decode_response(&mut buf).unwrap_err();
    check_err(err, expected, code, rid);
}

#[track_caller]
fn check_err(err: DecodeError, expected: DecodeError, code: ErrorCode, rid: Option<u32>) {
    assert_eq!(err, expected);
    assert_eq!(err.code(), code);
    assert_eq!(err.request_id(), rid.map(RequestId));
    let body_level =
        matches!(code, ErrorCode::BodyTooShort | ErrorCode::TrailingBytes | ErrorCode::BadValue);
    assert_eq!(code.closes_connection(), !body_level, "{code:?}");
}

fn bad_value(field: &'static str, value: u64) -> DecodeError {
    DecodeError::BadValue { field, value, request_id: RequestId(RID) }
}

// ---------------------------------------------------------------------------------------------
// Header.

#[test]
fn short_header_waits_without_consuming() {
    let full = frame(0x02, &purchase_body());
    for n in 0..HEADER_LEN {
        let mut buf = BytesMut::from(&full[..n]);
        assert_eq!(decode_frame(&mut buf).unwrap(), None, "{n} bytes");
        assert_eq!(&buf[..], &full[..n], "{n} bytes: nothing consumed");
        let mut buf = BytesMut::from(&full[..n]);
        assert_eq!(decode_request(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), n);
    }
}

#[test]
fn incomplete_body_waits_without_consuming() {
    let full = frame(0x02, &purchase_body());
    for n in HEADER_LEN..full.len() {
        let mut buf = BytesMut::from(&full[..n]);
        assert_eq!(decode_request(&mut buf).unwrap(), None, "{n} bytes");
        assert_eq!(&buf[..], &full[..n]);
        // Room for the rest of the frame is reserved, no more.
        assert!(buf.capacity() >= full.len());
    }
}

#[test]
fn wrong_magic_is_reported_after_two_bytes() {
    let mut one = BytesMut::from(&b"X"[..]);
    assert_eq!(decode_frame(&mut one).unwrap(), None, "one byte cannot be judged yet");
    for bytes in [&b"XC"[..], b"CX", b"GET / HTTP/1.1", b"\x16\x03\x01\x02\x00"] {
        let buf = BytesMut::from(bytes);
        let expected = DecodeError::BadMagic([bytes[0], bytes[1]]);
        expect_request_err(buf, expected, ErrorCode::BadMagic, None);
    }
    let mut full = frame(0x01, &[0; 8]);
    full[0] = b'c';
    expect_request_err(full, DecodeError::BadMagic(*b"cC"), ErrorCode::BadMagic, None);
}

#[test]
fn wrong_version() {
    for version in [0u8, 2, 0xff] {
        let buf = BytesMut::from(&header(b"CC", version, 0x01, 0, 0, RID, 8)[..]);
        expect_request_err(buf, DecodeError::BadVersion(version), ErrorCode::BadVersion, None);
    }
}

#[test]
fn nonzero_flags_or_reserved() {
    for (flags, reserved) in [(1u16, 0u16), (0x8000, 0), (0, 1), (0xffff, 0xffff)] {
        let buf = BytesMut::from(&header(b"CC", 1, 0x01, flags, reserved, RID, 8)[..]);
        let expected = DecodeError::BadHeader { flags, reserved, request_id: RequestId(RID) };
        expect_request_err(buf, expected, ErrorCode::BadHeader, Some(RID));
    }
}

#[test]
fn unknown_type_is_rejected_from_the_header_alone() {
    for t in [0x00u8, 0x7e, 0x7f, 0x80, 0xfe] {
        // Header only: the body is not awaited.
        let buf = BytesMut::from(&header(b"CC", 1, t, 0, 0, RID, 8)[..]);
        let expected = DecodeError::UnknownType { message_type: t, request_id: RequestId(RID) };
        expect_request_err(buf.clone(), expected.clone(), ErrorCode::UnknownType, Some(RID));
        expect_response_err(buf, expected, ErrorCode::UnknownType, Some(RID));
    }
}

#[test]
fn header_checks_run_in_the_documented_order() {
    // Bad version wins over bad flags, bad flags over unknown type, unknown type over length.
    let buf = BytesMut::from(&header(b"CC", 9, 0x00, 1, 0, RID, u32::MAX)[..]);
    expect_request_err(buf, DecodeError::BadVersion(9), ErrorCode::BadVersion, None);
    let buf = BytesMut::from(&header(b"CC", 1, 0x00, 1, 0, RID, u32::MAX)[..]);
    let expected = DecodeError::BadHeader { flags: 1, reserved: 0, request_id: RequestId(RID) };
    expect_request_err(buf, expected, ErrorCode::BadHeader, Some(RID));
    let buf = BytesMut::from(&header(b"CC", 1, 0x00, 0, 0, RID, u32::MAX)[..]);
    let expected = DecodeError::UnknownType { message_type: 0, request_id: RequestId(RID) };
    expect_request_err(buf, expected, ErrorCode::UnknownType, Some(RID));
}

#[test]
fn response_type_sent_as_request() {
    let buf = frame(0x82, &card_result_bytes(0));
    let expected = DecodeError::UnknownType { message_type: 0x82, request_id: RequestId(RID) };
    expect_request_err(buf, expected, ErrorCode::UnknownType, Some(RID));
    let buf = frame(0xff, &[0, 1, 0, 0]);
    let expected = DecodeError::UnknownType { message_type: 0xff, request_id: RequestId(RID) };
    expect_request_err(buf, expected, ErrorCode::UnknownType, Some(RID));
}

#[test]
fn request_type_decoded_as_response() {
    let buf = frame(0x02, &purchase_body());
    let expected = DecodeError::UnknownType { message_type: 0x02, request_id: RequestId(RID) };
    expect_response_err(buf, expected, ErrorCode::UnknownType, Some(RID));
}

#[test]
fn length_over_the_maximum() {
    let len = MAX_BODY_LEN as u32 + 1;
    let buf = BytesMut::from(&header(b"CC", 1, 0x0c, 0, 0, RID, len)[..]);
    let expected = DecodeError::FrameTooLarge {
        len: len.into(),
        max: MAX_BODY_LEN,
        request_id: RequestId(RID),
    };
    expect_request_err(buf, expected, ErrorCode::FrameTooLarge, Some(RID));
}

#[test]
fn length_at_the_maximum_is_accepted_by_the_framer() {
    let mut buf = BytesMut::from(&header(b"CC", 1, 0x0c, 0, 0, RID, MAX_BODY_LEN as u32)[..]);
    assert_eq!(decode_frame(&mut buf).unwrap(), None);
    buf.put_bytes(0, MAX_BODY_LEN);
    let f = decode_frame(&mut buf).unwrap().unwrap();
    assert_eq!(f.body.len(), MAX_BODY_LEN);
    assert!(buf.is_empty());
}

#[test]
fn length_ffffffff_is_rejected_without_allocating() {
    let mut buf = BytesMut::with_capacity(HEADER_LEN);
    buf.put_slice(&header(b"CC", 1, 0x02, 0, 0, RID, u32::MAX));
    let capacity = buf.capacity();
    let err = decode_frame(&mut buf).unwrap_err();
    assert_eq!(
        err,
        DecodeError::FrameTooLarge {
            len: u32::MAX.into(),
            max: MAX_BODY_LEN,
            request_id: RequestId(RID)
        }
    );
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(buf.capacity(), capacity, "the buffer must not grow for a refused length");
    assert_eq!(buf.len(), HEADER_LEN);
}

// ---------------------------------------------------------------------------------------------
// Body.

#[test]
fn body_shorter_than_required() {
    let mut body = purchase_body();
    body.pop();
    let expected = DecodeError::BodyTooShort {
        message_type: MessageType::Purchase,
        needed: 44,
        have: 43,
        request_id: RequestId(RID),
    };
    expect_request_err(frame(0x02, &body), expected, ErrorCode::BodyTooShort, Some(RID));

    // Empty body of a type that needs one.
    let expected = DecodeError::BodyTooShort {
        message_type: MessageType::Hello,
        needed: 8,
        have: 0,
        request_id: RequestId(RID),
    };
    expect_request_err(frame(0x01, &[]), expected, ErrorCode::BodyTooShort, Some(RID));

    // A count promising more elements than the body holds.
    let mut body = vec![0, 2];
    body.extend_from_slice(&[0; 52]);
    let expected = DecodeError::BodyTooShort {
        message_type: MessageType::OfflineBatch,
        needed: 2 + 52 + 8,
        have: 54,
        request_id: RequestId(RID),
    };
    expect_request_err(frame(0x0c, &body), expected, ErrorCode::BodyTooShort, Some(RID));

    // A response too.
    let mut body = card_result_bytes(0);
    body.truncate(30);
    let expected = DecodeError::BodyTooShort {
        message_type: MessageType::PurchaseResult,
        needed: 45,
        have: 30,
        request_id: RequestId(RID),
    };
    expect_response_err(frame(0x82, &body), expected, ErrorCode::BodyTooShort, Some(RID));
}

#[test]
fn body_longer_than_required() {
    let expected = DecodeError::TrailingBytes {
        message_type: MessageType::Hello,
        extra: 1,
        request_id: RequestId(RID),
    };
    expect_request_err(frame(0x01, &[0; 9]), expected, ErrorCode::TrailingBytes, Some(RID));

    let mut body = purchase_body();
    body.extend_from_slice(&[1, 2, 3]);
    let expected = DecodeError::TrailingBytes {
        message_type: MessageType::Purchase,
        extra: 3,
        request_id: RequestId(RID),
    };
    expect_request_err(frame(0x02, &body), expected, ErrorCode::TrailingBytes, Some(RID));

    let mut body = card_result_bytes(0);
    body.push(0);
    let expected = DecodeError::TrailingBytes {
        message_type: MessageType::BalanceResult,
        extra: 1,
        request_id: RequestId(RID),
    };
    expect_response_err(frame(0x84, &body), expected, ErrorCode::TrailingBytes, Some(RID));
}

#[test]
fn bad_status() {
    for status in [27u8, 0x80, 0xff] {
        let buf = frame(0x82, &card_result_bytes(status));
        expect_response_err(
            buf,
            bad_value("status", status.into()),
            ErrorCode::BadValue,
            Some(RID),
        );
    }
}

#[test]
fn bad_block_reason() {
    // 6 (Overdrawn) and 7 (Retired) are server-only reasons; 0 and 8+ are unassigned.
    for reason in [0u8, 6, 7, 8, 0xff] {
        let mut body = 1u64.to_be_bytes().to_vec();
        body.extend_from_slice(&42u64.to_be_bytes());
        body.push(reason);
        let buf = frame(0x08, &body);
        expect_request_err(buf, bad_value("reason", reason.into()), ErrorCode::BadValue, Some(RID));
    }
    for reason in 1..=5u8 {
        let mut body = 1u64.to_be_bytes().to_vec();
        body.extend_from_slice(&42u64.to_be_bytes());
        body.push(reason);
        let (_, req) = decode_request(&mut frame(0x08, &body)).unwrap().unwrap();
        assert!(matches!(req, Request::Block { reason: r, .. } if r as u8 == reason));
    }
}

fn staff_result_bytes(state: u8) -> Vec<u8> {
    let mut b = vec![0];
    b.extend_from_slice(&42u64.to_be_bytes());
    b.push(state);
    b.extend_from_slice(&[0; 8 * 4 + 16]);
    b
}

#[test]
fn bad_card_state() {
    for t in [0x88u8, 0x89, 0x8b] {
        assert!(decode_response(&mut frame(t, &staff_result_bytes(4))).is_ok());
        let buf = frame(t, &staff_result_bytes(5));
        expect_response_err(buf, bad_value("card_state", 5), ErrorCode::BadValue, Some(RID));
    }
}

fn history_body(kind: u8, entry_status: u8) -> Vec<u8> {
    let mut b = vec![0];
    b.extend_from_slice(&42u64.to_be_bytes());
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&100i64.to_be_bytes());
    b.push(1);
    b.extend_from_slice(&9u64.to_be_bytes());
    b.push(kind);
    b.push(entry_status);
    b.extend_from_slice(&[0; 8 + 8 + 8 + 4]);
    b.extend_from_slice(&0u64.to_be_bytes());
    b.extend_from_slice(&[0; 16]);
    b
}

#[test]
fn bad_entry_kind_and_entry_status() {
    assert!(decode_response(&mut frame(0x85, &history_body(15, 0))).is_ok());
    assert!(decode_response(&mut frame(0x85, &history_body(16, 26))).is_ok());
    for kind in [0u8, 0x7f, 0xff] {
        let buf = frame(0x85, &history_body(kind, 0));
        expect_response_err(buf, bad_value("kind", kind.into()), ErrorCode::BadValue, Some(RID));
    }
    let buf = frame(0x85, &history_body(2, 27));
    expect_response_err(buf, bad_value("status", 27), ErrorCode::BadValue, Some(RID));
}

fn hotlist_body(more: u8, listed: u8, reason: u8) -> Vec<u8> {
    let mut b = vec![1];
    b.extend_from_slice(&3u64.to_be_bytes());
    b.push(more);
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&42u64.to_be_bytes());
    b.push(listed);
    b.push(reason);
    b.extend_from_slice(&3u64.to_be_bytes());
    b
}

#[test]
fn bad_listed_more_and_hotlist_reason() {
    assert!(decode_response(&mut frame(0x8d, &hotlist_body(1, 0, 7))).is_ok());
    let buf = frame(0x8d, &hotlist_body(2, 1, 1));
    expect_response_err(buf, bad_value("more", 2), ErrorCode::BadValue, Some(RID));
    let buf = frame(0x8d, &hotlist_body(0, 2, 1));
    expect_response_err(buf, bad_value("listed", 2), ErrorCode::BadValue, Some(RID));
    for reason in [0u8, 8] {
        let buf = frame(0x8d, &hotlist_body(0, 1, reason));
        expect_response_err(
            buf,
            bad_value("reason", reason.into()),
            ErrorCode::BadValue,
            Some(RID),
        );
    }
}

#[test]
fn bad_error_message_utf8() {
    let buf = frame(0xff, &[0, 8, 0, 2, 0xc3, 0x28]);
    expect_response_err(buf, bad_value("message", 2), ErrorCode::BadValue, Some(RID));
}

#[test]
fn counts_over_their_limits_are_rejected_before_reading_elements() {
    // Each body holds only the count (and what precedes it): the limit check comes first.
    expect_request_err(
        frame(0x0c, &257u16.to_be_bytes()),
        bad_value("records", 257),
        ErrorCode::BadValue,
        Some(RID),
    );
    expect_request_err(
        frame(0x0c, &u16::MAX.to_be_bytes()),
        bad_value("records", 65535),
        ErrorCode::BadValue,
        Some(RID),
    );
    expect_request_err(
        frame(0x0d, &[4, 0, 65]),
        bad_value("cursor", 65),
        ErrorCode::BadValue,
        Some(RID),
    );
    expect_response_err(
        frame(0x8c, &257u16.to_be_bytes()),
        bad_value("results", 257),
        ErrorCode::BadValue,
        Some(RID),
    );
    expect_response_err(
        frame(0x8d, &[65]),
        bad_value("cursor", 65),
        ErrorCode::BadValue,
        Some(RID),
    );
    let mut b = vec![0, 0];
    b.extend_from_slice(&1025u16.to_be_bytes());
    expect_response_err(
        frame(0x8d, &b),
        bad_value("entries", 1025),
        ErrorCode::BadValue,
        Some(RID),
    );
    let mut b = history_body(2, 0);
    b[21] = 65;
    b.truncate(22);
    expect_response_err(frame(0x85, &b), bad_value("entries", 65), ErrorCode::BadValue, Some(RID));
    expect_response_err(
        frame(0xff, &[0, 1, 1, 1]),
        bad_value("message", 257),
        ErrorCode::BadValue,
        Some(RID),
    );
}

#[test]
fn counts_at_their_limits_decode() {
    let mut b = 256u16.to_be_bytes().to_vec();
    b.extend_from_slice(&[0; 256 * 52]);
    let (_, req) = decode_request(&mut frame(0x0c, &b)).unwrap().unwrap();
    assert!(matches!(req, Request::OfflineBatch { records } if records.len() == 256));
    let mut b = vec![0, 0, 64];
    b.extend_from_slice(&[0; 64 * 8]);
    let (_, req) = decode_request(&mut frame(0x0d, &b)).unwrap().unwrap();
    assert!(matches!(req, Request::HotlistSync { cursor, .. } if cursor.len() == 64));
}

#[test]
fn body_errors_through_decode_body_carry_request_id_zero() {
    let err = Request::decode_body(MessageType::Hello, &[0; 9]).unwrap_err();
    assert_eq!(err.request_id(), Some(RequestId(0)));
    assert_eq!(err.with_request_id(RequestId(5)).request_id(), Some(RequestId(5)));
    let err = Request::decode_body(MessageType::ServerInfo, &[]).unwrap_err();
    assert_eq!(err, DecodeError::UnknownType { message_type: 0x81, request_id: RequestId(0) });
    let err = Response::decode_body(MessageType::Hello, &[]).unwrap_err();
    assert_eq!(err, DecodeError::UnknownType { message_type: 0x01, request_id: RequestId(0) });
}

// ---------------------------------------------------------------------------------------------
// Streaming.

#[test]
fn frame_arriving_one_byte_at_a_time_decodes_once() {
    let mut wire = BytesMut::new();
    let req = Request::Purchase {
        auth: CardAuth { card_id: CardId(42), atc: Atc(7), nonce: 9, cryptogram: Mac([0xab; 16]) },
        amount: Amount(250),
    };
    req.encode(RequestId(RID), &mut wire).unwrap();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for byte in wire.iter() {
        buf.put_u8(*byte);
        if let Some(item) = decode_request(&mut buf).unwrap() {
            decoded.push(item);
        }
    }
    assert_eq!(decoded, vec![(RequestId(RID), req)]);
    assert!(buf.is_empty());
    assert_eq!(decode_request(&mut buf).unwrap(), None);
}

#[test]
fn back_to_back_frames_split_correctly() {
    let a = Request::Hello { client_time_ms: 1 };
    let b = Request::Close { op_ref: 2, card_id: CardId(3) };
    let mut buf = BytesMut::new();
    a.encode(RequestId(1), &mut buf).unwrap();
    b.encode(RequestId(2), &mut buf).unwrap();
    buf.put_slice(b"CC"); // start of a third frame
    assert_eq!(decode_request(&mut buf).unwrap(), Some((RequestId(1), a)));
    assert_eq!(decode_request(&mut buf).unwrap(), Some((RequestId(2), b)));
    assert_eq!(decode_request(&mut buf).unwrap(), None);
    assert_eq!(&buf[..], b"CC");
}

#[test]
fn a_body_error_leaves_the_next_frame_intact() {
    let mut buf = frame(0x01, &[0; 9]);
    Request::Hello { client_time_ms: 5 }.encode(RequestId(6), &mut buf).unwrap();
    assert_eq!(decode_request(&mut buf).unwrap_err().code(), ErrorCode::TrailingBytes);
    assert_eq!(
        decode_request(&mut buf).unwrap(),
        Some((RequestId(6), Request::Hello { client_time_ms: 5 }))
    );
}

// ---------------------------------------------------------------------------------------------
// Encoding limits.

#[track_caller]
fn expect_request_encode_err(req: &Request, expected: EncodeError) {
    let mut out = BytesMut::from(&b"prefix"[..]);
    assert_eq!(req.encode(RequestId(1), &mut out).unwrap_err(), expected);
    assert_eq!(&out[..], b"prefix", "nothing written");
}

#[track_caller]
fn expect_response_encode_err(resp: &Response, expected: EncodeError) {
    let mut out = BytesMut::from(&b"prefix"[..]);
    assert_eq!(resp.encode(RequestId(1), &mut out).unwrap_err(), expected);
    assert_eq!(&out[..], b"prefix", "nothing written");
}

fn zero_record() -> OfflineRecord {
    OfflineRecord {
        card_id: CardId(1),
        atc: Atc(1),
        amount: Amount(1),
        time_ms: 1,
        nonce: 1,
        certificate: Mac([0; 16]),
    }
}

fn zero_card_result() -> CardResult {
    CardResult {
        status: Status::Approved,
        card_id: CardId(1),
        atc: Atc(1),
        balance: Amount(0),
        journal_seq: 0,
        mac: Mac([0; 16]),
    }
}

#[test]
fn encode_rejects_counts_over_their_limits_and_writes_nothing() {
    expect_request_encode_err(
        &Request::OfflineBatch { records: vec![zero_record(); 257] },
        EncodeError::TooMany { field: "records", count: 257, max: 256 },
    );
    expect_request_encode_err(
        &Request::HotlistSync { cursor: vec![0; 65], max_entries: 1 },
        EncodeError::TooMany { field: "cursor", count: 65, max: 64 },
    );
    let entry = HistoryEntry {
        journal_seq: 1,
        kind: EntryKind::Purchase,
        status: Status::Approved,
        amount: Amount(-1),
        balance_after: Amount(0),
        time_ms: 0,
        atc: Atc(1),
    };
    expect_response_encode_err(
        &Response::History(HistoryPage {
            status: Status::Approved,
            card_id: CardId(1),
            atc: Atc(1),
            balance: Amount(0),
            entries: vec![entry; 65],
            next_before_seq: 0,
            mac: Mac([0; 16]),
        }),
        EncodeError::TooMany { field: "entries", count: 65, max: 64 },
    );
    expect_response_encode_err(
        &Response::OfflineBatch(vec![zero_card_result(); 257]),
        EncodeError::TooMany { field: "results", count: 257, max: 256 },
    );
    expect_response_encode_err(
        &Response::HotlistSync(HotlistChanges {
            cursor: vec![0; 65],
            more: false,
            entries: vec![],
        }),
        EncodeError::TooMany { field: "cursor", count: 65, max: 64 },
    );
    let he =
        HotlistEntry { card_id: CardId(1), listed: true, reason: BlockReason::Lost, version: 1 };
    expect_response_encode_err(
        &Response::HotlistSync(HotlistChanges {
            cursor: vec![],
            more: false,
            entries: vec![he; 1025],
        }),
        EncodeError::TooMany { field: "entries", count: 1025, max: 1024 },
    );
    expect_response_encode_err(
        &Response::Error { code: 8, message: "x".repeat(257) },
        EncodeError::TooMany { field: "message", count: 257, max: 256 },
    );
}

#[test]
fn encode_frame_rejects_an_oversized_body() {
    let f = Frame {
        message_type: MessageType::OfflineBatch,
        request_id: RequestId(1),
        body: Bytes::from(vec![0; MAX_BODY_LEN + 1]),
    };
    let mut out = BytesMut::new();
    assert_eq!(
        encode_frame(&f, &mut out).unwrap_err(),
        EncodeError::TooLarge { len: MAX_BODY_LEN + 1, max: MAX_BODY_LEN }
    );
    assert!(out.is_empty());
}

#[test]
fn largest_messages_fit_in_a_frame() {
    let mut out = BytesMut::new();
    Request::OfflineBatch { records: vec![zero_record(); 256] }
        .encode(RequestId(1), &mut out)
        .unwrap();
    assert_eq!(out.len(), HEADER_LEN + 2 + 256 * 52);
    let he =
        HotlistEntry { card_id: CardId(1), listed: true, reason: BlockReason::Lost, version: 1 };
    let mut out = BytesMut::new();
    Response::HotlistSync(HotlistChanges {
        cursor: vec![0; 64],
        more: true,
        entries: vec![he; 1024],
    })
    .encode(RequestId(1), &mut out)
    .unwrap();
    assert_eq!(out.len(), HEADER_LEN + 18_948);
    assert!(out.len() - HEADER_LEN <= MAX_BODY_LEN);
}

#[test]
fn error_text_is_cut_at_a_character_boundary() {
    // 255 ASCII bytes then a 2-byte character: cutting at 256 would split it.
    let text = format!("{}é", "a".repeat(255));
    let Response::Error { message, .. } = Response::error(ErrorCode::Internal, &text) else {
        panic!("not an error")
    };
    assert_eq!(message.len(), 255);
    let mut out = BytesMut::new();
    Response::error(ErrorCode::Internal, &"é".repeat(300)).encode(RequestId(0), &mut out).unwrap();
    let (_, decoded) = decode_response(&mut out).unwrap().unwrap();
    assert!(matches!(decoded, Response::Error { code: 12, message } if message.len() == 256));
}

#[test]
fn error_codes_parse_and_know_whether_they_close() {
    let open = [6u16, 7, 8, 11, 14];
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u16(code as u16), Some(code));
        assert_eq!(code.closes_connection(), !open.contains(&(code as u16)), "{code:?}");
    }
    assert_eq!(ErrorCode::from_u16(0), None);
    assert_eq!(ErrorCode::from_u16(15), None);
    for code in 1..=14u16 {
        assert!(ErrorCode::from_u16(code).is_some());
    }
}

#[test]
fn enum_parsers_accept_exactly_the_documented_values() {
    for v in 0..=255u8 {
        // 22..=26 are card products (protocol 1.3), 28 is SeqConflict (numbered offline).
        assert_eq!(Status::from_u8(v).is_some(), v <= 26 || v == 28, "status {v}");
        assert_eq!(CardState::from_u8(v).is_some(), v <= 4, "card state {v}");
        assert_eq!(BlockReason::from_u8(v).is_some(), (1..=7).contains(&v), "reason {v}");
        assert_eq!(EntryKind::from_u8(v).is_some(), (1..=16).contains(&v), "kind {v}");
        let t = MessageType::from_u8(v);
        assert_eq!(
            t.is_some(),
            (1..=0x14).contains(&v) || (0x81..=0x94).contains(&v) || v == 0xff,
            "type {v:#04x}"
        );
        if let Some(t) = t {
            assert_eq!(t as u8, v);
            assert_eq!(t.is_request(), v < 0x80);
        }
    }
    for s in Status::ALL {
        assert_eq!(Status::from_u8(s as u8), Some(s));
    }
}

#[cfg(feature = "codec")]
#[test]
fn tokio_codec_splits_frames() {
    use citycard_protocol::codec::{CodecError, FrameCodec};
    use tokio_util::codec::{Decoder, Encoder};
    let mut codec = FrameCodec;
    let mut buf = BytesMut::new();
    Request::Hello { client_time_ms: 3 }.encode(RequestId(4), &mut buf).unwrap();
    let f = codec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(frame_to_request(&f).unwrap(), Request::Hello { client_time_ms: 3 });
    let mut out = BytesMut::new();
    codec.encode(f, &mut out).unwrap();
    assert_eq!(out.len(), HEADER_LEN + 8);
    let mut bad = BytesMut::from(&b"XX"[..]);
    assert!(matches!(codec.decode(&mut bad), Err(CodecError::Decode(DecodeError::BadMagic(_)))));
}

// ---------------------------------------------------------------------------------------------
// Properties.

fn arb_mac() -> impl Strategy<Value = Mac> {
    any::<[u8; 16]>().prop_map(Mac)
}

fn arb_auth() -> impl Strategy<Value = CardAuth> {
    (any::<u64>(), any::<u32>(), any::<u64>(), arb_mac()).prop_map(|(c, a, nonce, cryptogram)| {
        CardAuth { card_id: CardId(c), atc: Atc(a), nonce, cryptogram }
    })
}

fn arb_amount() -> impl Strategy<Value = Amount> {
    any::<i64>().prop_map(Amount)
}

fn arb_status() -> impl Strategy<Value = Status> {
    prop::sample::select(Status::ALL.to_vec())
}

fn arb_card_state() -> impl Strategy<Value = CardState> {
    (0u8..=4).prop_map(|v| CardState::from_u8(v).unwrap())
}

fn arb_reason(max: u8) -> impl Strategy<Value = BlockReason> {
    (1u8..=max).prop_map(|v| BlockReason::from_u8(v).unwrap())
}

fn arb_kind() -> impl Strategy<Value = EntryKind> {
    (1u8..=15).prop_map(|v| EntryKind::from_u8(v).unwrap())
}

fn arb_record() -> impl Strategy<Value = OfflineRecord> {
    (any::<u64>(), any::<u32>(), arb_amount(), any::<u64>(), any::<u64>(), arb_mac()).prop_map(
        |(c, a, amount, time_ms, nonce, certificate)| OfflineRecord {
            card_id: CardId(c),
            atc: Atc(a),
            amount,
            time_ms,
            nonce,
            certificate,
        },
    )
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<u64>().prop_map(|client_time_ms| Request::Hello { client_time_ms }),
        (arb_auth(), arb_amount()).prop_map(|(auth, amount)| Request::Purchase { auth, amount }),
        (arb_auth(), arb_amount()).prop_map(|(auth, amount)| Request::TopUp { auth, amount }),
        arb_auth().prop_map(|auth| Request::Balance { auth }),
        (arb_auth(), any::<u64>(), any::<u16>())
            .prop_map(|(auth, before_seq, limit)| { Request::History { auth, before_seq, limit } }),
        arb_auth().prop_map(|auth| Request::Identity { auth }),
        (any::<u64>(), arb_amount())
            .prop_map(|(op_ref, deposit)| Request::Issue { op_ref, deposit }),
        (any::<u64>(), any::<u64>(), arb_reason(5)).prop_map(|(op_ref, c, reason)| {
            Request::Block { op_ref, card_id: CardId(c), reason }
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(op_ref, c)| Request::Unblock { op_ref, card_id: CardId(c) }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(op_ref, c)| Request::Replace { op_ref, card_id: CardId(c) }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(op_ref, c)| Request::Close { op_ref, card_id: CardId(c) }),
        prop::collection::vec(arb_record(), 0..=12)
            .prop_map(|records| Request::OfflineBatch { records }),
        (prop::collection::vec(any::<u64>(), 0..=64), any::<u16>())
            .prop_map(|(cursor, max_entries)| Request::HotlistSync { cursor, max_entries }),
        arb_auth().prop_map(|auth| Request::TapIn { auth }),
        (arb_auth(), arb_amount()).prop_map(|(auth, fare)| Request::TapOut { auth, fare }),
        (arb_auth(), prop::sample::select(INQUIRABLE.to_vec()), arb_amount()).prop_map(
            |(auth, original_type, amount)| Request::Inquiry { auth, original_type, amount }
        ),
        (arb_auth(), arb_amount(), any::<u32>(), arb_mac()).prop_map(|(auth, amount, a, m)| {
            Request::Reversal { auth, amount, original_atc: Atc(a), original_cryptogram: m }
        }),
        arb_auth().prop_map(|auth| Request::Funds { auth }),
        (any::<u64>(), arb_amount(), any::<u8>()).prop_map(|(op_ref, deposit, product)| {
            Request::IssueProduct { op_ref, deposit, product }
        }),
        (any::<u64>(), any::<u64>(), any::<u8>()).prop_map(|(op_ref, c, product)| {
            Request::SetProduct { op_ref, card_id: CardId(c), product }
        }),
        arb_auth().prop_map(|auth| Request::FundsProduct { auth }),
    ]
}

fn arb_transit_result() -> impl Strategy<Value = TransitResult> {
    (
        (arb_status(), any::<u64>(), any::<u32>(), arb_amount(), arb_amount()),
        (arb_amount(), arb_amount(), any::<u32>(), any::<u64>(), any::<u64>(), arb_mac()),
    )
        .prop_map(
            |(
                (status, c, a, balance, amount),
                (held, spendable, ref_atc, time_ms, journal_seq, mac),
            )| TransitResult {
                status,
                card_id: CardId(c),
                atc: Atc(a),
                balance,
                amount,
                held,
                spendable,
                ref_atc: Atc(ref_atc),
                time_ms,
                journal_seq,
                mac,
            },
        )
}

fn arb_card_result() -> impl Strategy<Value = CardResult> {
    (arb_status(), any::<u64>(), any::<u32>(), arb_amount(), any::<u64>(), arb_mac()).prop_map(
        |(status, c, a, balance, journal_seq, mac)| CardResult {
            status,
            card_id: CardId(c),
            atc: Atc(a),
            balance,
            journal_seq,
            mac,
        },
    )
}

fn arb_history_entry() -> impl Strategy<Value = HistoryEntry> {
    (any::<u64>(), arb_kind(), arb_status(), arb_amount(), arb_amount(), any::<u64>(), any::<u32>())
        .prop_map(|(journal_seq, kind, status, amount, balance_after, time_ms, a)| HistoryEntry {
            journal_seq,
            kind,
            status,
            amount,
            balance_after,
            time_ms,
            atc: Atc(a),
        })
}

fn arb_issue_result() -> impl Strategy<Value = IssueResult> {
    (
        arb_status(),
        any::<u64>(),
        any::<u16>(),
        any::<[u8; 32]>(),
        arb_amount(),
        any::<u64>(),
        any::<u64>(),
        arb_mac(),
    )
        .prop_map(|(status, c, kv, card_key, balance, r, journal_seq, mac)| IssueResult {
            status,
            card_id: CardId(c),
            key_version: KeyVersion(kv),
            card_key,
            balance,
            replaced_card_id: CardId(r),
            journal_seq,
            mac,
        })
}

fn arb_product_result() -> impl Strategy<Value = ProductResult> {
    (
        (arb_status(), any::<u64>(), arb_card_state(), any::<u8>()),
        (arb_amount(), arb_amount(), arb_amount(), arb_amount()),
        (any::<u64>(), arb_mac()),
    )
        .prop_map(
            |((status, c, card_state, product), (balance, deposit, paid, refunded), (seq, mac))| {
                ProductResult {
                    status,
                    card_id: CardId(c),
                    card_state,
                    product,
                    balance,
                    deposit,
                    deposit_paid: paid,
                    deposit_refunded: refunded,
                    journal_seq: seq,
                    mac,
                }
            },
        )
}

fn arb_staff_result() -> impl Strategy<Value = StaffResult> {
    (
        arb_status(),
        any::<u64>(),
        arb_card_state(),
        arb_amount(),
        arb_amount(),
        any::<u64>(),
        any::<u64>(),
        arb_mac(),
    )
        .prop_map(
            |(status, c, card_state, balance, refunded, hotlist_version, journal_seq, mac)| {
                StaffResult {
                    status,
                    card_id: CardId(c),
                    card_state,
                    balance,
                    refunded,
                    hotlist_version,
                    journal_seq,
                    mac,
                }
            },
        )
}

fn arb_response() -> impl Strategy<Value = Response> {
    let server_info =
        (any::<u8>(), any::<u8>(), any::<u64>(), any::<u64>(), any::<u16>(), any::<u16>())
            .prop_map(
                |(
                    protocol_version,
                    role,
                    server_time_ms,
                    hotlist_version,
                    shard_count,
                    max_in_flight,
                )| {
                    Response::ServerInfo(ServerInfo {
                        protocol_version,
                        role,
                        server_time_ms,
                        hotlist_version,
                        shard_count,
                        max_in_flight,
                    })
                },
            );
    let history = (
        arb_status(),
        any::<u64>(),
        any::<u32>(),
        arb_amount(),
        prop::collection::vec(arb_history_entry(), 0..=64),
        any::<u64>(),
        arb_mac(),
    )
        .prop_map(|(status, c, a, balance, entries, next_before_seq, mac)| {
            Response::History(HistoryPage {
                status,
                card_id: CardId(c),
                atc: Atc(a),
                balance,
                entries,
                next_before_seq,
                mac,
            })
        });
    let identity = || {
        (
            arb_status(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 64),
            arb_mac(),
        )
            .prop_map(|(status, c, a, journal_seq, issued_ms, expires_ms, sig, mac)| {
                Response::Identity(IdentityResult {
                    status,
                    card_id: CardId(c),
                    atc: Atc(a),
                    journal_seq,
                    issued_ms,
                    expires_ms,
                    signature: sig.try_into().unwrap(),
                    mac,
                })
            })
    };
    let hotlist_entry = (any::<u64>(), any::<bool>(), arb_reason(7), any::<u64>()).prop_map(
        |(c, listed, reason, version)| HotlistEntry { card_id: CardId(c), listed, reason, version },
    );
    let hotlist = (
        prop::collection::vec(any::<u64>(), 0..=64),
        any::<bool>(),
        prop::collection::vec(hotlist_entry, 0..=40),
    )
        .prop_map(|(cursor, more, entries)| {
            Response::HotlistSync(HotlistChanges { cursor, more, entries })
        });
    let answer = prop_oneof![
        Just(None),
        arb_card_result().prop_map(|c| Some(Box::new(Response::Purchase(c)))),
        arb_card_result().prop_map(|c| Some(Box::new(Response::TopUp(c)))),
        identity().prop_map(|i| Some(Box::new(i))),
        arb_transit_result().prop_map(|t| Some(Box::new(Response::TapIn(t)))),
        arb_transit_result().prop_map(|t| Some(Box::new(Response::TapOut(t)))),
        arb_transit_result().prop_map(|t| Some(Box::new(Response::Reversal(t)))),
    ];
    let inquiry = (arb_status(), any::<u64>(), any::<u32>(), answer, any::<u64>(), arb_mac())
        .prop_map(|(status, c, a, answer, journal_seq, mac)| {
            Response::Inquiry(InquiryResult {
                status,
                card_id: CardId(c),
                atc: Atc(a),
                answer,
                journal_seq,
                mac,
            })
        });
    prop_oneof![
        server_info,
        arb_transit_result().prop_map(Response::TapIn),
        arb_transit_result().prop_map(Response::TapOut),
        arb_transit_result().prop_map(Response::Reversal),
        arb_transit_result().prop_map(Response::Funds),
        inquiry,
        arb_card_result().prop_map(Response::Purchase),
        arb_card_result().prop_map(Response::TopUp),
        arb_card_result().prop_map(Response::Balance),
        history,
        identity(),
        arb_issue_result().prop_map(Response::Issue),
        arb_staff_result().prop_map(Response::Block),
        arb_staff_result().prop_map(Response::Unblock),
        arb_issue_result().prop_map(Response::Replace),
        arb_staff_result().prop_map(Response::Close),
        arb_product_result().prop_map(Response::SetProduct),
        (arb_transit_result(), any::<u8>(), arb_amount(), arb_amount(), any::<u32>()).prop_map(
            |(funds, product, deposit, spent_today, debits_today)| {
                Response::FundsProduct(FundsProductResult {
                    funds,
                    product,
                    deposit,
                    spent_today,
                    debits_today,
                })
            }
        ),
        prop::collection::vec(arb_card_result(), 0..=12).prop_map(Response::OfflineBatch),
        hotlist,
        (any::<u16>(), "\\PC{0,64}").prop_map(|(code, message)| Response::Error { code, message }),
    ]
}

/// A well-formed header of an assigned type with an arbitrary body, to reach body decoding.
fn arb_framed_body() -> impl Strategy<Value = Vec<u8>> {
    let types: Vec<u8> = (0..=255u8).filter(|t| MessageType::from_u8(*t).is_some()).collect();
    (prop::sample::select(types), any::<u32>(), prop::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(t, rid, body)| {
            let mut f = header(b"CC", 1, t, 0, 0, rid, body.len() as u32);
            f.extend_from_slice(&body);
            f
        })
}

proptest! {
    #[test]
    fn every_request_round_trips(req in arb_request(), rid in any::<u32>()) {
        let mut buf = BytesMut::new();
        req.encode(RequestId(rid), &mut buf).unwrap();
        prop_assert_eq!(buf[3], req.message_type() as u8);
        let len = buf.len();
        let frame = decode_frame(&mut buf.clone()).unwrap().unwrap();
        prop_assert_eq!(frame.body.len() + HEADER_LEN, len);
        let decoded = decode_request(&mut buf).unwrap();
        prop_assert_eq!(decoded, Some((RequestId(rid), req)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn every_response_round_trips(resp in arb_response(), rid in any::<u32>()) {
        let mut buf = BytesMut::new();
        resp.encode(RequestId(rid), &mut buf).unwrap();
        prop_assert_eq!(buf[3], resp.message_type() as u8);
        let decoded = decode_response(&mut buf).unwrap();
        prop_assert_eq!(decoded, Some((RequestId(rid), resp)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        decode_all(&bytes);
    }

    #[test]
    fn random_bodies_never_panic(bytes in arb_framed_body()) {
        decode_all(&bytes);
    }

    #[test]
    fn truncating_a_valid_frame_never_errors(req in arb_request(), cut in any::<prop::sample::Index>()) {
        let mut buf = BytesMut::new();
        req.encode(RequestId(1), &mut buf).unwrap();
        let n = cut.index(buf.len());
        let mut prefix = BytesMut::from(&buf[..n]);
        prop_assert_eq!(decode_request(&mut prefix).unwrap(), None);
        prop_assert_eq!(prefix.len(), n);
    }
}

/// Feeds `bytes` to every decoder until each stops; decoded messages must re-encode to a frame
/// that decodes to the same message.
fn decode_all(bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(_)) = decode_frame(&mut buf) {}
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some((id, req))) = decode_request(&mut buf) {
        let mut again = BytesMut::new();
        req.encode(id, &mut again).unwrap();
        assert_eq!(decode_request(&mut again).unwrap(), Some((id, req)));
    }
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some((id, resp))) = decode_response(&mut buf) {
        let mut again = BytesMut::new();
        resp.encode(id, &mut again).unwrap();
        assert_eq!(decode_response(&mut again).unwrap(), Some((id, resp)));
    }
}

fn numbered_record(terminal_seq: u64, flags: u8) -> NumberedRecord {
    NumberedRecord { record: zero_record(), terminal_seq, flags }
}

/// The body of a NumberedOfflineBatch with these (seq, flags) pairs, written out by hand.
fn numbered_body(records: &[(u64, u8)]) -> Vec<u8> {
    let mut body = (records.len() as u16).to_be_bytes().to_vec();
    for (seq, flags) in records {
        body.extend_from_slice(&1u64.to_be_bytes()); // card
        body.extend_from_slice(&1u32.to_be_bytes()); // ATC
        body.extend_from_slice(&1i64.to_be_bytes()); // amount
        body.extend_from_slice(&1u64.to_be_bytes()); // time
        body.extend_from_slice(&1u64.to_be_bytes()); // nonce
        body.extend_from_slice(&[0; 16]); // certificate
        body.extend_from_slice(&seq.to_be_bytes());
        body.push(*flags);
    }
    body
}

#[test]
fn numbered_offline_batch_layout_and_rules() {
    // 61 bytes a record: the 1.1 record, then terminal_seq and flags.
    let request = Request::NumberedOfflineBatch {
        records: vec![numbered_record(1, 0), numbered_record(2, FLAG_UNCERTAIN)],
    };
    let mut out = BytesMut::new();
    request.encode(RequestId(3), &mut out).unwrap();
    assert_eq!(&out[HEADER_LEN..], &numbered_body(&[(1, 0), (2, 1)])[..]);
    assert_eq!(out[3], 0x14);
    let (_, back) = decode_request(&mut out).unwrap().unwrap();
    assert_eq!(back, request);
    // An empty batch is allowed (it asks for the highest seq).
    let empty = Request::decode_body(MessageType::NumberedOfflineBatch, &numbered_body(&[]));
    assert_eq!(empty.unwrap(), Request::NumberedOfflineBatch { records: vec![] });
    // Seq 0, a seq not above the one before, flag bits other than bit 0: BadValue.
    for (records, field) in [
        (vec![(0u64, 0u8)], "terminal_seq"),
        (vec![(5, 0), (5, 0)], "terminal_seq"),
        (vec![(5, 0), (4, 0)], "terminal_seq"),
        (vec![(5, 2)], "flags"),
        (vec![(5, 0x80)], "flags"),
    ] {
        match Request::decode_body(MessageType::NumberedOfflineBatch, &numbered_body(&records)) {
            Err(DecodeError::BadValue { field: f, .. }) => assert_eq!(f, field, "{records:?}"),
            other => panic!("{records:?}: {other:?}"),
        }
    }
    let mut too_many = numbered_body(&[]);
    too_many[..2].copy_from_slice(&257u16.to_be_bytes());
    assert!(matches!(
        Request::decode_body(MessageType::NumberedOfflineBatch, &too_many),
        Err(DecodeError::BadValue { field: "records", .. })
    ));
    expect_request_encode_err(
        &Request::NumberedOfflineBatch { records: vec![numbered_record(1, 0); 257] },
        EncodeError::TooMany { field: "records", count: 257, max: 256 },
    );
    // The answer: highest_seq, count, then terminal_seq + CardResult (53 bytes) per record.
    let response = Response::NumberedOfflineBatch(NumberedResults {
        highest_seq: 9,
        results: vec![NumberedResult { terminal_seq: 9, result: zero_card_result() }],
    });
    let mut out = BytesMut::new();
    response.encode(RequestId(3), &mut out).unwrap();
    assert_eq!(out.len(), HEADER_LEN + 8 + 2 + 53);
    assert_eq!(out[3], 0x94);
    assert_eq!(&out[HEADER_LEN..HEADER_LEN + 10], &[0, 0, 0, 0, 0, 0, 0, 9, 0, 1]);
    let (_, back) = decode_response(&mut out).unwrap().unwrap();
    assert_eq!(back, response);
    // The largest batch and its answer fit in a frame.
    let records = (1..=256).map(|s| numbered_record(s, 0)).collect();
    let mut out = BytesMut::new();
    Request::NumberedOfflineBatch { records }.encode(RequestId(1), &mut out).unwrap();
    assert_eq!(out.len(), HEADER_LEN + 2 + 256 * 61);
}
