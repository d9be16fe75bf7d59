//! Reading mqseal's TOML configuration files.
//!
//! The broker, the agent and the controller all take a TOML file, and all
//! three owe their user the same thing when it is wrong: the file, the line
//! and the field, not "invalid type" and a byte offset. This is the one place
//! that turns `toml`'s errors into that.

#![forbid(unsafe_code)]

use std::path::Path;

use serde::de::DeserializeOwned;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// Which file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not TOML, or a key or value that does not fit.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// Which file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Values that parse but do not make sense together.
    #[error("{path}: {message}")]
    Invalid {
        /// Which file (or "flags").
        path: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

impl ConfigError {
    /// A value that parsed but is unusable, in the file at `path`.
    pub fn invalid(path: &Path, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: path.display().to_string(), message: message.into() }
    }
}

/// Parses `text` (read from `path`, used in messages).
///
/// # Errors
/// [`ConfigError::Parse`] with the line, column and the offending line quoted.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        // toml names unknown keys but not the key of a mistyped value;
        // quoting the line names the field either way.
        let source = text.lines().nth(line.saturating_sub(1)).unwrap_or("").trim();
        let message = format!("{} (in `{source}`)", e.message().trim_end());
        ConfigError::Parse { path: path.display().to_string(), line, column, message }
    })
}

/// Reads and parses the file at `path`.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`].
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    parse(&text, path)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        port: u16,
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let err = parse::<Sample>("name = \"a\"\nport = \"x\"\n", Path::new("s.toml")).unwrap_err().to_string();
        assert!(err.starts_with("s.toml:2:") && err.contains("port"), "{err}");
        let err = parse::<Sample>("name = \"a\"\nport = 1\nprot = 2\n", Path::new("s.toml")).unwrap_err().to_string();
        assert!(err.starts_with("s.toml:3:1:") && err.contains("prot"), "{err}");
        let err = load::<Sample>(Path::new("/nonexistent/s.toml")).unwrap_err().to_string();
        assert!(err.starts_with("/nonexistent/s.toml:"), "{err}");
    }
}
