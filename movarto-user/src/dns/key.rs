//! TSIG keys: BIND key files (what `tsig-keygen` writes) and nsupdate's `-y [alg:]name:secret`.

use std::{fmt, path::Path};

use anyhow::{Context as _, Result, bail};
use data_encoding::BASE64;
use hickory_proto::rr::{Name, TSigner, rdata::tsig::TsigAlgorithm};

/// Seconds of clock difference the server may accept (BIND's and nsupdate's default).
pub const TSIG_FUDGE: u16 = 300;

/// A shared-secret TSIG key.
#[derive(Clone)]
pub struct TsigKey {
    pub name: Name,
    pub algorithm: TsigAlgorithm,
    secret: Vec<u8>,
}

// The secret never appears in logs or error messages.
impl fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.algorithm)
    }
}

impl TsigKey {
    pub fn new(name: &str, algorithm: &str, secret_base64: &str) -> Result<Self> {
        let algorithm = parse_algorithm(algorithm)?;
        let name = Name::from_ascii(name)
            .map_err(|err| anyhow::anyhow!("invalid key name {name:?}: {err}"))?;
        let secret = BASE64
            .decode(secret_base64.as_bytes())
            .map_err(|err| anyhow::anyhow!("the secret is not valid base64: {err}"))?;
        if secret.is_empty() {
            bail!("the secret is empty");
        }
        Ok(Self {
            name,
            algorithm,
            secret,
        })
    }

    /// Parses nsupdate's `-y [alg:]name:secret`; the algorithm defaults to hmac-sha256.
    pub fn from_spec(spec: &str) -> Result<Self> {
        let parts: Vec<&str> = spec.split(':').collect();
        let (algorithm, name, secret) = match parts.as_slice() {
            [name, secret] => ("hmac-sha256", *name, *secret),
            [algorithm, name, secret] => (*algorithm, *name, *secret),
            _ => bail!("-y expects [alg:]name:secret, got {} fields", parts.len()),
        };
        Self::new(name, algorithm, secret).context("in the -y key")
    }

    /// Reads a BIND key file with exactly one `key` statement.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading key file {}", path.display()))?;
        parse_key_file(&text).with_context(|| format!("key file {}", path.display()))
    }

    /// The signer for requests; the server must know the same name, algorithm and secret.
    pub fn signer(&self) -> Result<TSigner> {
        TSigner::new(
            self.secret.clone(),
            self.algorithm.clone(),
            self.name.clone(),
            TSIG_FUDGE,
        )
        .map_err(|err| anyhow::anyhow!("TSIG key {self}: {err}"))
    }
}

fn parse_algorithm(text: &str) -> Result<TsigAlgorithm> {
    let lower = text.trim_end_matches('.').to_ascii_lowercase();
    match lower.as_str() {
        "hmac-sha256" => Ok(TsigAlgorithm::HmacSha256),
        "hmac-sha384" => Ok(TsigAlgorithm::HmacSha384),
        "hmac-sha512" => Ok(TsigAlgorithm::HmacSha512),
        _ => bail!(
            "unsupported TSIG algorithm {text:?}: use hmac-sha256, hmac-sha384 or hmac-sha512"
        ),
    }
}

/// A token of the key-file grammar, with the line it starts on.
#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Quoted(String),
    Open,
    Close,
    Semicolon,
}

fn tokenize(text: &str) -> Result<Vec<(Token, usize)>> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '#' => {
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let start = line;
                let mut closed = false;
                while let Some(c) = chars.next() {
                    if c == '\n' {
                        line += 1;
                    } else if c == '*' && chars.peek() == Some(&'/') {
                        chars.next();
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    bail!("line {start}: comment is never closed");
                }
            }
            '{' => tokens.push((Token::Open, line)),
            '}' => tokens.push((Token::Close, line)),
            ';' => tokens.push((Token::Semicolon, line)),
            '"' => {
                let start = line;
                let mut value = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '"' {
                        closed = true;
                        break;
                    }
                    if c == '\n' {
                        line += 1;
                    }
                    value.push(c);
                }
                if !closed {
                    bail!("line {start}: quoted string is never closed");
                }
                tokens.push((Token::Quoted(value), start));
            }
            c => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || matches!(n, '{' | '}' | ';' | '"') {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                tokens.push((Token::Word(word), line));
            }
        }
    }
    Ok(tokens)
}

/// Parses `key "name" { algorithm alg; secret "base64"; };`, as `tsig-keygen` writes it.
pub fn parse_key_file(text: &str) -> Result<TsigKey> {
    let tokens = tokenize(text)?;
    let last_line = text.lines().count().max(1);
    let mut it = tokens.into_iter().peekable();
    let mut next = |what: &str| -> Result<(Token, usize)> {
        it.next()
            .with_context(|| format!("line {last_line}: file ends where {what} was expected"))
    };

    match next("`key`")? {
        (Token::Word(w), _) if w == "key" => {}
        (other, line) => bail!("line {line}: expected `key`, found {}", describe(&other)),
    }
    let name = match next("the key name")? {
        (Token::Quoted(n) | Token::Word(n), _) => n,
        (other, line) => bail!(
            "line {line}: expected the key name, found {}",
            describe(&other)
        ),
    };
    match next("`{`")? {
        (Token::Open, _) => {}
        (other, line) => bail!("line {line}: expected `{{`, found {}", describe(&other)),
    }
    let mut algorithm: Option<(String, usize)> = None;
    let mut secret: Option<(String, usize)> = None;
    let close_line = loop {
        let (token, line) = next("`}`")?;
        let field = match token {
            Token::Close => break line,
            Token::Word(w) => w,
            other => bail!(
                "line {line}: expected `algorithm`, `secret` or `}}`, found {}",
                describe(&other)
            ),
        };
        let value = match next(&format!("the value of `{field}`"))? {
            (Token::Word(v) | Token::Quoted(v), _) => v,
            (other, l) => bail!(
                "line {l}: expected the value of `{field}`, found {}",
                describe(&other)
            ),
        };
        match next("`;`")? {
            (Token::Semicolon, _) => {}
            (other, l) => bail!(
                "line {l}: expected `;` after `{field} {value}`, found {}",
                describe(&other)
            ),
        }
        let slot = match field.as_str() {
            "algorithm" => &mut algorithm,
            "secret" => &mut secret,
            other => bail!("line {line}: unknown field `{other}` in key {name:?}"),
        };
        if slot.is_some() {
            bail!("line {line}: `{field}` is given twice in key {name:?}");
        }
        *slot = Some((value, line));
    };
    match next("`;` after `}`")? {
        (Token::Semicolon, _) => {}
        (other, line) => bail!(
            "line {line}: expected `;` after `}}`, found {}",
            describe(&other)
        ),
    }
    if let Some((token, line)) = it.next() {
        bail!(
            "line {line}: found {} after the key statement; movarto reads one key per file",
            describe(&token)
        );
    }
    let (algorithm, algorithm_line) =
        algorithm.with_context(|| format!("line {close_line}: key {name:?} has no `algorithm`"))?;
    let (secret, secret_line) =
        secret.with_context(|| format!("line {close_line}: key {name:?} has no `secret`"))?;
    let algorithm =
        parse_algorithm(&algorithm).with_context(|| format!("line {algorithm_line}"))?;
    let key = TsigKey::new(&name, "hmac-sha256", &secret)
        .with_context(|| format!("line {secret_line}: key {name:?}"))?;
    Ok(TsigKey { algorithm, ..key })
}

fn describe(token: &Token) -> String {
    match token {
        Token::Word(w) => format!("`{w}`"),
        Token::Quoted(q) => format!("\"{q}\""),
        Token::Open => "`{`".into(),
        Token::Close => "`}`".into(),
        Token::Semicolon => "`;`".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYGEN_OUTPUT: &str = "key \"movarto-key\" {\n\talgorithm hmac-sha256;\n\tsecret \"M/VNrWC8OgboTK6KUyfnk0NriIF1a3p8Q8CsknnNhe4=\";\n};\n";

    fn error_of(text: &str) -> String {
        format!("{:#}", parse_key_file(text).expect_err("must be rejected"))
    }

    #[test]
    fn reads_what_tsig_keygen_writes() {
        let key = parse_key_file(KEYGEN_OUTPUT).expect("valid key file");
        assert_eq!(key.name.to_ascii(), "movarto-key");
        assert_eq!(key.algorithm, TsigAlgorithm::HmacSha256);
        assert_eq!(key.secret.len(), 32);
        key.signer().expect("signer");
    }

    #[test]
    fn reads_comments_other_algorithms_and_field_order() {
        let text = "# made by hand\nkey k2.example. { // trailing\n secret \"c2VjcmV0\"; /* multi\nline */ algorithm HMAC-SHA512; };";
        let key = parse_key_file(text).expect("valid");
        assert_eq!(key.algorithm, TsigAlgorithm::HmacSha512);
        assert_eq!(key.secret, b"secret");
        assert!(key.name.to_ascii().starts_with("k2.example"));
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let key = parse_key_file(KEYGEN_OUTPUT).expect("valid");
        let shown = format!("{key:?} {key}");
        assert!(!shown.contains("M/VN"), "{shown}");
        assert!(shown.contains("movarto-key"), "{shown}");
    }

    #[test]
    fn malformed_files_name_the_line() {
        let cases = [
            ("", "file ends where `key` was expected"),
            ("zone \"x\" {};", "line 1: expected `key`, found `zone`"),
            (
                "key \"k\" {\n algorithm hmac-sha256;\n};",
                "line 3: key \"k\" has no `secret`",
            ),
            (
                "key \"k\" {\n secret \"c2VjcmV0\";\n};",
                "line 3: key \"k\" has no `algorithm`",
            ),
            (
                "key \"k\" {\n algorithm hmac-md5;\n secret \"c2VjcmV0\";\n};",
                "line 2: unsupported TSIG algorithm \"hmac-md5\"",
            ),
            (
                "key \"k\" {\n algorithm hmac-sha256;\n secret \"not base64!\";\n};",
                "line 3: key \"k\": the secret is not valid base64",
            ),
            (
                "key \"k\" {\n algorithm hmac-sha256\n secret \"c2VjcmV0\";\n};",
                "line 3: expected `;` after `algorithm hmac-sha256`, found `secret`",
            ),
            (
                "key \"k\" {\n algorithm hmac-sha256;\n secret \"c2VjcmV0\";\n",
                "file ends where `}` was expected",
            ),
            (
                "key \"k\" {\n secret \"c2VjcmV0;\n};\n",
                "line 2: quoted string is never closed",
            ),
            (
                "key \"k\" {\n colour blue;\n};",
                "line 2: unknown field `colour`",
            ),
            (
                "key \"k\" {\n algorithm hmac-sha256;\n algorithm hmac-sha512;\n};",
                "line 3: `algorithm` is given twice",
            ),
            (
                "key \"k\" { algorithm hmac-sha256; secret \"c2VjcmV0\"; };\nkey \"j\" {};",
                "line 2: found `key` after the key statement",
            ),
        ];
        for (text, expected) in cases {
            let err = error_of(text);
            assert!(
                err.contains(expected),
                "for {text:?}: got {err:?}, want {expected:?}"
            );
        }
    }

    #[test]
    fn key_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("movarto-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("bad.key");
        std::fs::write(&path, "key \"k\" {\n algorithm hmac-sha256;\n};").expect("write");
        let err = format!("{:#}", TsigKey::from_file(&path).expect_err("bad"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(err.contains("bad.key") && err.contains("line 3"), "{err}");
    }

    #[test]
    fn parses_nsupdate_y_specs() {
        let key = TsigKey::from_spec("hmac-sha384:k1:c2VjcmV0").expect("3 fields");
        assert_eq!(key.algorithm, TsigAlgorithm::HmacSha384);
        assert_eq!(key.name.to_ascii(), "k1");
        let key = TsigKey::from_spec("k1:c2VjcmV0").expect("2 fields");
        assert_eq!(key.algorithm, TsigAlgorithm::HmacSha256);
        for bad in ["k1", "a:b:c:d", "hmac-md5:k1:c2VjcmV0", "k1:%%%"] {
            assert!(TsigKey::from_spec(bad).is_err(), "{bad} accepted");
        }
    }
}
