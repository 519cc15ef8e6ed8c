//! The 16-byte frame header, protocol limits, and splitting a byte stream into frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// First two bytes of every frame: ASCII "CC".
pub const MAGIC: [u8; 2] = *b"CC";
/// The only protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest body accepted or produced, in bytes. The largest legitimate body is a hotlist sync
/// answer (1,024 entries of 18 bytes plus a 64-shard cursor, about 19 KiB) or an offline batch of
/// 256 records (about 13 KiB); 64 KiB leaves room for growth while bounding what a hostile peer
/// can make the server buffer per connection.
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// A request id chosen by the terminal; the response to a request carries the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u32);

macro_rules! message_types {
    ($($name:ident = $code:literal),* $(,)?) => {
        /// Message type byte (header offset 3). Requests are below 0x80, responses at or above.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum MessageType { $($name = $code),* }

        impl MessageType {
            /// Parses a type byte; `None` for an unassigned value.
            pub fn from_u8(value: u8) -> Option<Self> {
                match value { $($code => Some(Self::$name),)* _ => None }
            }
        }
    };
}

message_types! {
    Hello = 0x01,
    Purchase = 0x02,
    TopUp = 0x03,
    Balance = 0x04,
    History = 0x05,
    Identity = 0x06,
    Issue = 0x07,
    Block = 0x08,
    Unblock = 0x09,
    Replace = 0x0A,
    Close = 0x0B,
    OfflineBatch = 0x0C,
    HotlistSync = 0x0D,
    TapIn = 0x0E,
    TapOut = 0x0F,
    Inquiry = 0x10,
    Reversal = 0x11,
    Funds = 0x12,
    SetProduct = 0x13,
    NumberedOfflineBatch = 0x14,
    ServerInfo = 0x81,
    PurchaseResult = 0x82,
    TopUpResult = 0x83,
    BalanceResult = 0x84,
    HistoryPage = 0x85,
    IdentityResult = 0x86,
    IssueResult = 0x87,
    BlockResult = 0x88,
    UnblockResult = 0x89,
    ReplaceResult = 0x8A,
    CloseResult = 0x8B,
    OfflineResults = 0x8C,
    HotlistChanges = 0x8D,
    TapInResult = 0x8E,
    TapOutResult = 0x8F,
    InquiryResult = 0x90,
    ReversalResult = 0x91,
    FundsResult = 0x92,
    SetProductResult = 0x93,
    NumberedOfflineResults = 0x94,
    Error = 0xFF,
}

impl MessageType {
    /// True for request types (sent by terminals).
    pub fn is_request(self) -> bool {
        (self as u8) < 0x80
    }
}

/// Error codes carried in an `Error` frame (see PROTOCOL.md, "Error codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Bytes 0..2 were not "CC". Closes the connection.
    BadMagic = 1,
    /// Unsupported protocol version. Closes the connection.
    BadVersion = 2,
    /// Unassigned message type, or a response type sent by a client. Closes the connection.
    UnknownType = 3,
    /// Body length field above [`MAX_BODY_LEN`]. Closes the connection.
    FrameTooLarge = 4,
    /// Reserved header bits (flags, reserved) not zero. Closes the connection.
    BadHeader = 5,
    /// Body shorter than its type requires. The connection stays open.
    BodyTooShort = 6,
    /// Body longer than its type requires. The connection stays open.
    TrailingBytes = 7,
    /// A field holds a value outside its domain (enum, count over its limit, UTF-8). Open.
    BadValue = 8,
    /// A frame was started but not finished within the frame timeout. Closes the connection.
    FrameTimeout = 9,
    /// The server is at its connection limit. Closes the connection.
    TooManyConnections = 10,
    /// A request id is already in flight on this connection. The connection stays open.
    DuplicateRequestId = 11,
    /// The server failed internally (for example its journal stopped). Closes the connection.
    Internal = 12,
    /// The server is shutting down and takes no new requests. Closes the connection.
    ShuttingDown = 13,
    /// The terminal's role may not send this request and its response type has no status field
    /// to say so (HotlistSync from a kiosk or counter). The connection stays open.
    NotPermitted = 14,
}

impl ErrorCode {
    /// Every code, for reports and exhaustive tests.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadMagic,
        ErrorCode::BadVersion,
        ErrorCode::UnknownType,
        ErrorCode::FrameTooLarge,
        ErrorCode::BadHeader,
        ErrorCode::BodyTooShort,
        ErrorCode::TrailingBytes,
        ErrorCode::BadValue,
        ErrorCode::FrameTimeout,
        ErrorCode::TooManyConnections,
        ErrorCode::DuplicateRequestId,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::NotPermitted,
    ];

    /// Parses a code; `None` for an unassigned value.
    pub fn from_u16(value: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match value {
            1 => BadMagic,
            2 => BadVersion,
            3 => UnknownType,
            4 => FrameTooLarge,
            5 => BadHeader,
            6 => BodyTooShort,
            7 => TrailingBytes,
            8 => BadValue,
            9 => FrameTimeout,
            10 => TooManyConnections,
            11 => DuplicateRequestId,
            12 => Internal,
            13 => ShuttingDown,
            14 => NotPermitted,
            _ => return None,
        })
    }

    /// Whether the server closes the connection after sending this error.
    pub fn closes_connection(self) -> bool {
        !matches!(
            self,
            ErrorCode::BodyTooShort
                | ErrorCode::TrailingBytes
                | ErrorCode::BadValue
                | ErrorCode::DuplicateRequestId
                | ErrorCode::NotPermitted
        )
    }
}

/// Why bytes could not be decoded. Carries the request id whenever the header got that far, so
/// the error frame can name the request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("bad magic 0x{:02x}{:02x} (expected 0x4343, \"CC\")", .0[0], .0[1])]
    BadMagic([u8; 2]),
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("reserved header bits set (flags {flags:#06x}, reserved {reserved:#06x})")]
    BadHeader { flags: u16, reserved: u16, request_id: RequestId },
    #[error("unknown message type {message_type:#04x}")]
    UnknownType { message_type: u8, request_id: RequestId },
    #[error("body length {len} over the maximum {max}")]
    FrameTooLarge { len: u64, max: usize, request_id: RequestId },
    #[error("body of {message_type:?} too short: need at least {needed} bytes, have {have}")]
    BodyTooShort { message_type: MessageType, needed: usize, have: usize, request_id: RequestId },
    #[error("{extra} trailing bytes after the {message_type:?} body")]
    TrailingBytes { message_type: MessageType, extra: usize, request_id: RequestId },
    #[error("bad value in field {field}: {value}")]
    BadValue { field: &'static str, value: u64, request_id: RequestId },
}

impl DecodeError {
    /// The code an error frame reports for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadMagic(_) => ErrorCode::BadMagic,
            DecodeError::BadVersion(_) => ErrorCode::BadVersion,
            DecodeError::BadHeader { .. } => ErrorCode::BadHeader,
            DecodeError::UnknownType { .. } => ErrorCode::UnknownType,
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::BodyTooShort { .. } => ErrorCode::BodyTooShort,
            DecodeError::TrailingBytes { .. } => ErrorCode::TrailingBytes,
            DecodeError::BadValue { .. } => ErrorCode::BadValue,
        }
    }

    /// The request id from the header, where the header was readable that far (`None` for a
    /// bad magic or version). Errors of a body decoded on its own ([`crate::Request::decode_body`],
    /// [`crate::Response::decode_body`]) carry `RequestId(0)` until [`Self::with_request_id`].
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            DecodeError::BadHeader { request_id, .. }
            | DecodeError::UnknownType { request_id, .. }
            | DecodeError::FrameTooLarge { request_id, .. }
            | DecodeError::BodyTooShort { request_id, .. }
            | DecodeError::TrailingBytes { request_id, .. }
            | DecodeError::BadValue { request_id, .. } => Some(*request_id),
            DecodeError::BadMagic(_) | DecodeError::BadVersion(_) => None,
        }
    }

    /// Names the request whose body (or type) failed: the frame header's request id.
    pub fn with_request_id(mut self, id: RequestId) -> Self {
        match &mut self {
            DecodeError::UnknownType { request_id, .. }
            | DecodeError::BodyTooShort { request_id, .. }
            | DecodeError::TrailingBytes { request_id, .. }
            | DecodeError::BadValue { request_id, .. } => *request_id = id,
            _ => {}
        }
        self
    }
}

/// Why a message could not be encoded; nothing was written to the buffer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("{field} has {count} items, over the limit {max}")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error("body of {len} bytes over the maximum {max}")]
    TooLarge { len: usize, max: usize },
    /// An InquiryResult may only embed the answer of a consuming card request.
    #[error("an inquiry answer cannot embed message type {0:#04x}")]
    NotInquirable(u8),
}

/// One frame whose header is valid and whose body is complete but not yet interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub message_type: MessageType,
    pub request_id: RequestId,
    pub body: Bytes,
}

/// Splits one frame off the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed (reserving at most the validated frame length),
/// `Err` when the header is invalid; the header is checked before any body byte is awaited, so a
/// length of 0xFFFFFFFF is refused as soon as the 16 header bytes are in.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        // A wrong magic is reported as soon as two bytes are in, so a non-citycard peer is
        // told early instead of being left waiting for 16 bytes.
        if buf.len() >= 2 && buf[..2] != MAGIC {
            return Err(DecodeError::BadMagic([buf[0], buf[1]]));
        }
        return Ok(None);
    };
    let body_len = parse_header(header)?;
    let total = HEADER_LEN + body_len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let request_id = RequestId(u32::from_be_bytes([header[8], header[9], header[10], header[11]]));
    // Already checked by parse_header; kept as an error rather than a panic.
    let message_type = MessageType::from_u8(header[3])
        .ok_or(DecodeError::UnknownType { message_type: header[3], request_id })?;
    buf.advance(HEADER_LEN);
    let body = buf.split_to(body_len).freeze();
    Ok(Some(Frame { message_type, request_id, body }))
}

/// Validates a 16-byte header and returns the body length.
fn parse_header(header: &[u8]) -> Result<usize, DecodeError> {
    let mut h = header;
    let magic = [h.get_u8(), h.get_u8()];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let version = h.get_u8();
    if version != VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    let type_byte = h.get_u8();
    let flags = h.get_u16();
    let reserved = h.get_u16();
    let request_id = RequestId(h.get_u32());
    let len = h.get_u32();
    if flags != 0 || reserved != 0 {
        return Err(DecodeError::BadHeader { flags, reserved, request_id });
    }
    if MessageType::from_u8(type_byte).is_none() {
        return Err(DecodeError::UnknownType { message_type: type_byte, request_id });
    }
    if len as usize > MAX_BODY_LEN {
        return Err(DecodeError::FrameTooLarge { len: len.into(), max: MAX_BODY_LEN, request_id });
    }
    Ok(len as usize)
}

/// Writes a header for a body of `body_len` bytes.
/// Where the body length (u32) sits in the header: after magic, version, type, flags, reserved
/// and request id.
pub(crate) const BODY_LEN_OFFSET: usize = 12;

pub(crate) fn put_header(
    out: &mut BytesMut,
    message_type: MessageType,
    request_id: RequestId,
    body_len: usize,
) -> Result<(), EncodeError> {
    if body_len > MAX_BODY_LEN {
        return Err(EncodeError::TooLarge { len: body_len, max: MAX_BODY_LEN });
    }
    out.reserve(HEADER_LEN + body_len);
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(message_type as u8);
    out.put_u16(0);
    out.put_u16(0);
    out.put_u32(request_id.0);
    // Checked against MAX_BODY_LEN above, so it fits in u32.
    out.put_u32(body_len as u32);
    Ok(())
}

/// Encodes a frame with an already-encoded body.
pub fn encode_frame(frame: &Frame, out: &mut BytesMut) -> Result<(), EncodeError> {
    put_header(out, frame.message_type, frame.request_id, frame.body.len())?;
    out.put_slice(&frame.body);
    Ok(())
}
