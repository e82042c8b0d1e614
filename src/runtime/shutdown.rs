//! SIGTERM/SIGINT handling shared by every role: the first signal asks for a graceful stop, a
//! second one for an immediate one.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How far shutdown has gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Running,
    /// First signal: stop taking work, finish what is running.
    Graceful,
    /// Second signal (or the grace period ran out): put everything back and exit now.
    Immediate,
}

/// A handle that tells every part of a process how far shutdown has gone.
#[derive(Clone)]
pub struct Shutdown {
    tx: watch::Sender<Stage>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { tx: watch::channel(Stage::Running).0 }
    }
}

impl Shutdown {
    /// Listen for SIGTERM and SIGINT: each signal advances one stage.
    pub fn from_signals() -> std::io::Result<Self> {
        let s = Shutdown::default();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let tx = s.tx.clone();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                let next = match *tx.borrow() {
                    Stage::Running => Stage::Graceful,
                    _ => Stage::Immediate,
                };
                tracing::info!(signal = name, stage = ?next, "shutdown requested");
                tx.send_replace(next);
            }
        });
        Ok(s)
    }

    pub fn stage(&self) -> Stage {
        *self.tx.borrow()
    }

    /// Advance to `stage` (never backwards).
    pub fn advance(&self, stage: Stage) {
        self.tx.send_if_modified(|cur| {
            if stage > *cur {
                *cur = stage;
                true
            } else {
                false
            }
        });
    }

    /// Resolves once shutdown has reached `stage`.
    pub async fn reached(&self, stage: Stage) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|s| *s >= stage).await;
    }
}
