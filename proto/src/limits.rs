//! The numeric limits of PROTOCOL.md, and the internal ones services must agree on.

/// A WebSocket frame (and message) larger than this closes the connection with 1009.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// A message body holds 1 to this many characters (Unicode scalar values).
pub const MAX_BODY_CHARS: usize = 4096;
/// A `client_id` holds 1 to this many characters.
pub const MAX_CLIENT_ID_CHARS: usize = 64;
/// An `ack` frame names 1 to this many message ids.
pub const MAX_ACK_IDS: usize = 500;
/// Usernames: this many characters at least ...
pub const USERNAME_MIN: usize = 3;
/// ... and at most, of `[A-Za-z0-9_.-]`.
pub const USERNAME_MAX: usize = 32;
/// Passwords: this many characters at least ...
pub const PASSWORD_MIN: usize = 8;
/// ... and at most.
pub const PASSWORD_MAX: usize = 256;
/// Page size of list endpoints when the client names none ...
pub const PAGE_DEFAULT: u32 = 50;
/// ... and the most a client may ask for.
pub const PAGE_MAX: u32 = 200;
/// Messages per backlog page the gateway asks the store for.
pub const BACKLOG_PAGE: u32 = 500;
/// The store stops filling a backlog page once its bodies reach this many bytes, so a page of
/// long messages stays well under NATS's 1 MiB default payload limit.
pub const BACKLOG_PAGE_BYTES: usize = 256 * 1024;

/// Whether `name` is an acceptable username.
pub fn valid_username(name: &str) -> bool {
    (USERNAME_MIN..=USERNAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `password` has an acceptable length (counted in characters).
pub fn valid_password(password: &str) -> bool {
    (PASSWORD_MIN..=PASSWORD_MAX).contains(&password.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(valid_username("bob"));
        assert!(valid_username("A.b-c_9"));
        assert!(!valid_username("ab"));
        assert!(!valid_username(&"a".repeat(33)));
        assert!(!valid_username("bob smith"));
        assert!(!valid_username("bøb"));
    }

    #[test]
    fn passwords_count_characters() {
        assert!(valid_password("12345678"));
        assert!(!valid_password("1234567"));
        assert!(valid_password(&"é".repeat(256)));
        assert!(!valid_password(&"é".repeat(257)));
    }
}
