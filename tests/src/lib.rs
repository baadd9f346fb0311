//! braid-tests: whole-network tests that run real processes on 127.0.0.1.
//!
//! Not built yet: the first ones come with the data path (capture, entry points, set
//! reflectors, edges).
