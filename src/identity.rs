//! What a job is: the program it runs (found as the shell finds it, then made canonical) and
//! its arguments. The default job name comes from them, so `./sim`, `sim` found in `PATH` and
//! `/abs/sim` with the same arguments are one job; each snapshot records the program, a hash
//! of its executable and its arguments, so that a resume can tell when the program was rebuilt.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
pub use supervise_store::format::Origin;

/// Executables larger than this are not hashed (their origin records no hash).
const MAX_HASHED_BYTES: u64 = 1 << 30;

/// The program a job runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    /// Its canonical path (links resolved), which snapshots record.
    pub path: PathBuf,
    /// The path it is run by and named after: its directory's canonical path and its file
    /// name as found, so that `./sim`, `sim` in `PATH` and `/abs/sim` are one, and a program
    /// that is a link (`python3` -> `python3.11`) keeps its job when the link is moved.
    pub run: PathBuf,
    /// The blake3 of the executable file, in hex (`None` when it is too large or unreadable).
    pub exe_blake3: Option<String>,
}

/// Finds `command[0]` as `execvp` would (a name with a `/` relative to the working directory,
/// otherwise the first executable file of that name in `PATH`), resolves it to its canonical
/// path and hashes it. An error names the program and what is wrong, before anything is
/// created in the store.
pub fn resolve(command: &[OsString]) -> Result<Program> {
    let Some(name) = command.first() else {
        bail!("no command given: put the program to run after `--`");
    };
    let given = Path::new(name);
    let found = if name.as_encoded_bytes().contains(&b'/') {
        check_executable(given)?;
        given.to_path_buf()
    } else {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|dir| dir.join(given))
            .find(|p| check_executable(p).is_ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "cannot start {}: no such program in PATH ({})",
                    given.display(),
                    path.to_string_lossy()
                )
            })?
    };
    let path = std::fs::canonicalize(&found)
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", found.display()))?;
    let dir = found.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = std::fs::canonicalize(dir.unwrap_or(Path::new(".")))
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", found.display()))?;
    let run = dir.join(found.file_name().unwrap_or(found.as_os_str()));
    let exe_blake3 = hash_file(&path);
    Ok(Program {
        path,
        run,
        exe_blake3,
    })
}

fn check_executable(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", path.display()))?;
    if !meta.is_file() {
        bail!("cannot start {}: it is not a file", path.display());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!(
            "cannot start {}: it is not executable (chmod +x it, or run its interpreter: \
             supervise -- python3 {})",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

fn hash_file(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    if file.metadata().ok()?.len() > MAX_HASHED_BYTES {
        return None;
    }
    let mut hasher = blake3::Hasher::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file).take(MAX_HASHED_BYTES);
    std::io::copy(&mut reader, &mut hasher).ok()?;
    Some(hasher.finalize().to_hex().to_string())
}

impl Program {
    /// The origin of snapshots taken by this program run with `command`'s arguments.
    pub fn origin(&self, command: &[OsString]) -> Origin {
        Origin {
            program: self.path.to_string_lossy().into_owned(),
            exe_blake3: self.exe_blake3.clone(),
            args: command
                .iter()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        }
    }
}

/// The default job name: the program's file name as given (letters, digits, '-', '_'; `sh`,
/// not the `dash` it links to) and the first 8 hex digits of the blake3 of [`Program::run`]
/// and the arguments (as given: a relative argument names a file relative to where the job
/// runs).
/// For a Python interpreter running a script (or a module, `-m`), the script's name stands
/// in for the program's: `python3 sim.py` is job `sim-...`, not `python3-...`.
pub fn job_name(program: &Program, command: &[OsString]) -> String {
    let hashed = std::iter::once(program.run.as_os_str())
        .chain(command.iter().skip(1).map(|a| a.as_os_str()));
    match script_of(command) {
        Some(script) => name_of(&script, hashed),
        None => name_of(Path::new(&command[0]), hashed),
    }
}

/// The name releases before 0.3 gave a job of a Python script: the interpreter's. A store
/// that holds a job under it (and none under [`job_name`]) keeps it.
pub fn interpreter_job_name(program: &Program, command: &[OsString]) -> String {
    let hashed = std::iter::once(program.run.as_os_str())
        .chain(command.iter().skip(1).map(|a| a.as_os_str()));
    name_of(Path::new(&command[0]), hashed)
}

/// The script (its file stem) or module a Python interpreter (`python`, `python3.11`,
/// `pypy3`) runs, if the command is one.
fn script_of(command: &[OsString]) -> Option<PathBuf> {
    let interpreter = Path::new(command.first()?).file_name()?.to_str()?;
    if !(interpreter.starts_with("python") || interpreter.starts_with("pypy")) {
        return None;
    }
    let mut args = command[1..].iter().map(|a| a.to_str());
    while let Some(arg) = args.next() {
        match arg? {
            "-m" => return args.next().flatten().map(PathBuf::from),
            "-c" | "-" => return None,
            // Options that take a value.
            "-W" | "-X" | "-Q" => {
                args.next();
            }
            option if option.starts_with('-') => {}
            script => return Path::new(script).file_stem().map(PathBuf::from),
        }
    }
    None
}

/// The name releases before 0.2 gave the job: the file name as given and a hash of the command
/// line as typed. A store that holds a job under it (and none under [`job_name`]) keeps it.
pub fn legacy_job_name(command: &[OsString]) -> String {
    name_of(
        Path::new(&command[0]),
        command.iter().map(|a| a.as_os_str()),
    )
}

/// `<clean file name of program>-<first 8 hex digits of the blake3 of the parts, each ended by
/// a NUL>`.
fn name_of<'a>(program: &Path, parts: impl Iterator<Item = &'a std::ffi::OsStr>) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part.as_encoded_bytes());
        hasher.update(&[0]);
    }
    format!(
        "{}-{}",
        clean_base(program),
        &hasher.finalize().to_hex()[..8]
    )
}

fn clean_base(path: &Path) -> String {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        "job".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn equivalent_spellings_of_a_program_are_one_job() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("sim");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A directory reached through a link is the same directory.
        let link = dir.path().join("linked");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let link = link.join("sim");
        let abs = os(&[exe.to_str().unwrap(), "--n", "4"]);
        let dotted = os(&[&format!("{}/./sim", dir.path().display()), "--n", "4"]);
        let linked = os(&[link.to_str().unwrap(), "--n", "4"]);
        let name = |c: &[OsString]| job_name(&resolve(c).unwrap(), c);
        assert_eq!(name(&abs), name(&dotted));
        assert_eq!(name(&abs), name(&linked));
        assert!(name(&abs).starts_with("sim-"), "{}", name(&abs));
        assert_ne!(name(&abs), name(&os(&[exe.to_str().unwrap(), "--n", "5"])));
        // Found in PATH as the shell would, canonical, named as given.
        let sh = resolve(&os(&["sh"])).unwrap();
        assert!(sh.path.is_absolute() && sh.exe_blake3.is_some(), "{sh:?}");
        assert!(job_name(&sh, &os(&["sh"])).starts_with("sh-"));
        let odd = legacy_job_name(&os(&["/x/..py thon\n"]));
        supervise_store::name::validate("job", &odd).unwrap();
    }

    #[test]
    fn a_python_script_names_its_job_not_the_interpreter() {
        let script = |c: &[&str]| script_of(&os(c)).map(|p| p.display().to_string());
        assert_eq!(
            script(&["python3", "examples/heat.py", "--n", "4"]).as_deref(),
            Some("heat")
        );
        assert_eq!(
            script(&["/usr/bin/python3.11", "-u", "-X", "dev", "sim.py"]).as_deref(),
            Some("sim")
        );
        assert_eq!(
            script(&["pypy3", "-m", "model.run"]).as_deref(),
            Some("model.run")
        );
        assert_eq!(script(&["python3", "-c", "print(1)"]), None);
        assert_eq!(script(&["python3"]), None);
        assert_eq!(script(&["./heat", "heat.py"]), None);
        let Ok(python) = resolve(&os(&["python3"])) else {
            return;
        };
        let command = os(&["python3", "examples/heat.py", "--n", "4"]);
        let name = job_name(&python, &command);
        assert!(name.starts_with("heat-"), "{name}");
        supervise_store::name::validate("job", &name).unwrap();
        let module = job_name(&python, &os(&["python3", "-m", "model.run"]));
        assert!(module.starts_with("model_run-"), "{module}");
        // The same hash as the name an earlier release gave it, after the interpreter.
        let earlier = interpreter_job_name(&python, &command);
        assert!(earlier.starts_with("python3-"), "{earlier}");
        assert_eq!(name.rsplit('-').next(), earlier.rsplit('-').next());
    }

    #[test]
    fn a_program_that_cannot_run_is_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("data.txt");
        std::fs::write(&plain, b"x").unwrap();
        let err = resolve(&os(&[plain.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not executable"), "{err}");
        let err = resolve(&os(&["no-such-program-here-xyz"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such program in PATH"), "{err}");
        let err = resolve(&os(&[dir.path().to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a file"), "{err}");
    }
}
