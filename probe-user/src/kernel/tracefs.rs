//! tracefs: where it is mounted (mounting it when nobody has), which tracepoints exist and
//! where their fields sit.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds a mounted tracefs. When none is mounted, mounts one at /sys/kernel/tracing (it is
    /// a view of the kernel, not state: mounting it twice is harmless, and aya needs it to
    /// attach tracepoints).
    pub fn find_or_mount() -> anyhow::Result<Self> {
        if let Ok(found) = Self::find() {
            return Ok(found);
        }
        let target = CANDIDATES[0];
        let c_target = std::ffi::CString::new(target)?;
        // SAFETY: plain mount(2) with NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tracefs".as_ptr(),
                c_target.as_ptr(),
                c"tracefs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "tracefs is not mounted and mounting it at {target} failed: {} (mount it, or run faultline as root)",
                std::io::Error::last_os_error()
            );
        }
        Self::find().context("tracefs mounted but its events directory is missing")
    }

    /// A mounted tracefs, without mounting one; or why there is none to read.
    pub fn find() -> Result<Self, Unusable> {
        let mut unreadable = None;
        for root in CANDIDATES.iter().map(PathBuf::from) {
            match std::fs::metadata(root.join("events")) {
                Ok(m) if m.is_dir() => return Ok(Tracefs { root }),
                // Mounted (sysfs's empty mount point would say NotFound), but closed to us.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    unreadable.get_or_insert(root);
                }
                _ => {}
            }
        }
        Err(match unreadable {
            Some(root) => Unusable::Unreadable(root),
            None => Unusable::NotMounted,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn has_event(&self, category: &str, name: &str) -> bool {
        self.root
            .join("events")
            .join(category)
            .join(name)
            .join("id")
            .exists()
    }

    /// Byte offset of `field` in the tracepoint's record, from its `format` file.
    pub fn field_offset(&self, category: &str, name: &str, field: &str) -> anyhow::Result<u32> {
        let path = self
            .root
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let format = std::fs::read_to_string(&path).with_context(|| {
            format!("tracepoint {category}:{name} missing ({})", path.display())
        })?;
        field_offset_in(&format, field)
            .with_context(|| format!("tracepoint {category}:{name} has no field {field}"))
    }
}

/// Why no tracefs can be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Unusable {
    NotMounted,
    /// Mounted here, but this user may not search it (tracefs is root's, mode 0700).
    Unreadable(PathBuf),
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::NotMounted => write!(f, "tracefs not mounted"),
            Unusable::Unreadable(root) => write!(
                f,
                "tracefs is mounted at {} but not readable by this user (uid {}): it needs root, or CAP_DAC_READ_SEARCH",
                root.display(),
                // SAFETY: getuid(2) cannot fail.
                unsafe { libc::getuid() }
            ),
        }
    }
}

impl std::error::Error for Unusable {}

/// Parses `field:<decl> <name>;\toffset:<n>;...` lines of a tracepoint format file.
fn field_offset_in(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("offset:"))?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::field_offset_in;

    const FORMAT: &str = "name: sys_enter_clone3\nID: 123\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
\tfield:struct clone_args * uargs;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:char comm[16];\toffset:24;\tsize:16;\tsigned:0;\n";

    #[test]
    fn finds_fields() {
        assert_eq!(field_offset_in(FORMAT, "uargs"), Some(16));
        assert_eq!(field_offset_in(FORMAT, "__syscall_nr"), Some(8));
        assert_eq!(field_offset_in(FORMAT, "comm"), Some(24));
        assert_eq!(field_offset_in(FORMAT, "size"), None);
    }
}
