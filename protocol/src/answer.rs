//! The answer to a request, in one place: which response type answers each request, the decline
//! of any request with any status, and the sealed encode that writes a response and computes its
//! MAC over the bytes it just wrote, in one pass.
//!
//! The server builds every answer here: the shards for what they decide, the connection for what
//! it refuses before a shard sees the request (role, Busy, Unavailable). A card-related answer
//! travels as an [`Answer`]: the response with its MAC field still empty and the [`Seal`] (card
//! key and binding) that fills it while the frame is encoded, so the body is written once.

use bytes::BytesMut;

use crate::crypto::CardKey;
use crate::frame::{EncodeError, ErrorCode, MessageType, RequestId, HEADER_LEN};
use crate::message::{
    put_card_result, Amount, Atc, CardAuth, CardId, CardResult, CardState, FundsProductResult,
    HistoryPage, IdentityResult, InquiryResult, IssueResult, Mac, OfflineRecord, ProductResult,
    Request, Response, StaffResult, Status, TransitResult, CARD_RESULT_LEN,
};

/// Length of the response MAC at the end of a sealed body.
pub const MAC_LEN: usize = 16;

/// The response type that answers a request type (an Error frame can answer any of them);
/// `None` for a type that is not a request.
pub fn response_type(request: MessageType) -> Option<MessageType> {
    use MessageType::*;
    Some(match request {
        Hello => ServerInfo,
        Purchase => PurchaseResult,
        TopUp => TopUpResult,
        Balance => BalanceResult,
        History => HistoryPage,
        Identity => IdentityResult,
        Issue => IssueResult,
        Block => BlockResult,
        Unblock => UnblockResult,
        Replace => ReplaceResult,
        Close => CloseResult,
        OfflineBatch => OfflineResults,
        HotlistSync => HotlistChanges,
        TapIn => TapInResult,
        TapOut => TapOutResult,
        Inquiry => InquiryResult,
        Reversal => ReversalResult,
        Funds => FundsResult,
        SetProduct => SetProductResult,
        NumberedOfflineBatch => NumberedOfflineResults,
        _ => return None,
    })
}

impl Request {
    /// The response type that answers this request (see [`response_type`]).
    pub fn response_type(&self) -> MessageType {
        // Invariant: every Request variant has a request message type, and response_type maps
        // every request type.
        response_type(self.message_type()).unwrap_or(MessageType::Error)
    }
}

/// The card fields of a declined card answer: the request's card and ATC, no balance (the card
/// was not authenticated, or its balance is not the terminal's to learn), nothing journaled.
pub fn decline_card(status: Status, auth: &CardAuth) -> CardResult {
    CardResult {
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        balance: Amount(0),
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// A declined offline record: its card and ATC, no balance, nothing journaled.
pub fn decline_record(status: Status, record: &OfflineRecord) -> CardResult {
    CardResult {
        status,
        card_id: record.card_id,
        atc: record.atc,
        balance: Amount(0),
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// A declined block, unblock or close of `card_id`.
pub fn decline_staff(status: Status, card_id: CardId) -> StaffResult {
    StaffResult {
        status,
        card_id,
        card_state: CardState::Active,
        balance: Amount(0),
        refunded: Amount(0),
        hotlist_version: 0,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// A declined SetProduct of `card_id` (protocol 1.3): nothing changed, nothing journaled.
pub fn decline_product(status: Status, card_id: CardId) -> ProductResult {
    ProductResult {
        status,
        card_id,
        card_state: CardState::Active,
        product: 0,
        balance: Amount(0),
        deposit: Amount(0),
        deposit_paid: Amount(0),
        deposit_refunded: Amount(0),
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// A declined issue (`replaced` = 0) or replace of `replaced`: no card, no key.
pub fn decline_issue(status: Status, replaced: CardId) -> IssueResult {
    IssueResult {
        status,
        card_id: CardId(0),
        key_version: crate::message::KeyVersion(0),
        card_key: [0; 32],
        balance: Amount(0),
        replaced_card_id: replaced,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// A declined history page: no entries.
pub fn decline_history(status: Status, auth: &CardAuth) -> HistoryPage {
    HistoryPage {
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        balance: Amount(0),
        entries: Vec::new(),
        next_before_seq: 0,
        mac: Mac::default(),
    }
}

/// A declined identity check: no assertion, no signature.
pub fn decline_identity(status: Status, auth: &CardAuth) -> IdentityResult {
    IdentityResult {
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        journal_seq: 0,
        issued_ms: 0,
        expires_ms: 0,
        signature: [0; 64],
        mac: Mac::default(),
    }
}

/// A declined tap-in, tap-out, reversal or funds read (protocol 1.2): the request's card and
/// ATC, nothing held, nothing journaled.
pub fn decline_transit(status: Status, auth: &CardAuth) -> TransitResult {
    TransitResult {
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        balance: Amount(0),
        amount: Amount(0),
        held: Amount(0),
        spendable: Amount(0),
        ref_atc: Atc(0),
        time_ms: 0,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// A declined inquiry: no original answer.
pub fn decline_inquiry(status: Status, auth: &CardAuth) -> InquiryResult {
    InquiryResult {
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        answer: None,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// The decline of `request` with `status`, as the response type that answers it, with no MAC
/// (seal it with [`Answer::sealed`] when the card was authenticated). An offline batch gets
/// `status` for every record. Hello and HotlistSync answers have no status field: they are
/// refused with an Error frame `NotPermitted` (PROTOCOL.md, error code 14).
pub fn decline(request: &Request, status: Status) -> Response {
    let unknown =
        CardAuth { card_id: CardId(0), atc: Atc(0), nonce: 0, cryptogram: Mac::default() };
    let auth = request.card_auth().copied().unwrap_or(unknown);
    match request {
        Request::Purchase { .. } => Response::Purchase(decline_card(status, &auth)),
        Request::TopUp { .. } => Response::TopUp(decline_card(status, &auth)),
        Request::Balance { .. } => Response::Balance(decline_card(status, &auth)),
        Request::History { .. } => Response::History(decline_history(status, &auth)),
        Request::Identity { .. } => Response::Identity(decline_identity(status, &auth)),
        Request::Issue { .. } | Request::IssueProduct { .. } => {
            Response::Issue(decline_issue(status, CardId(0)))
        }
        Request::FundsProduct { .. } => Response::FundsProduct(FundsProductResult {
            funds: decline_transit(status, &auth),
            product: 0,
            deposit: Amount(0),
            spent_today: Amount(0),
            debits_today: 0,
        }),
        Request::SetProduct { card_id, .. } => {
            Response::SetProduct(decline_product(status, *card_id))
        }
        Request::Replace { card_id, .. } => Response::Replace(decline_issue(status, *card_id)),
        Request::Block { card_id, .. } => Response::Block(decline_staff(status, *card_id)),
        Request::Unblock { card_id, .. } => Response::Unblock(decline_staff(status, *card_id)),
        Request::Close { card_id, .. } => Response::Close(decline_staff(status, *card_id)),
        Request::OfflineBatch { records } => Response::OfflineBatch(
            records.iter().map(|record| decline_record(status, record)).collect(),
        ),
        Request::NumberedOfflineBatch { records } => {
            Response::NumberedOfflineBatch(crate::NumberedResults {
                highest_seq: 0,
                results: records
                    .iter()
                    .map(|n| crate::NumberedResult {
                        terminal_seq: n.terminal_seq,
                        result: decline_record(status, &n.record),
                    })
                    .collect(),
            })
        }
        Request::TapIn { .. } => Response::TapIn(decline_transit(status, &auth)),
        Request::TapOut { .. } => Response::TapOut(decline_transit(status, &auth)),
        Request::Reversal { .. } => Response::Reversal(decline_transit(status, &auth)),
        Request::Funds { .. } => Response::Funds(decline_transit(status, &auth)),
        Request::Inquiry { .. } => Response::Inquiry(decline_inquiry(status, &auth)),
        Request::Hello { .. } | Request::HotlistSync { .. } => Response::error(
            ErrorCode::NotPermitted,
            "this terminal's role may not send this request",
        ),
    }
}

/// What a response MAC is computed with: the card's key and the binding (the request
/// cryptogram, the offline certificate, or [`crate::crypto::staff_binding`] of the op_ref).
#[derive(Clone, Debug)]
pub struct Seal {
    pub key: CardKey,
    pub binding: Mac,
}

/// A response on its way to the wire, with the seal its MAC is computed with as it is encoded.
/// Without a seal it is sent as it stands (its MAC field, if any, stays as it is: zeros on a
/// decline of an unauthenticated card).
#[derive(Clone, Debug)]
pub struct Answer {
    response: Response,
    seal: Option<Seal>,
}

impl From<Response> for Answer {
    fn from(response: Response) -> Answer {
        Answer::plain(response)
    }
}

impl Answer {
    /// An answer that carries no MAC, or whose MAC is already in place.
    pub fn plain(response: Response) -> Answer {
        Answer { response, seal: None }
    }

    /// An answer whose MAC is computed under `key` and `binding` when it is encoded. Only a
    /// response with a trailing MAC field takes a seal ([`has_trailing_mac`]); for any other the
    /// seal is dropped (an offline batch's records carry their own MACs: [`seal_card_result`]).
    pub fn sealed(response: Response, key: CardKey, binding: Mac) -> Answer {
        let seal = has_trailing_mac(&response).then_some(Seal { key, binding });
        Answer { response, seal }
    }

    /// The response with its MAC field not yet filled in when it is sealed: for its status,
    /// type and fields, never for its MAC (use [`Answer::into_response`] for that).
    pub fn unsealed(&self) -> &Response {
        &self.response
    }

    pub fn status(&self) -> Option<Status> {
        self.response.status()
    }

    pub fn message_type(&self) -> MessageType {
        self.response.message_type()
    }

    pub fn is_sealed(&self) -> bool {
        self.seal.is_some()
    }

    /// Appends the complete frame to `out`, computing the MAC over the body bytes as written and
    /// patching it into the body's last 16 bytes. On error nothing is written.
    pub fn encode(&self, request_id: RequestId, out: &mut BytesMut) -> Result<(), EncodeError> {
        let start = out.len();
        self.response.encode(request_id, out)?;
        if let Some(seal) = &self.seal {
            let response_type = self.response.message_type() as u8;
            // Invariant: sealed responses end in a 16-byte MAC field (checked in `sealed`), so
            // the body is at least MAC_LEN long.
            let body = &mut out[start + HEADER_LEN..];
            crate::crypto::seal_response(&seal.key, response_type, &seal.binding, body);
        }
        Ok(())
    }

    /// The response with its MAC filled in (for callers that keep the value, not the bytes:
    /// tests, the simulator, the response store). Encodes the body once to compute it.
    pub fn into_response(self) -> Response {
        let Answer { mut response, seal: with } = self;
        if let Some(with) = with {
            seal(&with.key, &with.binding, &mut response);
        }
        response
    }
}

/// Computes the MAC of a response kept as a value and sets it (an answer that is sent goes
/// through [`Answer::encode`] instead, which MACs the bytes it writes). Encodes the body once
/// into a scratch buffer; no-op for a response without a trailing MAC.
pub fn seal(key: &CardKey, binding: &Mac, response: &mut Response) {
    if !has_trailing_mac(response) {
        return;
    }
    let mut body = BytesMut::with_capacity(128);
    // A body that cannot be encoded cannot be sent either; its MAC stays empty and the
    // connection's encode reports the error.
    if response.encode_body(&mut body).is_err() || body.len() < MAC_LEN {
        return;
    }
    let split = body.len() - MAC_LEN;
    let mac = key.response_mac(response.message_type() as u8, binding, &body[..split]);
    if let Some(slot) = response.mac_mut() {
        *slot = mac;
    }
}

/// True for the responses whose body ends in a response MAC over the rest of it (every
/// card-related single answer, the 1.2 transit answers included); false for ServerInfo, OfflineResults, HotlistChanges and Error.
pub fn has_trailing_mac(response: &Response) -> bool {
    matches!(
        response,
        Response::Purchase(_)
            | Response::TopUp(_)
            | Response::Balance(_)
            | Response::History(_)
            | Response::Identity(_)
            | Response::Issue(_)
            | Response::Replace(_)
            | Response::Block(_)
            | Response::Unblock(_)
            | Response::Close(_)
            | Response::TapIn(_)
            | Response::TapOut(_)
            | Response::Inquiry(_)
            | Response::Reversal(_)
            | Response::Funds(_)
            | Response::SetProduct(_)
            | Response::FundsProduct(_)
    )
}

/// Fills in the MAC of one card result (an offline batch record, whose MACs differ record by
/// record), encoding its 29 covered bytes on the stack. `response_type` is the type of the
/// response that carries it.
pub fn seal_card_result(
    key: &CardKey,
    response_type: MessageType,
    binding: &Mac,
    result: &mut CardResult,
) {
    let mut bytes = [0u8; CARD_RESULT_LEN];
    let mut writer = &mut bytes[..];
    put_card_result(&mut writer, result);
    let covered = CARD_RESULT_LEN - MAC_LEN;
    result.mac = key.response_mac(response_type as u8, binding, &bytes[..covered]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{response_mac_ok, staff_binding};
    use crate::KeyVersion;

    fn key() -> CardKey {
        CardKey::derive(&[9; 32], KeyVersion(1), CardId(42))
    }

    fn auth() -> CardAuth {
        CardAuth { card_id: CardId(42), atc: Atc(7), nonce: 3, cryptogram: Mac([5; 16]) }
    }

    fn all_requests() -> Vec<Request> {
        let auth = auth();
        let record = OfflineRecord {
            card_id: CardId(43),
            atc: Atc(2),
            amount: Amount(10),
            time_ms: 1,
            nonce: 2,
            certificate: Mac([1; 16]),
        };
        vec![
            Request::Hello { client_time_ms: 1 },
            Request::Purchase { auth, amount: Amount(5) },
            Request::TopUp { auth, amount: Amount(5) },
            Request::Balance { auth },
            Request::History { auth, before_seq: 0, limit: 10 },
            Request::Identity { auth },
            Request::Issue { op_ref: 1, deposit: Amount(0) },
            Request::Block { op_ref: 2, card_id: CardId(42), reason: crate::BlockReason::Lost },
            Request::Unblock { op_ref: 3, card_id: CardId(42) },
            Request::Replace { op_ref: 4, card_id: CardId(42) },
            Request::Close { op_ref: 5, card_id: CardId(42) },
            Request::OfflineBatch { records: vec![record, record] },
            Request::HotlistSync { cursor: Vec::new(), max_entries: 0 },
            Request::NumberedOfflineBatch {
                records: vec![crate::NumberedRecord { record, terminal_seq: 9, flags: 1 }],
            },
        ]
    }

    #[test]
    fn every_request_is_declined_with_its_own_response_type_and_status() {
        for request in all_requests() {
            for status in [Status::Busy, Status::NotPermitted, Status::Unavailable] {
                let response = decline(&request, status);
                match request {
                    Request::Hello { .. } | Request::HotlistSync { .. } => {
                        assert_eq!(response.message_type(), MessageType::Error, "{request:?}");
                    }
                    _ => {
                        assert_eq!(response.message_type(), request.response_type());
                        assert_eq!(response.status(), Some(status), "{request:?}");
                    }
                }
            }
        }
        let replaced = decline(&Request::Replace { op_ref: 1, card_id: CardId(9) }, Status::Busy);
        assert!(matches!(replaced, Response::Replace(r) if r.replaced_card_id == CardId(9)));
        let batch = decline(&all_requests()[11], Status::Busy);
        let Response::OfflineBatch(results) = batch else { panic!("not a batch") };
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|r| r.card_id == CardId(43) && r.atc == Atc(2)));
        let numbered = decline(&all_requests()[13], Status::Busy);
        let Response::NumberedOfflineBatch(n) = numbered else { panic!("not a numbered batch") };
        assert_eq!((n.highest_seq, n.results.len()), (0, 1));
        assert_eq!(n.results[0].terminal_seq, 9);
        assert_eq!(n.results[0].result.status, Status::Busy);
    }

    #[test]
    fn response_types_answer_requests_only() {
        assert_eq!(response_type(MessageType::Purchase), Some(MessageType::PurchaseResult));
        assert_eq!(response_type(MessageType::HotlistSync), Some(MessageType::HotlistChanges));
        assert_eq!(response_type(MessageType::PurchaseResult), None);
        assert_eq!(response_type(MessageType::Error), None);
        for request in all_requests() {
            assert_eq!(
                request.response_type() as u8,
                request.message_type() as u8 | 0x80,
                "{request:?}"
            );
        }
    }

    /// The MAC the one-pass encode writes is the one a terminal checks, and the same one
    /// `into_response` puts in the value: the wire bytes of both paths are identical.
    #[test]
    fn the_sealed_encode_matches_the_sealed_value() {
        let responses = [
            Response::Purchase(CardResult {
                balance: Amount(990),
                journal_seq: 77,
                ..decline_card(Status::Approved, &auth())
            }),
            Response::History(decline_history(Status::Approved, &auth())),
            Response::Identity(decline_identity(Status::Replay, &auth())),
            Response::Close(decline_staff(Status::Approved, CardId(42))),
            Response::Replace(decline_issue(Status::Approved, CardId(41))),
        ];
        for response in responses {
            let binding = staff_binding(99);
            let answer = Answer::sealed(response, key(), binding);
            let mut wire = BytesMut::new();
            answer.encode(RequestId(5), &mut wire).expect("encode");
            let body = &wire[HEADER_LEN..];
            assert!(response_mac_ok(&key(), answer.message_type() as u8, &binding, body));
            let value = answer.into_response();
            assert_ne!(value.clone().mac_mut().copied(), Some(Mac::default()));
            let mut again = BytesMut::new();
            value.encode(RequestId(5), &mut again).expect("encode");
            assert_eq!(wire, again, "{value:?}");
        }
    }

    #[test]
    fn a_plain_answer_is_the_response_as_it_stands() {
        let response = decline(&all_requests()[1], Status::Busy);
        let mut wire = BytesMut::new();
        Answer::plain(response.clone()).encode(RequestId(1), &mut wire).expect("encode");
        let mut direct = BytesMut::new();
        response.encode(RequestId(1), &mut direct).expect("encode");
        assert_eq!(wire, direct);
        assert_eq!(&wire[wire.len() - MAC_LEN..], &[0u8; MAC_LEN]);
    }

    #[test]
    fn an_offline_batch_takes_no_answer_seal_and_its_records_seal_one_by_one() {
        let batch = decline(&all_requests()[11], Status::Approved);
        assert!(!Answer::sealed(batch, key(), Mac([1; 16])).is_sealed());
        let mut record = decline_card(Status::Approved, &auth());
        seal_card_result(&key(), MessageType::OfflineResults, &Mac([1; 16]), &mut record);
        let mut body = BytesMut::new();
        Response::Balance(record).encode_body(&mut body).expect("encode");
        assert!(response_mac_ok(&key(), MessageType::OfflineResults as u8, &Mac([1; 16]), &body));
    }

    #[test]
    fn a_failed_encode_writes_nothing() {
        let too_many = Response::OfflineBatch(vec![
            decline_card(Status::Busy, &auth());
            crate::MAX_OFFLINE_RECORDS + 1
        ]);
        let mut out = BytesMut::from(&b"kept"[..]);
        assert!(Answer::plain(too_many).encode(RequestId(1), &mut out).is_err());
        assert_eq!(&out[..], b"kept");
    }
}
