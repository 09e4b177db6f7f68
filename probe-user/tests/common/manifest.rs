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

/// A copy of deploy/ in a temporary directory, removed on drop: what a user edits.
struct DeployCopy(PathBuf);

impl Drop for DeployCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("copy of deploy/");
    for entry in std::fs::read_dir(from).expect("deploy/").flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copying deploy/");
        }
    }
}

/// Every object `kubectl kustomize` renders from a copy of deploy/ after `edit` changed its
/// `kustomization.yaml` (given its text, returning the new one).
pub fn rendered_after(edit: impl FnOnce(&str) -> String) -> Vec<Value> {
    let copy = DeployCopy(std::env::temp_dir().join(super::unique("deploy-copy")));
    copy_dir(&root().join("deploy"), &copy.0);
    let file = copy.0.join("kustomization.yaml");
    let text = std::fs::read_to_string(&file).expect("kustomization.yaml");
    std::fs::write(&file, edit(&text)).expect("edited kustomization.yaml");
    yaml_docs(&output(
        Command::new(deploy_tool("kubectl"))
            .arg("kustomize")
            .arg(&copy.0),
    ))
}

/// The Prometheus Operator's objects enabled as kustomization.yaml says: its `components:`
/// lines uncommented.
pub fn rendered_with_monitoring() -> Vec<Value> {
    rendered_after(|text| {
        let enabled = text.replace(
            "# components:\n#   - monitoring\n",
            "components:\n  - monitoring\n",
        );
        assert_ne!(
            enabled, text,
            "kustomization.yaml has no commented `components:` entry"
        );
        enabled
    })
}
