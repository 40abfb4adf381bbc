//! Wave files on this machine: reading them, validating them with the coordinator's own
//! parser, and drawing their DAG.
//!
//! Validation is the parser the coordinator runs ([`venom_core::wave::parse_wave`]), run
//! locally, so `venomctl validate` judges a file exactly as a coordinator with default
//! limits would. `submit` validates with the limits lifted: structure errors are caught
//! before anything is sent, while size limits — configurable per coordinator — are left
//! to the coordinator that will enforce them.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;
use venom_core::wave::{parse_wave, Format, WaveError, WaveLimits, WaveSpec};

use super::Context;
use crate::output::print_json;

/// Largest file read at all (far above any coordinator's sensible spec limit; keeps a
/// mistaken path to a huge file from filling memory).
const MAX_READ_BYTES: u64 = 64 << 20;

/// A wave file read from disk.
#[derive(Debug, Clone)]
pub struct WaveFile {
    pub path: PathBuf,
    pub text: String,
    pub format: Format,
}

impl WaveFile {
    /// Reads `path`; the format comes from the extension (`.json`, `.toml`), else the content.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open wave file {}", path.display()))?;
        let mut bytes = Vec::new();
        file.take(MAX_READ_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read wave file {}", path.display()))?;
        if bytes.len() as u64 > MAX_READ_BYTES {
            anyhow::bail!(
                "{}: wave file is larger than {} MiB",
                path.display(),
                MAX_READ_BYTES >> 20
            );
        }
        let text = String::from_utf8(bytes).map_err(|err| {
            anyhow::anyhow!(
                "{}: wave file: is not valid UTF-8 (byte {})",
                path.display(),
                err.utf8_error().valid_up_to()
            )
        })?;
        Ok(Self {
            path: path.to_owned(),
            text,
            format: format_for(path),
        })
    }

    /// Parses and validates the file under `limits`.
    pub fn parse(&self, limits: &WaveLimits) -> Result<WaveSpec, WaveError> {
        parse_wave(self.text.as_bytes(), self.format, limits)
    }

    /// The format as `SubmitWaveRequest.format` spells it (empty: detect).
    pub fn wire_format(&self) -> &'static str {
        match self.format {
            Format::Toml => "toml",
            Format::Json => "json",
            Format::Auto => "",
        }
    }
}

/// `.json` → JSON, `.toml` → TOML, anything else → detect from the content.
pub fn format_for(path: &Path) -> Format {
    match path
        .extension()
        .and_then(|ext| ext.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("json") => Format::Json,
        Some("toml") => Format::Toml,
        _ => Format::Auto,
    }
}

/// Limits for validating before a submit: everything the coordinator configures is
/// lifted, so only the file's structure is judged here.
pub fn submit_limits() -> WaveLimits {
    WaveLimits {
        max_spec_bytes: MAX_READ_BYTES as usize,
        max_micro_tasks: u64::MAX,
        max_array: u32::MAX,
        max_tasks: usize::MAX,
    }
}

#[derive(Serialize)]
struct ValidationReport<'a> {
    ok: bool,
    file: String,
    name: Option<&'a str>,
    n_tasks: Option<usize>,
    n_micro_tasks: Option<u64>,
    error: Option<ErrorReport>,
}

#[derive(Serialize)]
struct ErrorReport {
    message: String,
    task: Option<String>,
    field: String,
}

/// `venomctl validate FILE`.
pub fn validate(ctx: &Context, path: &Path) -> anyhow::Result<u8> {
    let file = WaveFile::read(path)?;
    let result = file.parse(&WaveLimits::default());
    let display = path.display().to_string();
    if ctx.json() {
        let report = match &result {
            Ok(spec) => ValidationReport {
                ok: true,
                file: display,
                name: Some(&spec.name),
                n_tasks: Some(spec.tasks.len()),
                n_micro_tasks: Some(spec.n_micro_tasks()),
                error: None,
            },
            Err(err) => ValidationReport {
                ok: false,
                file: display,
                name: None,
                n_tasks: None,
                n_micro_tasks: None,
                error: Some(ErrorReport {
                    message: err.to_string(),
                    task: err.task.clone(),
                    field: err.field.clone(),
                }),
            },
        };
        print_json(&report)?;
    } else {
        match &result {
            Ok(spec) => println!("{}", ok_line(spec)),
            Err(err) => eprintln!("error: {display}: {err}"),
        }
    }
    Ok(if result.is_ok() { 0 } else { 1 })
}

/// `ok: <name>, N tasks, M micro-tasks`.
pub fn ok_line(spec: &WaveSpec) -> String {
    format!(
        "ok: {}, {} task{}, {} micro-task{}",
        spec.name,
        spec.tasks.len(),
        if spec.tasks.len() == 1 { "" } else { "s" },
        spec.n_micro_tasks(),
        if spec.n_micro_tasks() == 1 { "" } else { "s" }
    )
}

/// `venomctl graph FILE`: the full DAG as DOT.
pub fn graph_file(path: &Path) -> anyhow::Result<u8> {
    let file = WaveFile::read(path)?;
    let spec = file
        .parse(&submit_limits())
        .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
    print!("{}", spec.to_dot());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_follow_extensions() {
        assert_eq!(format_for(Path::new("w.json")), Format::Json);
        assert_eq!(format_for(Path::new("w.TOML")), Format::Toml);
        assert_eq!(format_for(Path::new("wave")), Format::Auto);
    }

    #[test]
    fn files_validate_with_the_coordinators_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "name = \"etl\"\n[[task]]\nid = \"a\"\nrun = \"true\"\n\
             [[task]]\nid = \"b\"\narray = 3\ndeps = [\"a\"]\ncmd = [\"true\"]\n",
        )
        .expect("write");
        let file = WaveFile::read(&good).expect("readable");
        assert_eq!(file.wire_format(), "toml");
        let spec = file.parse(&WaveLimits::default()).expect("valid wave");
        assert_eq!(ok_line(&spec), "ok: etl, 2 tasks, 4 micro-tasks");
        assert!(spec.to_dot().contains("\"a\" -> \"b\""));

        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "name = \"x\"\n[[task]]\nid = \"a\"\nrun = \"true\"\ndeps = [\"zz\"]\n",
        )
        .expect("write");
        let err = WaveFile::read(&bad)
            .expect("readable")
            .parse(&WaveLimits::default())
            .expect_err("unknown dependency");
        assert_eq!(err.task.as_deref(), Some("a"));
        assert_eq!(err.field, "deps");

        // A wave above the default cap passes the submit check (the coordinator's cap decides).
        let big = dir.path().join("big.toml");
        std::fs::write(
            &big,
            "name = \"big\"\n[[task]]\nid = \"a\"\narray = 200000\nrun = \"true\"\n",
        )
        .expect("write");
        let big = WaveFile::read(&big).expect("readable");
        assert!(big.parse(&WaveLimits::default()).is_err());
        assert!(big.parse(&submit_limits()).is_ok());

        assert!(WaveFile::read(&dir.path().join("missing.toml")).is_err());
    }
}
