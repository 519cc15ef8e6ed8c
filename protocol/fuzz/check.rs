// Shared by fuzz_targets/decode_frame.rs and tests/fuzz_corpus.rs (via `include!`).

/// Runs `data` through `decode_frame`, `decode_request` and `decode_response` until each stops,
/// panicking if an invariant fails:
/// - `Ok(None)` consumes nothing; a frame consumes exactly its header and body;
/// - no decoder reserves more than one maximal frame;
/// - every decoded request or response re-encodes to exactly the bytes it was decoded from
///   (the encoding is canonical), and decoding that again gives the same message;
/// - every error has a code, and a request id exactly when the header was readable;
/// - after a body-level error (connection stays open) exactly that frame was consumed, and
///   decoding continues with the next frame.
pub fn check(data: &[u8]) {
    use bytes::BytesMut;
    use citycard_protocol::frame::{decode_frame, HEADER_LEN, MAX_BODY_LEN};
    use citycard_protocol::{decode_request, decode_response, DecodeError};

    fn check_error(err: &DecodeError) {
        let _ = err.code();
        let header_level = matches!(err, DecodeError::BadMagic(_) | DecodeError::BadVersion(_));
        assert_eq!(err.request_id().is_none(), header_level, "{err:?}");
        let _ = err.to_string();
    }

    fn bounded(buf: &BytesMut, input_len: usize) {
        // BytesMut may double its allocation when it grows; anything more is a bug.
        assert!(buf.capacity() <= 2 * input_len + HEADER_LEN + MAX_BODY_LEN, "over-reserved");
    }

    // The frame splitter alone.
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match decode_frame(&mut buf) {
            Ok(Some(frame)) => {
                assert!(frame.body.len() <= MAX_BODY_LEN);
                assert_eq!(before.len() - buf.len(), HEADER_LEN + frame.body.len());
                assert_eq!(&before[HEADER_LEN..HEADER_LEN + frame.body.len()], &frame.body[..]);
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) must not consume");
                bounded(&buf, data.len());
                break;
            }
            Err(err) => {
                check_error(&err);
                break;
            }
        }
    }

    // Requests.
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match decode_request(&mut buf) {
            Ok(Some((id, req))) => {
                let consumed = &before[..before.len() - buf.len()];
                let mut again = BytesMut::new();
                req.encode(id, &mut again).expect("a decoded request encodes");
                assert_eq!(&again[..], consumed, "request re-encoding differs");
                let redecoded = decode_request(&mut again).expect("re-decodes").expect("complete");
                assert_eq!(redecoded, (id, req));
                assert!(again.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) must not consume");
                bounded(&buf, data.len());
                break;
            }
            Err(err) => {
                check_error(&err);
                if err.code().closes_connection() {
                    break;
                }
                // Body-level errors consumed exactly one frame; the stream goes on.
                assert!(buf.len() + HEADER_LEN <= before.len(), "body error without progress");
            }
        }
    }

    // Responses.
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match decode_response(&mut buf) {
            Ok(Some((id, resp))) => {
                let consumed = &before[..before.len() - buf.len()];
                let mut again = BytesMut::new();
                resp.encode(id, &mut again).expect("a decoded response encodes");
                assert_eq!(&again[..], consumed, "response re-encoding differs");
                let redecoded = decode_response(&mut again).expect("re-decodes").expect("complete");
                assert_eq!(redecoded, (id, resp));
                assert!(again.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) must not consume");
                bounded(&buf, data.len());
                break;
            }
            Err(err) => {
                check_error(&err);
                if err.code().closes_connection() {
                    break;
                }
                assert!(buf.len() + HEADER_LEN <= before.len(), "body error without progress");
            }
        }
    }
}
