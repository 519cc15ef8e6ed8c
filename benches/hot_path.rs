//! Hot-path pieces: frame encode/decode, cryptogram derive (cold) and verify (cached key), and
//! one shard's decide-and-apply path without the journal sync.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use citycard::engine::{Limits, Op, Secrets, Shard, ShardOptions};
use citycard::journal::JournalOptions;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    decode_request, Amount, Atc, CardAuth, CardId, KeyVersion, Mac, OfflineRecord, Request,
    RequestId, Response,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

fn purchase(card: CardId, atc: u32, key: &CardKey) -> Request {
    let cryptogram = key.request_cryptogram(2, card, Atc(atc), Amount(125), 7, "reader-1");
    Request::Purchase {
        auth: CardAuth { card_id: card, atc: Atc(atc), nonce: 7, cryptogram },
        amount: Amount(125),
    }
}

fn frames(c: &mut Criterion) {
    let key = CardKey::derive(&[1; 32], KeyVersion(1), CardId(6_000_000_000_000_001));
    let request = purchase(CardId(6_000_000_000_000_001), 1, &key);
    let mut encoded = BytesMut::new();
    request.encode(RequestId(1), &mut encoded).expect("encode");
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_purchase", |b| {
        let mut out = BytesMut::with_capacity(128);
        b.iter(|| {
            out.clear();
            black_box(&request).encode(RequestId(1), &mut out).expect("encode");
        })
    });
    group.bench_function("decode_purchase", |b| {
        b.iter(|| {
            let mut buf = encoded.clone();
            black_box(decode_request(&mut buf).expect("decode"))
        })
    });
    let records: Vec<OfflineRecord> = (0..256)
        .map(|i| OfflineRecord {
            card_id: CardId(i),
            atc: Atc(1),
            amount: Amount(10),
            time_ms: 1,
            nonce: 2,
            certificate: Mac([3; 16]),
        })
        .collect();
    let mut batch = BytesMut::new();
    Request::OfflineBatch { records }.encode(RequestId(2), &mut batch).expect("encode");
    group.bench_function("decode_offline_batch_256", |b| {
        b.iter(|| {
            let mut buf = batch.clone();
            black_box(decode_request(&mut buf).expect("decode"))
        })
    });
    let response = Response::Purchase(citycard_protocol::CardResult {
        status: citycard_protocol::Status::Approved,
        card_id: CardId(1),
        atc: Atc(1),
        balance: Amount(1),
        journal_seq: 1,
        mac: Mac([0; 16]),
    });
    group.bench_function("encode_card_result", |b| {
        let mut out = BytesMut::with_capacity(128);
        b.iter(|| {
            out.clear();
            black_box(&response).encode(RequestId(1), &mut out).expect("encode");
        })
    });
    group.finish();
}

fn cryptograms(c: &mut Criterion) {
    let master = [9u8; 32];
    let mut group = c.benchmark_group("cryptogram");
    group.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    group.bench_function("derive_card_key_cold", |b| {
        b.iter(|| {
            n += 1;
            black_box(CardKey::derive(&master, KeyVersion(1), CardId(n)))
        })
    });
    let key = CardKey::derive(&master, KeyVersion(1), CardId(1));
    let expected = key.request_cryptogram(2, CardId(1), Atc(1), Amount(5), 1, "reader-1");
    group.bench_function("verify_cached_key", |b| {
        b.iter(|| {
            let mac = key.request_cryptogram(2, CardId(1), Atc(1), Amount(5), 1, "reader-1");
            black_box(CardKey::verify(&expected, &mac))
        })
    });
    group.bench_function("derive_and_verify_cold", |b| {
        b.iter(|| {
            let key = CardKey::derive(&master, KeyVersion(1), CardId(1));
            let mac = key.request_cryptogram(2, CardId(1), Atc(1), Amount(5), 1, "reader-1");
            black_box(CardKey::verify(&expected, &mac))
        })
    });
    group.finish();
}

fn shard_path(c: &mut Criterion) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
    let secrets = Arc::new(Secrets {
        issuer: BTreeMap::from([(1, [5u8; 32])]),
        current_version: KeyVersion(1),
        retire_after_ms: BTreeMap::new(),
        assertion: ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key"),
    });
    let dir = tempfile::tempdir().expect("dir");
    let options = ShardOptions {
        index: 0,
        count: 1,
        dir: dir.path().to_owned(),
        journal: JournalOptions { segment_bytes: 256 * 1024 * 1024, ..Default::default() },
        limits: Limits { max_balance: i64::MAX / 4, max_amount: i64::MAX / 4, ..Limits::default() },
        checkpoint: citycard::engine::CheckpointPolicy::default(),
        archive: None,
    };
    let (mut shard, _) = Shard::open(options, secrets).expect("open");
    const CARDS: usize = 1_000;
    let mut cards = Vec::new();
    for op_ref in 0..CARDS as u64 {
        let issue = Request::Issue { op_ref, deposit: Amount(1_000_000_000) };
        let Ok(citycard::engine::Output::Response(answer)) =
            shard.execute("counter-1", Op::Request(&issue), 1)
        else {
            panic!("issue failed")
        };
        let Response::Issue(r) = answer.into_response() else { panic!("issue failed") };
        cards.push((r.card_id, CardKey::from_bytes(r.card_key), 0u32));
    }
    shard.commit().expect("commit");
    shard.persist().expect("persist");
    let mut group = c.benchmark_group("shard");
    group.throughput(Throughput::Elements(1)).measurement_time(Duration::from_secs(5));
    // Decide + journal append + in-memory apply; the commit (fdatasync) and the sled persist
    // run every 256 purchases outside the timed region.
    group.bench_function("purchase_decide_and_apply", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let requests: Vec<Request> = (0..iters)
                .map(|i| {
                    let card = &mut cards[i as usize % CARDS];
                    card.2 += 1;
                    purchase(card.0, card.2, &card.1)
                })
                .collect();
            for (i, request) in requests.iter().enumerate() {
                let start = Instant::now();
                black_box(shard.execute("reader-1", Op::Request(request), 2).expect("execute"));
                total += start.elapsed();
                if i % 256 == 255 {
                    shard.commit().expect("commit");
                    shard.persist().expect("persist");
                }
            }
            shard.commit().expect("commit");
            shard.persist().expect("persist");
            total
        })
    });
    // The sled write-behind cost per purchase, measured alone.
    group.bench_function("purchase_persist_per_tx", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let n = (iters - done).min(256);
                for i in 0..n {
                    let card = &mut cards[(done + i) as usize % CARDS];
                    card.2 += 1;
                    let request = purchase(card.0, card.2, &card.1);
                    shard.execute("reader-1", Op::Request(&request), 2).expect("execute");
                }
                shard.commit().expect("commit");
                let start = Instant::now();
                shard.persist().expect("persist");
                total += start.elapsed();
                done += n;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, frames, cryptograms, shard_path);
criterion_main!(benches);
