//! A small reader of the kernel's raw BTF (`/sys/kernel/btf/vmlinux`), just
//! enough to find struct member offsets.
//!
//! The LSM file hooks read `struct file`, `inode`, `dentry` and `super_block`
//! members whose offsets depend on the kernel's version and configuration.
//! aya has no CO-RE field relocations for Rust eBPF programs and keeps its BTF
//! struct members crate-private, so userspace reads the offsets here and hands
//! them to the programs through the `FILE_OFFSETS` map.
//!
//! Format: <https://docs.kernel.org/bpf/btf.html>.
use enforcer_common::{FileOffsets, SockOffsets};

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// How deep anonymous members and typedef/const chains are followed (a
/// cycle in malformed data ends here).
const MAX_DEPTH: usize = 32;

const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_TYPE_TAG: u8 = 18;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading BTF from {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("BTF: {strukt}.{member} is not a struct or union, cannot look inside it")]
    NotComposite { strukt: String, member: String },
    #[error("BTF: {strukt}.{path} is a bitfield or not byte-aligned")]
    Bitfield { strukt: String, path: String },
}

fn malformed(what: impl Into<String>) -> BtfError {
    BtfError::Malformed(what.into())
}

#[derive(Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset (already split from the bitfield size).
    bit_offset: u32,
    bitfield_size: u32,
}

struct Type {
    name_off: u32,
    kind: u8,
    /// For typedef/const/volatile/restrict/type_tag: the referenced type id.
    size_or_type: u32,
    /// Members of a STRUCT or UNION (empty otherwise).
    members: Vec<Member>,
}

/// Parsed BTF (types + strings), only what we need.
pub struct Btf {
    /// Type id `n` is `types[n - 1]`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

/// Bounds-checked native-endian read (the kernel's BTF is native-endian).
fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    at.checked_add(4)
        .and_then(|end| data.get(at..end))
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| malformed(format!("truncated at byte {at}")))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.into(),
            source,
        })?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < HEADER_LEN {
            return Err(malformed("shorter than its header"));
        }
        if data[..2] != MAGIC.to_ne_bytes() {
            return Err(malformed(format!(
                "bad magic {:02x?} (not BTF, or of the other endianness)",
                &data[..2]
            )));
        }
        if data[2] != 1 {
            return Err(malformed(format!("unsupported version {}", data[2])));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(malformed(format!("header length {hdr_len} < {HEADER_LEN}")));
        }
        let section = |off_at: usize, what: &str| -> Result<&[u8], BtfError> {
            let off = u32_at(data, off_at)? as usize;
            let len = u32_at(data, off_at + 4)? as usize;
            hdr_len
                .checked_add(off)
                .and_then(|s| Some(s..s.checked_add(len)?))
                .and_then(|range| data.get(range))
                .ok_or_else(|| malformed(format!("{what} section out of bounds")))
        };
        let type_sec = section(8, "type")?;
        let strings = section(16, "string")?.to_vec();
        let mut types = Vec::new();
        let mut at = 0usize;
        while at < type_sec.len() {
            let id = types.len() + 1;
            let name_off = u32_at(type_sec, at)?;
            let info = u32_at(type_sec, at + 4)?;
            let size_or_type = u32_at(type_sec, at + 8)?;
            at += 12;
            let n = (info & 0xffff) as usize; // vlen
            let kind = ((info >> 24) & 0x1f) as u8;
            let kind_flag = info >> 31 == 1;
            let trailing = match kind {
                2 | 7..=12 | 16 | 18 => 0,
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * n,
                6 | 13 => 8 * n,
                _ => return Err(malformed(format!("type {id} has unknown kind {kind}"))),
            };
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for i in 0..n {
                    let m = at + 12 * i;
                    let offset = u32_at(type_sec, m + 8)?;
                    let (bit_offset, bitfield_size) = if kind_flag {
                        (offset & 0xff_ffff, offset >> 24)
                    } else {
                        (offset, 0)
                    };
                    members.push(Member {
                        name_off: u32_at(type_sec, m)?,
                        type_id: u32_at(type_sec, m + 4)?,
                        bit_offset,
                        bitfield_size,
                    });
                }
            }
            at = at
                .checked_add(trailing)
                .filter(|&end| end <= type_sec.len())
                .ok_or_else(|| malformed(format!("type {id} runs past the type section")))?;
            types.push(Type {
                name_off,
                kind,
                size_or_type,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Follow typedef/const/volatile/restrict/type_tag to a STRUCT or UNION.
    fn composite(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..MAX_DEPTH {
            let t = self.get(id)?;
            match t.kind {
                KIND_STRUCT | KIND_UNION => return Some(t),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return None,
            }
        }
        None
    }

    /// Find member `name` in `t`, descending into anonymous struct/union
    /// members; the bit offset returned is from the start of `t`. `depth`
    /// and `budget` bound the work on malformed (cyclic) data.
    fn find_member(&self, t: &Type, name: &str, depth: usize, budget: &mut u32) -> Option<Member> {
        *budget = budget.checked_sub(1)?;
        if depth > MAX_DEPTH {
            return None;
        }
        if let Some(m) = t.members.iter().find(|m| self.name(m.name_off) == name) {
            return Some(*m);
        }
        t.members
            .iter()
            .filter(|m| self.name(m.name_off).is_empty())
            .find_map(|anon| {
                let inner =
                    self.find_member(self.composite(anon.type_id)?, name, depth + 1, budget)?;
                Some(Member {
                    bit_offset: anon.bit_offset.checked_add(inner.bit_offset)?,
                    ..inner
                })
            })
    }

    /// Byte offset of `path` ("f_path.dentry" walks into nested members)
    /// inside struct `strukt`.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut t = self
            .types
            .iter()
            .find(|t| {
                t.kind == KIND_STRUCT && !t.members.is_empty() && self.name(t.name_off) == strukt
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let mut bits: u64 = 0;
        let mut walked = String::new();
        for part in path.split('.') {
            if !walked.is_empty() {
                walked.push('.');
            }
            walked.push_str(part);
            let m = Some(part)
                .filter(|p| !p.is_empty())
                .and_then(|p| self.find_member(t, p, 0, &mut 10_000))
                .ok_or_else(|| BtfError::NoMember {
                    strukt: strukt.into(),
                    member: walked.clone(),
                })?;
            if m.bitfield_size != 0 || m.bit_offset % 8 != 0 {
                return Err(BtfError::Bitfield {
                    strukt: strukt.into(),
                    path: walked,
                });
            }
            bits += u64::from(m.bit_offset);
            if walked.len() < path.len() {
                t = self
                    .composite(m.type_id)
                    .ok_or_else(|| BtfError::NotComposite {
                        strukt: strukt.into(),
                        member: walked.clone(),
                    })?;
            }
        }
        u32::try_from(bits / 8).map_err(|_| malformed(format!("{strukt}.{path}: offset too large")))
    }
}

/// The offsets the LSM file hooks need.
pub fn file_offsets(btf: &Btf) -> Result<FileOffsets, BtfError> {
    Ok(FileOffsets {
        file_f_inode: btf.member_offset("file", "f_inode")?,
        file_dentry: btf.member_offset("file", "f_path.dentry")?,
        inode_i_ino: btf.member_offset("inode", "i_ino")?,
        inode_i_sb: btf.member_offset("inode", "i_sb")?,
        sb_s_dev: btf.member_offset("super_block", "s_dev")?,
        dentry_d_parent: btf.member_offset("dentry", "d_parent")?,
        dentry_d_inode: btf.member_offset("dentry", "d_inode")?,
        valid: 1,
    })
}

/// `task_struct.nsproxy`, `nsproxy.mnt_ns`, `mnt_namespace.ns.inum`: the
/// exec hold reads the current task's mount namespace through them.
pub fn mnt_ns_offsets(btf: &Btf) -> Result<(u32, u32, u32), BtfError> {
    Ok((
        btf.member_offset("task_struct", "nsproxy")?,
        btf.member_offset("nsproxy", "mnt_ns")?,
        btf.member_offset("mnt_namespace", "ns.inum")?,
    ))
}

/// The offsets through which the cgroup programs read the current task's
/// cgroup id and process id.
pub fn task_offsets(btf: &Btf) -> Result<enforcer_common::TaskOffsets, BtfError> {
    Ok(enforcer_common::TaskOffsets {
        task_tgid: btf.member_offset("task_struct", "tgid")?,
        task_cgroups: btf.member_offset("task_struct", "cgroups")?,
        css_set_dfl_cgrp: btf.member_offset("css_set", "dfl_cgrp")?,
        cgroup_kn: btf.member_offset("cgroup", "kn")?,
        kn_id: btf.member_offset("kernfs_node", "id")?,
        valid: 1,
    })
}

/// Whether this kernel lets a cgroup program read the current task the
/// way `enforcer-ebpf`'s `identity::current_ids` does: load (never attach)
/// a `cgroup/connect4` program that calls `bpf_get_current_task_btf` and
/// walks `o`'s offsets. Cgroup programs may call that helper only on
/// kernels that offer it to every program type (not on the oldest this
/// project supports); where the load fails, the programs call
/// `bpf_get_current_cgroup_id` instead. Err: the verifier's refusal.
pub fn task_walk_loads(o: &enforcer_common::TaskOffsets) -> Result<(), String> {
    let off = |v: u32| i16::try_from(v).map_err(|_| format!("offset {v} too large"));
    let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| -> u64 {
        u64::from(code)
            | (u64::from(dst | (src << 4)) << 8)
            | (u64::from(off as u16) << 16)
            | (u64::from(imm as u32) << 32)
    };
    const CALL: u8 = 0x85;
    const MOV64_REG: u8 = 0xbf;
    const LDX_W: u8 = 0x61;
    const LDX_DW: u8 = 0x79;
    const JEQ_IMM: u8 = 0x15;
    const MOV64_IMM: u8 = 0xb7;
    const EXIT: u8 = 0x95;
    const GET_CURRENT_TASK_BTF: i32 = 158;
    let insns = [
        insn(CALL, 0, 0, 0, GET_CURRENT_TASK_BTF),
        insn(MOV64_REG, 6, 0, 0, 0),
        insn(LDX_W, 1, 6, off(o.task_tgid)?, 0),
        insn(LDX_DW, 2, 6, off(o.task_cgroups)?, 0),
        insn(JEQ_IMM, 2, 0, 5, 0),
        insn(LDX_DW, 3, 2, off(o.css_set_dfl_cgrp)?, 0),
        insn(JEQ_IMM, 3, 0, 3, 0),
        insn(LDX_DW, 4, 3, off(o.cgroup_kn)?, 0),
        insn(JEQ_IMM, 4, 0, 1, 0),
        insn(LDX_DW, 5, 4, off(o.kn_id)?, 0),
        insn(MOV64_IMM, 0, 0, 0, 1),
        insn(EXIT, 0, 0, 0, 0),
    ];
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const CGROUP_SOCK_ADDR: u32 = 18;
    const CGROUP_INET4_CONNECT: u32 = 10;
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = ProgLoad {
        prog_type: CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: CGROUP_INET4_CONNECT,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid `union bpf_attr` prefix for BPF_PROG_LOAD
    // (the kernel zero-extends it); the buffers it points to outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            std::ptr::from_mut(&mut attr).cast::<libc::c_void>(),
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        let text = String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)])
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        return Err(format!("{err}: {text}"));
    }
    // SAFETY: a file descriptor the kernel just returned to us.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// The offsets the LSM socket hooks need (a socket's cgroup id).
pub fn sock_offsets(btf: &Btf) -> Result<SockOffsets, BtfError> {
    Ok(SockOffsets {
        socket_sk: btf.member_offset("socket", "sk")?,
        sock_family: btf.member_offset("sock", "__sk_common.skc_family")?,
        sock_cgroup: btf.member_offset("sock", "sk_cgrp_data.cgroup")?,
        cgroup_kn: btf.member_offset("cgroup", "kn")?,
        kn_id: btf.member_offset("kernfs_node", "id")?,
        kn_parent: btf
            .member_offset("kernfs_node", "parent")
            .or_else(|_| btf.member_offset("kernfs_node", "__parent"))?,
        file_f_inode: btf.member_offset("file", "f_inode")?,
        file_private_data: btf.member_offset("file", "private_data")?,
        inode_i_mode: btf.member_offset("inode", "i_mode")?,
        valid: 1,
    })
}

/// `struct bpf_sock_addr_kern`'s `uaddr` and `uaddrlen` (the unix socket
/// hooks read the address through them). `uaddrlen` exists since Linux 6.7,
/// the first kernel with those hooks.
pub fn sock_addr_offsets(btf: &Btf) -> Result<(u32, u32), BtfError> {
    Ok((
        btf.member_offset("bpf_sock_addr_kern", "uaddr")?,
        btf.member_offset("bpf_sock_addr_kern", "uaddrlen")?,
    ))
}

/// The offsets the BPF LSM unix hooks need.
pub fn unix_lsm_offsets(btf: &Btf) -> Result<enforcer_common::UnixLsmOffsets, BtfError> {
    Ok(enforcer_common::UnixLsmOffsets {
        socket_sk: btf.member_offset("socket", "sk")?,
        sock_cgroup: btf.member_offset("sock", "sk_cgrp_data.cgroup")?,
        cgroup_kn: btf.member_offset("cgroup", "kn")?,
        kn_id: btf.member_offset("kernfs_node", "id")?,
        kn_parent: btf
            .member_offset("kernfs_node", "parent")
            .or_else(|_| btf.member_offset("kernfs_node", "__parent"))?,
        unix_sock_addr: btf.member_offset("unix_sock", "addr")?,
        unix_sock_dentry: btf.member_offset("unix_sock", "path.dentry")?,
        unix_address_len: btf.member_offset("unix_address", "len")?,
        unix_address_name: btf.member_offset("unix_address", "name")?,
        valid: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-assembled native-endian BTF.
    #[derive(Default)]
    struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Blob {
        fn s(&mut self, name: &str) -> u32 {
            if self.strings.is_empty() {
                self.strings.push(0);
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        /// One type: header, then `trailing` words.
        fn ty(&mut self, name: u32, kind: u32, kflag: bool, vlen: u32, st: u32, trailing: &[u32]) {
            let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
            for w in [name, info, st].iter().chain(trailing) {
                self.types.extend_from_slice(&w.to_ne_bytes());
            }
        }
        fn build(&mut self) -> Vec<u8> {
            self.s("");
            let (tl, sl) = (self.types.len() as u32, self.strings.len() as u32);
            let mut out = MAGIC.to_ne_bytes().to_vec();
            out.extend_from_slice(&[1, 0]);
            for w in [24, 0, tl, tl, sl] {
                out.extend_from_slice(&u32::to_ne_bytes(w));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// Every kind with trailing data comes before the structs, so a wrong
    /// skip would misplace them.
    fn synthetic() -> Vec<u8> {
        let mut b = Blob::default();
        let (int, a, bb) = (b.s("int"), b.s("A"), b.s("B"));
        b.ty(int, 1, false, 0, 4, &[32]); // 1 INT
        b.ty(0, 2, false, 0, 1, &[]); // 2 PTR -> int
        b.ty(0, 3, false, 0, 0, &[1, 1, 4]); // 3 ARRAY
        b.ty(a, 6, false, 2, 4, &[a, 0, bb, 1]); // 4 ENUM
        b.ty(0, 13, false, 1, 1, &[0, 1]); // 5 FUNC_PROTO
        b.ty(a, 14, false, 0, 1, &[0]); // 6 VAR
        b.ty(bb, 15, false, 1, 4, &[6, 0, 4]); // 7 DATASEC
        b.ty(a, 17, false, 0, 6, &[0]); // 8 DECL_TAG
        b.ty(bb, 19, false, 1, 8, &[a, 0, 0]); // 9 ENUM64
        b.ty(a, 16, false, 0, 8, &[]); // 10 FLOAT
        b.ty(a, 18, false, 0, 1, &[]); // 11 TYPE_TAG
        b.ty(a, 12, false, 0, 5, &[]); // 12 FUNC
        let (target, bf, outer, x) = (b.s("target"), b.s("bf"), b.s("outer"), b.s("x"));
        // 13: anonymous union with kind_flag: target at bit 32, bf 5 bits at bit 3.
        b.ty(0, 5, true, 2, 8, &[target, 1, 32, bf, 1, 3 | (5 << 24)]);
        b.ty(0, 10, false, 0, 13, &[]); // 14 CONST -> 13
        b.ty(outer, 7, false, 0, 0, &[]); // 15 FWD outer
        b.ty(outer, 4, false, 0, 0, &[]); // 16 empty struct outer (not taken)
        b.ty(outer, 4, false, 2, 16, &[x, 1, 0, 0, 14, 64]); // 17 outer
        let (outer_t, holder, o, p) = (b.s("outer_t"), b.s("holder"), b.s("o"), b.s("p"));
        b.ty(outer_t, 8, false, 0, 17, &[]); // 18 TYPEDEF -> outer
        b.ty(holder, 4, false, 2, 40, &[p, 2, 0, o, 18, 128]); // 19 holder
        b.build()
    }

    #[test]
    fn synthetic_anonymous_members_and_kind_flag() {
        let btf = Btf::parse(&synthetic()).unwrap();
        assert_eq!(btf.types.len(), 19);
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "target").unwrap(), 12);
        assert_eq!(btf.member_offset("holder", "o.target").unwrap(), 28);
        assert_eq!(btf.member_offset("holder", "o.x").unwrap(), 16);
        let err = |s, p| btf.member_offset(s, p).unwrap_err().to_string();
        assert_eq!(
            err("outer", "bf"),
            "BTF: outer.bf is a bitfield or not byte-aligned"
        );
        assert_eq!(
            err("holder", "o.nope"),
            "BTF struct holder has no member o.nope"
        );
        assert_eq!(err("holder", "o."), "BTF struct holder has no member o.");
        assert_eq!(err("missing", "x"), "BTF has no struct missing");
        assert!(err("holder", "p.x").contains("holder.p is not a struct or union"));
    }

    /// The fuzzer's seed (`fuzz/seeds/btf/synthetic`) is this blob.
    #[test]
    #[cfg(target_endian = "little")]
    fn fuzz_seed_is_the_synthetic_blob() {
        let seed = include_bytes!("../../../fuzz/seeds/btf/synthetic");
        assert_eq!(seed.as_slice(), synthetic().as_slice());
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error_not_a_panic() {
        let good = synthetic();
        for n in 0..good.len() {
            assert!(
                Btf::parse(&good[..n]).is_err(),
                "prefix of {n} bytes parsed"
            );
        }
        assert!(Btf::parse(&[0x9f, 0xeb, 2, 0, 24, 0, 0, 0].repeat(3)).is_err()); // version
        assert!(Btf::parse(&[0xeb, 0x9f, 1, 0, 24, 0, 0, 0].repeat(3)).is_err()); // swapped
                                                                                  // Every byte replaced by a few values: must not panic (nor hang).
        let mut seed = 0x2545_f491_u32;
        for i in 0..good.len() {
            for v in [0x00, 0xff, 0x80, 0x01] {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let mut bad = good.clone();
                bad[i] = v;
                bad[(seed as usize) % good.len()] ^= (seed >> 16) as u8;
                if let Ok(btf) = Btf::parse(&bad) {
                    let _ = btf.member_offset("holder", "o.target");
                    let _ = btf.member_offset("outer", "bf");
                }
            }
        }
        // A struct whose anonymous members are itself (twice): bounded.
        let mut b = Blob::default();
        let lp = b.s("loop");
        b.ty(lp, 4, false, 2, 8, &[0, 1, 0, 0, 1, 0]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(btf.member_offset("loop", "x").is_err());
    }

    /// The real kernel's BTF; checked against layouts read in the kernel
    /// source (include/linux/fs.h, dcache.h, path.h).
    #[test]
    fn host_kernel_offsets() {
        let btf = Btf::from_sys_fs().expect("this test needs /sys/kernel/btf/vmlinux");
        let o = file_offsets(&btf).unwrap();
        assert_eq!(o.valid, 1);
        let all = [
            o.file_f_inode,
            o.file_dentry,
            o.inode_i_ino,
            o.inode_i_sb,
            o.sb_s_dev,
            o.dentry_d_parent,
            o.dentry_d_inode,
        ];
        assert!(all.iter().all(|&v| v > 0 && v < 1024), "{o:?}");
        // Any 64-bit kernel: super_block starts with `struct list_head
        // s_list` (two pointers) then `dev_t s_dev`; `struct path` is
        // { mnt, dentry }; dentry has `d_parent`, then `struct qstr d_name`
        // (16 bytes; inside an anonymous union in recent kernels), then `d_inode`;
        // inode has `i_sb`, `i_mapping`, [`i_security`], `i_ino`.
        assert_eq!(o.sb_s_dev, 16);
        assert_eq!(btf.member_offset("path", "dentry").unwrap(), 8);
        assert_eq!(
            o.file_dentry,
            btf.member_offset("file", "f_path").unwrap() + 8
        );
        assert_eq!(o.dentry_d_inode, o.dentry_d_parent + 24);
        assert!([16, 24].contains(&(o.inode_i_ino - o.inode_i_sb)), "{o:?}");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        if release.starts_with("6.18.") {
            // struct bpf_sock_addr_kern { struct sock *sk; struct sockaddr
            // *uaddr; u64 tmp_reg; void *t_ctx; u32 uaddrlen; }
            assert_eq!(sock_addr_offsets(&btf).unwrap(), (8, 32));
            // The BPF LSM unix hooks' offsets resolve too (`kernfs_node`'s
            // parent is `__parent` since 6.15), and so do the socket hooks'.
            let u = unix_lsm_offsets(&btf).unwrap();
            assert_eq!(
                (u.valid, u.socket_sk != 0, u.unix_sock_addr != 0),
                (1, true, true)
            );
            let so = sock_offsets(&btf).unwrap();
            assert_eq!(
                (so.valid, so.socket_sk, so.kn_parent != 0),
                (1, u.socket_sk, true)
            );
            // v6.18 with FS_POSIX_ACL, SECURITY and no lock debugging (this
            // host, and the usual distribution kernel): `struct file` is
            // f_lock(4) f_mode(4) f_op f_mapping private_data f_inode(32) ...
            // f_owner(56), then the union holding f_path at 64.
            let expected = FileOffsets {
                file_f_inode: 32,
                file_dentry: 72,
                inode_i_ino: 64,
                inode_i_sb: 40,
                sb_s_dev: 16,
                dentry_d_parent: 24,
                dentry_d_inode: 48,
                valid: 1,
            };
            assert_eq!(o, expected);
        }
    }
}
