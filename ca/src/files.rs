//! Files: the one reader of a state directory's manifest list (every `.yaml` or `.yml` below the
//! folder, sorted; the CA, the policy compiler and the agent all read this list), the
//! fingerprint watchers compare to see a change, and atomic writes.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The manifests below `dir`, sorted, and the directories that could not be read (with why).
pub fn manifests(dir: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, std::io::Error)>) {
    let (mut files, mut unreadable) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                unreadable.push((d, e));
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    unreadable.sort_by(|a, b| a.0.cmp(&b.0));
    (files, unreadable)
}

/// What a state directory looks like: each manifest's path, mtime and size.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// The fingerprint of a state directory (an unreadable one has none).
pub fn fingerprint(dir: &Path) -> Fingerprint {
    manifests(dir)
        .0
        .into_iter()
        .map(|p| {
            let meta = fs::metadata(&p).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (p, mtime, len)
        })
        .collect()
}

/// A write that failed, with the file it was for.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Writes `data` to `path` atomically: a temp file in the same directory, fsync, rename, fsync
/// of the directory. `mode` applies from creation, so a key is never briefly world-readable.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError { path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err(&tmp))?;
    f.write_all(data).map_err(err(&tmp))?;
    f.sync_all().map_err(err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(err(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_every_yaml_file_below_sorted_and_unreadable_folders_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let sub = dir.path().join("b");
        fs::create_dir(&sub).expect("mkdir");
        for f in ["z.yaml", "a.yml", "notes.txt"] {
            fs::write(dir.path().join(f), "").expect("write");
        }
        fs::write(sub.join("c.yaml"), "").expect("write");
        let (files, unreadable) = manifests(dir.path());
        let names: Vec<_> = files
            .iter()
            .map(|p| p.strip_prefix(dir.path()).expect("below").to_path_buf())
            .collect();
        assert_eq!(
            names,
            [PathBuf::from("a.yml"), "b/c.yaml".into(), "z.yaml".into()]
        );
        assert!(unreadable.is_empty());
        let (none, unreadable) = manifests(&dir.path().join("missing"));
        assert!(none.is_empty());
        assert_eq!(unreadable.len(), 1);
        // A change of content shows in the fingerprint.
        let before = fingerprint(dir.path());
        fs::write(dir.path().join("z.yaml"), "kind: Pod\n").expect("write");
        assert_ne!(fingerprint(dir.path()), before);
    }
}
