//! `countersign test`: policy test files (`policies/*.test.yaml`) run
//! offline through the gateway's one decision ([`crate::decision`]): no
//! authorization server, upstream or store. Each case is a call and what it
//! must get; a failing case prints a diff of the two.

pub mod call;
pub mod coverage;
pub mod file;
pub mod junit;
pub mod outcome;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::{Config, ConfigError};
use crate::decision::offline::{self, OfflineCall};
use crate::decision::Step;
use file::{Case, TestFile};
use outcome::Got;

/// Why the tests could not run at all (a failing case is not an error).
#[derive(Debug, Error)]
pub enum PolicyTestError {
    /// The reason is in the message, not a `source`: `main` prints the
    /// chain, which would repeat it.
    #[error("{file}: {reason}")]
    Read {
        file: String,
        reason: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error(
        "no policy test files (*.test.yaml) beside the policies of {0}; name the files to run"
    )]
    NoFiles(String),
}

/// The run of every case of every file.
#[derive(Debug)]
pub struct Report {
    pub files: Vec<FileReport>,
}

#[derive(Debug)]
pub struct FileReport {
    pub path: PathBuf,
    pub cases: Vec<CaseReport>,
}

#[derive(Debug)]
pub struct CaseReport {
    pub name: String,
    /// The diff (and the steps taken) when the case failed.
    pub failure: Option<String>,
    pub duration: Duration,
    /// Every step of the decision, for coverage.
    pub steps: Vec<Step>,
}

/// The test files beside the policy files `config` loads: `*.test.yaml` in
/// each policy directory, `x.test.yaml` beside a policy file `x.yaml`.
pub fn default_files(config: &Config) -> Vec<PathBuf> {
    let base = config.file.parent().unwrap_or_else(|| Path::new("."));
    let mut files = Vec::new();
    for entry in &config.gateway.policies {
        let path = base.join(entry);
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&path)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| crate::config::is_policy_test_file(p))
                .collect();
            found.sort();
            files.extend(found);
        } else if let Some(stem) = path.file_stem() {
            let beside = path.with_file_name(format!("{}.test.yaml", stem.to_string_lossy()));
            if beside.is_file() {
                files.push(beside);
            }
        }
    }
    files.dedup();
    files
}

/// Runs every case of `files` against `config`.
pub fn run(config: &Config, files: &[PathBuf]) -> Result<Report, PolicyTestError> {
    if files.is_empty() {
        return Err(PolicyTestError::NoFiles(config.file.display().to_string()));
    }
    let mut report = Report { files: Vec::new() };
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|reason| PolicyTestError::Read {
            file: path.display().to_string(),
            reason,
        })?;
        let parsed: TestFile = crate::config::parse_yaml(path, &text)?;
        let cases = parsed.cases.iter().map(|c| run_case(config, c)).collect();
        report.files.push(FileReport {
            path: path.clone(),
            cases,
        });
    }
    Ok(report)
}

fn run_case(config: &Config, case: &Case) -> CaseReport {
    let started = Instant::now();
    let (failure, steps) = match call::build(&case.call) {
        Err(reason) => (
            Some(format!("the call is not valid: {reason}\n")),
            Vec::new(),
        ),
        Ok((header, body, identity)) => {
            let call = OfflineCall::new(
                header,
                body,
                config.gateway.limits.max_body_bytes,
                identity,
                &config.gateway.identity,
            );
            let decided = offline::decide(config, call);
            let got = Got::of(&decided);
            let failure = (!outcome::matches(&case.expect, &got)).then(|| {
                let mut text = outcome::diff(
                    &outcome::expected_lines(&case.expect),
                    &outcome::got_lines(&case.expect, &got),
                );
                text.push_str("steps:\n");
                for step in &decided.steps {
                    for line in step.to_string().lines() {
                        let _ = writeln!(text, "  {line}");
                    }
                }
                text
            });
            (failure, decided.steps)
        }
    };
    CaseReport {
        name: case.name.clone(),
        failure,
        duration: started.elapsed(),
        steps,
    }
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failed() == 0
    }

    pub fn total(&self) -> usize {
        self.files.iter().map(|f| f.cases.len()).sum()
    }

    pub fn failed(&self) -> usize {
        self.cases().filter(|c| c.failure.is_some()).count()
    }

    pub fn cases(&self) -> impl Iterator<Item = &CaseReport> {
        self.files.iter().flat_map(|f| &f.cases)
    }

    /// One line per case, a diff under each failing one, and a summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for file in &self.files {
            let _ = writeln!(out, "{}", file.path.display());
            for case in &file.cases {
                match &case.failure {
                    None => {
                        let _ = writeln!(out, "  ok   {}", case.name);
                    }
                    Some(diff) => {
                        let _ = writeln!(out, "  FAIL {}", case.name);
                        for line in diff.lines() {
                            let _ = writeln!(out, "       {line}");
                        }
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "\n{} cases: {} passed, {} failed",
            self.total(),
            self.total() - self.failed(),
            self.failed()
        );
        out
    }
}
