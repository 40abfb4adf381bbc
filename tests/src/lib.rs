//! Shared helpers for Venom cross-crate tests.
