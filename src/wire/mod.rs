//! Celery's wire format over Redis: pure functions from bytes to messages and back.
//! No I/O here; the Redis code in [`crate::broker`] and [`crate::backend`] only moves bytes.

pub mod envelope;
pub mod keys;
pub mod message;
pub mod pyjson;
pub mod pyrepr;
pub mod result;
pub mod time;

pub use envelope::{
    Embed, RejectReason, Rejection, Signature, TaskMessage, dead_letter_entry, parse_message, parse_message_within,
    scan_header_ids,
};
pub use keys::PrioritySteps;
pub use message::{NewTask, UnackedEntry};
pub use result::{ExceptionInfo, ResultMeta, TaskState};
