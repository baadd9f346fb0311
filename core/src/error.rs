//! The crate's error type.

/// Errors from building core state machines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is out of range or contradicts another.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}
