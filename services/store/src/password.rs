//! Password hashes: argon2id with the parameters OWASP recommends (the crate's defaults), as
//! PHC strings, computed in working memory that is kept and reused.
//!
//! Each computation needs 19 MiB. Allocated per call, glibc serves it from the heap of
//! whichever blocking thread runs it and keeps it there after the call: a store that had
//! registered and logged in 1,000 users held 600–680 MB (docs/benchmarks.md). Here at most one
//! computation per core runs at once, each in a buffer taken from a pool of at most that
//! many, so the store holds 19 MiB per core for good and allocates nothing per call.
//!
//! The strings are the argon2 crate's own (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`):
//! hashes made before this module verify here, and these verify with the crate's verifier.

use std::sync::{LazyLock, Mutex};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Computations at once: one per core (more only queue inside the kernel), each with a
/// buffer of its own.
static SLOTS: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
});
/// Working memory not in use; never more buffers than [`SLOTS`] has permits.
static MEMORY: Mutex<Vec<Vec<Block>>> = Mutex::new(Vec::new());

/// Runs `job` with a working buffer on the blocking pool, at most one per core at a time.
async fn with_memory<T: Send + 'static>(
    job: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
) -> T {
    let _slot = SLOTS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let mut memory = MEMORY
        .lock()
        .expect("the memory pool lock")
        .pop()
        .unwrap_or_default();
    let (out, memory) = tokio::task::spawn_blocking(move || (job(&mut memory), memory))
        .await
        .expect("an argon2 job does not panic");
    MEMORY.lock().expect("the memory pool lock").push(memory);
    out
}

/// The PHC string of `password` with a fresh random salt.
pub(crate) async fn hash(password: String) -> String {
    with_memory(move |memory| hash_with(memory, password.as_bytes())).await
}

/// Whether `password` matches `stored` (a PHC string; anything else matches nothing).
pub(crate) async fn verify(password: String, stored: String) -> bool {
    with_memory(move |memory| verify_with(memory, password.as_bytes(), &stored)).await
}

/// The working memory for `params`, grown if needed (never shrunk: the next call needs the
/// same).
fn blocks<'a>(memory: &'a mut Vec<Block>, params: &Params) -> &'a mut [Block] {
    let count = params.block_count();
    if memory.len() < count {
        memory.resize(count, Block::new());
    }
    &mut memory[..count]
}

fn hash_with(memory: &mut Vec<Block>, password: &[u8]) -> String {
    let params = Params::default();
    let salt = Salt::generate();
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password, &salt, &mut out, blocks(memory, &params))
        .expect("argon2id with default parameters hashes any password");
    PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).expect("default parameters encode"),
        salt: Some(salt),
        hash: Some(Output::new(&out).expect("32 bytes is a valid output")),
    }
    .to_string()
}

fn verify_with(memory: &mut Vec<Block>, password: &[u8], stored: &str) -> bool {
    let Ok(stored) = PasswordHash::new(stored) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&stored.salt, &stored.hash) else {
        return false;
    };
    let algorithm = Algorithm::try_from(stored.algorithm.as_str());
    let version = stored
        .version
        .map_or(Ok(Version::default()), Version::try_from);
    let (Ok(algorithm), Ok(version), Ok(params)) = (algorithm, version, Params::try_from(&stored))
    else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let computed = Argon2::new(algorithm, version, params.clone()).hash_password_into_with_memory(
        password,
        salt,
        &mut out,
        blocks(memory, &params),
    );
    // `Output`'s equality is constant-time.
    computed.is_ok() && Output::new(&out).is_ok_and(|out| out == *expected)
}

#[cfg(test)]
mod tests {
    use argon2::{Argon2, PasswordHasher, PasswordVerifier};

    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let stored = hash("correct horse".into()).await;
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify("correct horse".into(), stored.clone()).await);
        assert!(!verify("correct horse ".into(), stored.clone()).await);
        assert!(!verify(String::new(), stored).await);
        // Same password, another salt.
        assert_ne!(hash("x".into()).await, hash("x".into()).await);
    }

    #[tokio::test]
    async fn hashes_are_the_crates_own_both_ways() {
        let by_crate = Argon2::default()
            .hash_password(b"hunter42")
            .unwrap()
            .to_string();
        assert!(verify("hunter42".into(), by_crate.clone()).await);
        assert!(!verify("hunter43".into(), by_crate).await);
        let ours = hash("hunter42".into()).await;
        assert!(
            Argon2::default()
                .verify_password(b"hunter42", ours.as_str())
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"hunter43", ours.as_str())
                .is_err()
        );
    }

    #[tokio::test]
    async fn anything_but_a_phc_string_matches_nothing() {
        for stored in [
            "",
            "plain text",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$bcrypt$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA",
        ] {
            assert!(
                !verify("plain text".into(), stored.into()).await,
                "{stored}"
            );
        }
    }
}
