//! The purchase answer from the shard's decision to the bytes on the wire: the response MAC and
//! the frame encode.

use bytes::BytesMut;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::frame::encode_frame;
use citycard_protocol::{
    Amount, Answer, Atc, CardId, CardResult, Frame, KeyVersion, Mac, MessageType, RequestId,
    Response, Status,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

fn result() -> CardResult {
    CardResult {
        status: Status::Approved,
        card_id: CardId(6_000_000_000_000_001),
        atc: Atc(41),
        balance: Amount(9_875),
        journal_seq: 123_456,
        mac: Mac::default(),
    }
}

/// The path before the answer had one home, as it was: the shard encoded the body to MAC it
/// (engine `seal_card`), and the connection encoded it again into a body buffer and copied that
/// behind the header (the old `Response::encode`).
fn two_pass(key: &CardKey, binding: &Mac, result: CardResult, out: &mut BytesMut) {
    let mut body = BytesMut::with_capacity(citycard_protocol::CARD_RESULT_LEN);
    let mut r = result;
    r.mac = Mac::default();
    Response::Balance(r).encode_body(&mut body).expect("encode");
    let split = body.len() - 16;
    r.mac = key.response_mac(MessageType::PurchaseResult as u8, binding, &body[..split]);
    let mut wire_body = BytesMut::with_capacity(64);
    Response::Purchase(r).encode_body(&mut wire_body).expect("encode");
    let frame = Frame {
        message_type: MessageType::PurchaseResult,
        request_id: RequestId(1),
        body: wire_body.freeze(),
    };
    encode_frame(&frame, out).expect("encode");
}

/// Today's path: the shard hands over the response and its seal (the card key moves into the
/// answer: cloned here, to count it), and the connection's encode writes the body once behind
/// the header and MACs the bytes it wrote.
fn one_pass(key: &CardKey, binding: &Mac, result: CardResult, out: &mut BytesMut) {
    let answer = Answer::sealed(Response::Purchase(result), key.clone(), *binding);
    answer.encode(RequestId(1), out).expect("encode");
}

fn answers(c: &mut Criterion) {
    let key = CardKey::derive(&[1; 32], KeyVersion(1), CardId(6_000_000_000_000_001));
    let binding = Mac([7; 16]);
    let mut group = c.benchmark_group("answer");
    group.throughput(Throughput::Elements(1));
    group.bench_function("purchase_two_pass", |b| {
        let mut out = BytesMut::with_capacity(128);
        b.iter(|| {
            out.clear();
            two_pass(black_box(&key), black_box(&binding), black_box(result()), &mut out);
        })
    });
    group.bench_function("purchase_one_pass", |b| {
        let mut out = BytesMut::with_capacity(128);
        b.iter(|| {
            out.clear();
            one_pass(black_box(&key), black_box(&binding), black_box(result()), &mut out);
        })
    });
    // Both paths put the same bytes on the wire.
    let (mut before, mut after) = (BytesMut::new(), BytesMut::new());
    two_pass(&key, &binding, result(), &mut before);
    one_pass(&key, &binding, result(), &mut after);
    assert_eq!(before, after, "the one-pass encode changed the wire bytes");
    group.finish();
}

criterion_group!(benches, answers);
criterion_main!(benches);
