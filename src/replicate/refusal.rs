//! The Unavailable answers sent instead of an unreplicated one: for work refused before it was
//! decided (replication stalled), and for a decided answer whose PostgreSQL commit did not come
//! back within the stall bound. Both are unauthenticated (zero MAC, balance 0, journal_seq 0)
//! and carry nothing of the decision, so a terminal learns nothing it could act on twice.

use citycard_protocol::answer::Answer;
use citycard_protocol::{Amount, CardId, CardResult, CardState, KeyVersion, Mac, Response, Status};

use crate::engine::Output;
use crate::server::worker::Work;

const UNAVAILABLE: Status = Status::Unavailable;

fn card(result: &CardResult) -> CardResult {
    CardResult {
        status: UNAVAILABLE,
        card_id: result.card_id,
        atc: result.atc,
        balance: Amount(0),
        journal_seq: 0,
        mac: Mac::default(),
    }
}

/// The refusal for work that was not decided. None for work that is not refused (a key reload).
pub fn for_work(work: &Work) -> Option<Output> {
    match work {
        Work::Request(request) => {
            Some(Output::Response(citycard_protocol::decline(request, UNAVAILABLE).into()))
        }
        Work::Offline(records) => Some(Output::Offline(
            records
                .iter()
                .map(|(i, r)| {
                    let result = CardResult {
                        status: UNAVAILABLE,
                        card_id: r.card_id,
                        atc: r.atc,
                        balance: Amount(0),
                        journal_seq: 0,
                        mac: Mac::default(),
                    };
                    (*i, result)
                })
                .collect(),
        )),
        // The cursor stays where the terminal had it and `more` tells it to ask again, as for a
        // Busy shard (PROTOCOL.md 3.2).
        Work::Hotlist { since, .. } => {
            Some(Output::Hotlist { version: *since, entries: Vec::new(), more: true })
        }
        Work::Numbered(records) => Some(Output::Numbered {
            results: records
                .iter()
                .map(|(i, n, _)| {
                    let result = citycard_protocol::answer::decline_record(UNAVAILABLE, &n.record);
                    (*i, citycard_protocol::NumberedResult { terminal_seq: n.terminal_seq, result })
                })
                .collect(),
            highest: 0,
        }),
        // Not answered: the connection declines the whole batch (PROTOCOL.md 6.13).
        Work::SeqLookup(_) => {
            Some(Output::SeqLookup { held: Vec::new(), highest: 0, complete: false })
        }
        Work::Reload(_) => None,
    }
}

/// The refusal that replaces a decided answer still waiting for PostgreSQL. The decision stays
/// in the journal and reaches PostgreSQL when it is back: a retry of the same bytes then gets
/// the original answer (or, if this site is lost first, a fresh decision at the other site,
/// which never saw this one).
pub fn for_output(output: Output) -> Output {
    match output {
        Output::Response(answer) => {
            Output::Response(Answer::plain(response_of(answer.into_response())))
        }
        Output::Offline(results) => {
            Output::Offline(results.into_iter().map(|(i, r)| (i, card(&r))).collect())
        }
        Output::Numbered { results, .. } => Output::Numbered {
            results: results
                .into_iter()
                .map(|(i, mut n)| {
                    n.result = card(&n.result);
                    (i, n)
                })
                .collect(),
            highest: 0,
        },
        // A lookup decides nothing; what it read is journaled already.
        lookup @ Output::SeqLookup { .. } => lookup,
        // Entries after `since` start at since + 1 (versions count changes), so the first
        // entry's version less one is the cursor the terminal sent.
        Output::Hotlist { version, entries, .. } => {
            let since = entries.first().map_or(version, |e| e.version.saturating_sub(1));
            Output::Hotlist { version: since, entries: Vec::new(), more: true }
        }
    }
}

fn response_of(response: Response) -> Response {
    match response {
        Response::Purchase(r) => Response::Purchase(card(&r)),
        Response::NumberedOfflineBatch(mut n) => {
            n.results.iter_mut().for_each(|r| r.result = card(&r.result));
            n.highest_seq = 0;
            Response::NumberedOfflineBatch(n)
        }
        Response::TopUp(r) => Response::TopUp(card(&r)),
        Response::Balance(r) => Response::Balance(card(&r)),
        Response::History(mut h) => {
            h.status = UNAVAILABLE;
            h.balance = Amount(0);
            h.entries.clear();
            h.next_before_seq = 0;
            h.mac = Mac::default();
            Response::History(h)
        }
        Response::Identity(mut i) => {
            i.status = UNAVAILABLE;
            i.journal_seq = 0;
            i.issued_ms = 0;
            i.expires_ms = 0;
            i.signature = [0; 64];
            i.mac = Mac::default();
            Response::Identity(i)
        }
        Response::Issue(i) | Response::Replace(i) => {
            let issue = citycard_protocol::IssueResult {
                status: UNAVAILABLE,
                card_id: CardId(0),
                key_version: KeyVersion(0),
                card_key: [0; 32],
                balance: Amount(0),
                replaced_card_id: i.replaced_card_id,
                journal_seq: 0,
                mac: Mac::default(),
            };
            if i.replaced_card_id == CardId(0) {
                Response::Issue(issue)
            } else {
                Response::Replace(issue)
            }
        }
        Response::Block(s) => Response::Block(staff(&s)),
        Response::Unblock(s) => Response::Unblock(staff(&s)),
        Response::Close(s) => Response::Close(staff(&s)),
        Response::OfflineBatch(results) => {
            Response::OfflineBatch(results.iter().map(card).collect())
        }
        Response::TapIn(t) => Response::TapIn(transit(&t)),
        Response::TapOut(t) => Response::TapOut(transit(&t)),
        Response::Reversal(t) => Response::Reversal(transit(&t)),
        Response::Funds(t) => Response::Funds(transit(&t)),
        Response::FundsProduct(f) => {
            Response::FundsProduct(citycard_protocol::FundsProductResult {
                funds: transit(&f.funds),
                product: 0,
                deposit: Amount(0),
                spent_today: Amount(0),
                debits_today: 0,
            })
        }
        // Protocol 1.3: a product change refused: its card, nothing of the decision shown.
        Response::SetProduct(p) => {
            Response::SetProduct(citycard_protocol::answer::decline_product(UNAVAILABLE, p.card_id))
        }
        Response::Inquiry(i) => Response::Inquiry(citycard_protocol::InquiryResult {
            status: UNAVAILABLE,
            card_id: i.card_id,
            atc: i.atc,
            answer: None,
            journal_seq: 0,
            mac: Mac::default(),
        }),
        other @ (Response::ServerInfo(_) | Response::HotlistSync(_) | Response::Error { .. }) => {
            other
        }
    }
}

/// A transit answer (protocol 1.2) refused: its card and ATC, nothing held or charged shown.
fn transit(t: &citycard_protocol::TransitResult) -> citycard_protocol::TransitResult {
    citycard_protocol::answer::decline_transit(
        UNAVAILABLE,
        &citycard_protocol::CardAuth {
            card_id: t.card_id,
            atc: t.atc,
            nonce: 0,
            cryptogram: Mac::default(),
        },
    )
}

fn staff(s: &citycard_protocol::StaffResult) -> citycard_protocol::StaffResult {
    citycard_protocol::StaffResult {
        status: UNAVAILABLE,
        card_id: s.card_id,
        card_state: CardState::Active,
        balance: Amount(0),
        refunded: Amount(0),
        hotlist_version: 0,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citycard_protocol::Atc;

    #[test]
    fn a_held_approval_becomes_an_unauthenticated_unavailable() {
        let approved = CardResult {
            status: Status::Approved,
            card_id: CardId(6_000_000_000_000_001),
            atc: Atc(9),
            balance: Amount(1234),
            journal_seq: 77,
            mac: Mac([7; 16]),
        };
        let Output::Response(answer) =
            for_output(Output::Response(Response::Purchase(approved).into()))
        else {
            panic!("kind changed");
        };
        let Response::Purchase(r) = answer.into_response() else { panic!("kind changed") };
        assert_eq!((r.status, r.card_id, r.atc), (Status::Unavailable, approved.card_id, Atc(9)));
        assert_eq!((r.balance, r.journal_seq, r.mac), (Amount(0), 0, Mac::default()));
    }

    #[test]
    fn an_issued_card_key_never_leaves_in_a_refusal() {
        let issued = citycard_protocol::IssueResult {
            status: Status::Approved,
            card_id: CardId(6_000_000_000_000_002),
            key_version: KeyVersion(1),
            card_key: [9; 32],
            balance: Amount(500),
            replaced_card_id: CardId(0),
            journal_seq: 3,
            mac: Mac([1; 16]),
        };
        let Output::Response(answer) = for_output(Output::Response(Response::Issue(issued).into()))
        else {
            panic!("kind changed");
        };
        let Response::Issue(i) = answer.into_response() else { panic!("kind changed") };
        assert_eq!((i.status, i.card_key, i.card_id), (Status::Unavailable, [0; 32], CardId(0)));
    }
}
