//! NATS credentials files: the user name and password one NATS user connects with, as written by
//! `referral-broker init` / `agency add` (`<secrets>/<who>/nats.creds`, mode 0600) and read by
//! the broker (`nats_credentials_file`) and each adapter.
//!
//! ```toml
//! user = "cc-haengbok1"
//! password = "…"
//! ```
//!
//! The password never appears in `Debug` output, logs or errors.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

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

/// Bytes of randomness in a generated password (hex encoded: 48 characters, well under
/// bcrypt's 72-byte limit).
const PASSWORD_BYTES: usize = 24;

impl Credentials {
    /// A fresh random password for `user`, from the operating system's randomness.
    pub fn generate(user: &str) -> Result<Credentials> {
        let mut bytes = [0u8; PASSWORD_BYTES];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| Error::Onboard(format!("no randomness from the operating system: {e}")))?;
        Ok(Credentials {
            user: user.to_owned(),
            password: hex::encode(bytes),
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
    pub fn parse(text: &str, path: &Path) -> Result<Credentials> {
        let bad = |message: String| Error::Credentials {
            path: path.to_owned(),
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

    /// Reads a credentials file. Warns if others than its owner may read it.
    pub fn load(path: &Path) -> Result<Credentials> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Credentials {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        warn_if_shared(path);
        Credentials::parse(&text, path)
    }

    /// Writes the file readable by its owner only (mode 0600), refusing to overwrite.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_private(path, self.to_file_text().as_bytes())
    }
}

/// Creates `path` with `bytes`, mode 0600, refusing to overwrite, and syncs it.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let err = |e: std::io::Error| Error::File {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the NATS credentials file may be read by others than its owner: chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_path: &Path) {}

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
        assert!(Credentials::load(Path::new("/nonexistent/x.creds")).is_err());
    }
}
