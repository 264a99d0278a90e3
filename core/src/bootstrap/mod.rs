//! Rendezvous (placeholder module; see DESIGN §3).
