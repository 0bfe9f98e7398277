//! Values built from files that change while kubetx runs: API tokens and the listener's TLS
//! certificate. Kubernetes updates a mounted Secret by swapping a symlink, which file-event APIs
//! report unreliably, so the files are re-read on an interval and the value is rebuilt when their
//! bytes change. A rebuild that fails keeps the previous value: a half-written certificate or an
//! emptied token file must never take the API down or open it.

use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// SHA-256 over the files' bytes (a missing file counts as empty): changes when any file does.
fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for file in files {
        // Length-prefixed, so that bytes moving from one file to the next still count as a change.
        let bytes = std::fs::read(file).unwrap_or_default();
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
    }
    hash.finalize().into()
}

/// The value `build` makes now (its error if it fails), then each value it makes after any of
/// `files` changed, checked every `interval` until `stop`. `what` names the value in logs;
/// errors are logged by `build`'s message, which must name files, never their contents.
pub fn watch_files<T, E, F>(
    what: &'static str,
    files: Vec<PathBuf>,
    interval: Duration,
    build: F,
    stop: CancellationToken,
) -> Result<watch::Receiver<T>, E>
where
    T: Send + Sync + 'static,
    E: Display,
    F: Fn() -> Result<T, E> + Send + 'static,
{
    // Taken before the first build: a change from here on is seen at the first tick.
    let mut seen = fingerprint(&files);
    let (sender, receiver) = watch::channel(build()?);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sender.closed() => return,
                _ = ticks.tick() => {}
            }
            let now = fingerprint(&files);
            if now == seen {
                continue;
            }
            match build() {
                Ok(value) => {
                    seen = now;
                    sender.send_replace(value);
                    info!(what, "reloaded after its files changed");
                }
                // Retried at the next tick: the files may still be being written.
                Err(error) => warn!(what, %error, "changed files not loaded; keeping the previous value"),
            }
        }
    });
    Ok(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_follows_every_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let files = vec![a.clone(), b.clone()];
        let missing = fingerprint(&files);
        std::fs::write(&a, "xy").expect("writes");
        let one = fingerprint(&files);
        assert_ne!(one, missing);
        std::fs::write(&a, "x").expect("writes");
        std::fs::write(&b, "y").expect("writes");
        assert_ne!(fingerprint(&files), one, "bytes moved from a to b");
    }

    #[tokio::test]
    async fn a_failed_rebuild_keeps_the_previous_value_until_the_files_are_fixed() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("value");
        std::fs::write(&file, "1").expect("writes");
        let attempts = Arc::new(AtomicUsize::new(0));
        let read = {
            let (file, attempts) = (file.clone(), Arc::clone(&attempts));
            move || -> Result<u32, String> {
                attempts.fetch_add(1, Ordering::SeqCst);
                let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
                text.trim().parse().map_err(|_| "not a number".to_owned())
            }
        };
        let stop = CancellationToken::new();
        let every = Duration::from_millis(10);
        let mut value = watch_files("test value", vec![file.clone()], every, read, stop.clone()).expect("reads");
        std::fs::write(&file, "half-writ").expect("writes");
        // Retried at later ticks, never loaded.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while attempts.load(Ordering::SeqCst) < 3 {
            assert!(std::time::Instant::now() < deadline, "no rebuild attempted");
            tokio::time::sleep(every).await;
        }
        assert_eq!((*value.borrow(), value.has_changed().expect("open")), (1, false));
        std::fs::write(&file, "2").expect("writes");
        value.changed().await.expect("reloaded");
        assert_eq!(*value.borrow_and_update(), 2);
        stop.cancel();
        assert!(value.changed().await.is_err(), "the watcher stops with `stop`");
    }
}
