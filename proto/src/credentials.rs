//! NATS credentials files: the user name and password one NATS user connects with, as written by
//! `referral-broker init` / `agency add` (`<secrets>/<who>/nats.creds`, mode 0600) and read by
//! the broker (`nats_credentials_file`) and each adapter. Part of the contract between them, so
//! it lives here, once.
//!
//! ```toml
//! user = "cc-haengbok1"
//! password = "…"
//! ```
//!
//! The password never appears in `Debug` output or errors.
//!
//! Also the rules every secret file obeys, in one place: [`write_private`] is the one writer of
//! 0600 files, and [`check_private`] refuses, at every load, a secret file (credentials, signing
//! key, bearer token, webhook secret) that others than its owner may read or write, as ssh does
//! with private keys. [`redact_url`] hides the user info of a server URL in logs and errors.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// Bytes of randomness in a generated password (hex encoded: 48 characters, well under
/// bcrypt's 72-byte limit).
const PASSWORD_BYTES: usize = 24;

/// One NATS user's name and password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// A credentials file that cannot be read, parsed or written. Never quotes the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read credentials file {path}: {message}")]
    Read { path: String, message: String },
    #[error("credentials file {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("cannot write credentials file {path}: {message}")]
    Write { path: String, message: String },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    #[error(transparent)]
    Exposed(#[from] ExposedSecret),
}

/// A secret file that others than its owner may read or write: refused, never just warned
/// about (a warning scrolls by; the secret has leaked whether anyone reads it or not).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path} may be read by others than its owner (mode {mode:o}); a secret file must be private: run `chmod 600 {path}`"
)]
pub struct ExposedSecret {
    pub path: String,
    /// The file's permission bits.
    pub mode: u32,
}

impl Credentials {
    /// A fresh random password for `user`, from the operating system's randomness.
    pub fn generate(user: &str) -> Result<Credentials, CredentialsError> {
        let mut bytes = [0u8; PASSWORD_BYTES];
        getrandom::getrandom(&mut bytes).map_err(|e| CredentialsError::Random(e.to_string()))?;
        Ok(Credentials {
            user: user.to_owned(),
            password: bytes.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// The file's text (TOML).
    pub fn to_file_text(&self) -> String {
        let mut table = toml::Table::new();
        table.insert("user".into(), toml::Value::String(self.user.clone()));
        table.insert(
            "password".into(),
            toml::Value::String(self.password.clone()),
        );
        format!(
            "# NATS credentials of {:?}: keep this file private (mode 0600).\n{}",
            self.user,
            toml::to_string(&table).unwrap_or_default()
        )
    }

    /// Parses a credentials file's text; `path` is only for the error.
    pub fn parse(text: &str, path: &Path) -> Result<Credentials, CredentialsError> {
        let bad = |message: String| CredentialsError::Invalid {
            path: path.display().to_string(),
            message,
        };
        // The TOML error quotes the offending line, which could be the password: say only where.
        let creds: Credentials = toml::from_str(text).map_err(|e| {
            bad(match e.span() {
                Some(span) => format!(
                    "not a credentials file (TOML `user` and `password`): error at byte {}",
                    span.start
                ),
                None => "not a credentials file (TOML `user` and `password`)".into(),
            })
        })?;
        if creds.user.trim().is_empty() || creds.user.chars().any(char::is_control) {
            return Err(bad("user is empty or has control characters".into()));
        }
        if creds.password.is_empty() || creds.password.chars().any(char::is_control) {
            return Err(bad("password is empty or has control characters".into()));
        }
        Ok(creds)
    }

    /// Reads a credentials file, refusing one that others may read ([`check_private`]).
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| CredentialsError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Credentials::parse(&text, path)
    }

    /// Writes the file readable by its owner only (mode 0600), refusing to overwrite.
    pub fn save(&self, path: &Path) -> Result<(), CredentialsError> {
        write_private(path, self.to_file_text().as_bytes()).map_err(|e| CredentialsError::Write {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }
}

/// Creates `path` with `bytes`, mode 0600, refusing to overwrite, and syncs it: for secrets
/// (credentials and signing keys).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Refuses a secret file that others than its owner may read or write (any of the mode bits
/// 0o077, as ssh refuses a private key): the error names the file and the `chmod` that fixes
/// it. A file that cannot be examined passes here; reading it then says why.
pub fn check_private(path: &Path) -> Result<(), ExposedSecret> {
    match shared_mode(path) {
        Some(mode) => Err(ExposedSecret {
            path: path.display().to_string(),
            mode,
        }),
        None => Ok(()),
    }
}

/// `url` with its user info hidden, for logs, `Debug` and errors: `nats://user:PW@host` becomes
/// `nats://user:***@host`, and a token (`nats://TOKEN@host`) becomes `nats://***@host`. A URL
/// without user info is returned as it is. Everything up to the last `@` counts as user info,
/// so a password holding `/` or `@` is hidden too.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let hidden = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}{hidden}{}", &rest[at..])
}

/// `text` (an error message that may quote a configuration line) with the user info of every
/// URL in it hidden as [`redact_url`] does. A URL runs from its scheme to the next space, quote,
/// comma or bracket.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // Back to the start of the scheme, forward to the end of the URL.
        let start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ']' | '>' | '`'))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// `url` without its user info (`nats://user:PW@host` becomes `nats://host`): what to hand a
/// client library that would otherwise log it whole, once the credentials were taken out.
pub fn without_user_info(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// The file's permission bits if others than its owner may read or write it (a secret that
/// should be mode 0600), else `None`.
pub fn shared_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.creds");
        let c = Credentials::generate("cc-1").unwrap();
        assert_eq!(c.password.len(), 2 * PASSWORD_BYTES);
        assert_ne!(c, Credentials::generate("cc-1").unwrap());
        c.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert_eq!(shared_mode(&path), None);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert_eq!(shared_mode(&path), Some(0o644));
            let e = Credentials::load(&path).unwrap_err();
            assert!(matches!(e, CredentialsError::Exposed(_)), "{e}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(c.save(&path).is_err(), "never overwrites");
        assert_eq!(Credentials::load(&path).unwrap(), c);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains(&c.password) && shown.contains("cc-1"),
            "{shown}"
        );
    }

    #[test]
    fn parses_and_hides_the_password() {
        let p = Path::new("a.creds");
        let c = Credentials::parse("# c\nuser = \"cc-1\"\npassword = \"0123abcd\"\n", p).unwrap();
        assert_eq!(c.user, "cc-1");
        assert!(!format!("{c:?}").contains("0123abcd"));
    }

    #[test]
    fn bad_files_are_refused_without_showing_the_password() {
        let p = Path::new("x.creds");
        for text in [
            "",
            "user = \"a\"",
            "password = \"sekrit-pw\"",
            "user = \"\"\npassword = \"sekrit-pw\"",
            "user = \"a\"\npassword = \"\"",
            "user = \"a\"\npassword = \"sekrit-pw\"\nextra = 1",
            "user = \"a\"\npassword = sekrit-pw",
            "user = \"a\"\npassword = \"sekrit\\npw\"",
        ] {
            let e = Credentials::parse(text, p).unwrap_err().to_string();
            assert!(!e.contains("sekrit"), "{text:?}: {e}");
            assert!(e.contains("x.creds"), "{e}");
        }
        let e = Credentials::load(Path::new("/nonexistent/a.creds")).unwrap_err();
        assert!(
            e.to_string().contains("cannot read credentials file"),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_private(&path, b"0123456789abcdef").unwrap();
        check_private(&path).unwrap();
        for (mode, refused) in [
            (0o600, false),
            (0o400, false),
            (0o700, false),
            (0o640, true),
            (0o644, true),
            (0o604, true),
            (0o620, true),
            (0o602, true),
            (0o660, true),
            (0o666, true),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = check_private(&path);
            assert_eq!(got.is_err(), refused, "{mode:o}");
            if let Err(e) = got {
                assert_eq!(e.mode, mode);
                let text = e.to_string();
                assert!(
                    text.contains(&format!("`chmod 600 {}`", path.display()))
                        && text.contains(&format!("{mode:o}")),
                    "{text}"
                );
            }
        }
        // A missing file is for the reader to report.
        check_private(&dir.path().join("missing")).unwrap();
    }

    #[test]
    fn urls_lose_their_user_info() {
        for (url, shown) in [
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://cc-1:s3cret@host:4222", "nats://cc-1:***@host:4222"),
            ("tls://tok3n@host", "tls://***@host"),
            ("nats://u:pa/ss@w@host", "nats://u:***@host"),
            ("u:s3cret@host:4222", "u:***@host:4222"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        assert_eq!(
            without_user_info("nats://u:pw@host:4222"),
            "nats://host:4222"
        );
        assert_eq!(without_user_info("tok@host"), "host");
        assert_eq!(
            redact_urls_in("2 | nats_urls = [\"nats://u:pw@a:1\", 'tls://tok@b'] x://c"),
            "2 | nats_urls = [\"nats://u:***@a:1\", 'tls://***@b'] x://c"
        );
        assert_eq!(redact_urls_in("no url here"), "no url here");
        assert_eq!(without_user_info("nats://host"), "nats://host");
    }
}
