//! braid-entrypoint: the entry point daemon.
//!
//! Not built yet; the issues that build it are listed in the README. It depends on
//! braid-core, where everything it decides lives.
