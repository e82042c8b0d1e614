//! Redis: URLs (the one parser, the one redaction), connections (health checks, error kinds,
//! backoff), kombu's transport, Celery's result backend, leases, and every Lua script. The
//! bytes these move are framed by [`crate::wire`].

pub mod backend;
pub mod broker;
pub mod connection;
pub mod lease;
pub mod redis_url;
pub mod scripts;
