//! faultline's eBPF object: every program and map the loader attaches, one module per concern.
#![no_std]
#![no_main]

mod cgroups;
mod clone;
mod conntrack;
mod dns;
mod kernel;
mod tasks;

/// The programs' license as the kernel reads it: GPL-compatible (`Dual MIT/GPL`), without
/// which the GPL-only helpers (ring buffers, probe reads of kernel memory) are refused.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier proves no program reaches a panic; this only satisfies no_std.
    loop {}
}
