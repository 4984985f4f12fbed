//! TEMPORARY stand-in for crate::frontend::nbd until it lands.
use crate::engine::{EngineError, View};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
pub trait ExportResolver: Send + Sync + 'static {
    fn resolve(&self, export_name: &str) -> Result<View, EngineError>;
    fn list(&self) -> Vec<String>;
    fn default_export(&self) -> Option<String>;
}
pub struct NbdServer(#[allow(dead_code)] Arc<dyn ExportResolver>);
impl NbdServer {
    pub fn new(resolver: Arc<dyn ExportResolver>) -> NbdServer {
        NbdServer(resolver)
    }
    pub fn listen_unix(&self, path: &Path) -> io::Result<()> {
        std::os::unix::net::UnixListener::bind(path).map(std::mem::forget)
    }
    pub fn listen_tcp(&self, addr: &str) -> io::Result<SocketAddr> {
        let l = std::net::TcpListener::bind(addr)?;
        let a = l.local_addr()?;
        std::mem::forget(l);
        Ok(a)
    }
    pub fn shutdown(&self) {}
}
