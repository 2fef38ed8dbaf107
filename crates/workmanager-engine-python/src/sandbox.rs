//! The OS-level sandbox of Python children — the real boundary, because an
//! in-interpreter import block list is always bypassable.
//!
//! The host does not fork into a sandbox itself (the service is
//! multi-threaded: only async-signal-safe code may run between fork and exec).
//! Instead it starts its own binary in launcher mode (`LAUNCHER_ARG`), a fresh
//! single-threaded process that applies every layer in order and then execs
//! the interpreter, which inherits them all:
//!
//! 1. parent-death signal (SIGKILL when the service dies); the process group
//!    is set by the host at spawn;
//! 2. every inherited fd closed except stdin/stdout (the protocol) and stderr;
//! 3. an empty network namespace, where the service has the privilege;
//! 4. an empty, read-only working directory, and every capability dropped;
//! 5. rlimits: address space, CPU seconds, open files, file size 0, core 0;
//! 6. `no_new_privs`;
//! 7. Landlock: read-only access to the interpreter, its standard library,
//!    site-packages and the system libraries; execute only the interpreter;
//!    no writes; no TCP bind/connect; no signals or abstract sockets outside;
//! 8. seccomp: no sockets, no execve (but the launcher's own, matched by the
//!    exact filename pointer, which the exec'd program cannot know), no
//!    process creation (only thread clones), no ptrace/process_vm_*, no
//!    mount/setns/unshare/bpf/perf/keyctl/io_uring/modules, no signals to
//!    other processes.
//!
//! `Python:Sandbox` = `strict` refuses to run a child unless every layer
//! applied; `standard` applies what the kernel supports; `off` applies none.
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// First argument that turns the `workmanager` binary into the launcher.
pub const LAUNCHER_ARG: &str = "__python-sandbox";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    Strict,
    Standard,
    Off,
}

impl SandboxMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Strict => "strict",
            SandboxMode::Standard => "standard",
            SandboxMode::Off => "off",
        }
    }
}

/// What the launcher is asked to do (passed as one JSON argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub mode: SandboxMode,
    /// The interpreter; also the only file Landlock lets the child execute.
    pub python: PathBuf,
    /// Interpreter arguments; the launcher appends its `Applied` report.
    pub args: Vec<String>,
    pub workdir: PathBuf,
    /// Directories and files the child may read.
    pub read_paths: Vec<PathBuf>,
    /// Directories whose files may be mapped executable / exec'd (the dynamic
    /// loader and shared libraries live there).
    pub exec_paths: Vec<PathBuf>,
    pub memory_bytes: u64,
    pub cpu_seconds: u64,
    pub open_files: u64,
    /// The service's pid: if the launcher's parent is already another
    /// process, the service died before the death signal was armed.
    pub parent_pid: u32,
}

/// Which layers actually applied, reported by the child in its `ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub mode: String,
    pub pdeathsig: bool,
    pub closed_fds: bool,
    pub netns: bool,
    /// Every capability dropped (matters when the service runs as root).
    pub capabilities: bool,
    pub workdir: bool,
    pub rlimits: bool,
    pub no_new_privs: bool,
    /// "full", "partial" or "none".
    pub landlock: String,
    pub seccomp: bool,
}

impl Applied {
    /// The layers that did not apply (empty: the full sandbox).
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        for (ok, name) in [
            (self.pdeathsig, "parent-death signal"),
            (self.closed_fds, "fd closing"),
            (self.netns, "network namespace"),
            (self.capabilities, "capability drop"),
            (self.workdir, "empty working directory"),
            (self.rlimits, "rlimits"),
            (self.no_new_privs, "no_new_privs"),
            (self.landlock == "full", "landlock"),
            (self.seccomp, "seccomp"),
        ] {
            if !ok {
                m.push(name);
            }
        }
        m
    }

    /// A short description for `ListEngines` and logs, e.g.
    /// "process+rlimits+no_new_privs+landlock+seccomp+netns".
    pub fn describe(&self) -> String {
        let mut parts = vec!["process"];
        if self.rlimits {
            parts.push("rlimits");
        }
        if self.no_new_privs {
            parts.push("no_new_privs");
        }
        match self.landlock.as_str() {
            "full" => parts.push("landlock"),
            "partial" => parts.push("landlock(partial)"),
            _ => {}
        }
        if self.seccomp {
            parts.push("seccomp");
        }
        if self.netns {
            parts.push("netns");
        }
        if self.capabilities {
            parts.push("nocaps");
        }
        parts.join("+")
    }

    pub fn off() -> Self {
        Applied {
            mode: "off".into(),
            landlock: "none".into(),
            ..Default::default()
        }
    }
}

#[cfg(target_os = "linux")]
pub use linux::launcher_main;

#[cfg(not(target_os = "linux"))]
pub fn launcher_main(_spec: &str) -> std::process::ExitCode {
    eprintln!("the Python sandbox launcher needs Linux; set Python:Sandbox=off");
    std::process::ExitCode::from(126)
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::process::ExitCode;

    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset,
        RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
        SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
    };

    use super::{Applied, LaunchSpec, SandboxMode};

    fn say(msg: &str) {
        let _ = writeln!(std::io::stderr(), "sandbox: {msg}");
    }

    /// A layer failed: fatal in strict mode, noted otherwise.
    fn layer(mode: SandboxMode, name: &str, result: Result<(), String>) -> Result<bool, ExitCode> {
        match result {
            Ok(()) => Ok(true),
            Err(e) if mode == SandboxMode::Strict => {
                say(&format!(
                    "{name} could not be applied ({e}); Python:Sandbox=strict refuses to run"
                ));
                Err(ExitCode::from(126))
            }
            Err(e) => {
                say(&format!("{name} not applied: {e}"));
                Ok(false)
            }
        }
    }

    fn errno() -> String {
        std::io::Error::last_os_error().to_string()
    }

    /// The launcher: apply every layer, then exec the interpreter.
    pub fn launcher_main(spec: &str) -> ExitCode {
        let spec: LaunchSpec = match serde_json::from_str(spec) {
            Ok(s) => s,
            Err(e) => {
                say(&format!("bad launch spec: {e}"));
                return ExitCode::from(126);
            }
        };
        match run(&spec) {
            Ok(never) => match never {},
            Err(code) => code,
        }
    }

    enum Never {}

    fn run(spec: &LaunchSpec) -> Result<Never, ExitCode> {
        let mode = spec.mode;
        let mut applied = Applied {
            mode: mode.as_str().into(),
            landlock: "none".into(),
            ..Default::default()
        };
        // Everything the exec needs is allocated before the filters go on.
        let python =
            CString::new(spec.python.as_os_str().as_bytes()).map_err(|_| ExitCode::from(126))?;

        if mode != SandboxMode::Off {
            applied.pdeathsig = layer(mode, "parent-death signal", pdeathsig(spec.parent_pid))?;
            applied.closed_fds = layer(mode, "fd closing", close_fds())?;
            applied.netns = layer(mode, "network namespace", netns())?;
            applied.workdir = layer(mode, "empty working directory", chdir(spec))?;
            applied.capabilities = layer(mode, "capability drop", drop_capabilities())?;
            applied.rlimits = layer(mode, "rlimits", rlimits(spec))?;
            applied.no_new_privs = layer(mode, "no_new_privs", no_new_privs())?;
            let (status, result) = landlock(spec);
            applied.landlock = status.into();
            layer(mode, "landlock", result)?;
        }
        if mode != SandboxMode::Off {
            // Last layer. Allocation stays allowed, so the report and argv
            // are built after it, and the report can say it applied.
            let result = seccomp_program(python.as_ptr() as u64).and_then(|programs| {
                programs
                    .iter()
                    .try_for_each(|p| seccompiler::apply_filter(p).map_err(|e| e.to_string()))
            });
            applied.seccomp = layer(mode, "seccomp", result)?;
        }

        let report = serde_json::to_string(&applied).unwrap_or_default();
        let mut argv: Vec<CString> = Vec::with_capacity(spec.args.len() + 2);
        argv.push(python.clone());
        for a in spec.args.iter().chain(std::iter::once(&report)) {
            argv.push(CString::new(a.as_bytes()).map_err(|_| ExitCode::from(126))?);
        }
        let env = [CString::new("LC_ALL=C.UTF-8").map_err(|_| ExitCode::from(126))?];
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());

        // SAFETY: `python`, `argv` and `env` are live NUL-terminated strings and
        // both pointer arrays end with NULL; execve only returns on failure.
        unsafe { libc::execve(python.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        say(&format!(
            "cannot execute the interpreter {}: {}",
            spec.python.display(),
            errno()
        ));
        Err(ExitCode::from(127))
    }

    fn pdeathsig(parent: u32) -> Result<(), String> {
        // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; no pointers.
        if unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
        } != 0
        {
            return Err(errno());
        }
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } as u32 != parent {
            return Err("the service exited before the child started".into());
        }
        Ok(())
    }

    fn close_fds() -> Result<(), String> {
        // SAFETY: close_range only closes descriptors of this process; 0-2 stay.
        let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        if r == 0 {
            return Ok(());
        }
        for fd in 3..4096 {
            // SAFETY: closing an fd number we do not use later; EBADF is harmless.
            unsafe { libc::close(fd) };
        }
        Ok(())
    }

    fn netns() -> Result<(), String> {
        // SAFETY: unshare takes flags only; it affects this process alone.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("{} (needs CAP_SYS_ADMIN)", errno()));
        }
        Ok(())
    }

    /// Empties the bounding set and the effective, permitted and inheritable
    /// sets, so even a root child has no privilege beyond file ownership.
    fn drop_capabilities() -> Result<(), String> {
        for cap in 0..64 {
            // SAFETY: PR_CAPBSET_DROP takes a capability number; EINVAL for
            // numbers the kernel does not know is expected and ignored.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522,
            pid: 0,
        }; // _LINUX_CAPABILITY_VERSION_3
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: capset reads a v3 header and two data structs, both valid
        // for the duration of the call.
        let r =
            unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
        if r != 0 {
            return Err(errno());
        }
        Ok(())
    }

    fn chdir(spec: &LaunchSpec) -> Result<(), String> {
        std::env::set_current_dir(&spec.workdir).map_err(|e| e.to_string())
    }

    fn rlimits(spec: &LaunchSpec) -> Result<(), String> {
        let limits = [
            (libc::RLIMIT_AS, spec.memory_bytes, "address space"),
            (libc::RLIMIT_CPU, spec.cpu_seconds, "CPU seconds"),
            (libc::RLIMIT_NOFILE, spec.open_files, "open files"),
            (libc::RLIMIT_FSIZE, 0, "file size"),
            (libc::RLIMIT_CORE, 0, "core size"),
        ];
        for (resource, value, name) in limits {
            let lim = libc::rlimit {
                rlim_cur: value as libc::rlim_t,
                rlim_max: value as libc::rlim_t,
            };
            // SAFETY: `lim` is a valid rlimit struct on the stack.
            if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                return Err(format!("{name}: {}", errno()));
            }
        }
        Ok(())
    }

    fn no_new_privs() -> Result<(), String> {
        // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(errno());
        }
        Ok(())
    }

    fn landlock(spec: &LaunchSpec) -> (&'static str, Result<(), String>) {
        let abi = ABI::V6;
        let existing = |paths: &[std::path::PathBuf]| -> Vec<std::path::PathBuf> {
            paths.iter().filter(|p| p.exists()).cloned().collect()
        };
        let build = || -> Result<landlock::RestrictionStatus, landlock::RulesetError> {
            let read = AccessFs::ReadFile | AccessFs::ReadDir;
            let (dirs, files): (Vec<_>, Vec<_>) = existing(&spec.read_paths)
                .into_iter()
                .partition(|p| p.is_dir());
            Ruleset::default()
                .set_compatibility(CompatLevel::BestEffort)
                .handle_access(AccessFs::from_all(abi))?
                .handle_access(AccessNet::from_all(abi))?
                .scope(Scope::from_all(abi))?
                .create()?
                .add_rules(path_beneath_rules(dirs, read))?
                .add_rules(path_beneath_rules(files, AccessFs::ReadFile))?
                .add_rules(path_beneath_rules(
                    existing(&spec.exec_paths),
                    read | AccessFs::Execute,
                ))?
                .add_rules(path_beneath_rules(
                    [&spec.python],
                    AccessFs::ReadFile | AccessFs::Execute,
                ))?
                .restrict_self()
        };
        match build() {
            Ok(status) => match status.ruleset {
                RulesetStatus::FullyEnforced => ("full", Ok(())),
                RulesetStatus::PartiallyEnforced => (
                    "partial",
                    Err("the kernel supports only part of the Landlock rules".into()),
                ),
                RulesetStatus::NotEnforced => (
                    "none",
                    Err("Landlock is not available in this kernel".into()),
                ),
            },
            Err(e) => ("none", Err(e.to_string())),
        }
    }

    fn arch() -> Result<TargetArch, String> {
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())
    }

    fn rule(conds: Vec<Result<Cond, seccompiler::BackendError>>) -> Result<SeccompRule, String> {
        let conds = conds
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        SeccompRule::new(conds).map_err(|e| e.to_string())
    }

    /// Two filters: `clone3` answers ENOSYS (so the C library falls back to
    /// `clone`, where the flags can be inspected); everything else denied
    /// answers EPERM.
    fn seccomp_program(exec_filename: u64) -> Result<Vec<BpfProgram>, String> {
        // SAFETY: getpid has no preconditions; exec keeps the pid.
        let pid = unsafe { libc::getpid() } as u32;
        let arch = arch()?;
        let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        let always: &[libc::c_long] = &[
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_reboot,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_acct,
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
            libc::SYS_userfaultfd,
            libc::SYS_tkill,
            libc::SYS_pidfd_open,
            libc::SYS_pidfd_send_signal,
            libc::SYS_pidfd_getfd,
            // Limits only go down: even a root child cannot lift its rlimits.
            libc::SYS_setrlimit,
            libc::SYS_prlimit64,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_fork,
            #[cfg(target_arch = "x86_64")]
            libc::SYS_vfork,
        ];
        for nr in always {
            deny.insert(*nr, vec![]);
        }
        // execve: only the launcher's own call, by its exact filename pointer.
        deny.insert(
            libc::SYS_execve,
            vec![rule(vec![Cond::new(0, Len::Qword, Op::Ne, exec_filename)])?],
        );
        // clone: threads only.
        deny.insert(
            libc::SYS_clone,
            vec![rule(vec![Cond::new(
                0,
                Len::Qword,
                Op::MaskedEq(libc::CLONE_THREAD as u64),
                0,
            )])?],
        );
        // Signals: only to this process or its own group.
        let neg = (-(pid as i64)) as u32 as u64;
        deny.insert(
            libc::SYS_kill,
            vec![rule(vec![
                Cond::new(0, Len::Dword, Op::Ne, 0),
                Cond::new(0, Len::Dword, Op::Ne, pid as u64),
                Cond::new(0, Len::Dword, Op::Ne, neg),
            ])?],
        );
        for nr in [
            libc::SYS_tgkill,
            libc::SYS_rt_sigqueueinfo,
            libc::SYS_rt_tgsigqueueinfo,
        ] {
            deny.insert(
                nr,
                vec![rule(vec![Cond::new(0, Len::Dword, Op::Ne, pid as u64)])?],
            );
        }
        let main = SeccompFilter::new(
            deny,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(|e| e.to_string())?;
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, vec![])]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| e.to_string())?;
        let main: BpfProgram = main
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
        let clone3: BpfProgram = clone3
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
        Ok(vec![clone3, main])
    }
}
