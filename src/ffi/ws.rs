//! The C face of `crate::ws`.
