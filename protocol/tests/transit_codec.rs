//! Byte-literal tests of the protocol 1.2 messages (TapIn, TapOut, Inquiry, Reversal, Funds and
//! their answers): every layout is written out byte by byte from PROTOCOL.md 3.2 and 3.3, not
//! produced by the crate's encoder.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use citycard_protocol::*;

const RID: u32 = 0x0102_0304;

fn frame(t: u8, body: &[u8]) -> Vec<u8> {
    let mut f = b"CC\x01".to_vec();
    f.push(t);
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(&RID.to_be_bytes());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// CardAuth: card 0x2a, ATC 7, nonce 0x0909..., cryptogram 0xcc x16.
const AUTH: [u8; 36] = [
    0, 0, 0, 0, 0, 0, 0, 0x2a, // card id
    0, 0, 0, 7, // atc
    9, 9, 9, 9, 9, 9, 9, 9, // nonce
    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
    0xcc, // cryptogram
];

fn auth() -> CardAuth {
    CardAuth {
        card_id: CardId(42),
        atc: Atc(7),
        nonce: 0x0909_0909_0909_0909,
        cryptogram: Mac([0xcc; 16]),
    }
}

fn with(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(rest);
    v
}

fn request(bytes: &[u8]) -> Result<Option<(RequestId, Request)>, DecodeError> {
    decode_request(&mut BytesMut::from(bytes))
}

fn response(bytes: &[u8]) -> Result<Option<(RequestId, Response)>, DecodeError> {
    decode_response(&mut BytesMut::from(bytes))
}

fn encoded_request(r: &Request) -> Vec<u8> {
    let mut out = BytesMut::new();
    r.encode(RequestId(RID), &mut out).unwrap();
    out.to_vec()
}

fn encoded_response(r: &Response) -> Vec<u8> {
    let mut out = BytesMut::new();
    r.encode(RequestId(RID), &mut out).unwrap();
    out.to_vec()
}

fn both_ways_request(bytes: Vec<u8>, expected: Request) {
    assert_eq!(request(&bytes).unwrap(), Some((RequestId(RID), expected.clone())));
    assert_eq!(encoded_request(&expected), bytes);
}

fn both_ways_response(bytes: Vec<u8>, expected: Response) {
    assert_eq!(response(&bytes).unwrap(), Some((RequestId(RID), expected.clone())));
    assert_eq!(encoded_response(&expected), bytes);
}

#[test]
fn tap_in_tap_out_and_funds_requests() {
    both_ways_request(frame(0x0e, &AUTH), Request::TapIn { auth: auth() });
    both_ways_request(frame(0x12, &AUTH), Request::Funds { auth: auth() });
    let fare = [0, 0, 0, 0, 0, 0, 0x01, 0x2c]; // 300
    both_ways_request(
        frame(0x0f, &with(&AUTH, &fare)),
        Request::TapOut { auth: auth(), fare: Amount(300) },
    );
    // TapIn is exactly 36 bytes, TapOut 44.
    let short = request(&frame(0x0e, &AUTH[..35])).unwrap_err();
    assert_eq!(short.code(), ErrorCode::BodyTooShort);
    let long = request(&frame(0x0f, &with(&AUTH, &[0; 9]))).unwrap_err();
    assert_eq!(long.code(), ErrorCode::TrailingBytes);
}

#[test]
fn inquiry_request_and_its_original_type() {
    let body = with(&AUTH, &[0x02, 0, 0, 0, 0, 0, 0, 0, 0xfa]);
    both_ways_request(
        frame(0x10, &body),
        Request::Inquiry {
            auth: auth(),
            original_type: MessageType::Purchase,
            amount: Amount(250),
        },
    );
    for t in [0x02u8, 0x03, 0x06, 0x0e, 0x0f, 0x11] {
        let body = with(&AUTH, &[t, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(request(&frame(0x10, &body)).is_ok(), "type {t:#04x} is inquirable");
    }
    // Reads, staff operations, inquiries and unassigned values are not.
    for t in [0x00u8, 0x01, 0x04, 0x05, 0x07, 0x0c, 0x10, 0x12, 0x82, 0xff] {
        let body = with(&AUTH, &[t, 0, 0, 0, 0, 0, 0, 0, 0]);
        let err = request(&frame(0x10, &body)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadValue, "type {t:#04x}");
    }
}

#[test]
fn reversal_request() {
    let mut rest = vec![0, 0, 0, 0, 0, 0, 0, 0xfa]; // amount 250
    rest.extend_from_slice(&[0, 0, 0, 5]); // original atc
    rest.extend_from_slice(&[0xab; 16]); // original cryptogram
    let body = with(&AUTH, &rest);
    assert_eq!(body.len(), 64);
    both_ways_request(
        frame(0x11, &body),
        Request::Reversal {
            auth: auth(),
            amount: Amount(250),
            original_atc: Atc(5),
            original_cryptogram: Mac([0xab; 16]),
        },
    );
    let r = request(&frame(0x11, &body)).unwrap().unwrap().1;
    assert_eq!(r.cryptogram_amount(), Amount(250));
    assert_eq!(r.cryptogram_type(), MessageType::Reversal);
}

fn transit_bytes(status: u8) -> Vec<u8> {
    let mut b = vec![status];
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x2a]); // card id
    b.extend_from_slice(&[0, 0, 0, 7]); // atc
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x03, 0xe8]); // balance 1000
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x01, 0x90]); // amount 400
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x01, 0x90]); // held 400
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x02, 0x58]); // spendable 600
    b.extend_from_slice(&[0, 0, 0, 6]); // ref atc
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0x00]); // time 4096
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x63]); // journal seq 99
    b.extend_from_slice(&[0x5e; 16]); // mac
    b
}

fn transit(status: Status) -> TransitResult {
    TransitResult {
        status,
        card_id: CardId(42),
        atc: Atc(7),
        balance: Amount(1000),
        amount: Amount(400),
        held: Amount(400),
        spendable: Amount(600),
        ref_atc: Atc(6),
        time_ms: 4096,
        journal_seq: 99,
        mac: Mac([0x5e; 16]),
    }
}

#[test]
fn transit_results() {
    assert_eq!(transit_bytes(0).len(), TRANSIT_RESULT_LEN);
    both_ways_response(frame(0x8e, &transit_bytes(0)), Response::TapIn(transit(Status::Approved)));
    both_ways_response(
        frame(0x8f, &transit_bytes(15)),
        Response::TapOut(transit(Status::NoOpenHold)),
    );
    both_ways_response(
        frame(0x91, &transit_bytes(19)),
        Response::Reversal(transit(Status::AlreadyReversed)),
    );
    both_ways_response(frame(0x92, &transit_bytes(0)), Response::Funds(transit(Status::Approved)));
    let err = response(&frame(0x8e, &transit_bytes(27))).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadValue);
}

#[test]
fn inquiry_result_with_and_without_the_original_answer() {
    // Found: the original PurchaseResult (45 bytes) embedded with its own MAC.
    let mut original = vec![0u8];
    original.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x2a, 0, 0, 0, 7]);
    original.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x06, 0xd6]); // balance 1750
    original.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x04, 0x12]); // journal seq 1042
    original.extend_from_slice(&[0x3a; 16]);
    let mut body = vec![0u8, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0, 0, 0, 7];
    body.extend_from_slice(&[0; 8]); // journal seq 0
    body.extend_from_slice(&[0x82, 0, 45]);
    body.extend_from_slice(&original);
    body.extend_from_slice(&[0x77; 16]);
    let answer = CardResult {
        status: Status::Approved,
        card_id: CardId(42),
        atc: Atc(7),
        balance: Amount(1750),
        journal_seq: 1042,
        mac: Mac([0x3a; 16]),
    };
    both_ways_response(
        frame(0x90, &body),
        Response::Inquiry(InquiryResult {
            status: Status::Approved,
            card_id: CardId(42),
            atc: Atc(7),
            answer: Some(Box::new(Response::Purchase(answer))),
            journal_seq: 0,
            mac: Mac([0x77; 16]),
        }),
    );
    // Not found: no answer, the burn's journal seq.
    let mut body = vec![17u8, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0, 0, 0, 7];
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x64, 0, 0, 0]);
    body.extend_from_slice(&[0x77; 16]);
    assert_eq!(body.len(), 40);
    both_ways_response(
        frame(0x90, &body),
        Response::Inquiry(InquiryResult {
            status: Status::NotFound,
            card_id: CardId(42),
            atc: Atc(7),
            answer: None,
            journal_seq: 100,
            mac: Mac([0x77; 16]),
        }),
    );
}

#[test]
fn inquiry_result_refuses_what_it_cannot_hold() {
    let head = [0u8, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0];
    let body_of = |t: u8, len: u16, answer: &[u8]| {
        let mut b = head.to_vec();
        b.push(t);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(answer);
        b.extend_from_slice(&[0; 16]);
        b
    };
    // A BalanceResult is not an answer an inquiry returns (reads are never stored).
    let err = response(&frame(0x90, &body_of(0x84, 45, &[0; 45]))).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadValue);
    // No type but bytes.
    let err = response(&frame(0x90, &body_of(0, 1, &[0]))).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadValue);
    // Longer than MAX_INQUIRY_ANSWER: refused before reading it.
    let err = response(&frame(0x90, &body_of(0x86, 129, &[0; 129]))).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadValue);
    // An embedded answer that does not decode as its type.
    let err = response(&frame(0x90, &body_of(0x82, 44, &[0; 44]))).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BadValue);
    // The encoder refuses to embed a non-inquirable answer.
    let r = Response::Inquiry(InquiryResult {
        status: Status::Approved,
        card_id: CardId(42),
        atc: Atc(7),
        answer: Some(Box::new(Response::Balance(CardResult {
            status: Status::Approved,
            card_id: CardId(42),
            atc: Atc(7),
            balance: Amount(0),
            journal_seq: 0,
            mac: Mac([0; 16]),
        }))),
        journal_seq: 0,
        mac: Mac([0; 16]),
    });
    let mut out = BytesMut::new();
    assert_eq!(r.encode(RequestId(1), &mut out), Err(EncodeError::NotInquirable(0x84)));
    assert!(out.is_empty());
}

#[test]
fn answer_types_pair_with_request_types() {
    for t in INQUIRABLE {
        let answer = answer_type_of(t).unwrap();
        assert_eq!(answer as u8, t as u8 | 0x80);
    }
    assert_eq!(answer_type_of(MessageType::Balance), None);
}
