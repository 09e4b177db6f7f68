//! Linux capabilities by number (linux/capability.h), named without the `CAP_` prefix, as
//! the manifest names them: one table for the test launcher that reproduces the DaemonSet's
//! capability set, the tests that read capability masks, and xtask's capability matrix (the
//! daemon itself uses the `caps` crate).

/// `NAMES[n]` is capability `n`'s name.
pub const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The number of a capability named with or without `CAP_`, in any case (`bpf`, `CAP_BPF`).
pub fn number(name: &str) -> Option<u32> {
    let name = name.strip_prefix("CAP_").unwrap_or(name);
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|n| n as u32)
}

/// The name of capability `n`, `?` for one this table does not know.
pub fn name(n: u32) -> &'static str {
    NAMES.get(n as usize).copied().unwrap_or("?")
}
