//! Small helpers for the tasks sessions and streams spawn.

/// Aborts a task when the session or stream that owns it ends, however it ends.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
