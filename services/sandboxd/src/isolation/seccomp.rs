//! The seccomp filters every sandbox process runs under, in the manner of Docker's and Flatpak's
//! default profiles: everything a web app and its tools need is allowed; the system calls that
//! reach past the sandbox (mounts, modules, kexec, BPF, keyrings, tracing, new namespaces, raw
//! clock and swap control, io_uring's separate attack surface) fail with `EPERM`.
//!
//! The programs are compiled with `seccompiler` (rust-vmm's filter compiler) and handed to
//! bubblewrap (`--add-seccomp-fd`), which loads them, with `no_new_privs`, right before the
//! sandbox's first `exec`. Three programs, because one program has one action on a match:
//! the deny list (`EPERM`), `clone3` (`ENOSYS`, so libc falls back to `clone`, whose flags a
//! filter can read, as Docker does), and a guard that refuses x32 system call numbers, which
//! share x86_64's audit architecture and would otherwise walk around the deny list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// System calls refused outright.
const DENIED: &[i64] = &[
    // Mounts and filesystem namespaces.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_mount_setattr,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    // Namespaces: joining or making any (clone's namespace flags are refused below).
    libc::SYS_unshare,
    libc::SYS_setns,
    // The kernel itself.
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_fanotify_init,
    libc::SYS_lookup_dcookie,
    libc::SYS_vhangup,
    // Keyrings are not namespaced.
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    // Tracing and reading other processes' memory.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    // The clocks are the host's.
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    // io_uring: a second system call interface that the rules above could not see into.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
];

/// `clone` flags that make namespaces.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// `ioctl` requests refused: pushing input into a terminal the sandbox shares.
const DENIED_IOCTLS: &[u64] = &[libc::TIOCSTI, libc::TIOCLINUX];

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filters are not built for {0}")]
    Arch(String),
    #[error("compiling the seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
    #[error("writing the seccomp filter: {0}")]
    Io(#[from] std::io::Error),
}

/// The compiled programs, written to files that the jail opens for bubblewrap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filters {
    pub files: Vec<PathBuf>,
}

fn arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH.into()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    Ok(SeccompRule::new(conditions)?)
}

fn masked(arg: u8, len: SeccompCmpArgLen, bit: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        arg,
        len,
        SeccompCmpOp::MaskedEq(bit),
        bit,
    )?)
}

fn equal(arg: u8, len: SeccompCmpArgLen, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value)?)
}

/// The deny list: `EPERM` for each system call in `DENIED`, for `clone` with any namespace
/// flag, and for the terminal `ioctl`s.
pub fn deny_list() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_clone,
        NAMESPACE_FLAGS
            .iter()
            .map(|flag| rule(vec![masked(0, SeccompCmpArgLen::Qword, *flag)?]))
            .collect::<Result<_, _>>()?,
    );
    // The request is an `unsigned int` to the kernel: compare the low 32 bits only, so set
    // high bits cannot disguise it.
    rules.insert(
        libc::SYS_ioctl,
        DENIED_IOCTLS
            .iter()
            .map(|req| rule(vec![equal(1, SeccompCmpArgLen::Dword, *req)?]))
            .collect::<Result<_, _>>()?,
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// `clone3` answers `ENOSYS`: its flags sit behind a pointer no filter can read, and libc
/// takes `ENOSYS` as the cue to use `clone`.
pub fn clone3() -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// On x86_64, system call numbers with the x32 bit set answer `ENOSYS` (they share x86_64's
/// audit architecture, so the deny list's number match would miss them). Elsewhere, nothing.
/// `seccompiler` matches exact numbers only, so this four-instruction range check is written
/// out here, with the kernel's constants.
pub fn x32_guard() -> Option<BpfProgram> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    // BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JGE | BPF_K, BPF_RET | BPF_K.
    const LD_W_ABS: u16 = 0x20;
    const JMP_JGE_K: u16 = 0x05 | 0x30;
    const RET_K: u16 = 0x06;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    Some(vec![
        // seccomp_data.nr is at offset 0.
        stmt(LD_W_ABS, 0),
        sock_filter {
            code: JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ])
}

/// A program as the kernel reads it: 8 bytes per instruction, in native byte order.
pub fn to_bytes(program: &[sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for i in program {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    out
}

impl Filters {
    /// Compiles the programs and writes them under `dir` (readable by root only: bubblewrap
    /// gets them as open descriptors).
    pub fn write(dir: &Path) -> Result<Filters, SeccompError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let mut programs = vec![("deny", deny_list()?), ("clone3", clone3()?)];
        if let Some(guard) = x32_guard() {
            programs.push(("x32", guard));
        }
        let mut files = Vec::new();
        for (name, program) in programs {
            let path = dir.join(format!("{name}.bpf"));
            crate::store::write_atomic(&path, &to_bytes(&program))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            files.push(path);
        }
        Ok(Filters { files })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn programs_compile_to_whole_instructions() {
        for program in [deny_list().unwrap(), clone3().unwrap()] {
            let bytes = to_bytes(&program);
            assert_eq!(bytes.len(), program.len() * 8);
            // The kernel's limit on one program.
            assert!(program.len() <= 4096);
        }
    }

    #[test]
    fn the_deny_list_names_every_namespace_flag_of_clone() {
        // One rule per flag: a clone with any one of them set must match on its own.
        let program = deny_list().unwrap();
        let ks: Vec<u32> = program.iter().map(|i| i.k).collect();
        for flag in NAMESPACE_FLAGS {
            assert!(
                ks.contains(&(*flag as u32)),
                "flag {flag:#x} is not in the program"
            );
        }
    }

    #[test]
    fn files_are_written_for_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = Filters::write(dir.path()).unwrap();
        assert!(f.files.len() >= 2);
        for file in &f.files {
            let meta = std::fs::metadata(file).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert_eq!(meta.len() % 8, 0);
        }
    }
}
