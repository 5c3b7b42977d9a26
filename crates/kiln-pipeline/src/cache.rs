//! The content-addressed stage cache: `ROOT/<stage>/<key>/` holds a stage's output files
//! and `entry.json` (its inputs and the SHA-256 of every output). `key` is the SHA-256 of
//! the stage's inputs; an entry is reused only after every file's hash is checked, and is
//! written into a temp folder renamed into place when complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Schema tag of `entry.json`.
pub const ENTRY_SCHEMA: &str = "kiln.cache-entry/1";
const ENTRY_FILE: &str = "entry.json";

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's content, naming the file on error.
pub fn file_digest(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// A stage's key: SHA-256 over its stage name and its inputs (name → value, sorted).
pub fn stage_key(stage: &str, inputs: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(format!("kiln-stage {stage}\n"));
    for (k, v) in inputs {
        h.update(format!("{k}={v}\n"));
    }
    hex(&h.finalize())
}

/// An output file's record in `entry.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 (hex).
    pub sha256: String,
}

/// `entry.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Always [`ENTRY_SCHEMA`].
    pub schema: String,
    /// Stage name.
    pub stage: String,
    /// The key (SHA-256 of the inputs).
    pub key: String,
    /// The inputs the key was computed from.
    pub inputs: BTreeMap<String, String>,
    /// Output files.
    pub files: BTreeMap<String, FileRecord>,
}

/// What a lookup found.
pub enum Lookup {
    /// A complete entry whose files all match their hashes: name → bytes.
    Hit(BTreeMap<String, Vec<u8>>),
    /// No entry under that key.
    Miss,
    /// An entry that fails its checks (why); it must be rebuilt.
    Corrupted(String),
}

/// The cache under a root folder (`target/kiln/cache`).
#[derive(Debug, Clone)]
pub struct Cache {
    /// The root folder.
    pub root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created on the first store).
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The folder of entry `key` of `stage`.
    pub fn entry_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(stage).join(key)
    }

    /// Looks entry `key` of `stage` up, checking every file against its recorded hash.
    pub fn lookup(&self, stage: &str, key: &str) -> Lookup {
        let dir = self.entry_dir(stage, key);
        if !dir.exists() {
            return Lookup::Miss;
        }
        match self.read_entry(&dir, stage, key) {
            Ok(files) => Lookup::Hit(files),
            Err(e) => Lookup::Corrupted(format!("{e:#}")),
        }
    }

    fn read_entry(&self, dir: &Path, stage: &str, key: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        let bytes = std::fs::read(dir.join(ENTRY_FILE)).context("no readable entry.json")?;
        let entry: Entry = serde_json::from_slice(&bytes).context("entry.json is not valid")?;
        if entry.schema != ENTRY_SCHEMA || entry.stage != stage || entry.key != key {
            bail!("entry.json describes another entry");
        }
        let mut files = BTreeMap::new();
        for (name, rec) in &entry.files {
            let data =
                std::fs::read(dir.join(name)).with_context(|| format!("output {name} missing"))?;
            if data.len() as u64 != rec.size || sha256_hex(&data) != rec.sha256 {
                bail!("output {name} does not match its recorded SHA-256");
            }
            files.insert(name.clone(), data);
        }
        Ok(files)
    }

    /// The recorded inputs of an entry, if it exists and is readable (for explanations).
    pub fn inputs_of(&self, stage: &str, key: &str) -> Option<BTreeMap<String, String>> {
        let bytes = std::fs::read(self.entry_dir(stage, key).join(ENTRY_FILE)).ok()?;
        serde_json::from_slice::<Entry>(&bytes)
            .ok()
            .map(|e| e.inputs)
    }

    /// Stores `files` as entry `key` of `stage`: written into a temp folder (every file
    /// atomically, `entry.json` last), then renamed into place, replacing a corrupted entry.
    pub fn store(
        &self,
        stage: &str,
        key: &str,
        inputs: &BTreeMap<String, String>,
        files: &BTreeMap<String, Vec<u8>>,
    ) -> Result<()> {
        let parent = self.root.join(stage);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create cache folder {}", parent.display()))?;
        let tmp = parent.join(format!(".tmp-{key}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = (|| -> Result<()> {
            std::fs::create_dir(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut records = BTreeMap::new();
            for (name, data) in files {
                if name == ENTRY_FILE || name.contains('/') || name.starts_with('.') {
                    bail!("bad cache file name `{name}`");
                }
                kiln_io::fsutil::write_atomic(&tmp.join(name), data)?;
                records.insert(
                    name.clone(),
                    FileRecord {
                        size: data.len() as u64,
                        sha256: sha256_hex(data),
                    },
                );
            }
            let entry = Entry {
                schema: ENTRY_SCHEMA.into(),
                stage: stage.into(),
                key: key.into(),
                inputs: inputs.clone(),
                files: records,
            };
            kiln_io::fsutil::write_atomic(
                &tmp.join(ENTRY_FILE),
                &serde_json::to_vec_pretty(&entry)?,
            )?;
            let dest = parent.join(key);
            if dest.exists() {
                std::fs::remove_dir_all(&dest)
                    .with_context(|| format!("cannot remove {}", dest.display()))?;
            }
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("cannot move {} into place", dest.display()))?;
            kiln_io::fsutil::sync_dir(&parent);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.with_context(|| format!("storing the {stage} stage in the cache"))
    }

    /// Removes entry `key` of `stage` (a corrupted one before its rebuild).
    pub fn remove(&self, stage: &str, key: &str) -> Result<()> {
        let dir = self.entry_dir(stage, key);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove cache entry {}", dir.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> BTreeMap<String, String> {
        [("model".to_string(), "abc".to_string())].into()
    }

    #[test]
    fn keys_depend_on_every_input_and_the_stage() {
        let a = stage_key("compile", &inputs());
        assert_eq!(a, stage_key("compile", &inputs()));
        assert_ne!(a, stage_key("package", &inputs()));
        let mut other = inputs();
        other.insert("model".into(), "abd".into());
        assert_ne!(a, stage_key("compile", &other));
        other.insert("extra".into(), String::new());
        assert_ne!(
            stage_key("compile", &other),
            stage_key("compile", &inputs())
        );
    }

    #[test]
    fn store_lookup_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let key = stage_key("optimize", &inputs());
        assert!(matches!(cache.lookup("optimize", &key), Lookup::Miss));
        let files: BTreeMap<String, Vec<u8>> = [
            ("model.nnef.tar".to_string(), b"model bytes".to_vec()),
            ("optimize.json".to_string(), b"{}".to_vec()),
        ]
        .into();
        cache.store("optimize", &key, &inputs(), &files).unwrap();
        match cache.lookup("optimize", &key) {
            Lookup::Hit(got) => assert_eq!(got, files),
            _ => panic!("expected a hit"),
        }
        assert_eq!(cache.inputs_of("optimize", &key), Some(inputs()));
        // No temp folder left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("cache/optimize"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![key.clone()]);

        // One flipped byte: detected, never returned.
        let f = cache.entry_dir("optimize", &key).join("model.nnef.tar");
        std::fs::write(&f, b"model bytez").unwrap();
        match cache.lookup("optimize", &key) {
            Lookup::Corrupted(why) => assert!(why.contains("model.nnef.tar"), "{why}"),
            _ => panic!("corruption not detected"),
        }
        // A missing file and a broken entry.json too.
        std::fs::remove_file(&f).unwrap();
        assert!(matches!(
            cache.lookup("optimize", &key),
            Lookup::Corrupted(_)
        ));
        std::fs::write(cache.entry_dir("optimize", &key).join(ENTRY_FILE), b"{").unwrap();
        assert!(matches!(
            cache.lookup("optimize", &key),
            Lookup::Corrupted(_)
        ));
        // Storing again replaces the broken entry.
        cache.store("optimize", &key, &inputs(), &files).unwrap();
        assert!(matches!(cache.lookup("optimize", &key), Lookup::Hit(_)));
        cache.remove("optimize", &key).unwrap();
        assert!(matches!(cache.lookup("optimize", &key), Lookup::Miss));
    }

    #[test]
    fn bad_file_names_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let files: BTreeMap<String, Vec<u8>> = [("../x".to_string(), vec![1])].into();
        assert!(cache.store("s", "k", &inputs(), &files).is_err());
        assert_eq!(std::fs::read_dir(dir.path().join("s")).unwrap().count(), 0);
    }
}
