//! Where things are by default.

use std::path::PathBuf;

/// `$SNAPBLK_DATA_DIR`, else `/var/lib/snapblk` for root, else
/// `$XDG_DATA_HOME/snapblk` or `~/.local/share/snapblk`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SNAPBLK_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/snapblk");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("snapblk");
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/snapblk")
}

/// The control socket the CLI talks to: `--control`, else `$SNAPBLK_CONTROL`,
/// else the default data directory's `control.sock`.
pub fn client_control_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os("SNAPBLK_CONTROL")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| default_data_dir().join("control.sock"))
}
