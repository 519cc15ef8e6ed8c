//! Card key derivation, request and response cryptograms, offline certificates and identity
//! assertion bytes. The exact byte layouts are specified in PROTOCOL.md, "Cryptography".

use ring::{hkdf, hmac};

use crate::message::{Amount, Atc, CardId, KeyVersion, Mac};

/// HKDF salt for card keys; changing it changes every card key.
pub const CARD_KEY_SALT: &[u8] = b"citycard card key v1";
const REQUEST_TAG: &[u8; 5] = b"CCRQ\x01";
const RESPONSE_TAG: &[u8; 5] = b"CCRS\x01";
const OFFLINE_TAG: &[u8; 5] = b"CCOF\x01";
const ASSERTION_TAG: &[u8; 5] = b"CCID\x01";
/// Longest terminal id in bytes (it is covered by cryptograms and kept in journal records).
pub const MAX_TERMINAL_ID_LEN: usize = 32;

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// A card's symmetric key with its HMAC key schedule computed once, so a cached `CardKey`
/// costs one HMAC per cryptogram. Debug hides the bytes.
#[derive(Clone)]
pub struct CardKey {
    bytes: [u8; 32],
    hmac: hmac::Key,
}

impl std::fmt::Debug for CardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardKey(..)")
    }
}

impl CardKey {
    /// card key = HKDF-SHA256(salt = [`CARD_KEY_SALT`], ikm = master key,
    /// info = key version (u16 BE) || card id (u64 BE), length 32).
    pub fn derive(master: &[u8; 32], version: KeyVersion, card_id: CardId) -> CardKey {
        let mut info = [0u8; 10];
        info[..2].copy_from_slice(&version.0.to_be_bytes());
        info[2..].copy_from_slice(&card_id.0.to_be_bytes());
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, CARD_KEY_SALT).extract(master);
        let mut bytes = [0u8; 32];
        let info_parts = [&info[..]];
        // Invariant: 32 bytes is far below HKDF-SHA256's 255 * 32 output limit, so neither
        // expand nor fill can fail.
        #[allow(clippy::expect_used)]
        prk.expand(&info_parts, Len32)
            .expect("32-byte HKDF output is within limits")
            .fill(&mut bytes)
            .expect("32-byte HKDF output is within limits");
        CardKey::from_bytes(bytes)
    }

    /// A key received at personalisation (issue/replace answer).
    pub fn from_bytes(bytes: [u8; 32]) -> CardKey {
        CardKey { hmac: hmac::Key::new(hmac::HMAC_SHA256, &bytes), bytes }
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    fn tag(&self, parts: &[&[u8]]) -> Mac {
        let mut ctx = hmac::Context::with_key(&self.hmac);
        for part in parts {
            ctx.update(part);
        }
        let full = ctx.sign();
        let mut mac = [0u8; 16];
        mac.copy_from_slice(&full.as_ref()[..16]);
        Mac(mac)
    }

    /// Request cryptogram: HMAC-SHA256(card key, "CCRQ" 0x01 || type u8 || card id u64 ||
    /// ATC u32 || amount i64 || nonce u64 || terminal id length u8 || terminal id), first 16
    /// bytes. `message_type` is the request's type byte.
    pub fn request_cryptogram(
        &self,
        message_type: u8,
        card_id: CardId,
        atc: Atc,
        amount: Amount,
        nonce: u64,
        terminal_id: &str,
    ) -> Mac {
        let mut fixed = [0u8; 29];
        fixed[0] = message_type;
        fixed[1..9].copy_from_slice(&card_id.0.to_be_bytes());
        fixed[9..13].copy_from_slice(&atc.0.to_be_bytes());
        fixed[13..21].copy_from_slice(&amount.0.to_be_bytes());
        fixed[21..29].copy_from_slice(&nonce.to_be_bytes());
        let terminal = terminal_bytes(terminal_id);
        self.tag(&[REQUEST_TAG, &fixed, &[terminal.len() as u8], terminal])
    }

    /// Offline certificate: HMAC-SHA256(card key, "CCOF" 0x01 || card id u64 || ATC u32 ||
    /// amount i64 || time ms u64 || nonce u64 || terminal id length u8 || terminal id), 16 bytes.
    pub fn offline_certificate(
        &self,
        card_id: CardId,
        atc: Atc,
        amount: Amount,
        time_ms: u64,
        nonce: u64,
        terminal_id: &str,
    ) -> Mac {
        let mut fixed = [0u8; 36];
        fixed[..8].copy_from_slice(&card_id.0.to_be_bytes());
        fixed[8..12].copy_from_slice(&atc.0.to_be_bytes());
        fixed[12..20].copy_from_slice(&amount.0.to_be_bytes());
        fixed[20..28].copy_from_slice(&time_ms.to_be_bytes());
        fixed[28..36].copy_from_slice(&nonce.to_be_bytes());
        let terminal = terminal_bytes(terminal_id);
        self.tag(&[OFFLINE_TAG, &fixed, &[terminal.len() as u8], terminal])
    }

    /// Response cryptogram: HMAC-SHA256(card key, "CCRS" 0x01 || response type u8 ||
    /// binding (16 bytes) || response body without its final 16-byte MAC field), 16 bytes.
    /// The binding is the request cryptogram (card requests), the offline certificate (offline
    /// results) or the op_ref as u64 BE followed by 8 zero bytes (staff operations).
    pub fn response_mac(&self, response_type: u8, binding: &Mac, body_without_mac: &[u8]) -> Mac {
        self.tag(&[RESPONSE_TAG, &[response_type], &binding.0, body_without_mac])
    }

    /// Constant-time check of a 16-byte tag computed by one of the functions above.
    pub fn verify(expected: &Mac, received: &Mac) -> bool {
        let mut diff = 0u8;
        for (a, b) in expected.0.iter().zip(received.0.iter()) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

/// The binding for staff operation responses: op_ref (u64 BE) then 8 zero bytes.
pub fn staff_binding(op_ref: u64) -> Mac {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&op_ref.to_be_bytes());
    Mac(b)
}

/// Terminal ids longer than the limit are cut (the server never issues such ids; cutting keeps
/// the length byte honest instead of panicking).
fn terminal_bytes(terminal_id: &str) -> &[u8] {
    let bytes = terminal_id.as_bytes();
    &bytes[..bytes.len().min(MAX_TERMINAL_ID_LEN)]
}

/// Bytes an identity assertion signature covers: "CCID" 0x01 || card id u64 || ATC u32 ||
/// journal seq u64 || issued ms u64 || expires ms u64 || terminal id length u8 || terminal id.
pub fn assertion_bytes(
    card_id: CardId,
    atc: Atc,
    journal_seq: u64,
    issued_ms: u64,
    expires_ms: u64,
    terminal_id: &str,
) -> Vec<u8> {
    let terminal = terminal_bytes(terminal_id);
    let mut out = Vec::with_capacity(5 + 36 + 1 + terminal.len());
    out.extend_from_slice(ASSERTION_TAG);
    out.extend_from_slice(&card_id.0.to_be_bytes());
    out.extend_from_slice(&atc.0.to_be_bytes());
    out.extend_from_slice(&journal_seq.to_be_bytes());
    out.extend_from_slice(&issued_ms.to_be_bytes());
    out.extend_from_slice(&expires_ms.to_be_bytes());
    out.push(terminal.len() as u8);
    out.extend_from_slice(terminal);
    out
}

/// Checks an identity assertion signature with the server's Ed25519 public key (32 bytes).
pub fn verify_assertion(public_key: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

/// Computes the MAC a response body should carry and writes it into the body's last 16 bytes.
/// Used by the server; clients use [`response_mac_ok`] to check.
pub fn seal_response(key: &CardKey, response_type: u8, binding: &Mac, body: &mut [u8]) {
    let split = body.len().saturating_sub(16);
    let mac = key.response_mac(response_type, binding, &body[..split]);
    body[split..].copy_from_slice(&mac.0);
}

/// Checks the MAC at the end of an encoded response body.
pub fn response_mac_ok(key: &CardKey, response_type: u8, binding: &Mac, body: &[u8]) -> bool {
    if body.len() < 16 {
        return false;
    }
    let split = body.len() - 16;
    let mut received = [0u8; 16];
    received.copy_from_slice(&body[split..]);
    CardKey::verify(&key.response_mac(response_type, binding, &body[..split]), &Mac(received))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_bit_changes_the_request_cryptogram() {
        let key = CardKey::derive(&[7u8; 32], KeyVersion(1), CardId(42));
        let base = key.request_cryptogram(2, CardId(42), Atc(5), Amount(250), 9, "reader-1");
        assert_ne!(base, key.request_cryptogram(2, CardId(43), Atc(5), Amount(250), 9, "reader-1"));
        assert_ne!(base, key.request_cryptogram(2, CardId(42), Atc(6), Amount(250), 9, "reader-1"));
        assert_ne!(base, key.request_cryptogram(2, CardId(42), Atc(5), Amount(251), 9, "reader-1"));
        assert_ne!(base, key.request_cryptogram(2, CardId(42), Atc(5), Amount(250), 8, "reader-1"));
        assert_ne!(base, key.request_cryptogram(2, CardId(42), Atc(5), Amount(250), 9, "reader-2"));
        assert_ne!(base, key.request_cryptogram(3, CardId(42), Atc(5), Amount(250), 9, "reader-1"));
        let other = CardKey::derive(&[7u8; 32], KeyVersion(2), CardId(42));
        assert_ne!(
            base,
            other.request_cryptogram(2, CardId(42), Atc(5), Amount(250), 9, "reader-1")
        );
    }

    #[test]
    fn verify_is_exact() {
        let a = Mac([1; 16]);
        let mut b = a;
        assert!(CardKey::verify(&a, &b));
        for i in 0..128 {
            b = a;
            b.0[i / 8] ^= 1 << (i % 8);
            assert!(!CardKey::verify(&a, &b));
        }
    }

    #[test]
    fn sealed_response_checks_and_tampering_fails() {
        let key = CardKey::derive(&[1u8; 32], KeyVersion(1), CardId(1));
        let binding = Mac([3; 16]);
        let mut body = vec![5u8; 45];
        seal_response(&key, 0x82, &binding, &mut body);
        assert!(response_mac_ok(&key, 0x82, &binding, &body));
        assert!(!response_mac_ok(&key, 0x83, &binding, &body));
        body[3] ^= 1;
        assert!(!response_mac_ok(&key, 0x82, &binding, &body));
    }
}
