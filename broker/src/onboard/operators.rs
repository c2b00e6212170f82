//! `referral-broker operator add|remove`: an operator's bearer token for the broker's HTTP API.
//!
//! ```text
//! <secrets>/operators/<name>.token   the token (0600, never overwritten), for --token-file
//! <operators file>                   [[operator]] name + token_sha256 (the broker's operators_file)
//! ```
//!
//! Like the agency commands: takes `<operators file>.lock`, checks everything, writes the
//! secret first (never over an existing one), then replaces the operators file whole; a
//! failure removes the token it wrote. The broker reads the file at every request that needs an
//! operator, so both commands take effect at once.

use std::path::{Path, PathBuf};

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};

use super::files::{self, Lock, Undo};
use super::{Report, shown};
use crate::error::{Error, Result};
use crate::operators::{self, Operators};

/// The header of an operators file `operator add` creates.
const NEW_FILE: &str = "\
# The broker's operators, written by `referral-broker operator add|remove`: each [[operator]]
# is a name and the SHA-256 of its bearer token (the token itself is only in the operator's
# 0600 file). The broker reads this file (operators_file) at every operator action.
";

/// `<secrets>/operators/<name>.token`.
pub fn token_path(secrets: &Path, name: &str) -> PathBuf {
    secrets.join("operators").join(format!("{name}.token"))
}

fn check_name(name: &str) -> Result<()> {
    if operators::is_valid_name(name) {
        Ok(())
    } else {
        Err(Error::Onboard(format!(
            "operator name {:?} is not valid: 1-{} characters of a-z, 0-9, '-', '.', '_', \
             starting with a letter or digit",
            name.chars().take(80).collect::<String>(),
            operators::MAX_NAME
        )))
    }
}

fn check_file(file: &Path) -> Result<()> {
    if file.as_os_str().is_empty() || file.is_dir() {
        return Err(Error::Onboard(format!(
            "--operators {} is not a file",
            file.display()
        )));
    }
    Ok(())
}

/// Reads the file (or a new one's header), checks it parses as [`Operators`].
fn load(file: &Path) -> Result<DocumentMut> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NEW_FILE.to_owned(),
        Err(e) => {
            return Err(Error::File {
                path: file.to_owned(),
                message: e.to_string(),
            });
        }
    };
    Operators::parse(&text, file)?;
    text.parse().map_err(|e: toml_edit::TomlError| Error::File {
        path: file.to_owned(),
        message: e.to_string(),
    })
}

fn entries_mut(doc: &mut DocumentMut) -> Option<&mut ArrayOfTables> {
    let item = doc
        .entry("operator")
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
    if let Some(array) = item.as_array().cloned() {
        // `operator = [{ .. }]`: the inline form, turned into tables.
        let mut tables = ArrayOfTables::new();
        for v in array.iter() {
            tables.push(v.as_inline_table()?.clone().into_table());
        }
        *item = Item::ArrayOfTables(tables);
    }
    item.as_array_of_tables_mut()
}

fn render(doc: &DocumentMut, file: &Path) -> Result<(String, Operators)> {
    let text = doc.to_string();
    let parsed = Operators::parse(&text, file)?;
    Ok((text, parsed))
}

/// Makes operator `name`: a fresh token in `<secrets>/operators/<name>.token` (0600) and its
/// digest in the operators file (created if absent).
pub fn add_operator(file: &Path, secrets: &Path, name: &str) -> Result<Report> {
    check_name(name)?;
    check_file(file)?;
    if secrets.as_os_str().is_empty() || (secrets.exists() && !secrets.is_dir()) {
        return Err(Error::Onboard(format!(
            "--secrets {} is not a directory",
            secrets.display()
        )));
    }
    super::ensure_parent(file)?;
    let _lock = Lock::take(file)?;
    let mut doc = load(file)?;
    if Operators::parse(&doc.to_string(), file)?
        .names()
        .any(|n| n == name)
    {
        return Err(Error::Onboard(format!(
            "operator {name} already exists in {} (remove it first to give it a new token)",
            file.display()
        )));
    }
    let token_file = token_path(secrets, name);
    files::must_not_exist(
        &token_file,
        "a token is never overwritten; move the old one away first",
    )?;
    let token = operators::generate_token()?;
    let mut entry = Table::new();
    entry["name"] = value(name);
    entry["token_sha256"] = value(hex::encode(operators::token_digest(&token)));
    entries_mut(&mut doc)
        .ok_or_else(|| Error::File {
            path: file.to_owned(),
            message: "`operator` is not a list of tables".into(),
        })?
        .push(entry);
    let (text, parsed) = render(&doc, file)?;
    if parsed.verify(&token) != Some(name) {
        return Err(Error::Onboard(format!(
            "operator {name} did not come out as written"
        )));
    }

    let mut report = Report::default();
    let mut undo = Undo::default();
    let dir = token_file.parent().unwrap_or(secrets);
    files::private_dir(dir)?;
    yeongye_proto::credentials::write_private(&token_file, format!("{token}\n").as_bytes())
        .map_err(|e| Error::File {
            path: token_file.clone(),
            message: e.to_string(),
        })?;
    undo.created(token_file.clone());
    report.wrote("operator token (0600)", &token_file);
    files::replace(file, text.as_bytes(), 0o644)?;
    undo.commit();
    report.wrote("operators file", file);
    report.note(format!(
        "the broker's config needs operators_file = {:?} (read at every operator action: no \
         restart needed once it is set)",
        shown(file)
    ));
    report.note(format!(
        "operator {name} authenticates with --token-file {} (or REFERRAL_OPERATOR_TOKEN_FILE)",
        shown(&token_file)
    ));
    Ok(report)
}

/// Removes operator `name` from the operators file (its token stops working at once) and
/// deletes its token file if it is where `add` put it.
pub fn remove_operator(file: &Path, secrets: Option<&Path>, name: &str) -> Result<Report> {
    check_name(name)?;
    check_file(file)?;
    if !file.exists() {
        return Err(Error::Onboard(format!(
            "operators file {} does not exist",
            file.display()
        )));
    }
    let _lock = Lock::take(file)?;
    let mut doc = load(file)?;
    let entries = entries_mut(&mut doc).ok_or_else(|| Error::File {
        path: file.to_owned(),
        message: "`operator` is not a list of tables".into(),
    })?;
    let before = entries.len();
    entries.retain(|t| t.get("name").and_then(Item::as_str) != Some(name));
    if entries.len() == before {
        return Err(Error::Onboard(format!(
            "operator {name} is not in {}",
            file.display()
        )));
    }
    let (text, _) = render(&doc, file)?;
    files::replace(file, text.as_bytes(), 0o644)?;
    let mut report = Report::default();
    report.wrote("operators file", file);
    report.note(format!(
        "operator {name} removed: its token is refused from now"
    ));
    if let Some(secrets) = secrets {
        let token_file = token_path(secrets, name);
        match std::fs::remove_file(&token_file) {
            Ok(()) => report.note(format!("deleted {}", token_file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.note(format!(
                "could not delete {}: {e} (it no longer works; delete it by hand)",
                token_file.display()
            )),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("operators.toml");
        let secrets = dir.path().join("secrets");
        add_operator(&file, &secrets, "kim").unwrap();
        add_operator(&file, &secrets, "lee").unwrap();
        let token = std::fs::read_to_string(token_path(&secrets, "kim")).unwrap();
        assert_eq!(
            yeongye_proto::credentials::shared_mode(&token_path(&secrets, "kim")),
            None
        );
        let ops = Operators::load(&file).unwrap();
        assert_eq!(ops.verify(&token), Some("kim"));
        assert!(
            !std::fs::read_to_string(&file)
                .unwrap()
                .contains(token.trim())
        );
        // Never twice, never over a token file.
        assert!(add_operator(&file, &secrets, "kim").is_err());
        assert!(add_operator(&file, &secrets, "Kim").is_err());
        remove_operator(&file, Some(&secrets), "kim").unwrap();
        let ops = Operators::load(&file).unwrap();
        assert_eq!(ops.verify(&token), None);
        assert_eq!(ops.names().collect::<Vec<_>>(), ["lee"]);
        assert!(!token_path(&secrets, "kim").exists());
        assert!(remove_operator(&file, Some(&secrets), "kim").is_err());
        // A token file in the way is not overwritten, and nothing is recorded.
        std::fs::write(token_path(&secrets, "park"), "x").unwrap();
        assert!(add_operator(&file, &secrets, "park").is_err());
        assert_eq!(Operators::load(&file).unwrap().len(), 1);
    }
}
