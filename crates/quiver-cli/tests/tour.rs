//! The README's tour, run word for word: the shell blocks between
//! `<!-- tour:begin -->` and `<!-- tour:end -->` in README.md, in order, in
//! an empty folder, with the `quiver` under test first on PATH, against a
//! real server on loopback. Any failing command fails the test.

mod common;

use std::path::Path;
use std::process::Command;

/// The tour's commands: the ```sh blocks between the markers, as written.
fn tour_script(readme: &str) -> String {
    let begin = readme
        .find("<!-- tour:begin -->")
        .expect("tour:begin marker");
    let end = readme.find("<!-- tour:end -->").expect("tour:end marker");
    let mut script = String::new();
    let mut in_block = false;
    for line in readme[begin..end].lines() {
        match line.trim_end() {
            "```sh" => in_block = true,
            "```" => in_block = false,
            l if in_block => {
                script.push_str(l);
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

#[test]
fn the_readme_tour_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let tour = tour_script(&readme);
    assert!(tour.lines().count() > 20, "the tour is too short: {tour}");
    // The tour's server listens on its documented port.
    assert!(
        std::net::UdpSocket::bind("127.0.0.1:4433").is_ok(),
        "something already listens on UDP 127.0.0.1:4433, where the tour's server goes"
    );
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(common::bin()).parent().unwrap().to_path_buf();
    // Where the `sqlite3` shell is missing, a stand-in with Python's
    // sqlite3 module runs the tour's one `sqlite3 FILE "SQL"` line.
    let shims = dir.path().join("shims");
    std::fs::create_dir(&shims).unwrap();
    if Command::new("sqlite3").arg("-version").output().is_err() {
        let shim = shims.join("sqlite3");
        std::fs::write(
            &shim,
            "#!/bin/sh\nexec python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             c.executescript(sys.argv[2]); c.commit()' \"$@\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Stop on the first failing command; stop the tour's background jobs
    // whatever happens.
    let wrapped = format!(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{tour}\necho TOUR-DONE\n"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&wrapped)
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("QUIVER_DB")
        .env_remove("QUIVER_TOKEN")
        .env_remove("QUIVER_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("TOUR-DONE"),
        "the tour failed ({}).\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // What the tour says happens, happened.
    assert!(stdout.contains("ship it on Friday"), "{stdout}");
    assert!(
        stdout.contains("\"id\":\"n3\"") || stdout.contains("id:       n3"),
        "{stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
