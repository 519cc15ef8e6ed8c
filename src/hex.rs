//! Lowercase hex for key files, serial numbers and report signatures: one place for it.

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn nibble(c: u8, upper_too: bool) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if upper_too => Some(c - b'A' + 10),
        _ => None,
    }
}

fn decode_with(s: &str, upper_too: bool) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| Some(nibble(p[0], upper_too)? << 4 | nibble(p[1], upper_too)?))
        .collect()
}

/// Bytes of hex text in either case; None for odd length or another character.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    decode_with(s, true)
}

/// Bytes of lowercase hex text only: where the text is signed, any other spelling is an
/// altered byte.
pub fn decode_lower(s: &str) -> Option<Vec<u8>> {
    decode_with(s, false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_refusals() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(super::encode(&bytes), "0001abff");
        assert_eq!(super::decode("0001ABff").as_deref(), Some(&bytes[..]));
        assert_eq!(super::decode_lower("0001ABff"), None);
        assert_eq!(super::decode("abc"), None);
        assert_eq!(super::decode("zz"), None);
    }
}
