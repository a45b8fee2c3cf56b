//! Just enough of a BTF reader to find where a kernel struct keeps a field
//! (`task_struct.sched_info.run_delay`), so that the sched programs can read
//! it at the right offset on this kernel. (Rust eBPF has no CO-RE
//! relocations; the offset is passed in as a read-only global instead.)

use std::{collections::HashMap, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the kernel's BTF at {path} failed: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("this kernel's BTF has no {0}")]
    Missing(String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One struct member: its name, type id and bit offset.
#[derive(Debug, Clone)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

/// The parts of a BTF blob this reader needs.
pub struct Btf {
    strings: Vec<u8>,
    /// Type id → (name offset, kind, size-or-type, members if struct/union).
    types: Vec<(u32, u32, u32, Vec<Member>)>,
    structs: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, Error> {
    data.get(at..at + 4)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(Error::Malformed("truncated"))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, Error> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let data = std::fs::read(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob (the format of /sys/kernel/btf/vmlinux).
    pub fn parse(data: &[u8]) -> Result<Self, Error> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(Error::Malformed("bad magic"));
        }
        let header_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_data = data
            .get(header_len + type_off..header_len + type_off + type_len)
            .ok_or(Error::Malformed("type section out of bounds"))?;
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .ok_or(Error::Malformed("string section out of bounds"))?
            .to_vec();
        // Type ids start at 1; id 0 is void.
        let mut types = vec![(0, 0, 0, Vec::new())];
        let mut at = 0;
        while at + 12 <= types_data.len() {
            let name = u32_at(types_data, at)?;
            let info = u32_at(types_data, at + 4)?;
            let size_or_type = u32_at(types_data, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            at += match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let base = at + i * 12;
                        let offset = u32_at(types_data, base + 8)?;
                        members.push(Member {
                            name: u32_at(types_data, base)?,
                            type_id: u32_at(types_data, base + 4)?,
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,        // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12,      // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                _ => return Err(Error::Malformed("unknown type kind")),
            };
            types.push((name, kind, size_or_type, members));
        }
        let mut btf = Self {
            strings,
            types,
            structs: HashMap::new(),
        };
        for (id, (name, kind, _, _)) in btf.types.iter().enumerate() {
            if *kind == KIND_STRUCT && *name != 0 {
                let name = btf.name(*name).to_owned();
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some((_, 8..=11 | 18, next, _)) => id = *next,
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `path` (member names, outermost first) in `structure`,
    /// and the size of the last member's type.
    pub fn member_offset(&self, structure: &str, path: &[&str]) -> Result<(usize, u32), Error> {
        let missing = || Error::Missing(format!("{structure}.{}", path.join(".")));
        let mut id = *self.structs.get(structure).ok_or_else(missing)?;
        let mut bits = 0u64;
        for field in path {
            let (_, _, _, members) = self.types.get(id as usize).ok_or_else(missing)?;
            let member = members
                .iter()
                .find(|m| self.name(m.name) == *field)
                .ok_or_else(missing)?;
            bits += u64::from(member.bit_offset);
            id = self.resolve(member.type_id);
        }
        let size = self
            .types
            .get(id as usize)
            .map_or(0, |(_, _, size, _)| *size);
        Ok(((bits / 8) as usize, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `typedef unsigned long long u64; struct info { int a; u64 delay; };`
    /// and `struct task { char pad[16]; struct info info; };`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0u64\0info\0a\0delay\0task\0pad\0char\0";
        let name = |s: &str| {
            let at = strings
                .windows(s.len() + 1)
                .position(|w| &w[..s.len()] == s.as_bytes() && w[s.len()] == 0)
                .unwrap();
            at as u32
        };
        let mut types: Vec<u8> = Vec::new();
        let mut push = |words: &[u32]| {
            words
                .iter()
                .for_each(|w| types.extend_from_slice(&w.to_le_bytes()))
        };
        push(&[name("int"), 1 << 24, 8, 64]); // [1] INT 8 bytes
        push(&[name("u64"), 8 << 24, 1]); // [2] TYPEDEF u64 -> 1
        push(&[name("info"), (4 << 24) | 2, 16]); // [3] STRUCT info
        push(&[name("a"), 1, 0, name("delay"), 2, 64]);
        push(&[name("char"), 1 << 24, 1, 8]); // [4] INT char
        push(&[0, 3 << 24, 0, 4, 1, 16]); // [5] ARRAY char[16]
        push(&[name("task"), (4 << 24) | 2, 32]); // [6] STRUCT task
        push(&[name("pad"), 5, 0, name("info"), 3, 128]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_nested_member_offsets_through_typedefs() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(
            btf.member_offset("task", &["info", "delay"]).unwrap(),
            (24, 8)
        );
        assert_eq!(btf.member_offset("info", &["a"]).unwrap(), (0, 8));
        assert_eq!(
            btf.member_offset("task", &["nope"])
                .unwrap_err()
                .to_string(),
            "this kernel's BTF has no task.nope"
        );
    }

    #[test]
    fn finds_run_delay_in_this_kernel() {
        let btf = Btf::from_sys_fs().unwrap();
        let (offset, size) = btf
            .member_offset("task_struct", &["sched_info", "run_delay"])
            .unwrap();
        assert_eq!(size, 8);
        assert!(offset > 0 && offset < 16384, "{offset}");
    }
}
