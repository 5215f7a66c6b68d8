//! Gantry pipeline files: the format, the typed model, validation, matrix expansion,
//! reuse across files and `if` conditions.
//!
//! This crate is pure: the caller hands it a file name and the text ([`parse`]), or also
//! a [`Resolver`] that returns the repository's other files by path ([`load`], for
//! `include:` and `uses:`), and gets back a [`Pipeline`] or every problem found, each
//! with file, line and column. [`bundle`] keeps a file with the files its load read, as
//! one text a run stores; [`parse`] reads such a bundle back with those files only. It reads no files itself, no clock and no environment.
//! It must never panic on any input and bounds its work: files up to 1 MiB, nesting up
//! to 64 levels, 200k YAML nodes per file (aliases counted), 64 files and 4 MiB for one
//! pipeline, 8 files deep, 16 MiB of copied job text (matrices, templates, includes and
//! calls together), 256 jobs per matrix, 512 jobs per pipeline, templates 8 deep,
//! conditions up to 4 KiB; the per-key limits are constants next to their loaders.
//!
//! # Why saphyr-parser
//!
//! DESIGN.md asks for a maintained YAML crate with line and column in every error. The
//! errors that matter most here are semantic ("needs names a job that does not exist"),
//! so every node needs its position, not just syntax errors. Candidates:
//!
//! - `serde_yaml` is archived; `serde_yaml_ng` and `serde_norway` are its forks. Their
//!   syntax errors carry a location, but once a value is deserialized into a struct its
//!   position is gone, so a semantic check could not point at its node.
//! - `serde-saphyr` (serde on top of saphyr) has the same shape of problem: positions
//!   for its own errors, not for the checks we make afterwards, unless every field is
//!   wrapped in a span type. Not evaluated further.
//! - `yaml-rust2` is maintained and its push parser reports a `Marker` per event, but
//!   its loaded `Yaml` tree drops them.
//! - `saphyr-parser` 0.0.11 (the successor of yaml-rust2 by the same maintainers, YAML
//!   1.2, two small dependencies: arraydeque and thiserror) is a pull parser that gives a
//!   `Span` with every event. We build a small positioned tree from it (`yaml` module) and
//!   map that to the model by hand (`load` module), so every error, syntactic or
//!   semantic, points at its node. Mapping by hand also sidesteps YAML 1.1 surprises:
//!   `on` stays the key `on`, not `true`, and `rust: 1.80` stays `"1.80"`, not `1.8`.
//!
//! # Format
//!
//! Keys are kebab-case as in GitHub Actions; `docs/pipeline-reference.md` documents every
//! key, and the repository's `examples/` and this crate's tests show them. Loading goes:
//! YAML to a positioned tree (`yaml`, merge keys applied), includes merged (`jobs`,
//! `reuse`), the top level read (`load`), then each job: templates extended, a called
//! pipeline's jobs read under the caller's name, the matrix expanded with
//! `${{ matrix.x }}` filled into the job's whole tree, and each expansion's keys read
//! (`load`, `runtime`). Last, needs and cycles are settled and every `${{ }}` reference is
//! checked against what its field may use and what is declared (`refs`, `jobs`).
//! `${{ inputs.x }}`, `git.*`, `event.*`, `env.X` and `needs` outputs are left for the
//! coordinator to fill in at dispatch, `${{ secrets.X }}` and `steps` outputs for the
//! agent.

mod bundle;
mod condition;
mod cron;
mod deploy;
mod glob;
mod inputs;
mod jobs;
mod load;
mod model;
mod outputs;
mod refs;
mod reuse;
mod runtime;
mod yaml;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use bundle::{bundle, BundleError, BUNDLE_HEADER};
pub use condition::{CompareOp, Condition, ConditionValue, Operand, StaticContext, StatusExpr};
pub use cron::{CronError, CronSchedule};
pub use deploy::{
    app_name_problem, environment_name_problem, parse_amount, AmountError, DeploySpec,
    DeployStrategy, EnvironmentSpec, HostAmount,
};
pub use glob::glob_match;
pub use inputs::{
    is_number, resolve_inputs, InputError, InputSpec, InputType, MAX_INPUTS, MAX_INPUT_VALUE,
    MAX_OPTIONS,
};
pub use load::{
    load, parse_duration, DurationError, MAX_EXPANDED_TEXT, MAX_FILE_SIZE, MAX_JOBS,
    MAX_MATRIX_JOBS,
};
pub use model::{
    referenced_secrets, CallSpec, Concurrency, Job, JobEnvironment, Pipeline, PushFilter, Step,
    Triggers,
};
pub use outputs::{
    artifact_name_problem, cache_key_problem, hash_files_patterns, home_path_problem, path_problem,
    ArtifactSpec, ArtifactWhen, CacheSpec, DEFAULT_EXPIRE_IN_SECS, MAX_ARTIFACT_NAME, MAX_CACHES,
    MAX_CACHE_KEY, MAX_EXPIRE_IN_SECS, MAX_OUTPUT_PATHS,
};
pub use refs::{parse_reference, EventField, GitField, Reference};
pub use reuse::{
    NoFiles, Resolver, MAX_EXTENDS, MAX_EXTENDS_DEPTH, MAX_FILES, MAX_FILE_DEPTH, MAX_TOTAL_BYTES,
};
pub use runtime::{
    image_name_problem, is_dns_label, parse_port, MAX_CHECKOUT_DEPTH, MAX_COMMAND_ARGS,
    MAX_GROUP_LEN, MAX_SERVICES, MAX_SERVICE_PORTS,
};

/// The default pipeline file name.
pub const DEFAULT_FILE_NAME: &str = "gantry.yml";

/// One problem in a pipeline file, at a 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found in a pipeline file, in file order; never empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors(pub Vec<ParseError>);

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

/// Parses, validates and expands a pipeline file that stands alone: `include:` and
/// `uses:` are refused with a message saying so. `file_name` is used in errors and,
/// without a `name:` key, for the pipeline's name (`ci.yml` gives `ci`).
pub fn parse(file_name: &str, text: &str) -> Result<Pipeline, Errors> {
    load::parse(file_name, text)
}

#[cfg(test)]
mod feature_tests;
#[cfg(test)]
mod tests;
