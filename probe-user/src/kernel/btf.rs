//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`, and a module's split BTF on
//! top of it, e.g. `/sys/kernel/btf/nf_conntrack`): struct member offsets and enum values,
//! which the eBPF programs need because Rust eBPF has no CO-RE relocations.
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

/// A parsed BTF blob (with its base, for a module's split BTF).
pub struct Btf {
    /// The base blob, then the split blob when there is one.
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// A split blob's string section (position in `data`, length): its string offsets
    /// continue after the base's `strings_len`.
    split_strings: Option<(usize, usize)>,
    /// Index = type id - 1.
    types: Vec<TypeEntry>,
    structs_by_name: HashMap<String, u32>,
}

/// The type entries of `data[start..end]`, appended to `types` with their extra data's
/// position moved by `shift` (where the data will sit in a merged buffer).
fn read_types(
    data: &[u8],
    start: usize,
    end: usize,
    shift: usize,
    types: &mut Vec<TypeEntry>,
) -> anyhow::Result<()> {
    let u32_at = |off: usize| -> anyhow::Result<u32> {
        let b = data.get(off..off + 4).context("truncated BTF")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut pos = start;
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
        ensure!(
            extra + extra_len <= end,
            "BTF type {pos} runs past the type section"
        );
        types.push(TypeEntry {
            kind,
            name_off,
            vlen,
            kind_flag: info >> 31 == 1,
            extra: extra + shift,
        });
        pos = extra + extra_len;
    }
    Ok(())
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> anyhow::Result<Self> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    /// BTF from `--btf PATH` when given (a raw BTF file, or a vmlinux ELF with a `.BTF`
    /// section), else the running kernel's.
    pub fn from_option(path: Option<&Path>) -> anyhow::Result<Self> {
        match path {
            Some(p) => Self::from_file(p),
            None => Self::from_kernel(),
        }
    }

    /// A raw BTF file, or an ELF file (a vmlinux) whose `.BTF` section is read.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let data =
            std::fs::read(path).with_context(|| format!("reading BTF from {}", path.display()))?;
        let data = if data.starts_with(b"\x7fELF") {
            btf_section(&data).with_context(|| format!("reading {}", path.display()))?
        } else {
            data
        };
        Self::parse(data).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    /// The running kernel's BTF with a module's on top, for types that only the module
    /// defines (`nf_conn` where conntrack is a module).
    pub fn with_module(&self, module: &str) -> anyhow::Result<Self> {
        let path = Path::new("/sys/kernel/btf").join(module);
        let data =
            std::fs::read(&path).with_context(|| format!("reading BTF from {}", path.display()))?;
        Self::parse_split(data, self)
            .with_context(|| format!("parsing split BTF from {}", path.display()))
    }

    pub fn parse(data: Vec<u8>) -> anyhow::Result<Self> {
        Self::parse_on(data, None)
    }

    /// A split BTF blob (a module's): its type ids and string offsets continue the base's.
    pub fn parse_split(data: Vec<u8>, base: &Btf) -> anyhow::Result<Self> {
        ensure!(base.split_strings.is_none(), "the base is itself split BTF");
        Self::parse_on(data, Some(base))
    }

    fn parse_on(blob: Vec<u8>, base: Option<&Btf>) -> anyhow::Result<Self> {
        let data = &blob;
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
        // Positions in the merged buffer: the base's bytes come first.
        let shift = base.map_or(0, |b| b.data.len());

        let mut types = base.map(|b| b.types.clone()).unwrap_or_default();
        let first_new = types.len();
        read_types(data, type_off, type_off + type_len, shift, &mut types)?;

        let mut btf = match base {
            None => Btf {
                data: blob,
                strings,
                strings_len,
                split_strings: None,
                types,
                structs_by_name: HashMap::new(),
            },
            Some(b) => {
                let mut merged = Vec::with_capacity(b.data.len() + blob.len());
                merged.extend_from_slice(&b.data);
                merged.extend_from_slice(&blob);
                Btf {
                    data: merged,
                    strings: b.strings,
                    strings_len: b.strings_len,
                    split_strings: Some((strings + shift, strings_len)),
                    types,
                    structs_by_name: b.structs_by_name.clone(),
                }
            }
        };
        for i in first_new..btf.types.len() {
            let t = btf.types[i];
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.string(t.name_off).to_owned();
                btf.structs_by_name.entry(name).or_insert(i as u32 + 1);
            }
        }
        Ok(btf)
    }

    /// Whether the struct is described (e.g. `nf_conn`, which a module may define).
    pub fn has_struct(&self, strukt: &str) -> bool {
        self.structs_by_name.contains_key(strukt)
    }

    /// Names of the structs described.
    pub fn struct_names(&self) -> impl Iterator<Item = &str> {
        self.structs_by_name.keys().map(String::as_str)
    }

    fn u32_at(&self, off: usize) -> u32 {
        let b = &self.data[off..off + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn string(&self, off: u32) -> &str {
        let (start, end) = match self.split_strings {
            Some((pos, len)) if off as usize >= self.strings_len => {
                (pos + (off as usize - self.strings_len), pos + len)
            }
            _ => (self.strings + off as usize, self.strings + self.strings_len),
        };
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

/// The `.BTF` section of an ELF file (a vmlinux built with CONFIG_DEBUG_INFO_BTF).
fn btf_section(elf: &[u8]) -> anyhow::Result<Vec<u8>> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(elf).context("not a readable ELF file")?;
    let section = file.section_by_name(".BTF").context(
        "the ELF file has no .BTF section (a kernel built without CONFIG_DEBUG_INFO_BTF?)",
    )?;
    Ok(section.data().context("reading the .BTF section")?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: the header, the type section, the string section.
    fn blob(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        let (t, s) = (types.len() as u32, strings.len() as u32);
        for v in [24u32, 0, t, t, s] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(types);
        out.extend_from_slice(strings);
        out
    }

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
        blob(&t, &strings)
    }

    /// A module's split BTF on top of `sample()`: `struct modstruct { int m @0; struct inner
    /// i @64; }`, its strings and type ids continuing the base's.
    fn split_sample(base_strings_len: u32) -> Vec<u8> {
        let strings = b"modstruct\0m\0i\0".to_vec();
        let s = |off: u32| base_strings_len + off;
        let mut t: Vec<u8> = Vec::new();
        for v in [s(0), KIND_STRUCT << 24 | 2, 16, s(10), 1, 0, s(12), 2, 64] {
            t.extend_from_slice(&v.to_le_bytes());
        }
        blob(&t, &strings)
    }

    #[test]
    fn an_elf_file_is_read_through_its_btf_section() {
        // faultline's own eBPF object is an ELF with a .BTF section describing its types.
        let path = std::env::temp_dir().join(format!("faultline-btf-test-{}", std::process::id()));
        std::fs::write(&path, crate::kernel::inventory::OBJECT).expect("test");
        let btf = Btf::from_file(&path);
        let _ = std::fs::remove_file(&path);
        let btf = btf.expect("test");
        // The offsets global's type, as probe-common defines it.
        assert_eq!(
            btf.member_offset("KernelOffsets", "task_real_parent")
                .expect("test"),
            4
        );
        assert!(btf_section(b"\x7fELF not really").is_err());
    }

    #[test]
    fn split_btf_continues_the_base() {
        let base = Btf::parse(sample()).expect("test");
        let module = Btf::parse_split(split_sample(base.strings_len as u32), &base).expect("test");
        assert!(!base.has_struct("modstruct"));
        assert!(module.has_struct("modstruct"));
        assert_eq!(module.member_offset("modstruct", "i.y").expect("test"), 12);
        // The base's types and strings are still there.
        assert_eq!(module.member_offset("outer", "in.y").expect("test"), 12);
        assert_eq!(module.enum_value("E_NEG").expect("test"), -2);
        assert!(Btf::parse_split(split_sample(0), &module).is_err());
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
