//! Checks the test vectors in `PROTOCOL.md` against this crate.
//!
//! Every vector block of the document is parsed; the table in [`vectors`] says what message each
//! named vector must be. For every vector the test compares every documented field with the
//! table, encodes the message and compares with the documented frame, decodes the documented
//! frame and compares with the message, and recomputes card keys (HKDF written out by hand),
//! cryptogram and MAC inputs (assembled here from the frame bytes, not by `crypto.rs`), the HMACs
//! and the identity assertion signature. It fails when a vector is missing, unknown, or differs,
//! and when some request or response type has no vector.
//!
//! To regenerate the blocks after a deliberate change:
//! `cargo test -p citycard-protocol --test spec_vectors -- --ignored --nocapture print_vectors`
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use bytes::BytesMut;
use citycard_protocol::crypto::{self, CardKey};
use citycard_protocol::frame::HEADER_LEN;
use citycard_protocol::*;
use ring::hmac;

// ---------------------------------------------------------------------------------------------
// Fixed parameters of the vectors.

const MASTER: [u8; 32] = {
    let mut m = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        m[i] = i as u8;
        i += 1;
    }
    m
};
const KV: KeyVersion = KeyVersion(1);
const CARD: CardId = CardId(1_000_000_000_000_001);
const CARD_ISSUED: CardId = CardId(1_000_000_000_000_002);
const CARD_NEW: CardId = CardId(1_000_000_000_000_003);
const ASSERTION_SEED: [u8; 32] = [0x5a; 32];
/// 2026-01-01T00:00:00Z in Unix milliseconds.
const T0: u64 = 1_767_225_600_000;
const READER: &str = "reader-1";
const KIOSK: &str = "kiosk-1";
const COUNTER: &str = "counter-1";

/// Every vector name the document must contain.
const EXPECTED: &[&str] = &[
    "card-key",
    "card-key-issued",
    "card-key-replacement",
    "assertion-key",
    "hello-request",
    "purchase-request",
    "topup-request",
    "balance-request",
    "history-request",
    "identity-request",
    "issue-request",
    "block-request",
    "unblock-request",
    "replace-request",
    "close-request",
    "offline-batch-request",
    "hotlist-sync-request",
    "hotlist-sync-cursor-request",
    "server-info-response",
    "purchase-response",
    "purchase-insufficient-funds-response",
    "purchase-unknown-card-response",
    "topup-response",
    "balance-response",
    "history-response",
    "history-response-beyond-retention",
    "identity-response",
    "issue-response",
    "block-response",
    "unblock-response",
    "replace-response",
    "close-response",
    "close-response-blocked-debtor",
    "offline-results-response",
    "hotlist-changes-response",
    "error-response",
    "error-bad-magic-response",
    // Protocol 1.2.
    "tapin-request",
    "tapout-request",
    "inquiry-request",
    "reversal-request",
    "funds-request",
    "tapin-response",
    "tapout-response",
    "tapout-no-open-hold-response",
    "inquiry-response",
    "inquiry-not-found-response",
    "reversal-response",
    "funds-response",
    // Protocol 1.3.
    "issue-product-request",
    "set-product-request",
    "set-product-response",
    "set-product-balance-limit-response",
    "purchase-daily-count-limit-response",
    "funds-product-request",
    "funds-product-response",
    // Protocol 1.3: numbered offline uploads.
    "numbered-offline-request",
    "numbered-offline-response",
];

// ---------------------------------------------------------------------------------------------
// Hex helpers.

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex in groups of two bytes, 16 bytes per line, continuation lines indented.
fn hex_block(bytes: &[u8]) -> String {
    let lines: Vec<String> = bytes
        .chunks(16)
        .map(|line| line.chunks(2).map(hex).collect::<Vec<_>>().join(" "))
        .collect();
    lines.join("\n  ")
}

fn unhex(s: &str) -> Vec<u8> {
    let digits: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(digits.len() % 2, 0, "odd number of hex digits in {s:?}");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

fn unhex16(s: &str) -> [u8; 16] {
    unhex(s).try_into().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The table: what each vector is.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Msg {
    Req(Request),
    Resp(Response),
    /// Key material only, no frame.
    None,
}

struct Line {
    key: String,
    value: String,
    hex: bool,
}

struct Vector {
    name: &'static str,
    request_id: u32,
    lines: Vec<Line>,
    msg: Msg,
}

impl Vector {
    fn new(name: &'static str, request_id: u32) -> Vector {
        Vector { name, request_id, lines: Vec::new(), msg: Msg::None }
    }
    fn field(mut self, key: impl Into<String>, value: impl ToString) -> Vector {
        self.lines.push(Line { key: key.into(), value: value.to_string(), hex: false });
        self
    }
    fn hex(mut self, key: impl Into<String>, bytes: &[u8]) -> Vector {
        self.lines.push(Line { key: key.into(), value: hex_block(bytes), hex: true });
        self
    }
    fn msg(mut self, msg: Msg) -> Vector {
        self.msg = msg;
        self
    }

    fn frame(&self) -> Option<Vec<u8>> {
        let mut out = BytesMut::new();
        let id = RequestId(self.request_id);
        match &self.msg {
            Msg::Req(r) => r.encode(id, &mut out).unwrap(),
            Msg::Resp(r) => r.encode(id, &mut out).unwrap(),
            Msg::None => return None,
        }
        Some(out.to_vec())
    }

    /// All lines of the block, in document order.
    fn all_lines(&self) -> Vec<Line> {
        let mut lines = vec![Line { key: "vector".into(), value: self.name.into(), hex: false }];
        if let Some(frame) = self.frame() {
            let t = MessageType::from_u8(frame[3]).unwrap();
            lines.push(Line {
                key: "type".into(),
                value: format!("{t:?} (0x{:02x})", frame[3]),
                hex: false,
            });
            lines.push(Line {
                key: "request_id".into(),
                value: self.request_id.to_string(),
                hex: false,
            });
        }
        for l in &self.lines {
            lines.push(Line { key: l.key.clone(), value: l.value.clone(), hex: l.hex });
        }
        if let Some(frame) = self.frame() {
            lines.push(Line { key: "frame".into(), value: hex_block(&frame), hex: true });
        }
        lines
    }

    fn render(&self) -> String {
        let mut s = String::from("```\n");
        for l in self.all_lines() {
            s.push_str(&format!("{}: {}\n", l.key, l.value));
        }
        s.push_str("```\n");
        s
    }
}

fn key(card: CardId) -> CardKey {
    CardKey::derive(&MASTER, KV, card)
}

fn k_card() -> CardKey {
    key(CARD)
}

fn enum_line<T: std::fmt::Debug>(v: T, code: u8) -> String {
    format!("{v:?} ({code})")
}

/// A card request's fields and cryptogram lines.
fn card_request(
    v: Vector,
    t: MessageType,
    atc: u32,
    nonce: u64,
    amount: i64,
    terminal: &str,
) -> (Vector, CardAuth) {
    let k = key(CARD);
    let cryptogram = k.request_cryptogram(t as u8, CARD, Atc(atc), Amount(amount), nonce, terminal);
    let auth = CardAuth { card_id: CARD, atc: Atc(atc), nonce, cryptogram };
    let mut v = v
        .field("terminal_id", terminal)
        .field("card_id", CARD.0)
        .field("atc", atc)
        .field("nonce", format!("0x{nonce:016x}"));
    if matches!(t, MessageType::Purchase | MessageType::TopUp | MessageType::Reversal) {
        v = v.field("amount", amount);
    }
    if t == MessageType::TapOut {
        v = v.field("fare", amount);
    }
    if t == MessageType::History {
        v = v.field("before_seq", 0).field("limit", 20);
    }
    let input = cryptogram_input(t as u8, &auth, Amount(amount), terminal);
    let v = v
        .hex("card_key", k.bytes())
        .hex("cryptogram_input", &input)
        .hex("cryptogram", &cryptogram.0);
    (v, auth)
}

/// The request cryptogram input written out from the PROTOCOL.md layout (not via crypto.rs).
fn cryptogram_input(t: u8, auth: &CardAuth, amount: Amount, terminal: &str) -> Vec<u8> {
    let mut m = b"CCRQ\x01".to_vec();
    m.push(t);
    m.extend_from_slice(&auth.card_id.0.to_be_bytes());
    m.extend_from_slice(&auth.atc.0.to_be_bytes());
    m.extend_from_slice(&amount.0.to_be_bytes());
    m.extend_from_slice(&auth.nonce.to_be_bytes());
    m.push(terminal.len() as u8);
    m.extend_from_slice(terminal.as_bytes());
    m
}

fn certificate_input(r: &OfflineRecord, terminal: &str) -> Vec<u8> {
    let mut m = b"CCOF\x01".to_vec();
    m.extend_from_slice(&r.card_id.0.to_be_bytes());
    m.extend_from_slice(&r.atc.0.to_be_bytes());
    m.extend_from_slice(&r.amount.0.to_be_bytes());
    m.extend_from_slice(&r.time_ms.to_be_bytes());
    m.extend_from_slice(&r.nonce.to_be_bytes());
    m.push(terminal.len() as u8);
    m.extend_from_slice(terminal.as_bytes());
    m
}

fn mac_input(response_type: u8, binding: &[u8; 16], body_without_mac: &[u8]) -> Vec<u8> {
    let mut m = b"CCRS\x01".to_vec();
    m.push(response_type);
    m.extend_from_slice(binding);
    m.extend_from_slice(body_without_mac);
    m
}

/// Encodes `resp` with a zero MAC, seals it with `key` and returns the response with its MAC
/// filled in, plus the MAC input and MAC lines.
fn sealed(v: Vector, resp: Response, k: &CardKey, binding: Mac) -> (Vector, Response) {
    let t = resp.message_type() as u8;
    let mut body = BytesMut::new();
    resp.encode_body(&mut body).unwrap();
    crypto::seal_response(k, t, &binding, &mut body);
    let decoded = Response::decode_body(resp.message_type(), &body).unwrap();
    let split = body.len() - 16;
    let v = v
        .hex("card_key", k.bytes())
        .hex("binding", &binding.0)
        .hex("mac_input", &mac_input(t, &binding.0, &body[..split]))
        .hex("mac", &body[split..]);
    (v, decoded)
}

fn card_result_fields(v: Vector, prefix: &str, c: &CardResult) -> Vector {
    v.field(format!("{prefix}status"), enum_line(c.status, c.status as u8))
        .field(format!("{prefix}card_id"), c.card_id.0)
        .field(format!("{prefix}atc"), c.atc.0)
        .field(format!("{prefix}balance"), c.balance.0)
        .field(format!("{prefix}journal_seq"), c.journal_seq)
}

/// Offline record `i`'s lines: its fields, its certificate input and its certificate.
fn offline_record_fields(v: Vector, i: usize, r: &OfflineRecord) -> Vector {
    v.field(format!("record[{i}].card_id"), r.card_id.0)
        .field(format!("record[{i}].atc"), r.atc.0)
        .field(format!("record[{i}].amount"), r.amount.0)
        .field(format!("record[{i}].time_ms"), r.time_ms)
        .field(format!("record[{i}].nonce"), format!("0x{:016x}", r.nonce))
        .hex(format!("record[{i}].certificate_input"), &certificate_input(r, READER))
        .hex(format!("record[{i}].certificate"), &r.certificate.0)
}

/// Seals offline answer `i` on its own (type `t`, binding = its record's certificate, MAC
/// input = the answer's first 29 bytes), fills in `c.mac` and adds the binding, MAC input and
/// MAC lines.
fn sealed_offline_result(
    v: Vector,
    i: usize,
    k: &CardKey,
    t: MessageType,
    record: &OfflineRecord,
    c: &mut CardResult,
) -> Vector {
    let mut body = BytesMut::new();
    Response::Purchase(*c).encode_body(&mut body).unwrap();
    let t = t as u8;
    let input = mac_input(t, &record.certificate.0, &body[..29]);
    c.mac = k.response_mac(t, &record.certificate, &body[..29]);
    v.hex(format!("result[{i}].binding"), &record.certificate.0)
        .hex(format!("result[{i}].mac_input"), &input)
        .hex(format!("result[{i}].mac"), &c.mac.0)
}

fn card_result(status: Status, atc: u32, balance: i64, journal_seq: u64) -> CardResult {
    CardResult {
        status,
        card_id: CARD,
        atc: Atc(atc),
        balance: Amount(balance),
        journal_seq,
        mac: Mac([0; 16]),
    }
}

fn transit_fields(v: Vector, t: &TransitResult) -> Vector {
    v.field("status", enum_line(t.status, t.status as u8))
        .field("card_id", t.card_id.0)
        .field("atc", t.atc.0)
        .field("balance", t.balance.0)
        .field("amount", t.amount.0)
        .field("held", t.held.0)
        .field("spendable", t.spendable.0)
        .field("ref_atc", t.ref_atc.0)
        .field("time_ms", t.time_ms)
        .field("journal_seq", t.journal_seq)
}

#[allow(clippy::too_many_arguments)]
fn transit_result(
    status: Status,
    atc: u32,
    balance: i64,
    amount: i64,
    held: i64,
    ref_atc: u32,
    time_ms: u64,
    journal_seq: u64,
) -> TransitResult {
    TransitResult {
        status,
        card_id: CARD,
        atc: Atc(atc),
        balance: Amount(balance),
        amount: Amount(amount),
        held: Amount(held),
        spendable: Amount(balance - held),
        ref_atc: Atc(ref_atc),
        time_ms,
        journal_seq,
        mac: Mac([0; 16]),
    }
}

fn staff_fields(v: Vector, s: &StaffResult) -> Vector {
    v.field("status", enum_line(s.status, s.status as u8))
        .field("card_id", s.card_id.0)
        .field("card_state", enum_line(s.card_state, s.card_state as u8))
        .field("balance", s.balance.0)
        .field("refunded", s.refunded.0)
        .field("hotlist_version", s.hotlist_version)
        .field("journal_seq", s.journal_seq)
}

fn issue_fields(v: Vector, i: &IssueResult) -> Vector {
    v.field("status", enum_line(i.status, i.status as u8))
        .field("card_id", i.card_id.0)
        .field("key_version", i.key_version.0)
        .hex("new_card_key", &i.card_key)
        .field("balance", i.balance.0)
        .field("replaced_card_id", i.replaced_card_id.0)
        .field("journal_seq", i.journal_seq)
}

fn list(values: &[u64]) -> String {
    let items: Vec<String> = values.iter().map(u64::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn offline_records() -> Vec<OfflineRecord> {
    let k = key(CARD);
    [(3u32, T0 - 3_600_000, 0x0a0a_0a0a_0000_0003u64), (4, T0 - 1_800_000, 0x0a0a_0a0a_0000_0004)]
        .into_iter()
        .map(|(atc, time_ms, nonce)| {
            let amount = Amount(180);
            let certificate = k.offline_certificate(CARD, Atc(atc), amount, time_ms, nonce, READER);
            OfflineRecord { card_id: CARD, atc: Atc(atc), amount, time_ms, nonce, certificate }
        })
        .collect()
}

fn vectors() -> Vec<Vector> {
    let mut out = Vec::new();

    // Key material.
    for (name, card) in
        [("card-key", CARD), ("card-key-issued", CARD_ISSUED), ("card-key-replacement", CARD_NEW)]
    {
        out.push(
            Vector::new(name, 0)
                .hex("master_key", &MASTER)
                .field("key_version", KV.0)
                .field("card_id", card.0)
                .hex("card_key", key(card).bytes()),
        );
    }
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&ASSERTION_SEED).unwrap();
    use ring::signature::KeyPair;
    out.push(
        Vector::new("assertion-key", 0)
            .hex("assertion_seed", &ASSERTION_SEED)
            .hex("assertion_public_key", pair.public_key().as_ref()),
    );

    // Requests.
    out.push(
        Vector::new("hello-request", 1)
            .field("client_time_ms", T0)
            .msg(Msg::Req(Request::Hello { client_time_ms: T0 })),
    );
    let (v, purchase_auth) = card_request(
        Vector::new("purchase-request", 7),
        MessageType::Purchase,
        5,
        0x1122_3344_5566_7788,
        250,
        READER,
    );
    out.push(v.msg(Msg::Req(Request::Purchase { auth: purchase_auth, amount: Amount(250) })));
    let (v, topup_auth) = card_request(
        Vector::new("topup-request", 8),
        MessageType::TopUp,
        6,
        0x0102_0304_0506_0708,
        2000,
        KIOSK,
    );
    out.push(v.msg(Msg::Req(Request::TopUp { auth: topup_auth, amount: Amount(2000) })));
    let (v, balance_auth) = card_request(
        Vector::new("balance-request", 9),
        MessageType::Balance,
        7,
        0x0000_0000_dead_beef,
        0,
        READER,
    );
    out.push(v.msg(Msg::Req(Request::Balance { auth: balance_auth })));
    let (v, history_auth) = card_request(
        Vector::new("history-request", 10),
        MessageType::History,
        8,
        0x0000_0000_0000_0008,
        0,
        KIOSK,
    );
    out.push(v.msg(Msg::Req(Request::History { auth: history_auth, before_seq: 0, limit: 20 })));
    let (v, identity_auth) = card_request(
        Vector::new("identity-request", 11),
        MessageType::Identity,
        9,
        0x0000_0000_0000_0009,
        0,
        KIOSK,
    );
    out.push(v.msg(Msg::Req(Request::Identity { auth: identity_auth })));
    out.push(
        Vector::new("issue-request", 20)
            .field("terminal_id", COUNTER)
            .field("op_ref", 5001)
            .field("deposit", 1000)
            .msg(Msg::Req(Request::Issue { op_ref: 5001, deposit: Amount(1000) })),
    );
    out.push(
        Vector::new("block-request", 21)
            .field("terminal_id", COUNTER)
            .field("op_ref", 5002)
            .field("card_id", CARD.0)
            .field("reason", enum_line(BlockReason::Lost, 1))
            .msg(Msg::Req(Request::Block {
                op_ref: 5002,
                card_id: CARD,
                reason: BlockReason::Lost,
            })),
    );
    for (name, rid, op_ref, card) in [
        ("unblock-request", 22, 5003u64, CARD),
        ("replace-request", 23, 5004, CARD),
        ("close-request", 24, 5005, CARD_NEW),
    ] {
        let req = match name {
            "unblock-request" => Request::Unblock { op_ref, card_id: card },
            "replace-request" => Request::Replace { op_ref, card_id: card },
            _ => Request::Close { op_ref, card_id: card },
        };
        out.push(
            Vector::new(name, rid)
                .field("terminal_id", COUNTER)
                .field("op_ref", op_ref)
                .field("card_id", card.0)
                .msg(Msg::Req(req)),
        );
    }
    let records = offline_records();
    let mut v = Vector::new("offline-batch-request", 30)
        .field("terminal_id", READER)
        .hex("card_key", key(CARD).bytes())
        .field("records", records.len());
    for (i, r) in records.iter().enumerate() {
        v = offline_record_fields(v, i, r);
    }
    out.push(v.msg(Msg::Req(Request::OfflineBatch { records: records.clone() })));
    out.push(
        Vector::new("hotlist-sync-request", 31)
            .field("max_entries", 1024)
            .field("cursor", list(&[]))
            .msg(Msg::Req(Request::HotlistSync { cursor: vec![], max_entries: 1024 })),
    );
    out.push(
        Vector::new("hotlist-sync-cursor-request", 32)
            .field("max_entries", 256)
            .field("cursor", list(&[3, 0, 7, 1]))
            .msg(Msg::Req(Request::HotlistSync { cursor: vec![3, 0, 7, 1], max_entries: 256 })),
    );

    // Protocol 1.2 requests.
    let (v, tapin_auth) = card_request(
        Vector::new("tapin-request", 40),
        MessageType::TapIn,
        12,
        0x0000_0000_0000_000c,
        0,
        READER,
    );
    out.push(v.msg(Msg::Req(Request::TapIn { auth: tapin_auth })));
    let (v, tapout_auth) = card_request(
        Vector::new("tapout-request", 41),
        MessageType::TapOut,
        13,
        0x0000_0000_0000_000d,
        320,
        "reader-2",
    );
    out.push(v.msg(Msg::Req(Request::TapOut { auth: tapout_auth, fare: Amount(320) })));
    // The inquiry carries purchase-request's CardAuth: its cryptogram covers type 0x02.
    let input = cryptogram_input(0x02, &purchase_auth, Amount(250), READER);
    let v = Vector::new("inquiry-request", 42)
        .field("terminal_id", READER)
        .field("card_id", CARD.0)
        .field("atc", 5)
        .field("nonce", format!("0x{:016x}", purchase_auth.nonce))
        .field("original_type", "Purchase (0x02)")
        .field("amount", 250)
        .hex("card_key", k_card().bytes())
        .hex("cryptogram_input", &input)
        .hex("cryptogram", &purchase_auth.cryptogram.0);
    out.push(v.msg(Msg::Req(Request::Inquiry {
        auth: purchase_auth,
        original_type: MessageType::Purchase,
        amount: Amount(250),
    })));
    let (v, reversal_auth) = card_request(
        Vector::new("reversal-request", 43),
        MessageType::Reversal,
        14,
        0x0000_0000_0000_000e,
        250,
        READER,
    );
    let v = v.field("original_atc", 5).hex("original_cryptogram", &purchase_auth.cryptogram.0);
    out.push(v.msg(Msg::Req(Request::Reversal {
        auth: reversal_auth,
        amount: Amount(250),
        original_atc: Atc(5),
        original_cryptogram: purchase_auth.cryptogram,
    })));
    let (v, funds_auth) = card_request(
        Vector::new("funds-request", 44),
        MessageType::Funds,
        15,
        0x0000_0000_0000_000f,
        0,
        KIOSK,
    );
    out.push(v.msg(Msg::Req(Request::Funds { auth: funds_auth })));

    // Responses.
    let info = ServerInfo {
        protocol_version: 1,
        role: 1,
        server_time_ms: T0 + 12,
        hotlist_version: 11,
        shard_count: 4,
        max_in_flight: 64,
    };
    out.push(
        Vector::new("server-info-response", 1)
            .field("protocol_version", info.protocol_version)
            .field("role", "reader (1)")
            .field("server_time_ms", info.server_time_ms)
            .field("hotlist_version", info.hotlist_version)
            .field("shard_count", info.shard_count)
            .field("max_in_flight", info.max_in_flight)
            .msg(Msg::Resp(Response::ServerInfo(info))),
    );
    let k = key(CARD);
    for (name, rid, auth, make, result) in [
        (
            "purchase-response",
            7,
            purchase_auth,
            Response::Purchase as fn(CardResult) -> Response,
            card_result(Status::Approved, 5, 1750, 1042),
        ),
        (
            "purchase-insufficient-funds-response",
            7,
            purchase_auth,
            Response::Purchase,
            card_result(Status::InsufficientFunds, 5, 120, 1042),
        ),
        (
            "topup-response",
            8,
            topup_auth,
            Response::TopUp,
            card_result(Status::Approved, 6, 3750, 1043),
        ),
        (
            "balance-response",
            9,
            balance_auth,
            Response::Balance,
            card_result(Status::Approved, 7, 3750, 0),
        ),
    ] {
        let v = card_result_fields(Vector::new(name, rid), "", &result);
        let (v, resp) = sealed(v, make(result), &k, auth.cryptogram);
        out.push(v.msg(Msg::Resp(resp)));
    }
    let unknown = card_result(Status::UnknownCard, 5, 0, 0);
    out.push(
        card_result_fields(Vector::new("purchase-unknown-card-response", 7), "", &unknown)
            .hex("mac", &[0; 16])
            .msg(Msg::Resp(Response::Purchase(unknown))),
    );

    let entries = vec![
        HistoryEntry {
            journal_seq: 1043,
            kind: EntryKind::TopUp,
            status: Status::Approved,
            amount: Amount(2000),
            balance_after: Amount(3750),
            time_ms: T0 + 30_000,
            atc: Atc(6),
        },
        HistoryEntry {
            journal_seq: 1042,
            kind: EntryKind::Purchase,
            status: Status::Approved,
            amount: Amount(-250),
            balance_after: Amount(1750),
            time_ms: T0 + 20_000,
            atc: Atc(5),
        },
    ];
    let mut v = Vector::new("history-response", 10)
        .field("status", enum_line(Status::Approved, 0))
        .field("card_id", CARD.0)
        .field("atc", 8)
        .field("balance", 3750)
        .field("entries", entries.len());
    for (i, e) in entries.iter().enumerate() {
        v = v
            .field(format!("entry[{i}].journal_seq"), e.journal_seq)
            .field(format!("entry[{i}].kind"), enum_line(e.kind, e.kind as u8))
            .field(format!("entry[{i}].status"), enum_line(e.status, e.status as u8))
            .field(format!("entry[{i}].amount"), e.amount.0)
            .field(format!("entry[{i}].balance_after"), e.balance_after.0)
            .field(format!("entry[{i}].time_ms"), e.time_ms)
            .field(format!("entry[{i}].atc"), e.atc.0);
    }
    let v = v.field("next_before_seq", 0);
    let page = HistoryPage {
        status: Status::Approved,
        card_id: CARD,
        atc: Atc(8),
        balance: Amount(3750),
        entries,
        next_before_seq: 0,
        mac: Mac([0; 16]),
    };
    let (v, resp) = sealed(v, Response::History(page), &k, history_auth.cryptogram);
    out.push(v.msg(Msg::Resp(resp)));

    // Protocol 1.2: the next page would start past the retention (6.1).
    let v = Vector::new("history-response-beyond-retention", 10)
        .field("status", enum_line(Status::BeyondRetention, 21))
        .field("card_id", CARD.0)
        .field("atc", 8)
        .field("balance", 3750)
        .field("entries", 0)
        .field("next_before_seq", 0);
    let page = HistoryPage {
        status: Status::BeyondRetention,
        card_id: CARD,
        atc: Atc(8),
        balance: Amount(3750),
        entries: Vec::new(),
        next_before_seq: 0,
        mac: Mac([0; 16]),
    };
    let (v, resp) = sealed(v, Response::History(page), &k, history_auth.cryptogram);
    out.push(v.msg(Msg::Resp(resp)));

    let issued_ms = T0 + 60_000;
    let expires_ms = issued_ms + 300_000;
    let assertion = crypto::assertion_bytes(CARD, Atc(9), 1044, issued_ms, expires_ms, KIOSK);
    let signature: [u8; 64] = pair.sign(&assertion).as_ref().try_into().unwrap();
    let identity = IdentityResult {
        status: Status::Approved,
        card_id: CARD,
        atc: Atc(9),
        journal_seq: 1044,
        issued_ms,
        expires_ms,
        signature,
        mac: Mac([0; 16]),
    };
    let v = Vector::new("identity-response", 11)
        .field("terminal_id", KIOSK)
        .field("status", enum_line(Status::Approved, 0))
        .field("card_id", CARD.0)
        .field("atc", 9)
        .field("journal_seq", 1044)
        .field("issued_ms", issued_ms)
        .field("expires_ms", expires_ms)
        .hex("assertion", &assertion)
        .hex("signature", &signature);
    let (v, resp) = sealed(v, Response::Identity(identity), &k, identity_auth.cryptogram);
    out.push(v.msg(Msg::Resp(resp)));

    for (name, rid, op_ref, card, balance, replaced, seq) in [
        ("issue-response", 20, 5001u64, CARD_ISSUED, 1000, CardId(0), 1045u64),
        ("replace-response", 23, 5004, CARD_NEW, 3750, CARD, 1048),
    ] {
        let nk = key(card);
        let result = IssueResult {
            status: Status::Approved,
            card_id: card,
            key_version: KV,
            card_key: *nk.bytes(),
            balance: Amount(balance),
            replaced_card_id: replaced,
            journal_seq: seq,
            mac: Mac([0; 16]),
        };
        let v = issue_fields(Vector::new(name, rid), &result).field("op_ref", op_ref);
        let resp = if name == "issue-response" {
            Response::Issue(result)
        } else {
            Response::Replace(result)
        };
        let (v, resp) = sealed(v, resp, &nk, crypto::staff_binding(op_ref));
        out.push(v.msg(Msg::Resp(resp)));
    }
    for (name, rid, op_ref, card, state, balance, refunded, hv, seq) in [
        ("block-response", 21, 5002u64, CARD, CardState::Blocked, 3750, 0, 4u64, 1046u64),
        ("unblock-response", 22, 5003, CARD, CardState::Active, 3750, 0, 5, 1047),
        ("close-response", 24, 5005, CARD_NEW, CardState::Closed, 0, 3750, 2, 1049),
        // Protocol 1.1: a blocked debtor closes with its debt kept and nothing refunded.
        ("close-response-blocked-debtor", 26, 5006, CARD, CardState::Closed, -200, 0, 6, 1052),
    ] {
        let result = StaffResult {
            status: Status::Approved,
            card_id: card,
            card_state: state,
            balance: Amount(balance),
            refunded: Amount(refunded),
            hotlist_version: hv,
            journal_seq: seq,
            mac: Mac([0; 16]),
        };
        let v = staff_fields(Vector::new(name, rid), &result).field("op_ref", op_ref);
        let resp = match name {
            "block-response" => Response::Block(result),
            "unblock-response" => Response::Unblock(result),
            _ => Response::Close(result),
        };
        let (v, resp) = sealed(v, resp, &key(card), crypto::staff_binding(op_ref));
        out.push(v.msg(Msg::Resp(resp)));
    }

    // Offline results: each record is a CardResult sealed on its own (type 0x8c, binding = the
    // record's certificate, MAC input = that record's first 29 bytes).
    let mut v = Vector::new("offline-results-response", 30)
        .hex("card_key", k.bytes())
        .field("results", records.len());
    let mut results = Vec::new();
    for (i, (rec, (balance, seq))) in records.iter().zip([(140, 1050u64), (-40, 1051)]).enumerate()
    {
        let mut c = card_result(Status::Approved, rec.atc.0, balance, seq);
        v = card_result_fields(v, &format!("result[{i}]."), &c);
        v = sealed_offline_result(v, i, &k, MessageType::OfflineResults, rec, &mut c);
        results.push(c);
    }
    out.push(v.msg(Msg::Resp(Response::OfflineBatch(results))));

    let changes = HotlistChanges {
        cursor: vec![3, 0, 7, 1],
        more: false,
        entries: vec![
            HotlistEntry {
                card_id: CardId(1_000_000_000_000_044),
                listed: true,
                reason: BlockReason::Lost,
                version: 1,
            },
            HotlistEntry {
                card_id: CARD,
                listed: true,
                reason: BlockReason::Overdrawn,
                version: 3,
            },
            HotlistEntry {
                card_id: CardId(1_000_000_000_000_046),
                listed: false,
                reason: BlockReason::Stolen,
                version: 7,
            },
            HotlistEntry {
                card_id: CardId(1_000_000_000_000_047),
                listed: true,
                reason: BlockReason::Retired,
                version: 1,
            },
        ],
    };
    let mut v = Vector::new("hotlist-changes-response", 31)
        .field("cursor", list(&changes.cursor))
        .field("more", changes.more)
        .field("entries", changes.entries.len());
    for (i, e) in changes.entries.iter().enumerate() {
        v = v
            .field(format!("entry[{i}].card_id"), e.card_id.0)
            .field(format!("entry[{i}].listed"), e.listed)
            .field(format!("entry[{i}].reason"), enum_line(e.reason, e.reason as u8))
            .field(format!("entry[{i}].version"), e.version);
    }
    out.push(v.msg(Msg::Resp(Response::HotlistSync(changes))));

    // Protocol 1.2 responses. The hold expires 3 hours after the tap-in (the default).
    let tapin_ms = T0 + 120_000;
    let expires = tapin_ms + 10_800_000;
    for (name, rid, auth, make, result) in [
        (
            "tapin-response",
            40,
            tapin_auth,
            Response::TapIn as fn(TransitResult) -> Response,
            transit_result(Status::Approved, 12, 3750, 400, 400, 0, expires, 1060),
        ),
        (
            "tapout-response",
            41,
            tapout_auth,
            Response::TapOut,
            transit_result(Status::Approved, 13, 3430, 320, 0, 12, 0, 1061),
        ),
        (
            "tapout-no-open-hold-response",
            41,
            tapout_auth,
            Response::TapOut,
            transit_result(Status::NoOpenHold, 13, 3750, 0, 0, 0, 0, 1061),
        ),
        (
            "reversal-response",
            43,
            reversal_auth,
            Response::Reversal,
            transit_result(Status::Approved, 14, 2000, 250, 0, 5, 0, 1063),
        ),
        (
            "funds-response",
            44,
            funds_auth,
            Response::Funds,
            transit_result(Status::Approved, 15, 3750, 0, 400, 12, expires, 0),
        ),
    ] {
        // The TapOut vectors are answers to reader-2, which the MAC does not name.
        let v = transit_fields(Vector::new(name, rid), &result);
        let (v, resp) = sealed(v, make(result), &k, auth.cryptogram);
        out.push(v.msg(Msg::Resp(resp)));
    }
    // Inquiry found: purchase-response embedded byte for byte (its own MAC included), the whole
    // sealed again under the same binding (the purchase's cryptogram).
    let original = match out.iter().find(|v| v.name == "purchase-response").map(|v| &v.msg) {
        Some(Msg::Resp(r)) => r.clone(),
        _ => unreachable!("purchase-response is built above"),
    };
    let mut original_body = BytesMut::new();
    original.encode_body(&mut original_body).unwrap();
    for (name, status, answer, seq) in [
        ("inquiry-response", Status::Approved, Some(Box::new(original)), 0u64),
        ("inquiry-not-found-response", Status::NotFound, None, 1062),
    ] {
        let mut v = Vector::new(name, 42)
            .field("status", enum_line(status, status as u8))
            .field("card_id", CARD.0)
            .field("atc", 5)
            .field("journal_seq", seq);
        v = match &answer {
            Some(_) => {
                v.field("answer_type", "PurchaseResult (0x82)").hex("answer", &original_body)
            }
            None => v.field("answer_type", "none (0x00)"),
        };
        let result = InquiryResult {
            status,
            card_id: CARD,
            atc: Atc(5),
            answer,
            journal_seq: seq,
            mac: Mac([0; 16]),
        };
        let (v, resp) = sealed(v, Response::Inquiry(result), &k, purchase_auth.cryptogram);
        out.push(v.msg(Msg::Resp(resp)));
    }

    // Protocol 1.3: card products and deposits.
    out.push(
        Vector::new("issue-product-request", 50)
            .field("terminal_id", COUNTER)
            .field("op_ref", 5010)
            .field("deposit", 1000)
            .field("product", 1)
            .msg(Msg::Req(Request::IssueProduct {
                op_ref: 5010,
                deposit: Amount(1000),
                product: 1,
            })),
    );
    out.push(
        Vector::new("set-product-request", 51)
            .field("terminal_id", COUNTER)
            .field("op_ref", 5011)
            .field("card_id", CARD.0)
            .field("product", 2)
            .msg(Msg::Req(Request::SetProduct { op_ref: 5011, card_id: CARD, product: 2 })),
    );
    for (name, rid, status, product, deposit, paid, seq) in [
        ("set-product-response", 51, Status::Approved, 2u8, 2000, 1500, 1070u64),
        ("set-product-balance-limit-response", 53, Status::BalanceLimit, 1, 500, 0, 1072),
    ] {
        let result = ProductResult {
            status,
            card_id: CARD,
            card_state: CardState::Active,
            product,
            balance: Amount(3750),
            deposit: Amount(deposit),
            deposit_paid: Amount(paid),
            deposit_refunded: Amount(0),
            journal_seq: seq,
            mac: Mac([0; 16]),
        };
        let v = Vector::new(name, rid)
            .field("status", enum_line(result.status, result.status as u8))
            .field("card_id", result.card_id.0)
            .field("card_state", enum_line(result.card_state, result.card_state as u8))
            .field("product", result.product)
            .field("balance", result.balance.0)
            .field("deposit", result.deposit.0)
            .field("deposit_paid", result.deposit_paid.0)
            .field("deposit_refunded", result.deposit_refunded.0)
            .field("journal_seq", result.journal_seq)
            .field("op_ref", if rid == 51 { 5011 } else { 5013 });
        let op_ref = if rid == 51 { 5011 } else { 5013 };
        let (v, resp) =
            sealed(v, Response::SetProduct(result), &key(CARD), crypto::staff_binding(op_ref));
        out.push(v.msg(Msg::Resp(resp)));
    }
    // Funds with its 37th byte: the 1.2 fields, then product 2, deposit 2,000 and today's
    // counters (spent 620 in 3 debits), then the MAC over all of it.
    let (v, funds_product_auth) = card_request(
        Vector::new("funds-product-request", 54),
        MessageType::Funds,
        16,
        0x0000_0000_0000_0010,
        0,
        KIOSK,
    );
    let v = v.field("detail", 1);
    out.push(v.msg(Msg::Req(Request::FundsProduct { auth: funds_product_auth })));
    let funds = transit_result(Status::Approved, 16, 3750, 0, 0, 0, 0, 0);
    let result = FundsProductResult {
        funds,
        product: 2,
        deposit: Amount(2000),
        spent_today: Amount(620),
        debits_today: 3,
    };
    let v = transit_fields(Vector::new("funds-product-response", 54), &funds)
        .field("product", 2)
        .field("deposit", 2000)
        .field("spent_today", 620)
        .field("debits_today", 3);
    let (v, resp) = sealed(v, Response::FundsProduct(result), &k, funds_product_auth.cryptogram);
    out.push(v.msg(Msg::Resp(resp)));

    let limited = card_result(Status::DailyCountLimit, 5, 3750, 1071);
    let v =
        card_result_fields(Vector::new("purchase-daily-count-limit-response", 52), "", &limited);
    let (v, resp) = sealed(v, Response::Purchase(limited), &k, purchase_auth.cryptogram);
    out.push(v.msg(Msg::Resp(resp)));
    // Protocol 1.3: numbered offline uploads. Records 5 and 6 of the card (seqs 7 and 8, the
    // second uncertain); the answer approves seq 7 and refuses seq 8 as SeqConflict (the reader
    // had used seq 8 for another record already): unauthenticated, balance 0, zero MAC.
    let numbered: Vec<NumberedRecord> = [(5u32, 7u64, 0u8), (6, 8, FLAG_UNCERTAIN)]
        .into_iter()
        .map(|(atc, terminal_seq, flags)| {
            let (amount, time_ms, nonce) =
                (Amount(120), T0 - 600_000, 0x0b0b_0b0b_0000_0000 | u64::from(atc));
            let certificate = k.offline_certificate(CARD, Atc(atc), amount, time_ms, nonce, READER);
            let record =
                OfflineRecord { card_id: CARD, atc: Atc(atc), amount, time_ms, nonce, certificate };
            NumberedRecord { record, terminal_seq, flags }
        })
        .collect();
    let mut v = Vector::new("numbered-offline-request", 50)
        .field("terminal_id", READER)
        .hex("card_key", k.bytes())
        .field("records", numbered.len());
    for (i, n) in numbered.iter().enumerate() {
        v = offline_record_fields(v, i, &n.record)
            .field(format!("record[{i}].terminal_seq"), n.terminal_seq)
            .field(format!("record[{i}].flags"), format!("0x{:02x}", n.flags));
    }
    out.push(v.msg(Msg::Req(Request::NumberedOfflineBatch { records: numbered.clone() })));
    let mut v = Vector::new("numbered-offline-response", 50)
        .hex("card_key", k.bytes())
        .field("highest_seq", 8)
        .field("results", numbered.len());
    let mut results = Vec::new();
    let approved = card_result(Status::Approved, 5, 3630, 1070);
    let conflict =
        CardResult { balance: Amount(0), ..card_result(Status::SeqConflict, 6, 0, 1071) };
    for (i, (n, mut c)) in numbered.iter().zip([approved, conflict]).enumerate() {
        v = v.field(format!("result[{i}].terminal_seq"), n.terminal_seq);
        v = card_result_fields(v, &format!("result[{i}]."), &c);
        if c.status == Status::Approved {
            let t = MessageType::NumberedOfflineResults;
            v = sealed_offline_result(v, i, &k, t, &n.record, &mut c);
        } else {
            v = v.hex(format!("result[{i}].mac"), &c.mac.0);
        }
        results.push(NumberedResult { terminal_seq: n.terminal_seq, result: c });
    }
    let response = NumberedResults { highest_seq: 8, results };
    out.push(v.msg(Msg::Resp(Response::NumberedOfflineBatch(response))));

    for (name, rid, code, message) in [
        ("error-response", 7, ErrorCode::DuplicateRequestId, "request id 7 is already in flight"),
        ("error-bad-magic-response", 0, ErrorCode::BadMagic, "bad magic"),
    ] {
        out.push(
            Vector::new(name, rid)
                .field("code", format!("{code:?} ({})", code as u16))
                .field("message", message)
                .msg(Msg::Resp(Response::error(code, message))),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Parsing the document.

/// Vector blocks of PROTOCOL.md: name -> (key -> value). Continuation lines (starting with
/// whitespace) are appended to the previous value after a single space.
fn parse_doc() -> BTreeMap<String, Vec<(String, String)>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let section = doc.split("\n## Test vectors").nth(1).expect("no '## Test vectors' section");
    let section = section.split("\n## ").next().unwrap();
    let mut blocks = BTreeMap::new();
    let mut in_block = false;
    let mut current: Vec<(String, String)> = Vec::new();
    for line in section.lines() {
        if line.starts_with("```") {
            if in_block {
                if let Some((k, name)) = current.first().cloned() {
                    if k == "vector" {
                        let prev = blocks.insert(name.clone(), std::mem::take(&mut current));
                        assert!(prev.is_none(), "vector {name} appears twice");
                    }
                }
                current.clear();
            }
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            let last = current.last_mut().expect("continuation line without a key");
            last.1.push(' ');
            last.1.push_str(line.trim());
        } else if let Some((k, v)) = line.split_once(':') {
            current.push((k.trim().to_owned(), v.trim().to_owned()));
        } else {
            panic!("unparsable vector line {line:?}");
        }
    }
    assert!(!in_block, "unterminated code block in the test vector section");
    blocks
}

fn get<'a>(block: &'a [(String, String)], key: &str) -> Option<&'a str> {
    block.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn hmac16(key: &[u8], data: &[u8]) -> [u8; 16] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    tag.as_ref()[..16].try_into().unwrap()
}

/// HKDF-SHA256 (RFC 5869) for a 32-byte output, written out: PRK = HMAC(salt, IKM),
/// OKM = T(1) = HMAC(PRK, info || 0x01).
fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt), ikm);
    let mut t1_input = info.to_vec();
    t1_input.push(1);
    let okm = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &t1_input);
    okm.as_ref().try_into().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
#[ignore = "prints the vector blocks for PROTOCOL.md"]
fn print_vectors() {
    for v in vectors() {
        println!("{}", v.render());
    }
}

#[test]
fn table_names_are_the_expected_ones() {
    let mut names: Vec<&str> = vectors().iter().map(|v| v.name).collect();
    names.sort_unstable();
    let mut expected = EXPECTED.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected);
}

#[test]
fn every_message_type_has_a_vector() {
    let covered: BTreeSet<u8> = vectors().iter().filter_map(|v| v.frame()).map(|f| f[3]).collect();
    for code in 0..=255u8 {
        if MessageType::from_u8(code).is_some() {
            assert!(covered.contains(&code), "no vector for message type {code:#04x}");
        }
    }
}

#[test]
fn document_vectors_match_the_crate() {
    let doc = parse_doc();
    let table = vectors();
    let table_names: BTreeSet<&str> = table.iter().map(|v| v.name).collect();
    for name in doc.keys() {
        assert!(table_names.contains(name.as_str()), "PROTOCOL.md has unknown vector {name}");
    }
    for name in EXPECTED {
        assert!(doc.contains_key(*name), "PROTOCOL.md lacks vector {name}");
    }
    for v in &table {
        let block = &doc[v.name];
        let expected = v.all_lines();
        let doc_keys: Vec<&str> = block.iter().map(|(k, _)| k.as_str()).collect();
        let table_keys: Vec<&str> = expected.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(doc_keys, table_keys, "vector {}: field lines differ", v.name);
        for l in &expected {
            let got = get(block, &l.key).unwrap();
            if l.hex {
                assert_eq!(unhex(got), unhex(&l.value), "vector {} field {}", v.name, l.key);
            } else {
                assert_eq!(got, l.value, "vector {} field {}", v.name, l.key);
            }
        }
    }
}

/// Checks that use only the document's bytes and the layouts in PROTOCOL.md.
#[test]
fn document_vectors_are_self_consistent() {
    let doc = parse_doc();
    let mut checked_frames = 0;
    for (name, block) in &doc {
        if let Some(card_key) = get(block, "card_key").filter(|_| name.starts_with("card-key")) {
            let master = unhex(get(block, "master_key").unwrap());
            let version: u16 = get(block, "key_version").unwrap().parse().unwrap();
            let card: u64 = get(block, "card_id").unwrap().parse().unwrap();
            let mut info = version.to_be_bytes().to_vec();
            info.extend_from_slice(&card.to_be_bytes());
            let by_hand = hkdf32(b"citycard card key v1", &master, &info);
            assert_eq!(by_hand.to_vec(), unhex(card_key), "{name}: HKDF");
            let master: [u8; 32] = master.try_into().unwrap();
            assert_eq!(
                CardKey::derive(&master, KeyVersion(version), CardId(card)).bytes(),
                &by_hand
            );
        }
        if name == "assertion-key" {
            let seed = unhex(get(block, "assertion_seed").unwrap());
            let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
            use ring::signature::KeyPair;
            assert_eq!(
                pair.public_key().as_ref(),
                unhex(get(block, "assertion_public_key").unwrap())
            );
        }
        let Some(frame_hex) = get(block, "frame") else {
            continue;
        };
        let frame = unhex(frame_hex);
        checked_frames += 1;
        assert_eq!(&frame[..3], b"CC\x01", "{name}");
        let body_len = u32::from_be_bytes(frame[12..16].try_into().unwrap()) as usize;
        assert_eq!(frame.len(), HEADER_LEN + body_len, "{name}: length field");
        let rid: u32 = get(block, "request_id").unwrap().parse().unwrap();
        assert_eq!(u32::from_be_bytes(frame[8..12].try_into().unwrap()), rid, "{name}");
        let t = frame[3];
        let body = &frame[HEADER_LEN..];
        let card_key = get(block, "card_key").map(unhex);

        // Re-encoding the decoded frame gives the same bytes.
        let mut buf = BytesMut::from(&frame[..]);
        let mut again = BytesMut::new();
        if t < 0x80 {
            let (id, req) = decode_request(&mut buf).unwrap().unwrap();
            assert_eq!(id, RequestId(rid));
            req.encode(id, &mut again).unwrap();
        } else {
            let (id, resp) = decode_response(&mut buf).unwrap().unwrap();
            assert_eq!(id, RequestId(rid));
            resp.encode(id, &mut again).unwrap();
        }
        assert!(buf.is_empty(), "{name}");
        assert_eq!(again.to_vec(), frame, "{name}: re-encoding");

        // Request cryptogram: input assembled from the frame bytes.
        if let Some(input) = get(block, "cryptogram_input") {
            let input = unhex(input);
            let terminal = get(block, "terminal_id").unwrap();
            let mut expected = b"CCRQ\x01".to_vec();
            // An Inquiry carries the original request's cryptogram: its type is body[36].
            let t = if t == 0x10 { body[36] } else { t };
            expected.push(t);
            expected.extend_from_slice(&body[0..12]); // card id, ATC
            let amount: &[u8] = match frame[3] {
                0x02 | 0x03 | 0x0f | 0x11 => &body[36..44],
                0x10 => &body[37..45],
                _ => &[0; 8],
            };
            expected.extend_from_slice(amount);
            expected.extend_from_slice(&body[12..20]); // nonce
            expected.push(terminal.len() as u8);
            expected.extend_from_slice(terminal.as_bytes());
            assert_eq!(input, expected, "{name}: cryptogram input");
            let cryptogram = unhex16(get(block, "cryptogram").unwrap());
            assert_eq!(hmac16(card_key.as_ref().unwrap(), &input), cryptogram, "{name}");
            assert_eq!(&body[20..36], &cryptogram, "{name}: cryptogram in the frame");
            let k = CardKey::from_bytes(card_key.clone().unwrap().try_into().unwrap());
            let card = CardId(u64::from_be_bytes(body[0..8].try_into().unwrap()));
            let atc = Atc(u32::from_be_bytes(body[8..12].try_into().unwrap()));
            let nonce = u64::from_be_bytes(body[12..20].try_into().unwrap());
            let amount = Amount(i64::from_be_bytes(amount.try_into().unwrap()));
            assert_eq!(k.request_cryptogram(t, card, atc, amount, nonce, terminal).0, cryptogram);
        }
        // Offline certificates.
        for i in 0.. {
            let Some(input) = get(block, &format!("record[{i}].certificate_input")) else {
                break;
            };
            let input = unhex(input);
            let terminal = get(block, "terminal_id").unwrap();
            // 52 bytes a record, 61 in a numbered batch (terminal_seq and flags after).
            let stride = if t == 0x14 { 61 } else { 52 };
            let rec = &body[2 + stride * i..2 + stride * i + 52];
            let mut expected = b"CCOF\x01".to_vec();
            expected.extend_from_slice(&rec[..36]);
            expected.push(terminal.len() as u8);
            expected.extend_from_slice(terminal.as_bytes());
            assert_eq!(input, expected, "{name}: certificate input {i}");
            let cert = unhex16(get(block, &format!("record[{i}].certificate")).unwrap());
            assert_eq!(hmac16(card_key.as_ref().unwrap(), &input), cert, "{name}");
            assert_eq!(&rec[36..], &cert, "{name}: certificate in the frame");
        }
        // Response MAC over the whole body.
        if let Some(input) = get(block, "mac_input") {
            let input = unhex(input);
            let binding = unhex16(get(block, "binding").unwrap());
            let split = body.len() - 16;
            assert_eq!(input, mac_input(t, &binding, &body[..split]), "{name}: MAC input");
            let mac = unhex16(get(block, "mac").unwrap());
            let key = card_key.clone().unwrap();
            assert_eq!(hmac16(&key, &input), mac, "{name}");
            assert_eq!(&body[split..], &mac, "{name}: MAC in the frame");
            let k = CardKey::from_bytes(key.try_into().unwrap());
            assert!(crypto::response_mac_ok(&k, t, &Mac(binding), body), "{name}");
        } else if let Some(mac) = get(block, "mac") {
            // A decline that could not authenticate the card: all-zero MAC.
            assert_eq!(unhex(mac), [0; 16], "{name}");
            assert_eq!(&body[body.len() - 16..], &[0; 16], "{name}");
        }
        // Offline results: one MAC per record.
        for i in 0.. {
            let Some(input) = get(block, &format!("result[{i}].mac_input")) else {
                break;
            };
            let input = unhex(input);
            // A numbered answer: highest_seq, count, then terminal_seq before each result.
            let (start, stride) = if t == 0x94 { (18, 53) } else { (2, 45) };
            let rec = &body[start + stride * i..start + stride * i + 45];
            let binding = unhex16(get(block, &format!("result[{i}].binding")).unwrap());
            assert_eq!(input, mac_input(t, &binding, &rec[..29]), "{name}: MAC input {i}");
            let mac = unhex16(get(block, &format!("result[{i}].mac")).unwrap());
            assert_eq!(hmac16(card_key.as_ref().unwrap(), &input), mac, "{name}");
            assert_eq!(&rec[29..], &mac, "{name}: MAC in the frame");
        }
        // Identity assertion and its signature.
        if let Some(assertion) = get(block, "assertion") {
            let assertion = unhex(assertion);
            let terminal = get(block, "terminal_id").unwrap();
            let mut expected = b"CCID\x01".to_vec();
            expected.extend_from_slice(&body[1..13]); // card id, ATC
            expected.extend_from_slice(&body[13..37]); // journal seq, issued, expires
            expected.push(terminal.len() as u8);
            expected.extend_from_slice(terminal.as_bytes());
            assert_eq!(assertion, expected, "{name}: assertion bytes");
            let signature: [u8; 64] = body[37..101].try_into().unwrap();
            assert_eq!(signature.to_vec(), unhex(get(block, "signature").unwrap()));
            let public = unhex(get(&doc["assertion-key"], "assertion_public_key").unwrap());
            assert!(crypto::verify_assertion(&public, &assertion, &signature), "{name}");
            let issued = u64::from_be_bytes(body[21..29].try_into().unwrap());
            let expires = u64::from_be_bytes(body[29..37].try_into().unwrap());
            assert_eq!(expires, issued + 300_000, "{name}: expiry = issue + 5 minutes");
        }
    }
    assert_eq!(checked_frames, EXPECTED.len() - 4);
}
