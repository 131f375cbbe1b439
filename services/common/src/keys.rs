//! One reversible encoding of ids as JetStream KV keys. Ids are opaque (resource ids may hold `:`,
//! end-user ids anything), but a KV key is `[-/_=.A-Za-z0-9]+`, may not start or end with `.` and
//! may not hold `..` (each `.` separates subject tokens). Bytes of `[A-Za-z0-9_/-]` stay as they
//! are and so does a `.` where a key may hold one, so readable ids stay readable and the keys
//! written before this encoding existed are unchanged; every other byte becomes `=XX` (upper-case
//! hex), as in [`crate::subjects::user_token`], which agrees with it on ids without `.` or `/`.
//!
//! An encoded id may hold `.`: a key made of several parts puts at most one encoded id among
//! fixed parts that hold no `.` (`relay.<id>`, `<id>.<meter>`), so it stays injective.

/// The longest encoded key accepted: a KV operation's subject (`$KV.<bucket>.<key>`) and its reply
/// inbox must fit the server's control line (4 KiB by default) with room to spare.
pub const MAX_KEY_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("an id used as a KV key must not be empty")]
    Empty,
    #[error("the id encodes to a {len}-byte KV key, longer than {max}")]
    TooLong { len: usize, max: usize },
    #[error("`{0}` is not an encoded KV key (not one `encode_key` produces)")]
    NotEncoded(String),
    #[error("KV key `{0}` decodes to bytes that are not UTF-8")]
    NotUtf8(String),
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn kept(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'/')
}

/// Encodes an id (any bytes) as a valid KV key; refuses an empty id and one whose key would be
/// longer than [`MAX_KEY_LEN`].
pub fn encode_key(id: impl AsRef<[u8]>) -> Result<String, KeyError> {
    let id = id.as_ref();
    if id.is_empty() {
        return Err(KeyError::Empty);
    }
    let mut out = String::with_capacity(id.len());
    for (i, &b) in id.iter().enumerate() {
        // A `.` stays where it separates two non-empty tokens: not first, not last, not after
        // another `.` (whose own escape then keeps the key free of `..`).
        let dot_ok = b == b'.' && i > 0 && i + 1 < id.len() && id[i - 1] != b'.';
        if kept(b) || dot_ok {
            out.push(char::from(b));
        } else {
            out.push('=');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    if out.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong {
            len: out.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(out)
}

/// The inverse of [`encode_key`]. Refuses anything `encode_key` would not have produced, so two
/// keys never decode to the same id.
pub fn decode_key(key: &str) -> Result<Vec<u8>, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    let invalid = || KeyError::NotEncoded(key.to_string());
    let mut bytes = Vec::with_capacity(key.len());
    let mut it = key.bytes();
    while let Some(b) = it.next() {
        if b == b'=' {
            let hi = it.next().and_then(hex_value).ok_or_else(invalid)?;
            let lo = it.next().and_then(hex_value).ok_or_else(invalid)?;
            bytes.push(hi << 4 | lo);
        } else if kept(b) || b == b'.' {
            bytes.push(b);
        } else {
            return Err(invalid());
        }
    }
    // Only the canonical form is accepted (`=41` for `A` is not, nor a `.` where a key may not
    // hold one).
    if encode_key(&bytes)? != key {
        return Err(invalid());
    }
    Ok(bytes)
}

/// [`decode_key`] for ids that are text.
pub fn decode_key_str(key: &str) -> Result<String, KeyError> {
    String::from_utf8(decode_key(key)?).map_err(|_| KeyError::NotUtf8(key.to_string()))
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
