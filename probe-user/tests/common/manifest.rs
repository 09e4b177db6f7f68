//! deploy/ as the tests read it: the workspace root, the deploy tools `cargo xtask setup`
//! installs (kubectl, a Python with PyYAML), and the kustomize base rendered into JSON values.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A tool of target/deploy-tools (`cargo xtask setup`).
pub fn deploy_tool(name: &str) -> PathBuf {
    let path = root().join("target/deploy-tools/bin").join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo xtask setup`",
        path.display()
    );
    path
}

/// A command's stdout; it must succeed.
pub fn output(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// YAML documents as JSON values (through the tools venv's PyYAML).
pub fn yaml_docs(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(deploy_tool("python3"))
        .args(["-c", "import sys, yaml, json; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), yaml.as_bytes())
        .expect("feeding python");
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success(), "not YAML");
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

/// Every object `kubectl kustomize deploy/` renders.
pub fn rendered() -> Vec<Value> {
    yaml_docs(&output(
        Command::new(deploy_tool("kubectl"))
            .arg("kustomize")
            .arg(root().join("deploy")),
    ))
}
