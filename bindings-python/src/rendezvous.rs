//! `devccl._native.RendezvousServer`: a rendezvous server hosted by this process (the torch
//! backend runs one per process group on its rank 0).

use std::sync::Mutex;
use std::time::Duration;

use devccl_core::auth::AuthKey;
use devccl_core::bootstrap::{RendezvousServer, ServerOptions};
use pyo3::prelude::*;

use crate::errors::{Kind, err, to_py};

/// A devccl rendezvous server listening on `listen` (`host:port`; port 0 picks a free one).
/// `world` fixes the size of the group named "world" (other groups take the size of their
/// first joiner); `secret` must match the ranks' DEVCCL_SECRET; a group not complete within
/// `group_timeout` seconds fails for every rank waiting, naming the missing ranks.
#[derive(Debug)]
#[pyclass(frozen, name = "RendezvousServer", module = "devccl._native")]
pub struct PyRendezvousServer {
    server: Mutex<Option<RendezvousServer>>,
    addr: std::net::SocketAddr,
}

#[pymethods]
impl PyRendezvousServer {
    #[new]
    #[pyo3(signature = (listen="127.0.0.1:0", *, world=None, secret=None, group_timeout=120.0))]
    fn new(
        py: Python<'_>,
        listen: &str,
        world: Option<usize>,
        secret: Option<&str>,
        group_timeout: f64,
    ) -> PyResult<Self> {
        if !(group_timeout > 0.0 && group_timeout.is_finite()) {
            return Err(err(
                py,
                Kind::Usage,
                format!("group_timeout must be a positive number of seconds, got {group_timeout}"),
            ));
        }
        let opts = ServerOptions {
            world,
            key: secret.map(AuthKey::from_secret),
            group_timeout: Duration::from_secs_f64(group_timeout),
        };
        let listen = listen.to_string();
        let s = py.detach(move || RendezvousServer::start(&listen, opts)).map_err(|e| to_py(py, e))?;
        let addr = s.local_addr();
        Ok(PyRendezvousServer { server: Mutex::new(Some(s)), addr })
    }

    /// The address it listens on, as `host:port` (IPv6 in brackets).
    #[getter]
    fn address(&self) -> String {
        self.addr.to_string()
    }

    /// The port it listens on.
    #[getter]
    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stop serving (groups still forming fail; the listening socket closes). Idempotent.
    fn shutdown(&self, py: Python<'_>) {
        let s = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = s {
            py.detach(move || s.shutdown());
        }
    }

    fn __repr__(&self) -> String {
        let live = self.server.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        format!("<devccl RendezvousServer {} {}>", self.addr, if live { "serving" } else { "stopped" })
    }
}

impl Drop for PyRendezvousServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            // Shutting down waits briefly for connections to close; do not hold the GIL.
            let _ = Python::try_attach(move |py| py.detach(move || s.shutdown()));
        }
    }
}
