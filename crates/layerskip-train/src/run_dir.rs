//! The output directory of a training run: one run at a time (a lock file), checked before the
//! first step (writable, room for a checkpoint), never silently over an earlier run, and
//! checkpoint files written so that a failed write (a full disk) is reported, never lost.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use burn::record::{FullPrecisionSettings, Recorder, RecorderError};
use burn::tensor::backend::Backend;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, TrainError};

/// How a run starts in its output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run: the directory must not hold an earlier one.
    Fresh,
    /// A new run that first deletes the earlier run's checkpoints in the directory.
    Overwrite,
    /// Continue the run whose latest checkpoint the directory holds.
    Resume,
}

/// A training run's output directory, locked for as long as this value lives.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    /// The open `.lock` file; the OS drops the lock when the process ends, even on `kill -9`.
    _lock: File,
    removed: Vec<PathBuf>,
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TrainError {
    TrainError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl RunDir {
    /// Creates (if needed) and locks `path`, checks that it is writable, removes temporary
    /// directories left by an interrupted save, and applies `start`: a fresh run is refused if an
    /// earlier run's checkpoints are there, an overwrite deletes them, a resume needs them.
    pub fn open(path: &Path, start: Start) -> Result<Self> {
        if path.exists() && !path.is_dir() {
            return Err(file_error(path, "exists and is not a directory"));
        }
        if start == Start::Resume && !path.is_dir() {
            return Err(file_error(path, "--resume: no such directory"));
        }
        std::fs::create_dir_all(path).map_err(|e| file_error(path, e))?;
        let lock_path = path.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                file_error(
                    &lock_path,
                    format!("the output directory is not writable: {e}"),
                )
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(file_error(
                    path,
                    "another training run is writing to this directory (it holds .lock); \
                     wait for it to end or choose another --out",
                ));
            }
            Err(TryLockError::Error(e)) => return Err(file_error(&lock_path, e)),
        }
        probe_writable(path)?;
        let mut removed = Vec::new();
        for entry in entries(path)? {
            let name = entry.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(".checkpoint-") && name.ends_with(".tmp") {
                std::fs::remove_dir_all(&entry).map_err(|e| file_error(&entry, e))?;
                removed.push(entry);
            }
        }
        let earlier = earlier_run(path)?;
        match start {
            Start::Fresh if !earlier.is_empty() => {
                let names: Vec<String> = earlier
                    .iter()
                    .map(|p| {
                        p.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .into_owned()
                    })
                    .collect();
                return Err(file_error(
                    path,
                    format!(
                        "holds an earlier run ({}); pass --resume to continue it, --overwrite to \
                         replace it, or choose another --out",
                        names.join(", ")
                    ),
                ));
            }
            Start::Overwrite => {
                for old in earlier {
                    if old.is_dir() {
                        std::fs::remove_dir_all(&old)
                    } else {
                        std::fs::remove_file(&old)
                    }
                    .map_err(|e| file_error(&old, e))?;
                    removed.push(old);
                }
                sync_dir(path)?;
            }
            Start::Resume if latest_checkpoint(path).is_none() => {
                return Err(file_error(path, "--resume: no checkpoint to resume from"));
            }
            _ => {}
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
            removed,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What [`RunDir::open`] deleted: interrupted saves, and with [`Start::Overwrite`] the
    /// earlier run's checkpoints.
    pub fn removed(&self) -> &[PathBuf] {
        &self.removed
    }

    /// Fails if the file system holding the directory has less than `bytes` free.
    pub fn check_space(&self, bytes: u64) -> Result<()> {
        let free = fs4::available_space(&self.path).map_err(|e| file_error(&self.path, e))?;
        if free < bytes {
            return Err(file_error(
                &self.path,
                format!(
                    "a checkpoint needs about {} MB but only {} MB are free",
                    bytes.div_ceil(1 << 20),
                    free / (1 << 20)
                ),
            ));
        }
        Ok(())
    }
}

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_error(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    out.sort();
    Ok(out)
}

/// What an earlier run wrote in `dir`: its numbered `checkpoint-NNNNNN` directories and the
/// `latest` pointer (not a user's `checkpoint-best/` or other files).
fn earlier_run(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(entries(dir)?
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            let numbered = name
                .strip_prefix("checkpoint-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            (numbered && p.is_dir()) || name == "latest"
        })
        .collect())
}

/// Creates, writes, syncs and deletes a file in `dir`.
fn probe_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    let result = File::create(&probe).and_then(|mut f| {
        f.write_all(b"layerskip")?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    result.map_err(|e| file_error(dir, format!("the output directory is not writable: {e}")))
}

/// Makes a rename or a deletion in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| file_error(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Burn's named MessagePack format (files load with `NamedMpkFileRecorder` and back), written so
/// that every error reaches the caller: Burn's file recorder writes through a `BufWriter` that it
/// drops without flushing explicitly, so an error in the last buffered write (a full disk) is lost
/// and a truncated file looks saved. This one flushes, syncs to disk, and names the file in the
/// error. `RecordArgs` is the full path, extension included.
#[derive(Debug, Default, Clone)]
pub struct DurableMpkRecorder;

/// A writer that keeps the first I/O error, which MessagePack's encoder reports only as text.
struct KeepError<W> {
    inner: W,
    error: Option<std::io::Error>,
}

impl<W: Write> Write for KeepError<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| {
            self.error
                .get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// "`path`: `error`", with the error of a full disk spelled out.
fn write_error(path: &Path, error: &std::io::Error) -> RecorderError {
    let what = if error.kind() == std::io::ErrorKind::StorageFull {
        format!("no space left on the device writing {}", path.display())
    } else {
        format!("writing {}: {error}", path.display())
    };
    RecorderError::Unknown(what)
}

impl<B: Backend> Recorder<B> for DurableMpkRecorder {
    type Settings = FullPrecisionSettings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(
        &self,
        item: I,
        path: PathBuf,
    ) -> std::result::Result<(), RecorderError> {
        let file = File::create(&path).map_err(|e| write_error(&path, &e))?;
        let mut writer = KeepError {
            inner: BufWriter::new(file),
            error: None,
        };
        if let Err(e) = rmp_serde::encode::write_named(&mut writer, &item) {
            return Err(match writer.error {
                Some(io) => write_error(&path, &io),
                None => RecorderError::Unknown(format!("encoding {}: {e}", path.display())),
            });
        }
        let file = writer
            .inner
            .into_inner()
            .map_err(|e| write_error(&path, e.error()))?;
        file.sync_all().map_err(|e| write_error(&path, &e))
    }

    fn load_item<I: DeserializeOwned>(
        &self,
        path: &mut PathBuf,
    ) -> std::result::Result<I, RecorderError> {
        let file = File::open(&*path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RecorderError::FileNotFound(path.display().to_string()),
            _ => RecorderError::Unknown(format!("{}: {e}", path.display())),
        })?;
        rmp_serde::decode::from_read(BufReader::new(file))
            .map_err(|e| RecorderError::Unknown(format!("{}: {e}", path.display())))
    }
}

/// The checkpoint that `out_dir/latest` points at, if any.
pub fn latest_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(out_dir.join("latest")).ok()?;
    let dir = out_dir.join(name.trim());
    dir.join("trainer_state.json").is_file().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("layerskip-rundir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_run_on_a_locked_directory_is_refused_until_the_first_ends() {
        let dir = tmp("lock");
        let first = RunDir::open(&dir, Start::Fresh).unwrap();
        let err = RunDir::open(&dir, Start::Fresh).unwrap_err().to_string();
        assert!(err.contains("another training run"), "{err}");
        drop(first);
        RunDir::open(&dir, Start::Fresh).unwrap();
    }

    #[test]
    fn an_earlier_run_is_refused_replaced_or_resumed_and_stale_saves_are_removed() {
        let dir = tmp("earlier");
        std::fs::create_dir_all(dir.join("checkpoint-000002")).unwrap();
        std::fs::write(dir.join("checkpoint-000002/trainer_state.json"), "{}").unwrap();
        std::fs::write(dir.join("latest"), "checkpoint-000002").unwrap();
        std::fs::create_dir_all(dir.join(".checkpoint-000004.tmp")).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        std::fs::create_dir_all(dir.join("checkpoint-best")).unwrap();
        std::fs::write(dir.join("checkpoint-best/config.json"), "{}").unwrap();

        let err = RunDir::open(&dir, Start::Fresh).unwrap_err().to_string();
        assert!(
            err.contains("earlier run (checkpoint-000002, latest)") && err.contains("--overwrite"),
            "{err}"
        );
        assert!(!dir.join(".checkpoint-000004.tmp").exists());
        assert!(dir.join("checkpoint-000002").is_dir());

        RunDir::open(&dir, Start::Resume).unwrap();
        let run = RunDir::open(&dir, Start::Overwrite).unwrap();
        assert_eq!(run.removed().len(), 2);
        assert!(!dir.join("checkpoint-000002").exists() && !dir.join("latest").exists());
        assert!(
            dir.join("notes.txt").is_file() && dir.join("checkpoint-best/config.json").is_file(),
            "only the run's numbered checkpoints are deleted"
        );
        drop(run);
        let err = RunDir::open(&dir, Start::Resume).unwrap_err().to_string();
        assert!(err.contains("no checkpoint"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_read_only_directory_is_reported_before_training() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp("readonly");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        // Root ignores permissions; the check is meaningful only for other users.
        if File::create(dir.join("root-check")).is_ok() {
            eprintln!("SKIPPED: running as root");
            return;
        }
        let err = RunDir::open(&dir, Start::Fresh).unwrap_err().to_string();
        assert!(err.contains("not writable"), "{err}");
    }

    #[test]
    fn a_full_disk_is_reported_naming_the_file_and_a_saved_record_loads_back() {
        type B = burn::backend::Flex;
        let values: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        let item =
            burn::record::BurnRecord::<Vec<f32>, B>::new::<DurableMpkRecorder>(values.clone());
        #[cfg(target_os = "linux")]
        {
            // Every write to /dev/full fails with ENOSPC.
            let err = Recorder::<B>::save_item(&DurableMpkRecorder, &item, "/dev/full".into())
                .unwrap_err();
            let text = format!("{err:?}");
            assert!(
                text.contains("no space left on the device writing /dev/full"),
                "{text}"
            );
        }
        let dir = tmp("record");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("values.mpk");
        Recorder::<B>::save_item(&DurableMpkRecorder, &item, path.clone()).unwrap();
        let back: burn::record::BurnRecord<Vec<f32>, B> =
            Recorder::<B>::load_item(&DurableMpkRecorder, &mut path.clone()).unwrap();
        assert_eq!(back.item, values);
    }
}
