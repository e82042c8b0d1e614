//! Celery's wire format over Redis: pure functions from bytes to messages and back.
//! No I/O here; the Redis code in [`crate::transport::broker`] and [`crate::transport::backend`] only moves bytes.
//!
//! - [`kombu`]: the envelope every message travels in, both ways, and the `unacked` entries;
//! - [`task_read`] / [`task_write`]: task messages (protocol 2, and 1 on the way in);
//! - [`pidbox`]: remote-control requests in, replies out;
//! - [`result`]: result-backend values, both ways;
//! - [`chord`]: the entries of a chord's join and the join itself;
//! - [`keys`]: every Redis key and channel name, and kombu's binding format;
//! - [`pyjson`], [`pyrepr`], [`time`]: how Python prints JSON, reprs and times.
//!
//! Events are written by `crate::worker::events` with `kombu::exchange_message`; their fields are
//! Celery's event schema, which only the worker produces.

pub mod chord;
pub mod keys;
pub mod kombu;
pub mod pidbox;
pub mod pyjson;
pub mod pyrepr;
pub mod result;
pub mod task_read;
pub mod task_write;
pub mod time;

pub use keys::PrioritySteps;
pub use kombu::UnackedEntry;
pub use result::{ExceptionInfo, ResultMeta, TaskState};
pub use task_read::{
    Embed, RejectReason, Rejection, Signature, TaskMessage, dead_letter_entry, parse_message, parse_message_within,
    scan_header_ids,
};
pub use task_write::NewTask;
