//! What file mode knows about a code that writes its own checkpoint files: which files are
//! checkpoints and when one is complete, what belongs with it, how to ask the code for a
//! checkpoint or a stop, how to resume it, and how to tell its completion from a stop. A preset
//! ([`super::preset`]) fills it in for a known code; the `--checkpoint ...` options describe any
//! other.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

/// A file-name pattern (`*`, `?`, `[...]`) relative to the run directory; the directory part, if
/// any, is literal.
#[derive(Clone, Debug)]
pub struct FilePattern {
    /// As given.
    pub text: String,
    /// The directory the files are in, relative to the run directory (empty: the run directory).
    pub dir: PathBuf,
    /// The pattern the file name must match.
    pub name: glob::Pattern,
}

impl FilePattern {
    /// Parses `text`; a pattern in its directory part, an absolute path or `..` is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        let path = Path::new(text);
        if path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
            return Err(format!(
                "{text:?}: give a path relative to the run directory, without '..'"
            ));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{text:?} names no file"))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.to_string_lossy().contains(['*', '?', '[']) {
            return Err(format!(
                "{text:?}: a pattern may match file names only, not directories"
            ));
        }
        let name = glob::Pattern::new(name).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Self {
            text: text.to_owned(),
            dir,
            name,
        })
    }

    /// Whether `rel` (relative to the run directory) matches.
    pub fn matches(&self, rel: &Path) -> bool {
        rel.parent().unwrap_or(Path::new("")) == self.dir
            && rel.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                // `*` does not match a leading dot: hidden and temporary files are never
                // checkpoints unless the pattern says so.
                let options = glob::MatchOptions {
                    require_literal_leading_dot: true,
                    ..glob::MatchOptions::new()
                };
                self.name.matches_with(n, options)
            })
    }
}

/// One test a checkpoint file must pass to count as complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Complete {
    /// The code renames a finished file into place: whatever is at the name is whole.
    Renamed,
    /// The code writes the file in place and closes it: it is whole once it stopped changing
    /// (the same length, time and inode at two scans in a row).
    Closed,
    /// It starts with these bytes.
    Starts(Vec<u8>),
    /// It ends with these bytes.
    Ends(Vec<u8>),
    /// This command, given a copy of the file as `{checkpoint}` (appended when absent), exits 0.
    Command(Vec<String>),
}

impl Complete {
    /// Parses `renamed`, `closed`, `magic=TEXT` (at both ends), `start=TEXT`, `end=TEXT` or
    /// `command=CMD`; TEXT may use `\0`, `\n`, `\\` and `\xHH`.
    pub fn parse(s: &str) -> Result<Vec<Self>, String> {
        let (what, arg) = s.split_once('=').unwrap_or((s, ""));
        Ok(match what {
            "renamed" => vec![Complete::Renamed],
            "closed" => vec![Complete::Closed],
            "magic" => {
                let m = unescape(arg)?;
                vec![Complete::Starts(m.clone()), Complete::Ends(m)]
            }
            "start" => vec![Complete::Starts(unescape(arg)?)],
            "end" => vec![Complete::Ends(unescape(arg)?)],
            "command" => vec![Complete::Command(split_words(arg)?)],
            _ => {
                return Err(format!(
                    "{s:?}: say renamed, closed, magic=TEXT, start=TEXT, end=TEXT or command=CMD"
                ));
            }
        })
        .and_then(|v: Vec<Complete>| match v.first() {
            Some(Complete::Starts(m) | Complete::Ends(m)) if m.is_empty() => {
                Err(format!("{s:?}: the marker is empty"))
            }
            _ => Ok(v),
        })
    }
}

/// How the code is asked for something (a checkpoint, a stop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Send this signal to the program's process group, once.
    Signal(Signal),
    /// Create this file (relative to the run directory); it is removed before each start.
    Touch(PathBuf),
    /// The code cannot be asked.
    Nothing,
}

impl Ask {
    /// Parses `signal=NAME` (`TERM`, `SIGUSR1`, ...), `touch=FILE` or `none`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (what, arg) = s.split_once('=').unwrap_or((s, ""));
        match what {
            "none" => Ok(Ask::Nothing),
            "signal" => {
                let name = arg.to_ascii_uppercase();
                let name = if name.starts_with("SIG") {
                    name
                } else {
                    format!("SIG{name}")
                };
                name.parse::<Signal>()
                    .map(Ask::Signal)
                    .map_err(|_| format!("{s:?}: {arg:?} is not a signal name"))
            }
            "touch" => {
                let p = FilePattern::parse(arg)?;
                if p.text.contains(['*', '?', '[']) {
                    return Err(format!("{s:?}: give a file name, not a pattern"));
                }
                Ok(Ask::Touch(PathBuf::from(arg)))
            }
            _ => Err(format!("{s:?}: say signal=NAME, touch=FILE or none")),
        }
    }
}

/// Where the code's step comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepFrom {
    /// Not known.
    Unknown,
    /// The last run of digits in the checkpoint's file name (`restart.5000`).
    Name,
    /// The first whole number this command prints, given the checkpoint as `{checkpoint}`.
    Command(Vec<String>),
    /// `gmx dump -cp` (the GROMACS preset): it must succeed; its `step = N` line is the step
    /// and the output files it lists are companions, cut to the lengths it records.
    GromacsDump {
        /// The `gmx` program of the command.
        gmx: String,
    },
}

impl StepFrom {
    /// Parses `name`, `command=CMD` or `none`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            None if s == "name" => Ok(StepFrom::Name),
            None if s == "none" => Ok(StepFrom::Unknown),
            Some(("command", cmd)) => Ok(StepFrom::Command(split_words(cmd)?)),
            _ => Err(format!("{s:?}: say name, command=CMD or none")),
        }
    }
}

/// How a resumed run is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The same command with these arguments added at the end.
    Args(Vec<String>),
    /// Another command.
    Command(Vec<String>),
}

/// Everything file mode needs (see the module's doc).
#[derive(Clone, Debug)]
pub struct FileSpec {
    /// The preset it came from, if any (`gromacs`, `lammps`).
    pub preset: Option<&'static str>,
    /// The run directory: the program's working directory, where its files are.
    pub dir: PathBuf,
    /// Which files are checkpoints.
    pub checkpoints: Vec<FilePattern>,
    /// What makes one complete (every test must pass).
    pub complete: Vec<Complete>,
    /// Files that belong with each checkpoint.
    pub companions: Vec<FilePattern>,
    /// A command that, given a copy of the checkpoint as `{checkpoint}`, prints the files that
    /// belong with it, one path (relative to the run directory) per line.
    pub companions_command: Option<Vec<String>>,
    /// The code's step of a checkpoint.
    pub step: StepFrom,
    /// How to ask for a checkpoint (scheduled, SIGUSR1, `supervise snapshot`).
    pub ask_checkpoint: Ask,
    /// How to ask for a stop (SIGINT/SIGTERM to the supervisor, the lease).
    pub ask_stop: Ask,
    /// How a resumed run starts (`{checkpoint}` and `{step}` are substituted).
    pub resume: Resume,
    /// Exit codes that mean "stopped cleanly after a checkpoint" (besides 0).
    pub clean_exits: Vec<i32>,
    /// What the code writes to stderr when it got a stop signal: when set, a clean exit code
    /// nobody asked for is a stop only if the code said it (its fatal errors may exit the same).
    pub stop_said: Option<String>,
    /// A file that exists only once the code has finished (relative to the run directory): an
    /// exit 0 without it (changed during this life) is a stop, not the end.
    pub done_file: Option<PathBuf>,
    /// The code's own checkpoint interval, when known.
    pub schedule: Option<Duration>,
    /// Byte-shuffle width for stored files matching these patterns (floating-point data).
    pub shuffle: Vec<(FilePattern, u8)>,
    /// Environment the program gets besides the supervisor's own.
    pub env: Vec<(String, String)>,
    /// What the preset changed in the command on every start (e.g. `-cpt 10`), already applied.
    pub command: Vec<OsString>,
    /// Things the user should know (e.g. a missing `-reprod`), said once at start.
    pub advice: Vec<String>,
}

impl FileSpec {
    /// A code run as `command` in `dir` about which nothing is known yet: no checkpoint files;
    /// complete once closed; stopped with one SIGTERM; resumed by the same command; its exit 0
    /// is its end.
    pub fn new(dir: &Path, command: &[OsString]) -> Self {
        FileSpec {
            preset: None,
            dir: dir.to_owned(),
            checkpoints: Vec::new(),
            complete: vec![Complete::Closed],
            companions: Vec::new(),
            companions_command: None,
            step: StepFrom::Unknown,
            ask_checkpoint: Ask::Nothing,
            ask_stop: Ask::Signal(Signal::SIGTERM),
            resume: Resume::Args(Vec::new()),
            clean_exits: Vec::new(),
            stop_said: None,
            done_file: None,
            schedule: None,
            shuffle: Vec::new(),
            env: Vec::new(),
            command: command.to_vec(),
            advice: Vec::new(),
        }
    }

    /// The argv of a life: the command, or the resume command, with `{checkpoint}` and `{step}`
    /// replaced when resuming from `resume`.
    pub fn argv(&self, resume: Option<(&Path, Option<u64>)>) -> Vec<OsString> {
        let Some((checkpoint, step)) = resume else {
            return self.command.clone();
        };
        let fill = |word: &String| -> OsString {
            let step = step.map_or_else(|| "0".to_owned(), |s| s.to_string());
            let text = word.replace("{step}", &step);
            match text.split_once("{checkpoint}") {
                None => OsString::from(text),
                Some((before, after)) => {
                    let mut w = OsString::from(before);
                    w.push(checkpoint.as_os_str());
                    w.push(after);
                    w
                }
            }
        };
        match &self.resume {
            Resume::Args(args) => {
                let mut argv = self.command.clone();
                argv.extend(args.iter().map(fill));
                argv
            }
            Resume::Command(cmd) => cmd.iter().map(fill).collect(),
        }
    }

    /// The shuffle width for a stored file.
    pub fn shuffle_for(&self, rel: &Path) -> u8 {
        self.shuffle
            .iter()
            .find(|(p, _)| p.matches(rel))
            .map_or(0, |(_, w)| *w)
    }

    /// The directories checkpoint files are in, relative to the run directory, each once.
    pub fn checkpoint_dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = self.checkpoints.iter().map(|p| p.dir.as_path()).collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Whether `rel` is a checkpoint file.
    pub fn is_checkpoint(&self, rel: &Path) -> bool {
        self.checkpoints.iter().any(|p| p.matches(rel))
    }
}

/// Splits a command line as a POSIX shell would (quotes, backslashes; no expansion).
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    match shlex::split(s) {
        Some(words) if !words.is_empty() => Ok(words),
        Some(_) => Err("the command is empty".into()),
        None => Err(format!("{s:?}: unbalanced quotes")),
    }
}

/// `\0`, `\n`, `\t`, `\\` and `\xHH` in a marker.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'0') => out.push(0),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let v = std::str::from_utf8(&hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("{s:?}: \\x needs two hex digits"))?;
                out.push(v);
            }
            _ => {
                return Err(format!(
                    "{s:?}: unknown escape (use \\0 \\n \\t \\\\ \\xHH)"
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_in_their_directory_only() {
        let p = FilePattern::parse("out/restart.*").unwrap();
        assert!(p.matches(Path::new("out/restart.500")));
        assert!(!p.matches(Path::new("restart.500")));
        assert!(!p.matches(Path::new("out/sub/restart.500")));
        assert!(FilePattern::parse("/abs/x").is_err());
        assert!(FilePattern::parse("../x").is_err());
        assert!(FilePattern::parse("d*/x").is_err());
    }

    #[test]
    fn completeness_asks_and_steps_parse_or_say_why() {
        assert_eq!(
            Complete::parse("magic=LammpS RestartT\\0").unwrap(),
            vec![
                Complete::Starts(b"LammpS RestartT\0".to_vec()),
                Complete::Ends(b"LammpS RestartT\0".to_vec())
            ]
        );
        assert_eq!(
            Complete::parse("command=gmx dump -cp").unwrap(),
            vec![Complete::Command(vec![
                "gmx".into(),
                "dump".into(),
                "-cp".into()
            ])]
        );
        assert!(Complete::parse("magic=").is_err());
        assert!(Complete::parse("sometimes").is_err());
        assert_eq!(
            Ask::parse("signal=term").unwrap(),
            Ask::Signal(Signal::SIGTERM)
        );
        assert_eq!(
            Ask::parse("signal=SIGUSR1").unwrap(),
            Ask::Signal(Signal::SIGUSR1)
        );
        assert_eq!(Ask::parse("touch=STOP").unwrap(), Ask::Touch("STOP".into()));
        assert!(Ask::parse("signal=NOPE").is_err());
        assert!(Ask::parse("touch=/tmp/x").is_err());
        assert_eq!(StepFrom::parse("name").unwrap(), StepFrom::Name);
        assert!(StepFrom::parse("guess").is_err());
    }

    #[test]
    fn a_resumed_life_gets_the_checkpoint_substituted() {
        let spec = FileSpec {
            resume: Resume::Args(vec!["-var".into(), "r".into(), "x{checkpoint}".into()]),
            ..FileSpec::new(
                Path::new("/run"),
                &["lmp", "-in", "in.melt"].map(OsString::from),
            )
        };
        assert_eq!(spec.argv(None), spec.command);
        assert_eq!(
            spec.argv(Some((Path::new("restart.500"), Some(500)))),
            ["lmp", "-in", "in.melt", "-var", "r", "xrestart.500"]
                .map(OsString::from)
                .to_vec()
        );
    }
}
