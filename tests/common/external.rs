//! External programs some tests need (redis-server, nginx, Chromium).
//!
//! `build.rs` marks such tests `ignored` on machines without the program
//! (`#[cfg_attr(missing_redis, ignore = "...")]`), so the test summary shows
//! the skip; a test that runs anyway (under CI, or with `--ignored`) calls
//! [`require`] and fails with the one command that installs what is missing.

use std::path::PathBuf;

/// The install command for each program the tests may need.
pub const INSTALL: [(&str, &str); 4] = [
    ("redis-server", "apt-get install -y redis-server"),
    ("nginx", "apt-get install -y nginx"),
    ("chromium", "apt-get install -y chromium"),
    ("node", "apt-get install -y nodejs npm"),
];

/// The path of `program`, searched on `PATH` and in /usr/sbin.
///
/// # Panics
/// When it is not installed, naming the command that installs it.
pub fn require(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file());
    match found {
        Some(path) => path,
        None => {
            let install = INSTALL
                .iter()
                .find(|(name, _)| *name == program)
                .map_or("install it", |(_, command)| command);
            panic!("{program} is not installed; this test needs it: {install}")
        }
    }
}
