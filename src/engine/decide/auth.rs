//! Card authentication as a pure check: the cryptogram or offline certificate against the key
//! passed in. A failure is a decline status that is never journaled and consumes no ATC.

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, CardAuth, MessageType, OfflineRecord, Status};

/// Checks an online request's cryptogram under the card's key.
pub fn request(
    key: &CardKey,
    terminal: &str,
    message_type: MessageType,
    auth: &CardAuth,
    amount: Amount,
) -> Result<(), Status> {
    let expected = key.request_cryptogram(
        message_type as u8,
        auth.card_id,
        auth.atc,
        amount,
        auth.nonce,
        terminal,
    );
    if CardKey::verify(&expected, &auth.cryptogram) {
        Ok(())
    } else {
        Err(Status::BadCryptogram)
    }
}

/// Checks an offline record's certificate under the card's key.
pub fn offline(key: &CardKey, terminal: &str, record: &OfflineRecord) -> Result<(), Status> {
    let expected = key.offline_certificate(
        record.card_id,
        record.atc,
        record.amount,
        record.time_ms,
        record.nonce,
        terminal,
    );
    if CardKey::verify(&expected, &record.certificate) {
        Ok(())
    } else {
        Err(Status::BadCryptogram)
    }
}
