//! Counter operations and their answers in words, shared by the web page and the CLI.

use citycard_client::words::{
    block_reason_name, card_state_name, entry_kind_name, money, status_name, status_words,
};
use citycard_client::{Client, ClientError};
use citycard_protocol::{
    Amount, BlockReason, CardId, HistoryPage, IssueResult, MessageType, StaffResult, Status,
    MAX_HISTORY_PAGE,
};
use serde::Serialize;

use super::cards::DevCards;

/// Largest amount staff may type, in minor units (a guard against typos far beyond any real
/// balance cap; the server applies its configured limits on top).
pub const MAX_TYPED_AMOUNT: i64 = 10_000_000_000;

/// One staff action with its inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Issue {
        deposit: Amount,
    },
    TopUp {
        card: CardId,
        amount: Amount,
    },
    Balance {
        card: CardId,
    },
    History {
        card: CardId,
        before_seq: u64,
        limit: u16,
    },
    Block {
        card: CardId,
        reason: BlockReason,
    },
    Unblock {
        card: CardId,
    },
    Replace {
        card: CardId,
    },
    Close {
        card: CardId,
    },
    /// Protocol 1.3: change the card's product (e.g. register an anonymous card).
    SetProduct {
        card: CardId,
        product: u8,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Issue { .. } => "issue",
            Op::TopUp { .. } => "top-up",
            Op::Balance { .. } => "balance",
            Op::History { .. } => "history",
            Op::Block { .. } => "block",
            Op::Unblock { .. } => "unblock",
            Op::Replace { .. } => "replace",
            Op::Close { .. } => "close",
            Op::SetProduct { .. } => "set product",
        }
    }
}

/// A field of an answer, for display.
#[derive(Clone, Debug, Serialize)]
pub struct Field {
    pub name: &'static str,
    pub value: String,
}

/// One history line, for display.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryRow {
    pub journal_seq: u64,
    pub kind: &'static str,
    pub status: &'static str,
    pub amount: String,
    pub balance_after: String,
    pub time_ms: u64,
}

/// The server's answer to one action (or why there is none), ready to show.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    pub operation: &'static str,
    /// Status name (`Approved`, `CardBlocked`, ...), or `Error` when there is no answer.
    pub status: &'static str,
    pub approved: bool,
    /// The outcome in words.
    pub message: String,
    /// The card the action was about, masked (`****1234`).
    pub card: Option<String>,
    /// A card number staff must hand over or type later: the card a successful issue or
    /// replace created. Shown in full.
    pub new_card: Option<u64>,
    /// Balance in minor units, when the answer carries an authenticated one.
    pub balance_minor: Option<i64>,
    pub fields: Vec<Field>,
    pub history: Vec<HistoryRow>,
    pub op_ref: Option<u64>,
}

impl Answer {
    fn new(op: &Op, status: Status) -> Answer {
        Answer {
            operation: op.name(),
            status: status_name(status),
            approved: status == Status::Approved,
            message: status_words(status).to_owned(),
            card: None,
            new_card: None,
            balance_minor: None,
            fields: Vec::new(),
            history: Vec::new(),
            op_ref: None,
        }
    }

    /// No answer from the server (or no way to ask): the reason in words.
    pub fn failed(operation: &'static str, message: String) -> Answer {
        Answer {
            operation,
            status: "Error",
            approved: false,
            message,
            card: None,
            new_card: None,
            balance_minor: None,
            fields: Vec::new(),
            history: Vec::new(),
            op_ref: None,
        }
    }

    fn field(&mut self, name: &'static str, value: impl Into<String>) {
        self.fields.push(Field { name, value: value.into() });
    }

    fn balance(&mut self, minor: i64) {
        self.balance_minor = Some(minor);
        self.field("balance", money(minor));
    }

    /// Plain text for the CLI.
    pub fn to_text(&self) -> String {
        let mut out = format!("{}: {}\n", self.operation, self.message);
        if let Some(card) = &self.card {
            out.push_str(&format!("  card: {card}\n"));
        }
        if let Some(card) = self.new_card {
            out.push_str(&format!("  new card: {card}\n"));
        }
        for field in &self.fields {
            out.push_str(&format!("  {}: {}\n", field.name, field.value));
        }
        for row in &self.history {
            out.push_str(&format!(
                "  #{} {} {} {} -> {}\n",
                row.journal_seq, row.kind, row.status, row.amount, row.balance_after
            ));
        }
        if let Some(op_ref) = self.op_ref {
            out.push_str(&format!("  op_ref: {op_ref} (repeat it to retry this operation)\n"));
        }
        out
    }
}

/// Parses money typed by staff: `20`, `20.5`, `20.50` (currency units, at most two decimals).
pub fn parse_amount(text: &str) -> Result<Amount, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not an amount like 20 or 20.50");
    let (units, cents) = match text.split_once('.') {
        Some((units, cents)) => (units, cents),
        None => (text, ""),
    };
    if units.is_empty() || units.len() > 12 || !units.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if cents.len() > 2 || !cents.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let units: i64 = units.parse().map_err(|_| bad())?;
    let cents: i64 = match cents.len() {
        0 => 0,
        1 => cents.parse::<i64>().map_err(|_| bad())? * 10,
        _ => cents.parse().map_err(|_| bad())?,
    };
    let minor = units.checked_mul(100).and_then(|u| u.checked_add(cents)).ok_or_else(bad)?;
    if minor > MAX_TYPED_AMOUNT {
        return Err(format!("{text} is above the console's limit of {}", money(MAX_TYPED_AMOUNT)));
    }
    Ok(Amount(minor))
}

/// Parses a card number typed by staff (digits; spaces and dashes between groups allowed).
pub fn parse_card(text: &str) -> Result<CardId, String> {
    let digits: String = text.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a card number is up to 20 digits".to_owned());
    }
    digits.parse::<u64>().map(CardId).map_err(|_| "the card number is too large".to_owned())
}

/// Parses a block reason by name or number (staff reasons 1..=5 only).
pub fn parse_reason(text: &str) -> Result<BlockReason, String> {
    let reason = match text.trim().to_ascii_lowercase().as_str() {
        "1" | "lost" => BlockReason::Lost,
        "2" | "stolen" => BlockReason::Stolen,
        "3" | "damaged" => BlockReason::Damaged,
        "4" | "fraud" | "fraudsuspected" | "fraud-suspected" => BlockReason::FraudSuspected,
        "5" | "other" => BlockReason::Other,
        _ => return Err(format!("{text:?} is not a reason (lost, stolen, damaged, fraud, other)")),
    };
    Ok(reason)
}

/// The counter: its client and, in development, the card simulator.
pub struct Counter {
    pub client: Client,
    pub cards: Option<DevCards>,
}

const NO_CARD_READER: &str = "this operation needs the card's cryptogram, and this console has no \
     card reader: start it with --dev-card-keys KEYS/issuer.key to simulate cards (development \
     only)";

impl Counter {
    /// Performs `op`; `op_ref` identifies a staff operation (reuse it to retry one).
    pub async fn run(&self, op: &Op, op_ref: u64) -> Answer {
        match self.try_run(op, op_ref).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(operation = op.name(), error = %e, "counter operation failed");
                let mut answer =
                    Answer::failed(op.name(), format!("no answer from the server: {e}"));
                if let Some(card) = op_card(op) {
                    answer.card = Some(card.masked());
                }
                answer
            }
        }
    }

    async fn try_run(&self, op: &Op, op_ref: u64) -> Result<Answer, ClientError> {
        let client = &self.client;
        let mut answer = match op {
            Op::Issue { deposit } => {
                let result = client.issue(op_ref, *deposit).await?;
                issued(op, &result, None)
            }
            Op::Replace { card } => {
                let result = client.replace(op_ref, *card).await?;
                issued(op, &result, Some(*card))
            }
            Op::Block { card, reason } => {
                let result = client.block(op_ref, *card, *reason, None).await?;
                let mut answer = staff(op, &result);
                answer.field("reason", block_reason_name(*reason));
                answer
            }
            Op::Unblock { card } => staff(op, &client.unblock(op_ref, *card, None).await?),
            Op::Close { card } => {
                let result = client.close(op_ref, *card, None).await?;
                let mut answer = staff(op, &result);
                if result.status == Status::Approved {
                    answer.field("refunded", money(result.refunded.0));
                }
                answer
            }
            Op::SetProduct { card, product } => {
                let result = client.set_product(op_ref, *card, *product, None).await?;
                let mut answer = Answer::new(op, result.status);
                answer.card = Some(result.card_id.masked());
                if authenticated(result.status) && result.status != Status::UnknownCard {
                    answer.field("product", result.product.to_string());
                    answer.field("card deposit", money(result.deposit.0));
                    if result.deposit_paid.0 != 0 {
                        answer.field("take deposit", money(result.deposit_paid.0));
                    }
                    if result.deposit_refunded.0 != 0 {
                        answer.field("pay back deposit", money(result.deposit_refunded.0));
                    }
                    answer.balance(result.balance.0);
                }
                if result.journal_seq != 0 {
                    answer.field("journal seq", result.journal_seq.to_string());
                }
                answer
            }
            Op::TopUp { card, amount } => return self.top_up(op, *card, *amount).await,
            Op::Balance { card } | Op::History { card, .. } => {
                return self.read(op, *card).await;
            }
        };
        if !matches!(op, Op::TopUp { .. } | Op::Balance { .. } | Op::History { .. }) {
            answer.op_ref = Some(op_ref);
        }
        Ok(answer)
    }

    async fn top_up(&self, op: &Op, card: CardId, amount: Amount) -> Result<Answer, ClientError> {
        let Some(cards) = &self.cards else {
            return Ok(no_reader(op, card));
        };
        let _turn = cards.turn().await;
        let mut found = match cards.find(&self.client, card).await? {
            Ok(found) => found,
            Err(decline) => return Ok(read_decline(op, &decline)),
        };
        let auth = found.card.auth(MessageType::TopUp, amount, self.client.terminal_id());
        let result = self.client.top_up(&auth, amount, Some(found.card.key())).await?;
        let mut answer = Answer::new(op, result.status);
        answer.card = Some(card.masked());
        answer.field("amount", money(amount.0));
        if authenticated(result.status) {
            answer.balance(result.balance.0);
        }
        if result.journal_seq != 0 {
            answer.field("journal seq", result.journal_seq.to_string());
        }
        Ok(answer)
    }

    async fn read(&self, op: &Op, card: CardId) -> Result<Answer, ClientError> {
        let Some(cards) = &self.cards else {
            return Ok(no_reader(op, card));
        };
        let found = {
            let _turn = cards.turn().await;
            match cards.find(&self.client, card).await? {
                Ok(found) => found,
                Err(decline) => return Ok(read_decline(op, &decline)),
            }
        };
        let mut answer = Answer::new(op, found.newest.status);
        answer.card = Some(card.masked());
        answer.balance(found.newest.balance.0);
        let Op::History { before_seq, limit, .. } = op else { return Ok(answer) };
        let limit = (*limit).clamp(1, MAX_HISTORY_PAGE as u16);
        let page = if *before_seq == 0 && usize::from(limit) == MAX_HISTORY_PAGE {
            found.newest
        } else {
            let auth = found.card.read_auth(MessageType::History, self.client.terminal_id());
            self.client.history(&auth, *before_seq, limit, Some(found.card.key())).await?
        };
        answer.history = page.entries.iter().map(row).collect();
        if page.next_before_seq != 0 {
            answer.field("older entries", format!("before #{}", page.next_before_seq));
        }
        Ok(answer)
    }
}

fn op_card(op: &Op) -> Option<CardId> {
    match op {
        Op::Issue { .. } => None,
        Op::TopUp { card, .. }
        | Op::Balance { card }
        | Op::History { card, .. }
        | Op::Block { card, .. }
        | Op::Unblock { card }
        | Op::Replace { card }
        | Op::Close { card }
        | Op::SetProduct { card, .. } => Some(*card),
    }
}

fn authenticated(status: Status) -> bool {
    !matches!(
        status,
        Status::UnknownCard
            | Status::BadCryptogram
            | Status::NotPermitted
            | Status::Busy
            | Status::Unavailable
            | Status::ReferenceReused
            | Status::KeyVersionRetired
    )
}

fn no_reader(op: &Op, card: CardId) -> Answer {
    let mut answer = Answer::failed(op.name(), NO_CARD_READER.to_owned());
    answer.card = Some(card.masked());
    answer
}

fn read_decline(op: &Op, page: &HistoryPage) -> Answer {
    let mut answer = Answer::new(op, page.status);
    answer.card = Some(page.card_id.masked());
    answer
}

fn row(entry: &citycard_protocol::HistoryEntry) -> HistoryRow {
    HistoryRow {
        journal_seq: entry.journal_seq,
        kind: entry_kind_name(entry.kind),
        status: status_name(entry.status),
        amount: money(entry.amount.0),
        balance_after: money(entry.balance_after.0),
        time_ms: entry.time_ms,
    }
}

fn issued(op: &Op, result: &IssueResult, replaced: Option<CardId>) -> Answer {
    let mut answer = Answer::new(op, result.status);
    answer.card = replaced.map(CardId::masked);
    if result.status == Status::Approved {
        answer.new_card = Some(result.card_id.0);
        answer.balance(result.balance.0);
        answer.field("key version", result.key_version.0.to_string());
        answer.field("journal seq", result.journal_seq.to_string());
    }
    answer
}

fn staff(op: &Op, result: &StaffResult) -> Answer {
    let mut answer = Answer::new(op, result.status);
    answer.card = Some(result.card_id.masked());
    if result.status != Status::UnknownCard && authenticated(result.status) {
        answer.field("card state", card_state_name(result.card_state));
        answer.balance(result.balance.0);
    }
    if result.journal_seq != 0 {
        answer.field("journal seq", result.journal_seq.to_string());
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_amounts() {
        assert_eq!(parse_amount("20"), Ok(Amount(2_000)));
        assert_eq!(parse_amount(" 20.5 "), Ok(Amount(2_050)));
        assert_eq!(parse_amount("0.07"), Ok(Amount(7)));
        for bad in ["", "-1", "1.234", "1,50", "abc", ".5", "1e3", "99999999999999"] {
            assert!(parse_amount(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn typed_card_numbers_and_reasons() {
        assert_eq!(parse_card("1000 0000 0000 0002"), Ok(CardId(1_000_000_000_000_002)));
        assert!(parse_card("12a").is_err());
        assert!(parse_card("99999999999999999999").is_err());
        assert_eq!(parse_reason("Stolen"), Ok(BlockReason::Stolen));
        assert!(parse_reason("retired").is_err());
    }
}
