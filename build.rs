//! Tells the integration tests which external programs this machine lacks,
//! so a test that needs one is reported as `ignored` (with the command that
//! installs it) in `cargo test`'s summary instead of passing without having
//! run. Under CI (`CI` set) no test is ignored for a missing program: it
//! fails its tests with the same message.

use std::{
    env,
    path::{Path, PathBuf},
};

/// (cfg set when missing, programs needed). `missing_node` covers the JS
/// codec tests, which need node alone; `missing_browser` the end-to-end
/// page test, which also drives Chromium through `web/node_modules`.
const EXTERNALS: [(&str, &[&str]); 4] = [
    ("missing_redis", &["redis-server"]),
    ("missing_nginx", &["nginx"]),
    ("missing_node", &["node"]),
    ("missing_browser", &["node", "chromium"]),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CI");
    println!("cargo:rerun-if-env-changed=CHROMIUM_PATH");
    // An install (apt-get, npm ci) changes one of these.
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "web"] {
        if Path::new(dir).exists() || dir == "web" {
            println!("cargo:rerun-if-changed={dir}");
        }
    }
    let ci = env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    for (cfg, programs) in EXTERNALS {
        println!("cargo:rustc-check-cfg=cfg({cfg})");
        let mut missing = programs.iter().any(|p| find(p).is_none());
        if cfg == "missing_browser" {
            missing |= !Path::new("web/node_modules/playwright-core").is_dir();
        }
        if missing && !ci {
            println!("cargo:rustc-cfg={cfg}");
        }
    }
}

fn find(program: &str) -> Option<PathBuf> {
    if program == "chromium" {
        if let Ok(path) = env::var("CHROMIUM_PATH") {
            return Some(PathBuf::from(path)).filter(|p| p.exists());
        }
    }
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
