//! The worker's state file (`--statedb PATH`, Celery's `worker_state_db`): the revoked ids, with
//! the Unix time each was revoked, and the Lamport clock, kept across restarts — so a worker
//! restarted alone (no peer to ask at mingle) still refuses what was revoked before.
//!
//! Our own format, not Celery's shelve file: one JSON document
//! `{"format": "celery-autoscale-statedb", "version": 1, "clock": N, "revoked": [[id, unix_time], …]}`.
//! It is read at start (a missing file is an empty state; an unreadable one stops the start
//! with an error naming the flag: silently starting empty would run tasks that were revoked),
//! written at start (so an unwritable path is found at once), within [`DEBOUNCE`] of every
//! change, and at shutdown. Every write is atomic: a temporary file beside it, flushed to disk,
//! then renamed over it, so a crash leaves the old file or the new one, never half of one.
//! Ids older than Celery's three hours are dropped on load, as Celery purges them at boot;
//! unlike Celery 5.7, which stamps loaded ids with the time of the load, the saved times are kept.

use super::control::WorkerState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How soon after a change the file is written (changes in a burst are written once).
pub const DEBOUNCE: Duration = Duration::from_millis(200);

const FORMAT: &str = "celery-autoscale-statedb";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct File {
    format: String,
    version: u32,
    clock: u64,
    revoked: Vec<(String, f64)>,
}

/// Read `path` into `state`. Returns how many revoked ids were read; a missing file reads as
/// none. The error says what is wrong and the fix, naming the flag.
pub fn load(path: &Path, state: &WorkerState) -> Result<usize, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("--statedb {}: cannot read it ({e})", path.display())),
    };
    let file: File = serde_json::from_slice(&bytes)
        .ok()
        .filter(|f: &File| f.format == FORMAT && f.version == VERSION)
        .ok_or_else(|| {
            format!(
                "--statedb {}: not a celery-autoscale state file (a JSON document with \"format\": \"{FORMAT}\", version {VERSION}); \
                 move it away (the worker then starts with no saved revokes) or name another path",
                path.display()
            )
        })?;
    state.events.adjust_clock(file.clock);
    let n = file.revoked.len();
    state.revoked.add_revoked_at(&file.revoked);
    Ok(n)
}

/// Write `state` to `path` atomically.
pub fn save(path: &Path, state: &WorkerState) -> std::io::Result<()> {
    let file = File {
        format: FORMAT.into(),
        version: VERSION,
        clock: state.events.clock(),
        revoked: state.revoked.ids_with_time(),
    };
    let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    let tmp = temp_path(path);
    let written = (|| {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Write the file within [`DEBOUNCE`] of every change of the revoked set, until aborted.
pub async fn keep_written(path: PathBuf, state: Arc<WorkerState>) {
    let mut changes = state.revoked.changes();
    while changes.changed().await.is_ok() {
        tokio::time::sleep(DEBOUNCE).await;
        changes.borrow_and_update();
        if let Err(e) = save(&path, &state) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the --statedb file; revokes since the last write are not saved");
        }
    }
}
