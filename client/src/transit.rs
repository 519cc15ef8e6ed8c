//! The protocol 1.2 requests (PROTOCOL.md 6.7 to 6.10): tap-in and tap-out holds, reversal of a
//! purchase, inquiry about a request whose answer was lost, and funds. Each answer is checked
//! like the 1.1 card answers (card, ATC, response MAC when the key is given).

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    Amount, Atc, CardAuth, InquiryResult, Mac, MessageType, Request, Response, TransitResult,
};

use crate::client::{check_mac, echo, unexpected, Client};
use crate::error::ClientError;

impl Client {
    async fn transit_result(
        &self,
        request: Request,
        key: Option<&CardKey>,
    ) -> Result<TransitResult, ClientError> {
        let auth = *request.card_auth().ok_or(ClientError::Mismatch("not a card request"))?;
        let (response, frame) = self.exchange(&request, Some(auth.card_id)).await?;
        let result = match (request.message_type(), response) {
            (MessageType::TapIn, Response::TapIn(r))
            | (MessageType::TapOut, Response::TapOut(r))
            | (MessageType::Reversal, Response::Reversal(r))
            | (MessageType::Funds, Response::Funds(r)) => r,
            (t, other) => {
                let expected =
                    citycard_protocol::answer_type_of(t).unwrap_or(MessageType::FundsResult);
                return Err(unexpected(expected, &other));
            }
        };
        if self.checks_answers() {
            echo(&auth, result.card_id, result.atc)?;
            check_mac(key, result.status, &result.mac, &frame, &auth.cryptogram)?;
        }
        Ok(result)
    }

    /// Tap-in at an entry gate (reader role): a hold of the server's maximum fare.
    pub async fn tap_in(
        &self,
        auth: &CardAuth,
        key: Option<&CardKey>,
    ) -> Result<TransitResult, ClientError> {
        self.transit_result(Request::TapIn { auth: *auth }, key).await
    }

    /// Tap-out at an exit gate (reader role): completes the card's hold with `fare`.
    pub async fn tap_out(
        &self,
        auth: &CardAuth,
        fare: Amount,
        key: Option<&CardKey>,
    ) -> Result<TransitResult, ClientError> {
        self.transit_result(Request::TapOut { auth: *auth, fare }, key).await
    }

    /// Reverses this terminal's purchase of `amount` made with ATC `original_atc` and request
    /// cryptogram `original_cryptogram` (reader role), with a new ATC of the card in `auth`.
    pub async fn reversal(
        &self,
        auth: &CardAuth,
        amount: Amount,
        original_atc: Atc,
        original_cryptogram: Mac,
        key: Option<&CardKey>,
    ) -> Result<TransitResult, ClientError> {
        let request = Request::Reversal { auth: *auth, amount, original_atc, original_cryptogram };
        self.transit_result(request, key).await
    }

    /// Balance, open hold and spendable balance (reader and kiosk roles).
    pub async fn funds(
        &self,
        auth: &CardAuth,
        key: Option<&CardKey>,
    ) -> Result<TransitResult, ClientError> {
        self.transit_result(Request::Funds { auth: *auth }, key).await
    }

    /// Asks for the answer to `original`, a consuming card request this terminal sent and got
    /// no answer to; nothing is executed. The embedded original answer's MAC is checked too.
    pub async fn inquiry(
        &self,
        original: &Request,
        key: Option<&CardKey>,
    ) -> Result<InquiryResult, ClientError> {
        let auth = *original.card_auth().ok_or(ClientError::Mismatch("not a card request"))?;
        let request = Request::Inquiry {
            auth,
            original_type: original.cryptogram_type(),
            amount: original.cryptogram_amount(),
        };
        let (response, frame) = self.exchange(&request, Some(auth.card_id)).await?;
        let Response::Inquiry(result) = response else {
            return Err(unexpected(MessageType::InquiryResult, &response));
        };
        if self.checks_answers() {
            echo(&auth, result.card_id, result.atc)?;
            check_mac(key, result.status, &result.mac, &frame, &auth.cryptogram)?;
            if let (Some(key), Some(answer)) = (key, result.answer.as_deref()) {
                let mut body = bytes::BytesMut::new();
                answer.encode_body(&mut body).map_err(|_| ClientError::Mismatch("answer"))?;
                let t = answer.message_type();
                if Some(t) != citycard_protocol::answer_type_of(original.message_type()) {
                    return Err(ClientError::Mismatch("answer type"));
                }
                // Only journaled (so authenticated) answers are ever embedded.
                if !citycard_protocol::crypto::response_mac_ok(
                    key,
                    t as u8,
                    &auth.cryptogram,
                    &body,
                ) {
                    return Err(ClientError::BadMac(t));
                }
            }
        }
        Ok(result)
    }
}
