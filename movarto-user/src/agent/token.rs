//! The site token: the shared secret of an agent's control API, kept in a root-only file.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, Result, bail};
use subtle::ConstantTimeEq as _;

/// A bearer token. Not `Debug`, so it never lands in a log.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Reads the token from `path`, refusing a file others could read.
    pub fn from_file(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            bail!(
                "the token file {} is readable by group or others (mode {:o}); \
                 `chmod 600 {}` it",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        Self::new(text.trim()).with_context(|| format!("the token file {}", path.display()))
    }

    pub fn new(token: &str) -> Result<Self> {
        if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("a token is at least 16 printable characters without spaces");
        }
        Ok(Self(token.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the strings differ.
    pub fn matches(&self, offered: &str) -> bool {
        self.0.as_bytes().ct_eq(offered.as_bytes()).into()
    }
}

/// A fresh random token (hex), e.g. for `agent --init-token`.
/// A fresh session token for one migration; never zero, so the tunnel is authenticated.
pub fn random_session_token() -> Result<movarto_common::ids::SessionToken> {
    loop {
        let mut buf = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
            .context("reading /dev/urandom")?;
        let token = movarto_common::ids::SessionToken(u64::from_ne_bytes(buf));
        if !token.is_zero() {
            return Ok(token);
        }
    }
}

pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .context("reading /dev/urandom")?;
    Ok(data_encoding::HEXLOWER.encode(&buf))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn files_others_can_read_are_refused() {
        let dir = std::env::temp_dir().join(format!("movarto-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Token::from_file(&path).err().expect("refused").to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let token = Token::from_file(&path).expect("accepted");
        assert!(token.matches("0123456789abcdef0123"));
        assert!(!token.matches("0123456789abcdef0124"));
        assert!(!token.matches("0123456789abcdef012"));
        std::fs::write(&path, "short").expect("write");
        assert!(Token::from_file(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn random_tokens_differ() {
        let (a, b) = (random_hex(16).expect("a"), random_hex(16).expect("b"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
