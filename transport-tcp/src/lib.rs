//! TCP transport (in progress).
#![forbid(unsafe_code)]
