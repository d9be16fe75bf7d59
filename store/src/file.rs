//! The embedded default store: one JSON file, read into memory.
//!
//! Other processes (the `mqseal` CLI) change the file while the broker runs,
//! so every lookup compares the file's modification time and length with the
//! ones it loaded and reloads on change: a `user disable` is seen by the next
//! login, not after a restart. A `stat` per login costs microseconds.
//!
//! Writes take an exclusive lock on a sibling `.lock` file (so the broker and
//! the CLI never interleave read-modify-write cycles), write a temporary file
//! with mode 0600, fsync it, rename it over the old one and fsync the
//! directory: a crash leaves either the old file or the new one, never half.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{CredentialStore, StoreError, UserRecord};

/// File format version, so a later layout can be told apart.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Document {
    version: u32,
    users: Vec<UserRecord>,
}

#[derive(Default)]
struct Loaded {
    /// (mtime, length) of the file the map came from; `None` if it did not exist.
    stamp: Option<(SystemTime, u64)>,
    users: BTreeMap<String, UserRecord>,
}

/// Credentials in a local JSON file.
pub struct FileStore {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl FileStore {
    /// Opens (without requiring it to exist yet) the file at `path`. A file
    /// that exists but cannot be parsed is an error now, with line and
    /// column, rather than at the first login.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let store = FileStore { path: path.into(), loaded: Mutex::new(Loaded::default()) };
        store.refresh()?;
        Ok(store)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_error(&self, source: std::io::Error) -> StoreError {
        StoreError::File { path: self.path.display().to_string(), source }
    }

    fn stamp(&self) -> Result<Option<(SystemTime, u64)>, StoreError> {
        match fs::metadata(&self.path) {
            Ok(meta) => Ok(Some((meta.modified().map_err(|e| self.io_error(e))?, meta.len()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_error(e)),
        }
    }

    fn read_file(&self) -> Result<BTreeMap<String, UserRecord>, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.io_error(e)),
        };
        let doc: Document = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: self.path.display().to_string(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        if doc.version != VERSION {
            return Err(StoreError::Corrupt {
                path: self.path.display().to_string(),
                line: 1,
                column: 1,
                message: format!("version {} is not supported (expected {VERSION})", doc.version),
            });
        }
        let mut users = BTreeMap::new();
        for record in doc.users {
            record.validate()?;
            users.insert(record.username.clone(), record);
        }
        Ok(users)
    }

    /// Reloads the file if it changed since the last load.
    fn refresh(&self) -> Result<(), StoreError> {
        let stamp = self.stamp()?;
        let mut loaded = self.loaded.lock().map_err(|_| self.poisoned())?;
        if loaded.stamp != stamp || stamp.is_none() {
            loaded.users = self.read_file()?;
            loaded.stamp = stamp;
        }
        Ok(())
    }

    fn poisoned(&self) -> StoreError {
        self.io_error(std::io::Error::other("in-memory copy poisoned by an earlier panic"))
    }

    fn with_users<T>(&self, f: impl FnOnce(&BTreeMap<String, UserRecord>) -> T) -> Result<T, StoreError> {
        self.refresh()?;
        let loaded = self.loaded.lock().map_err(|_| self.poisoned())?;
        Ok(f(&loaded.users))
    }

    /// Read-modify-write under the cross-process lock.
    fn modify<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, UserRecord>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(|e| self.io_error(e))?;
        let lock_path = self.path.with_extension("lock");
        let mut options = OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        {
            // Empty, but it sits beside the credentials: nobody else's business.
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let lock = options.open(&lock_path).map_err(|e| self.io_error(e))?;
        lock.lock().map_err(|e| self.io_error(e))?;

        let mut users = self.read_file()?;
        let out = f(&mut users)?;
        let doc = Document { version: VERSION, users: users.values().cloned().collect() };
        let text = serde_json::to_string_pretty(&doc).map_err(|e| self.io_error(std::io::Error::other(e)))?;

        let tmp = self.path.with_extension("tmp");
        write_private(&tmp, text.as_bytes()).map_err(|e| self.io_error(e))?;
        fs::rename(&tmp, &self.path).map_err(|e| self.io_error(e))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| self.io_error(e))?;
        drop(lock);

        let mut loaded = self.loaded.lock().map_err(|_| self.poisoned())?;
        loaded.users = users;
        loaded.stamp = self.stamp()?;
        Ok(out)
    }
}

/// Creates `path` with mode 0600 (never briefly world-readable) and fsyncs it.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.create(true).write(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // An existing file keeps its old mode through open(); force it.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

impl FileStore {
    /// Writes many records in one read-modify-write (replacing same-named
    /// ones): provisioning a fleet one `put` at a time would rewrite the
    /// whole file once per device.
    pub async fn put_many(&self, records: &[UserRecord]) -> Result<(), StoreError> {
        for r in records {
            r.validate()?;
        }
        self.modify(|users| {
            for r in records {
                users.insert(r.username.clone(), r.clone());
            }
            Ok(())
        })
    }
}

impl CredentialStore for FileStore {
    async fn get(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        self.with_users(|users| users.get(username).cloned())
    }

    async fn get_many(&self, usernames: &[String]) -> Result<Vec<UserRecord>, StoreError> {
        self.with_users(|users| usernames.iter().filter_map(|u| users.get(u).cloned()).collect())
    }

    async fn put(&self, record: &UserRecord, replace: bool) -> Result<(), StoreError> {
        record.validate()?;
        self.modify(|users| {
            if !replace && users.contains_key(&record.username) {
                return Err(StoreError::Exists(record.username.clone()));
            }
            users.insert(record.username.clone(), record.clone());
            Ok(())
        })
    }

    async fn delete(&self, username: &str) -> Result<bool, StoreError> {
        self.modify(|users| Ok(users.remove(username).is_some()))
    }

    async fn list(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.with_users(|users| users.values().cloned().collect())
    }

    async fn legacy_hash(&self, _username: &str) -> Result<Option<Zeroizing<String>>, StoreError> {
        // The legacy layout is a MongoDB collection; a file never has it.
        Ok(None)
    }

    async fn upgrade_legacy(&self, upgraded: &UserRecord) -> Result<(), StoreError> {
        self.put(upgraded, true).await
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_private_atomic_and_seen_by_other_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.json");
        let a = FileStore::open(&path).unwrap();
        let b = FileStore::open(&path).unwrap();
        assert!(a.get("dev-1").await.unwrap().is_none());

        a.put(&UserRecord::device("dev-1", b"s").unwrap(), false).await.unwrap();
        assert!(matches!(a.put(&UserRecord::device("dev-1", b"t").unwrap(), false).await, Err(StoreError::Exists(_))));
        // A second handle (another process, in real life) sees the change.
        let seen = b.get("dev-1").await.unwrap().unwrap();
        assert!(seen.verify(b"s"));

        let mut disabled = seen.clone();
        disabled.disabled = true;
        b.put(&disabled, true).await.unwrap();
        assert!(a.get("dev-1").await.unwrap().unwrap().disabled);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(fs::metadata(path.with_extension("lock")).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(!path.with_extension("tmp").exists());
        assert!(a.delete("dev-1").await.unwrap());
        assert!(!a.delete("dev-1").await.unwrap());
        assert!(b.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_corrupt_file_is_refused_with_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.json");
        fs::write(&path, "{\"version\": 1,\n \"users\": [ {\"username\": 5} ]}").unwrap();
        let err = FileStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("users.json") && err.contains("line 2"), "{err}");

        fs::write(&path, r#"{"version":1,"users":[{"username":"a/b","password_hash":"00","salt":"","algorithm":"sha256","role":"device"}]}"#).unwrap();
        let err = FileStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("invalid username"), "{err}");
    }
}
