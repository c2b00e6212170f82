//! The agency's NATS credentials file, as `referral-broker agency add` writes it
//! (`<secrets>/<agency>/nats.creds`, mode 0600): TOML with `user` and `password`. The password
//! never appears in `Debug` output, logs or errors.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use tracing::warn;

use crate::error::{Error, Result};

/// A NATS user name and password.
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

impl Credentials {
    /// Parses a credentials file's text; `path` is only for errors, which never quote the file
    /// (it could be the password).
    pub fn parse(text: &str, path: &Path) -> Result<Credentials> {
        let bad =
            |what: String| Error::Config(format!("credentials file {}: {what}", path.display()));
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

    /// Reads a credentials file; warns if others than its owner may read it.
    pub fn load(path: &Path) -> Result<Credentials> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read credentials file {}: {e}",
                path.display()
            ))
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                warn!(
                    file = %path.display(),
                    "the NATS credentials file may be read by others than its owner: chmod 600 it"
                );
            }
        }
        Credentials::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hides_the_password() {
        let p = Path::new("a.creds");
        let c = Credentials::parse("# c\nuser = \"cc-1\"\npassword = \"0123abcd\"\n", p).unwrap();
        assert_eq!(c.user, "cc-1");
        assert!(!format!("{c:?}").contains("0123abcd"));
        for bad in [
            "",
            "user = \"cc-1\"",
            "user = \"\"\npassword = \"sekrit\"",
            "user = \"cc-1\"\npassword = \"\"",
            "user = \"cc-1\"\npassword = sekrit",
            "user = \"cc-1\"\npassword = \"sekrit\"\nmore = 1",
        ] {
            let e = Credentials::parse(bad, p).unwrap_err().to_string();
            assert!(
                e.contains("a.creds") && !e.contains("sekrit"),
                "{bad:?}: {e}"
            );
        }
        let e = Credentials::load(Path::new("/nonexistent/a.creds")).unwrap_err();
        assert!(
            e.to_string().contains("cannot read credentials file"),
            "{e}"
        );
    }
}
