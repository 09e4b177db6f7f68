//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): struct member offsets and
//! enum values, which the eBPF programs need because Rust eBPF has no CO-RE relocations.
//!
//! Only what faultline asks is decoded: the type table is indexed once, then members are
//! looked up by name, through anonymous structs and unions and along dotted paths (`ns.inum`).

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, bail, ensure};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// One decoded type: its kind, name offset and where its trailing records start.
#[derive(Clone, Copy)]
struct TypeEntry {
    kind: u32,
    name_off: u32,
    vlen: u32,
    kind_flag: bool,
    /// Byte offset of the records that follow the common header.
    extra: usize,
}

/// A parsed BTF blob.
pub struct Btf {
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// Index = type id - 1.
    types: Vec<TypeEntry>,
    structs_by_name: HashMap<String, u32>,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> anyhow::Result<Self> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let data =
            std::fs::read(path).with_context(|| format!("reading BTF from {}", path.display()))?;
        Self::parse(data).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    pub fn parse(data: Vec<u8>) -> anyhow::Result<Self> {
        ensure!(data.len() >= 24, "too short for a BTF header");
        ensure!(
            u16::from_le_bytes([data[0], data[1]]) == MAGIC,
            "not little-endian BTF"
        );
        let u32_at = |off: usize| -> anyhow::Result<u32> {
            let b = data.get(off..off + 4).context("truncated BTF")?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let hdr_len = u32_at(4)? as usize;
        let type_off = hdr_len + u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let strings = hdr_len + u32_at(16)? as usize;
        let strings_len = u32_at(20)? as usize;
        ensure!(
            type_off + type_len <= data.len() && strings + strings_len <= data.len(),
            "BTF sections run past the end"
        );

        let mut types = Vec::new();
        let mut pos = type_off;
        let end = type_off + type_len;
        while pos < end {
            let name_off = u32_at(pos)?;
            let info = u32_at(pos + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let extra = pos + 12;
            let extra_len = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                2 | 7..=12 | 16 | 18 => 0,
                other => bail!("unknown BTF kind {other} at byte {pos}"),
            };
            types.push(TypeEntry {
                kind,
                name_off,
                vlen,
                kind_flag: info >> 31 == 1,
                extra,
            });
            pos = extra + extra_len;
        }

        let mut btf = Btf {
            data,
            strings,
            strings_len,
            types,
            structs_by_name: HashMap::new(),
        };
        for (i, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.string(t.name_off).to_owned();
                btf.structs_by_name.entry(name).or_insert(i as u32 + 1);
            }
        }
        Ok(btf)
    }

    fn u32_at(&self, off: usize) -> u32 {
        let b = &self.data[off..off + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn string(&self, off: u32) -> &str {
        let start = self.strings + off as usize;
        let end = self.strings + self.strings_len;
        let Some(bytes) = self.data.get(start..end) else {
            return "";
        };
        let len = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or("")
    }

    fn entry(&self, id: u32) -> Option<&TypeEntry> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    /// Skips typedefs and qualifiers (typedef, volatile, const, restrict, type tag).
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.entry(id) {
                Some(t) if matches!(t.kind, 8..=11 | 18) => id = self.u32_at(t.extra - 4),
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `member` inside the struct named `strukt`. `member` may be a dotted path
    /// through embedded structs (`ns.inum`); anonymous structs and unions are searched.
    pub fn member_offset(&self, strukt: &str, member: &str) -> anyhow::Result<u32> {
        let mut id = *self
            .structs_by_name
            .get(strukt)
            .with_context(|| format!("struct {strukt} not in kernel BTF"))?;
        let mut total = 0u32;
        for (i, part) in member.split('.').enumerate() {
            if i > 0 {
                id = self.resolve(id);
            }
            let (bits, member_type) = self
                .find_member(id, part, 0)
                .with_context(|| format!("{strukt}.{member} not in kernel BTF"))?;
            ensure!(bits % 8 == 0, "{strukt}.{member} is a bitfield");
            total += bits / 8;
            id = member_type;
        }
        Ok(total)
    }

    /// Finds a member by name, descending into anonymous members. Returns (bit offset, type).
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Option<(u32, u32)> {
        let t = self.entry(id)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for m in 0..t.vlen as usize {
            let rec = t.extra + m * 12;
            let m_name = self.u32_at(rec);
            let m_type = self.u32_at(rec + 4);
            let raw_off = self.u32_at(rec + 8);
            let bit_off = if t.kind_flag {
                raw_off & 0x00ff_ffff
            } else {
                raw_off
            };
            if m_name == 0 {
                if let Some((inner, ty)) = self.find_member(self.resolve(m_type), name, depth + 1) {
                    return Some((bit_off + inner, ty));
                }
            } else if self.string(m_name) == name {
                return Some((bit_off, m_type));
            }
        }
        None
    }

    /// Size in bytes of the struct named `strukt`.
    pub fn struct_size(&self, strukt: &str) -> anyhow::Result<u32> {
        let id = *self
            .structs_by_name
            .get(strukt)
            .with_context(|| format!("struct {strukt} not in kernel BTF"))?;
        let t = self.entry(id).context("struct id out of range")?;
        Ok(self.u32_at(t.extra - 4))
    }

    /// Value of an enumerator, looked up by its (globally unique) name, e.g. `pids_cgrp_id`.
    pub fn enum_value(&self, enumerator: &str) -> anyhow::Result<i64> {
        for t in &self.types {
            let (rec_len, is64) = match t.kind {
                KIND_ENUM => (8, false),
                KIND_ENUM64 => (12, true),
                _ => continue,
            };
            for v in 0..t.vlen as usize {
                let rec = t.extra + v * rec_len;
                if self.string(self.u32_at(rec)) != enumerator {
                    continue;
                }
                let lo = self.u32_at(rec + 4);
                return Ok(if is64 {
                    ((self.u32_at(rec + 8) as u64) << 32 | lo as u64) as i64
                } else {
                    lo as i32 as i64
                });
            }
        }
        bail!("enumerator {enumerator} not in kernel BTF")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: `struct outer { int a; union { int b; struct inner in; }; }`,
    /// `struct inner { int x; int y; }`, `enum e { E_ONE = 1, E_NEG = -2 }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0inner\0in\0x\0y\0e\0E_ONE\0E_NEG\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = [name.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .enumerate()
                .find(|(i, w)| *w == needle.as_slice() && (*i == 0 || strings[i - 1] == 0))
                .map(|(i, _)| i as u32)
                .expect("test")
        };
        let mut t: Vec<u8> = Vec::new();
        let mut push = |v: &[u32]| v.iter().for_each(|x| t.extend_from_slice(&x.to_le_bytes()));
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { int x @0; int y @32 }
        push(&[
            s("inner"),
            KIND_STRUCT << 24 | 2,
            8,
            s("x"),
            1,
            0,
            s("y"),
            1,
            32,
        ]);
        // 3: anonymous union { int b; struct inner in; }
        push(&[0, KIND_UNION << 24 | 2, 8, s("b"), 1, 0, s("in"), 2, 0]);
        // 4: struct outer { int a @0; union @64 }
        push(&[
            s("outer"),
            KIND_STRUCT << 24 | 2,
            16,
            s("a"),
            1,
            0,
            0,
            3,
            64,
        ]);
        // 5: enum e
        push(&[
            s("e"),
            KIND_ENUM << 24 | 2,
            4,
            s("E_ONE"),
            1,
            s("E_NEG"),
            (-2i32) as u32,
        ]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn offsets_through_anonymous_members_and_paths() {
        let btf = Btf::parse(sample()).expect("test");
        assert_eq!(btf.member_offset("outer", "a").expect("test"), 0);
        assert_eq!(btf.member_offset("outer", "b").expect("test"), 8);
        assert_eq!(btf.member_offset("outer", "in.y").expect("test"), 12);
        assert_eq!(btf.member_offset("inner", "y").expect("test"), 4);
        assert!(btf.member_offset("outer", "nope").is_err());
        assert!(btf.member_offset("nope", "a").is_err());
    }

    #[test]
    fn enum_values() {
        let btf = Btf::parse(sample()).expect("test");
        assert_eq!(btf.enum_value("E_ONE").expect("test"), 1);
        assert_eq!(btf.enum_value("E_NEG").expect("test"), -2);
        assert!(btf.enum_value("E_NONE").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        let mut bad = sample();
        bad[12] = 0xff; // type_len past the end
        assert!(Btf::parse(bad).is_err());
        let mut bad = sample();
        bad[24 + 7] = 0x1f; // kind 31 in the first type's info
        assert!(Btf::parse(bad).is_err());
    }

    #[test]
    fn reads_the_running_kernel() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("no /sys/kernel/btf/vmlinux here; skipped");
            return;
        };
        // pids_cgroup starts with its css on every kernel.
        assert_eq!(btf.member_offset("pids_cgroup", "css").expect("test"), 0);
        assert!(btf.member_offset("task_struct", "cgroups").expect("test") > 0);
        assert!(btf.member_offset("pid_namespace", "ns.inum").is_ok());
        assert!(btf.enum_value("pids_cgrp_id").is_ok());
    }
}
