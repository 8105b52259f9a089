//! Presets: [`FileSpec`]s filled in for codes whose checkpoint habits were measured (Debian 12's
//! GROMACS 2022.5 and LAMMPS 20220106; ARCHITECTURE.md, "File mode", says what was measured).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::spec::{Ask, Complete, FilePattern, FileSpec, Resume, StepFrom};

/// A code with a preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// GROMACS `gmx mdrun` (also `gmx_mpi`, `gmx_d`, under `mpirun`).
    Gromacs,
    /// LAMMPS `lmp` with an input that follows README's "LAMMPS" section.
    Lammps,
}

/// The file-mode spec of `preset` for `command`, run in `dir`, with the supervisor's `--every`
/// (`None`: not given).
pub fn spec(
    preset: Preset,
    command: &[OsString],
    dir: &Path,
    every: Option<Duration>,
) -> Result<FileSpec, String> {
    match preset {
        Preset::Gromacs => gromacs(command, dir, every),
        Preset::Lammps if recognise(command) != Some(Preset::Lammps) => Err(
            "--preset lammps runs `lmp ...` (or lmp_*, under mpirun): the command has no `lmp`"
                .into(),
        ),
        Preset::Lammps => Ok(lammps(command, dir, every)),
    }
}

/// The preset for a command that runs a code with one (`gmx mdrun`, `lmp`), if any: said at
/// start when the command runs without one.
pub fn recognise(command: &[OsString]) -> Option<Preset> {
    let name = |w: &OsString| {
        Path::new(w)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let names: Vec<String> = command.iter().map(name).collect();
    if names.iter().any(|n| n == "mdrun") && names.iter().any(|n| n.starts_with("gmx")) {
        return Some(Preset::Gromacs);
    }
    if names.iter().any(|n| n == "lmp" || n.starts_with("lmp_")) {
        return Some(Preset::Lammps);
    }
    None
}

impl Preset {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Gromacs => "gromacs",
            Preset::Lammps => "lammps",
        }
    }
}

fn pattern(text: &str) -> FilePattern {
    // Presets use fixed, valid patterns; a file name from the command line is escaped.
    FilePattern::parse(text).unwrap_or_else(|_| FilePattern {
        text: text.to_owned(),
        dir: PathBuf::new(),
        name: glob::Pattern::new(&glob::Pattern::escape(text)).unwrap_or_default(),
    })
}

/// A file named on the command line, as a pattern matching exactly it.
fn literal(path: &str) -> Result<FilePattern, String> {
    let p = Path::new(path);
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{path:?} names no file"))?;
    let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
    if p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
        return Err(format!(
            "{path:?}: file mode keeps the code's files in its run directory; give a path \
             inside it (relative, without '..')"
        ));
    }
    Ok(FilePattern {
        text: path.to_owned(),
        dir,
        name: glob::Pattern::new(&glob::Pattern::escape(name)).map_err(|e| e.to_string())?,
    })
}

/// GROMACS: TERM makes mdrun checkpoint at its next neighbour-search step and exit 1 (a second
/// TERM: within ~11 steps, exit 2; a third aborts without one, so it is sent once). It renames
/// `md_stepN.cpt` to the checkpoint name when one is whole; `gmx dump -cp` checks it, gives its
/// step and the output files with the lengths a resume needs. No signal asks for a checkpoint
/// without stopping: `--every` becomes `-cpt` (minutes). A resume adds `-cpi`. `-maxh` ends
/// with exit 0 and no `-c` file: the `-c` file tells completion.
fn gromacs(command: &[OsString], dir: &Path, every: Option<Duration>) -> Result<FileSpec, String> {
    let words: Vec<String> = command
        .iter()
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    let at = words.iter().position(|w| w == "mdrun").ok_or(
        "--preset gromacs runs `gmx mdrun ...` (or gmx_mpi, under mpirun): the command has no \
         `mdrun`",
    )?;
    let gmx = match at.checked_sub(1).and_then(|i| words.get(i)) {
        Some(g)
            if Path::new(g)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("gmx")) =>
        {
            g.clone()
        }
        _ => "gmx".to_owned(),
    };
    let args = &words[at + 1..];
    let value = |flag: &str| -> Option<&String> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let deffnm = value("-deffnm");
    let named = |flag: &str, ext: &str, default: &str| -> String {
        value(flag)
            .cloned()
            .or_else(|| deffnm.map(|d| format!("{d}.{ext}")))
            .unwrap_or_else(|| default.to_owned())
    };
    let cpo = named("-cpo", "cpt", "state.cpt");
    let confout = named("-c", "gro", "confout.gro");
    let mut command = command.to_vec();
    let mut advice = Vec::new();
    let schedule = match (value("-cpt"), every) {
        (Some(m), None) => m
            .parse::<f64>()
            .ok()
            .filter(|m| *m > 0.0 && m.is_finite())
            .map(|m| Duration::from_secs_f64(m * 60.0)),
        (Some(_), Some(_)) => {
            return Err(
                "--every and mdrun's -cpt both set the checkpoint interval: give one".into(),
            );
        }
        (None, every) => {
            // GROMACS's own default is 15 minutes; supervise's --every default is 10.
            let every = every.unwrap_or(Duration::from_secs(600));
            command.push("-cpt".into());
            command.push(format!("{}", every.as_secs_f64() / 60.0).into());
            Some(every)
        }
    };
    if !args.iter().any(|a| a == "-reprod") {
        advice.push(
            "mdrun runs without -reprod: a resumed run continues correctly but is not \
             bit-identical to an uninterrupted one (add -reprod, and a fixed -nt, for that)"
                .to_owned(),
        );
    }
    let done_file = if args.iter().any(|a| a == "-noconfout") {
        advice.push(
            "with -noconfout mdrun writes no final coordinates, so its exit 0 is taken as the \
             end of the run, also after a -maxh stop"
                .to_owned(),
        );
        None
    } else {
        Some(PathBuf::from(confout))
    };
    let resume = if args.iter().any(|a| a == "-cpi") {
        // The command names the checkpoint already; mdrun starts fresh when it is absent.
        Resume::Args(Vec::new())
    } else {
        Resume::Args(vec!["-cpi".into(), "{checkpoint}".into()])
    };
    Ok(FileSpec {
        preset: Some("gromacs"),
        checkpoints: vec![literal(&cpo)?],
        complete: vec![Complete::Renamed],
        step: StepFrom::GromacsDump { gmx },
        resume,
        clean_exits: vec![1, 2],
        // mdrun's fatal errors exit 1 too; a stop says this first.
        stop_said: Some("Received the ".into()),
        done_file,
        schedule,
        shuffle: ["*.cpt", "*.trr", "*.xtc", "*.edr"]
            .iter()
            .map(|p| (pattern(p), 4))
            .collect(),
        advice,
        ..FileSpec::new(dir, &command)
    })
}

/// What `gmx dump -cp` tells about a checkpoint.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GromacsDump {
    /// `step = N`.
    pub step: Option<u64>,
    /// Each `output filename = F` with the length recorded for it.
    pub outputs: Vec<(PathBuf, Option<u64>)>,
}

/// Reads `gmx dump -cp`'s output.
pub fn gromacs_dump(text: &str) -> GromacsDump {
    let mut dump = GromacsDump::default();
    let mut high: Option<u64> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "step" if dump.step.is_none() => dump.step = value.parse().ok(),
            "output filename" => {
                dump.outputs.push((PathBuf::from(value), None));
                high = None;
            }
            "file_offset_high" => high = value.parse::<i64>().ok().map(|h| h as u64 & 0xffff_ffff),
            "file_offset_low" => {
                let low = value.parse::<i64>().ok().map(|l| l as u64 & 0xffff_ffff);
                if let (Some(last), Some(high), Some(low)) = (dump.outputs.last_mut(), high, low) {
                    last.1 = Some((high << 32) | low);
                }
            }
            _ => {}
        }
    }
    dump
}

/// LAMMPS: no signal handling at all, so a stop is a file its input watches (`fix halt` on
/// `is_file(STOP)`, then `write_restart`); restart files are written in place and are whole
/// when they start and end with `LammpS RestartT\0`; the step is in their name; a resume passes
/// the restart file as `-var sv_restart FILE` to the same input, which reads it. The input
/// writes `done.txt` when its run reached the end. `OMPI_MCA_ess_singleton_isolated=1` keeps the
/// Debian build's `orted` helper from escaping the program's process group.
fn lammps(command: &[OsString], dir: &Path, every: Option<Duration>) -> FileSpec {
    let mut advice = Vec::new();
    if every.is_some() {
        advice.push(
            "LAMMPS writes restart files on its input's own schedule (`restart N ...`): \
             --every has no effect on it"
                .to_owned(),
        );
    }
    let marker = b"LammpS RestartT\0".to_vec();
    FileSpec {
        preset: Some("lammps"),
        checkpoints: vec![pattern("restart.*")],
        complete: vec![
            Complete::Closed,
            Complete::Starts(marker.clone()),
            Complete::Ends(marker),
        ],
        step: StepFrom::Name,
        ask_stop: Ask::Touch(PathBuf::from("STOP")),
        resume: Resume::Args(vec![
            "-var".into(),
            "sv_restart".into(),
            "{checkpoint}".into(),
        ]),
        done_file: Some(PathBuf::from("done.txt")),
        // No byte shuffle: zstd alone keeps 56% of the melt's restart file, an 8-byte shuffle
        // first 66% (its doubles are interleaved with ints per atom).
        env: vec![("OMPI_MCA_ess_singleton_isolated".into(), "1".into())],
        advice,
        ..FileSpec::new(dir, command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn gromacs_names_its_files_from_the_command_and_maps_every_to_cpt() {
        let s = spec(
            Preset::Gromacs,
            &words("gmx mdrun -s md.tpr -deffnm md -reprod"),
            Path::new("/r"),
            Some(Duration::from_secs(6)),
        )
        .unwrap();
        assert!(s.is_checkpoint(Path::new("md.cpt")));
        assert!(!s.is_checkpoint(Path::new("md_prev.cpt")));
        assert_eq!(s.done_file.as_deref(), Some(Path::new("md.gro")));
        assert_eq!(
            s.command,
            words("gmx mdrun -s md.tpr -deffnm md -reprod -cpt 0.1")
        );
        assert!(s.advice.is_empty());
        assert_eq!(
            s.argv(Some((Path::new("md.cpt"), Some(5)))),
            words("gmx mdrun -s md.tpr -deffnm md -reprod -cpt 0.1 -cpi md.cpt")
        );
        let plain = spec(
            Preset::Gromacs,
            &words("gmx_mpi mdrun -cpt 5"),
            Path::new("/r"),
            None,
        )
        .unwrap();
        assert!(plain.is_checkpoint(Path::new("state.cpt")));
        assert_eq!(plain.done_file.as_deref(), Some(Path::new("confout.gro")));
        assert_eq!(plain.schedule, Some(Duration::from_secs(300)));
        assert_eq!(
            plain.step,
            StepFrom::GromacsDump {
                gmx: "gmx_mpi".into()
            }
        );
        assert_eq!(plain.advice.len(), 1, "no -reprod is said");
        assert!(spec(Preset::Gromacs, &words("lmp -in x"), Path::new("/r"), None).is_err());
        assert!(spec(Preset::Lammps, &words("gmx mdrun"), Path::new("/r"), None).is_err());
        assert!(
            spec(
                Preset::Lammps,
                &words("lmp_mpi -in x"),
                Path::new("/r"),
                None
            )
            .is_ok()
        );
        assert!(
            spec(
                Preset::Gromacs,
                &words("gmx mdrun -cpt 5"),
                Path::new("/r"),
                Some(Duration::from_secs(60))
            )
            .is_err()
        );
    }

    #[test]
    fn gromacs_and_lammps_commands_are_recognised_without_a_preset() {
        assert_eq!(
            recognise(&words("gmx mdrun -deffnm md")),
            Some(Preset::Gromacs)
        );
        assert_eq!(
            recognise(&words("mpirun -n 4 /opt/bin/gmx_mpi mdrun")),
            Some(Preset::Gromacs)
        );
        assert_eq!(recognise(&words("lmp -in in.melt")), Some(Preset::Lammps));
        assert_eq!(recognise(&words("./sim --steps 5")), None);
        assert_eq!(recognise(&words("gmx grompp -f x.mdp")), None);
    }

    #[test]
    fn gmx_dump_gives_the_step_and_each_output_with_its_length() {
        let text = "checkpoint file version = 22\nstep = 1600\nenergy_nsteps = 99\n\
                    output filename = md.log\nfile_offset_high = 0\nfile_offset_low = 26768\n\
                    output filename = md.trr\nfile_offset_high = 1\nfile_offset_low = -2\n";
        let d = gromacs_dump(text);
        assert_eq!(d.step, Some(1600));
        assert_eq!(
            d.outputs,
            vec![
                (PathBuf::from("md.log"), Some(26768)),
                (PathBuf::from("md.trr"), Some((1 << 32) | 0xffff_fffe)),
            ]
        );
    }
}
