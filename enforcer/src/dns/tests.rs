//! Proxy tests.
