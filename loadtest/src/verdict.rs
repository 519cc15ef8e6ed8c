//! How one answer turned out for the load tester: the client's checked answer or error, sorted
//! into a [`Verdict`] that says what is known of the card afterwards (its balance believed only
//! from an authenticated answer).

use citycard_client::ClientError;
use citycard_protocol::{CardResult, IdentityResult, InquiryResult, Mac, Status, TransitResult};

use crate::mix::Op;

/// A checked answer from the client.
#[derive(Debug)]
pub enum Answer {
    Card(CardResult),
    Identity(IdentityResult),
    Transit(TransitResult),
    Inquiry(InquiryResult),
}

/// How an answer turned out.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A well-formed answer for the right card: its status, and the balance it reports when it
    /// is authenticated (carries a valid MAC) and is a card result.
    Answer { status: Status, balance: Option<i64> },
    /// The request was never sent (no connection): its outcome is known, nothing happened.
    NotSent { kind: String },
    /// No answer within the timeout: the outcome is unknown.
    Timeout,
    /// No usable answer: the request's outcome is unknown.
    Failed { kind: String, bad_mac: bool },
}

/// Statuses the server sends without a MAC (the card was not authenticated).
pub fn unauthenticated(status: Status) -> bool {
    matches!(
        status,
        Status::UnknownCard
            | Status::BadCryptogram
            | Status::KeyVersionRetired
            | Status::NotPermitted
            | Status::Busy
            | Status::Unavailable
    )
}

/// Turns the client's outcome into a verdict. The client has already checked the answer's
/// type, card, ATC and (when it was given the key) its MAC; a balance is believed only from an
/// authenticated answer. `floor`: the floor server decides nothing, so every answer there is an
/// approval without a balance.
pub fn judge(op: Op, outcome: Result<Answer, ClientError>, floor: bool) -> Verdict {
    let answer = match outcome {
        Ok(answer) => answer,
        Err(error) => return failure(op, &error),
    };
    if floor {
        return Verdict::Answer { status: Status::Approved, balance: None };
    }
    match answer {
        Answer::Card(r) if r.mac == Mac::default() && unauthenticated(r.status) => {
            Verdict::Answer { status: r.status, balance: None }
        }
        Answer::Card(r) => Verdict::Answer { status: r.status, balance: Some(r.balance.0) },
        Answer::Identity(i) => Verdict::Answer { status: i.status, balance: None },
        Answer::Transit(t) if t.mac == Mac::default() && unauthenticated(t.status) => {
            Verdict::Answer { status: t.status, balance: None }
        }
        Answer::Transit(t) => Verdict::Answer { status: t.status, balance: Some(t.balance.0) },
        Answer::Inquiry(i) => Verdict::Answer { status: i.status, balance: None },
    }
}

/// The verdict on a client error (the client sends each request once, so `GaveUp` wraps the
/// one attempt's error).
fn failure(op: Op, error: &ClientError) -> Verdict {
    let failed = |kind: String| Verdict::Failed { kind, bad_mac: false };
    match error {
        ClientError::GaveUp { last, .. } => failure(op, last),
        ClientError::Timeout { .. } => Verdict::Timeout,
        ClientError::Connect { .. }
        | ClientError::ConnectTimeout { .. }
        | ClientError::Alpn
        | ClientError::Tls(_) => Verdict::NotSent { kind: format!("{error}") },
        ClientError::ConnectionLost(_) => failed("connection lost".into()),
        ClientError::BadMac(_) => {
            Verdict::Failed { kind: "bad response MAC".into(), bad_mac: true }
        }
        ClientError::Server { name, .. } => failed(format!("error frame {name}")),
        ClientError::UnexpectedType { got, .. } => {
            failed(format!("{} answered by type {got:#04x}", op.name()))
        }
        ClientError::Mismatch(_) => failed("answer names another card or ATC".into()),
        ClientError::Decode(e) => failed(format!("undecodable answer to {}: {e}", op.name())),
        other => failed(format!("{other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use citycard_protocol::{Amount, Atc, CardId};

    fn result(status: Status, balance: i64, mac: Mac) -> CardResult {
        CardResult {
            status,
            card_id: CardId(77),
            atc: Atc(4),
            balance: Amount(balance),
            journal_seq: 1,
            mac,
        }
    }

    #[test]
    fn judge_believes_balances_of_authenticated_answers_only() {
        let sealed = result(Status::Approved, 900, Mac([7; 16]));
        assert_eq!(
            judge(Op::Purchase, Ok(Answer::Card(sealed)), false),
            Verdict::Answer { status: Status::Approved, balance: Some(900) }
        );
        let busy = result(Status::Busy, 0, Mac::default());
        assert_eq!(
            judge(Op::Purchase, Ok(Answer::Card(busy)), false),
            Verdict::Answer { status: Status::Busy, balance: None }
        );
        // The floor approves everything and reports no balance.
        assert_eq!(
            judge(Op::Balance, Ok(Answer::Card(busy)), true),
            Verdict::Answer { status: Status::Approved, balance: None }
        );
    }

    #[test]
    fn judge_sorts_client_errors_by_what_they_mean_for_the_card() {
        let once = |last: ClientError| ClientError::GaveUp { attempts: 1, last: Box::new(last) };
        assert_eq!(
            judge(Op::Purchase, Err(once(ClientError::Timeout { timeout_ms: 5 })), false),
            Verdict::Timeout
        );
        assert!(matches!(
            judge(
                Op::Purchase,
                Err(ClientError::BadMac(citycard_protocol::MessageType::PurchaseResult)),
                false
            ),
            Verdict::Failed { bad_mac: true, .. }
        ));
        let refused = ClientError::Connect {
            addr: "127.0.0.1:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(matches!(judge(Op::TopUp, Err(once(refused)), false), Verdict::NotSent { .. }));
        assert_eq!(
            judge(Op::Purchase, Err(once(ClientError::ConnectionLost("x".into()))), false),
            Verdict::Failed { kind: "connection lost".into(), bad_mac: false }
        );
        assert!(matches!(
            judge(Op::Purchase, Err(ClientError::Mismatch("ATC")), false),
            Verdict::Failed { bad_mac: false, .. }
        ));
    }
}
