//! The client: typed operations over one pipelined connection, with same-bytes retries,
//! per-card ordering, reconnects and response MAC checks.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use citycard_protocol::crypto::{response_mac_ok, staff_binding, CardKey};
use citycard_protocol::message::CARD_RESULT_LEN;
use citycard_protocol::{
    Amount, BlockReason, CardAuth, CardId, CardResult, Frame, HistoryPage, HotlistChanges,
    IdentityResult, IssueResult, Mac, MessageType, NumberedRecord, NumberedResults, OfflineRecord,
    ProductResult, Request, Response, ServerInfo, StaffResult, Status, MAX_HISTORY_PAGE,
    MAX_HOTLIST_ENTRIES, MAX_OFFLINE_RECORDS,
};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{oneshot, Semaphore};

use crate::config::Config;
use crate::connection::Connection;
use crate::error::ClientError;
use crate::words::error_code_name;

/// A citycard terminal client. Cheap to clone: clones share the connection, the in-flight
/// limit and the per-card ordering.
///
/// **Pipelining.** Calls from many tasks share one connection; each gets a request id and a
/// background reader hands every answer to its caller, whatever order the answers arrive in.
/// At most `max_in_flight` requests are outstanding; further callers wait.
///
/// **Per-card order.** Requests that name a card (every card request and Block, Unblock,
/// Replace, Close) are sent in the order their calls were first polled, and a card's next
/// request is sent only once the previous one has its final answer. That is stricter than
/// the wire needs, on purpose: a request retried after Busy or a lost connection must not be
/// overtaken by the card's next transaction, or the retry would find its ATC used and be
/// declined Replay. Different cards are pipelined freely.
///
/// **Retries.** Busy and Unavailable answers, lost connections, timeouts and the server's
/// Internal, ShuttingDown and TooManyConnections errors are retried with the *same request*
/// (same ATC, nonce and cryptogram, or the same op_ref) after a doubling backoff with jitter,
/// on a new connection where the old one failed. The protocol answers a repeated request with
/// its original answer, so a retry never performs an operation twice. After the last attempt a
/// Busy or Unavailable answer is returned as it is (nothing was done); other failures end in
/// [`ClientError::GaveUp`].
///
/// **MACs.** Pass the card's key where the terminal has it and every authenticated answer is
/// checked: a MAC that does not verify is [`ClientError::BadMac`], never an answer. Without the
/// key (a real card holds it, not the terminal) the answer is returned for the card to check.
/// Issue and Replace answers are always checked with the new card key they carry.
/// ([`Config::unchecked_answers_for_benchmarking`] turns every check off, for benchmarks only.)
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    /// The current connection; replaced when it fails. A tokio mutex because opening a
    /// connection awaits, and concurrent callers should wait for that one connection.
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    slots: Semaphore,
    /// The cards with a request in progress, each with the callers waiting for their turn in
    /// FIFO order (entries leave when the last turn ends, so the map holds at most one entry
    /// per caller). A card nobody waits for costs no allocation: the queue is empty.
    cards: Mutex<HashMap<CardId, VecDeque<oneshot::Sender<()>>>>,
    /// Answers that arrived after their caller had stopped waiting (shared with every
    /// connection this client opens).
    late_answers: Arc<AtomicU64>,
}

/// A card's turn, held for one exchange; dropping it hands the turn to the next waiter.
struct CardTurn<'a> {
    client: &'a Inner,
    card: CardId,
}

impl Drop for CardTurn<'_> {
    fn drop(&mut self) {
        pass_turn(self.client, self.card);
    }
}

/// Gives `card`'s turn to the first waiter still waiting, or ends the card's entry.
fn pass_turn(client: &Inner, card: CardId) {
    let mut cards = client.cards.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(waiters) = cards.get_mut(&card) else { return };
    while let Some(next) = waiters.pop_front() {
        // Fails only when that waiter gave up (its receiver is closed): try the next one.
        if next.send(()).is_ok() {
            return;
        }
    }
    cards.remove(&card);
}

/// A caller waiting for a card's turn. Dropped before it saw the turn (its call was
/// cancelled), it closes its receiver; a turn that arrived all the same is passed on.
struct TurnWait<'a> {
    client: &'a Inner,
    card: CardId,
    turn: Option<oneshot::Receiver<()>>,
}

impl Drop for TurnWait<'_> {
    fn drop(&mut self) {
        let Some(mut turn) = self.turn.take() else { return };
        turn.close();
        if turn.try_recv().is_ok() {
            pass_turn(self.client, self.card);
        }
    }
}

/// Statuses of answers that were produced without authenticating the card: they carry an
/// all-zero MAC (PROTOCOL.md 4.1) and claim nothing about the card.
fn unauthenticated(status: Status, mac: &Mac) -> bool {
    matches!(
        status,
        Status::UnknownCard
            | Status::BadCryptogram
            | Status::NotPermitted
            | Status::Busy
            | Status::Unavailable
            | Status::ReferenceReused
            | Status::SeqConflict
    ) || (status == Status::KeyVersionRetired && *mac == Mac::default())
}

fn expected_answer(request: MessageType) -> MessageType {
    match request {
        MessageType::Hello => MessageType::ServerInfo,
        MessageType::Purchase => MessageType::PurchaseResult,
        MessageType::TopUp => MessageType::TopUpResult,
        MessageType::Balance => MessageType::BalanceResult,
        MessageType::History => MessageType::HistoryPage,
        MessageType::Identity => MessageType::IdentityResult,
        MessageType::Issue => MessageType::IssueResult,
        MessageType::Block => MessageType::BlockResult,
        MessageType::Unblock => MessageType::UnblockResult,
        MessageType::Replace => MessageType::ReplaceResult,
        MessageType::Close => MessageType::CloseResult,
        MessageType::OfflineBatch => MessageType::OfflineResults,
        MessageType::HotlistSync => MessageType::HotlistChanges,
        MessageType::TapIn => MessageType::TapInResult,
        MessageType::TapOut => MessageType::TapOutResult,
        MessageType::Inquiry => MessageType::InquiryResult,
        MessageType::Reversal => MessageType::ReversalResult,
        MessageType::Funds => MessageType::FundsResult,
        MessageType::SetProduct => MessageType::SetProductResult,
        MessageType::NumberedOfflineBatch => MessageType::NumberedOfflineResults,
        // Only requests are sent; a response type here is a bug that the check below reports.
        other => other,
    }
}

/// Busy and Unavailable mean "nothing was done, send the same request again".
fn not_done(response: &Response) -> bool {
    let retry = |s: Status| matches!(s, Status::Busy | Status::Unavailable);
    match response {
        Response::OfflineBatch(results) => results.iter().any(|r| retry(r.status)),
        Response::NumberedOfflineBatch(n) => n.results.iter().any(|r| retry(r.result.status)),
        other => other.status().is_some_and(retry),
    }
}

/// `delay` with equal jitter (between half and all of it), so terminals that lost the same
/// server do not come back in lockstep.
fn jittered(delay_ms: u64) -> Duration {
    let mut bytes = [0u8; 8];
    let random = match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u64::from_be_bytes(bytes),
        Err(_) => 0,
    };
    let half = delay_ms / 2;
    Duration::from_millis(half + random % (delay_ms - half + 1))
}

impl Client {
    /// A client for `config`. No connection is opened until the first call.
    pub fn new(config: Config) -> Result<Client, ClientError> {
        config.validate()?;
        let slots = Semaphore::new(config.max_in_flight);
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                connection: tokio::sync::Mutex::new(None),
                slots,
                cards: Mutex::new(HashMap::new()),
                late_answers: Arc::new(AtomicU64::new(0)),
            }),
        })
    }

    /// The terminal id (certificate CN) cards must compute their cryptograms over.
    pub fn terminal_id(&self) -> &str {
        &self.inner.config.terminal_id
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Answers that came after their request had timed out (and so were not believed or
    /// returned), over the client's life. They are only seen while the connection lives on,
    /// so mostly with [`Config::keep_connection_on_timeout`].
    pub fn late_answers(&self) -> u64 {
        self.inner.late_answers.load(Ordering::Relaxed)
    }

    /// False only under [`Config::unchecked_answers_for_benchmarking`].
    pub(crate) fn checks_answers(&self) -> bool {
        !self.inner.config.unchecked_answers_for_benchmarking
    }

    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.is_alive()) {
            return Ok(connection.clone());
        }
        *slot = None;
        let connection =
            Arc::new(Connection::open(&self.inner.config, self.inner.late_answers.clone()).await?);
        tracing::debug!(server = %self.inner.config.server, "connected");
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn forget(&self, connection: &Arc<Connection>) {
        let mut slot = self.inner.connection.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, connection)) {
            *slot = None;
        }
    }

    async fn card_turn(&self, card: CardId) -> CardTurn<'_> {
        let waiting = {
            let mut cards = self.inner.cards.lock().unwrap_or_else(PoisonError::into_inner);
            match cards.entry(card) {
                Entry::Vacant(free) => {
                    free.insert(VecDeque::new());
                    None
                }
                Entry::Occupied(mut busy) => {
                    let (sender, receiver) = oneshot::channel();
                    busy.get_mut().push_back(sender);
                    Some(receiver)
                }
            }
        };
        let client = &*self.inner;
        if let Some(receiver) = waiting {
            let mut wait = TurnWait { client, card, turn: Some(receiver) };
            if let Some(turn) = wait.turn.as_mut() {
                // The sender is dropped unsent only with the whole map, that is never while
                // this client lives; either way the card is then free.
                let _ = turn.await;
            }
            wait.turn = None;
        }
        CardTurn { client, card }
    }

    /// Sends `request` (retrying as the type's docs say) and returns the final answer with its
    /// frame (the frame's body is what MACs are computed over).
    pub async fn exchange(
        &self,
        request: &Request,
        card: Option<CardId>,
    ) -> Result<(Response, Frame), ClientError> {
        let _turn = match card {
            Some(card) => Some(self.card_turn(card).await),
            None => None,
        };
        let config = &self.inner.config;
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let expected = expected_answer(request.message_type());
        let mut last_error: Option<ClientError> = None;
        let mut last_not_done: Option<(Response, Frame)> = None;
        for attempt in 0..config.retry.attempts {
            if attempt > 0 {
                tokio::time::sleep(jittered(config.retry.backoff_ms(attempt))).await;
            }
            let connection = match self.connection().await {
                Ok(connection) => connection,
                Err(e) if e.is_retryable() => {
                    tracing::debug!(attempt, error = %e, "connect failed; retrying");
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let answer = {
                // The semaphore is never closed, so acquire cannot fail; treat it as a lost
                // connection should that ever change.
                let Ok(_slot) = self.inner.slots.acquire().await else {
                    return Err(ClientError::ConnectionLost("client closed".into()));
                };
                connection.call(request, timeout).await
            };
            let frame = match answer {
                Ok(frame) => frame,
                Err(e) if e.is_retryable() => {
                    tracing::debug!(attempt, error = %e, "no answer; retrying the same request");
                    let timed_out = matches!(e, ClientError::Timeout { .. });
                    if !(timed_out && config.keep_connection_on_timeout) {
                        self.forget(&connection).await;
                    }
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let response = Response::decode_body(frame.message_type, &frame.body)?;
            if let Response::Error { code, message } = response {
                let error = ClientError::Server { code, name: error_code_name(code), message };
                if error.is_retryable() {
                    self.forget(&connection).await;
                    last_error = Some(error);
                    continue;
                }
                return Err(error);
            }
            if frame.message_type != expected {
                return Err(ClientError::UnexpectedType {
                    expected,
                    got: frame.message_type as u8,
                });
            }
            if not_done(&response) {
                last_error = None;
                last_not_done = Some((response, frame));
                continue;
            }
            return Ok((response, frame));
        }
        match (last_not_done, last_error) {
            (Some(answer), None) => Ok(answer),
            (_, Some(last)) => {
                Err(ClientError::GaveUp { attempts: config.retry.attempts, last: Box::new(last) })
            }
            // attempts >= 1 (validated), so one of the two was set.
            (None, None) => Err(ClientError::ConnectionLost("no attempt made".into())),
        }
    }

    /// Hello: the server's view of this terminal (role), its clock, shard count and limits.
    pub async fn hello(&self, client_time_ms: u64) -> Result<ServerInfo, ClientError> {
        match self.exchange(&Request::Hello { client_time_ms }, None).await?.0 {
            Response::ServerInfo(info) => Ok(info),
            other => Err(unexpected(MessageType::ServerInfo, &other)),
        }
    }

    async fn card_result(
        &self,
        request: Request,
        key: Option<&CardKey>,
    ) -> Result<CardResult, ClientError> {
        let auth = *request.card_auth().ok_or(ClientError::Mismatch("not a card request"))?;
        let (response, frame) = self.exchange(&request, Some(auth.card_id)).await?;
        let result = match response {
            Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => r,
            other => return Err(unexpected(expected_answer(request.message_type()), &other)),
        };
        if self.checks_answers() {
            echo(&auth, result.card_id, result.atc)?;
            check_mac(key, result.status, &result.mac, &frame, &auth.cryptogram)?;
        }
        Ok(result)
    }

    /// Purchase of `amount` (reader role). `auth` comes from the card (see [`crate::Card`]);
    /// `key`, when the terminal has it, checks the answer's MAC.
    pub async fn purchase(
        &self,
        auth: &CardAuth,
        amount: Amount,
        key: Option<&CardKey>,
    ) -> Result<CardResult, ClientError> {
        self.card_result(Request::Purchase { auth: *auth, amount }, key).await
    }

    /// Top-up of `amount` (kiosk and counter roles).
    pub async fn top_up(
        &self,
        auth: &CardAuth,
        amount: Amount,
        key: Option<&CardKey>,
    ) -> Result<CardResult, ClientError> {
        self.card_result(Request::TopUp { auth: *auth, amount }, key).await
    }

    /// Balance inquiry (reader and kiosk roles; a counter reads the balance with
    /// [`Client::history`]).
    pub async fn balance(
        &self,
        auth: &CardAuth,
        key: Option<&CardKey>,
    ) -> Result<CardResult, ClientError> {
        self.card_result(Request::Balance { auth: *auth }, key).await
    }

    /// One page of the card's history, newest first: entries below `before_seq` (0 = newest),
    /// at most `limit` (1..=64) of them. Kiosk and counter roles.
    pub async fn history(
        &self,
        auth: &CardAuth,
        before_seq: u64,
        limit: u16,
        key: Option<&CardKey>,
    ) -> Result<HistoryPage, ClientError> {
        let limit = limit.clamp(1, MAX_HISTORY_PAGE as u16);
        let request = Request::History { auth: *auth, before_seq, limit };
        let (response, frame) = self.exchange(&request, Some(auth.card_id)).await?;
        let Response::History(page) = response else {
            return Err(unexpected(MessageType::HistoryPage, &response));
        };
        if self.checks_answers() {
            echo(auth, page.card_id, page.atc)?;
            check_mac(key, page.status, &page.mac, &frame, &auth.cryptogram)?;
        }
        Ok(page)
    }

    /// An identity assertion for the card, signed by the server (kiosk and counter roles).
    /// Check the signature with [`crate::verify_identity`].
    pub async fn identity(
        &self,
        auth: &CardAuth,
        key: Option<&CardKey>,
    ) -> Result<IdentityResult, ClientError> {
        let (response, frame) =
            self.exchange(&Request::Identity { auth: *auth }, Some(auth.card_id)).await?;
        let Response::Identity(result) = response else {
            return Err(unexpected(MessageType::IdentityResult, &response));
        };
        if self.checks_answers() {
            echo(auth, result.card_id, result.atc)?;
            check_mac(key, result.status, &result.mac, &frame, &auth.cryptogram)?;
        }
        Ok(result)
    }

    /// Issues a new card with `deposit` (counter role). `op_ref` must be unique per staff
    /// operation of this terminal; retrying with the same op_ref gets the original answer.
    /// An approval's MAC is checked under the new card key it carries.
    pub async fn issue(&self, op_ref: u64, deposit: Amount) -> Result<IssueResult, ClientError> {
        let (response, frame) = self.exchange(&Request::Issue { op_ref, deposit }, None).await?;
        let Response::Issue(result) = response else {
            return Err(unexpected(MessageType::IssueResult, &response));
        };
        if self.checks_answers() {
            check_issue(op_ref, &result, &frame)?;
        }
        Ok(result)
    }

    /// Protocol 1.3: issues a new card of `product` with `deposit` as its initial balance (the
    /// product's card deposit is paid on top, PROTOCOL.md 6.12; counter role). Exactly-once by
    /// `op_ref` as [`Client::issue`]; an approval's MAC is checked under the new card key.
    pub async fn issue_product(
        &self,
        op_ref: u64,
        deposit: Amount,
        product: u8,
    ) -> Result<IssueResult, ClientError> {
        let request = Request::IssueProduct { op_ref, deposit, product };
        let (response, frame) = self.exchange(&request, None).await?;
        let Response::Issue(result) = response else {
            return Err(unexpected(MessageType::IssueResult, &response));
        };
        if self.checks_answers() {
            check_issue(op_ref, &result, &frame)?;
        }
        Ok(result)
    }

    /// Protocol 1.3: changes `card`'s product (counter role). The answer tells the deposit
    /// money to take (`deposit_paid`) or pay back (`deposit_refunded`). Its MAC is under the
    /// card's key: pass it when you have it.
    pub async fn set_product(
        &self,
        op_ref: u64,
        card: CardId,
        product: u8,
        key: Option<&CardKey>,
    ) -> Result<ProductResult, ClientError> {
        let request = Request::SetProduct { op_ref, card_id: card, product };
        let (response, frame) = self.exchange(&request, Some(card)).await?;
        let Response::SetProduct(result) = response else {
            return Err(unexpected(MessageType::SetProductResult, &response));
        };
        if self.checks_answers() {
            if result.card_id != card {
                return Err(ClientError::Mismatch("card id"));
            }
            check_mac(key, result.status, &result.mac, &frame, &staff_binding(op_ref))?;
        }
        Ok(result)
    }

    /// Replaces `card` by a new one that receives its balance (counter role).
    pub async fn replace(&self, op_ref: u64, card: CardId) -> Result<IssueResult, ClientError> {
        let request = Request::Replace { op_ref, card_id: card };
        let (response, frame) = self.exchange(&request, Some(card)).await?;
        let Response::Replace(result) = response else {
            return Err(unexpected(MessageType::ReplaceResult, &response));
        };
        if result.status == Status::Approved && result.replaced_card_id != card {
            return Err(ClientError::Mismatch("replaced card id"));
        }
        if self.checks_answers() {
            check_issue(op_ref, &result, &frame)?;
        }
        Ok(result)
    }

    async fn staff(
        &self,
        request: Request,
        op_ref: u64,
        card: CardId,
        key: Option<&CardKey>,
    ) -> Result<StaffResult, ClientError> {
        let (response, frame) = self.exchange(&request, Some(card)).await?;
        let result = match response {
            Response::Block(r) | Response::Unblock(r) | Response::Close(r) => r,
            other => return Err(unexpected(expected_answer(request.message_type()), &other)),
        };
        if self.checks_answers() {
            if result.card_id != card {
                return Err(ClientError::Mismatch("card id"));
            }
            check_mac(key, result.status, &result.mac, &frame, &staff_binding(op_ref))?;
        }
        Ok(result)
    }

    /// Blocks `card` for `reason` (Lost..=Other; counter role). The MAC is under the card's
    /// key, which a counter usually does not hold: pass it when you have it.
    pub async fn block(
        &self,
        op_ref: u64,
        card: CardId,
        reason: BlockReason,
        key: Option<&CardKey>,
    ) -> Result<StaffResult, ClientError> {
        if matches!(reason, BlockReason::Overdrawn | BlockReason::Retired) {
            return Err(ClientError::Config("staff may block for reasons 1..=5 only".into()));
        }
        self.staff(Request::Block { op_ref, card_id: card, reason }, op_ref, card, key).await
    }

    /// Unblocks a blocked `card` (counter role).
    pub async fn unblock(
        &self,
        op_ref: u64,
        card: CardId,
        key: Option<&CardKey>,
    ) -> Result<StaffResult, ClientError> {
        self.staff(Request::Unblock { op_ref, card_id: card }, op_ref, card, key).await
    }

    /// Closes `card` and refunds its balance (counter role).
    pub async fn close(
        &self,
        op_ref: u64,
        card: CardId,
        key: Option<&CardKey>,
    ) -> Result<StaffResult, ClientError> {
        self.staff(Request::Close { op_ref, card_id: card }, op_ref, card, key).await
    }

    /// Uploads offline records (reader role, at most 256 per call). `key_of` gives the card
    /// key for a record's card where the reader has it (None: that result is not checked).
    /// Results come back in the order of the records.
    pub async fn offline_batch(
        &self,
        records: &[OfflineRecord],
        key_of: impl Fn(CardId) -> Option<CardKey>,
    ) -> Result<Vec<CardResult>, ClientError> {
        if records.len() > MAX_OFFLINE_RECORDS {
            return Err(ClientError::Config(format!(
                "at most {MAX_OFFLINE_RECORDS} offline records per batch"
            )));
        }
        let request = Request::OfflineBatch { records: records.to_vec() };
        let (response, frame) = self.exchange(&request, None).await?;
        let Response::OfflineBatch(results) = response else {
            return Err(unexpected(MessageType::OfflineResults, &response));
        };
        if results.len() != records.len() {
            return Err(ClientError::Mismatch("number of offline results"));
        }
        if !self.checks_answers() {
            return Ok(results);
        }
        for (i, (record, result)) in records.iter().zip(&results).enumerate() {
            if result.card_id != record.card_id || result.atc != record.atc {
                return Err(ClientError::Mismatch("offline result card or ATC"));
            }
            let Some(key) = key_of(record.card_id) else { continue };
            if unauthenticated(result.status, &result.mac) {
                continue;
            }
            // Each result's MAC covers its own first 29 bytes (PROTOCOL.md 7.4).
            let start = 2 + i * CARD_RESULT_LEN;
            let covered = frame
                .body
                .get(start..start + CARD_RESULT_LEN - 16)
                .ok_or(ClientError::Mismatch("offline results body length"))?;
            let expected =
                key.response_mac(MessageType::OfflineResults as u8, &record.certificate, covered);
            if !CardKey::verify(&expected, &result.mac) {
                return Err(ClientError::BadMac(MessageType::OfflineResults));
            }
        }
        Ok(results)
    }

    /// Protocol 1.3: uploads records numbered by this reader (at most 256 per call, seqs
    /// strictly increasing; an empty slice asks for the highest seq the server has recorded).
    /// `key_of` as for [`Client::offline_batch`]. A retry of the same records is answered
    /// their first results (PROTOCOL.md 6.13), so a lost answer is safe to send again.
    pub async fn numbered_offline_batch(
        &self,
        records: &[NumberedRecord],
        key_of: impl Fn(CardId) -> Option<CardKey>,
    ) -> Result<NumberedResults, ClientError> {
        if records.len() > MAX_OFFLINE_RECORDS {
            return Err(ClientError::Config(format!(
                "at most {MAX_OFFLINE_RECORDS} offline records per batch"
            )));
        }
        if records.windows(2).any(|w| w[1].terminal_seq <= w[0].terminal_seq)
            || records.first().is_some_and(|r| r.terminal_seq == 0)
        {
            return Err(ClientError::Config(
                "terminal seqs start at 1 and increase strictly within a batch".into(),
            ));
        }
        let request = Request::NumberedOfflineBatch { records: records.to_vec() };
        let (response, frame) = self.exchange(&request, None).await?;
        let Response::NumberedOfflineBatch(answer) = response else {
            return Err(unexpected(MessageType::NumberedOfflineResults, &response));
        };
        if answer.results.len() != records.len() {
            return Err(ClientError::Mismatch("number of numbered offline results"));
        }
        if !self.checks_answers() {
            return Ok(answer);
        }
        for (i, (sent, got)) in records.iter().zip(&answer.results).enumerate() {
            let (record, result) = (&sent.record, &got.result);
            if got.terminal_seq != sent.terminal_seq
                || result.card_id != record.card_id
                || result.atc != record.atc
            {
                return Err(ClientError::Mismatch("numbered offline result seq, card or ATC"));
            }
            let Some(key) = key_of(record.card_id) else { continue };
            if unauthenticated(result.status, &result.mac) {
                continue;
            }
            // highest_seq and count, then terminal_seq before each result (PROTOCOL.md 3.3);
            // each MAC covers its result's first 29 bytes, type byte 0x94 (7.4).
            let start = 10 + i * (8 + CARD_RESULT_LEN) + 8;
            let covered = frame
                .body
                .get(start..start + CARD_RESULT_LEN - 16)
                .ok_or(ClientError::Mismatch("numbered offline results body length"))?;
            let t = MessageType::NumberedOfflineResults;
            let expected = key.response_mac(t as u8, &record.certificate, covered);
            if !CardKey::verify(&expected, &result.mac) {
                return Err(ClientError::BadMac(t));
            }
        }
        Ok(answer)
    }

    /// One round of hotlist sync (reader role): changes after `cursor` (empty = from the
    /// start). Repeat with the returned cursor while `more` is set.
    pub async fn hotlist_sync(
        &self,
        cursor: &[u64],
        max_entries: u16,
    ) -> Result<HotlistChanges, ClientError> {
        let max_entries = max_entries.clamp(1, MAX_HOTLIST_ENTRIES as u16);
        let request = Request::HotlistSync { cursor: cursor.to_vec(), max_entries };
        match self.exchange(&request, None).await?.0 {
            Response::HotlistSync(changes) => Ok(changes),
            other => Err(unexpected(MessageType::HotlistChanges, &other)),
        }
    }
}

pub(crate) fn unexpected(expected: MessageType, got: &Response) -> ClientError {
    ClientError::UnexpectedType { expected, got: got.message_type() as u8 }
}

pub(crate) fn echo(
    auth: &CardAuth,
    card: CardId,
    atc: citycard_protocol::Atc,
) -> Result<(), ClientError> {
    if card != auth.card_id {
        return Err(ClientError::Mismatch("card id"));
    }
    if atc != auth.atc {
        return Err(ClientError::Mismatch("ATC"));
    }
    Ok(())
}

pub(crate) fn check_mac(
    key: Option<&CardKey>,
    status: Status,
    mac: &Mac,
    frame: &Frame,
    binding: &Mac,
) -> Result<(), ClientError> {
    let Some(key) = key else { return Ok(()) };
    if unauthenticated(status, mac) {
        return Ok(());
    }
    if response_mac_ok(key, frame.message_type as u8, binding, &frame.body) {
        Ok(())
    } else {
        Err(ClientError::BadMac(frame.message_type))
    }
}

fn check_issue(op_ref: u64, result: &IssueResult, frame: &Frame) -> Result<(), ClientError> {
    if result.status != Status::Approved {
        return Ok(());
    }
    let key = CardKey::from_bytes(result.card_key);
    if response_mac_ok(&key, frame.message_type as u8, &staff_binding(op_ref), &frame.body) {
        Ok(())
    } else {
        Err(ClientError::BadMac(frame.message_type))
    }
}
