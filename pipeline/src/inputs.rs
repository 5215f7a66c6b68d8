//! A pipeline's inputs: their types and the check of the values a run is given.
//!
//! The model and the pure rules only; reading `on.inputs` with positions is in `load`.
//! The coordinator calls [`resolve_inputs`] when it starts a run (`gantry run --input`,
//! the dashboard's form, a caller's `with:`), so a value that cannot be right is refused
//! before any job runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most inputs one pipeline declares.
pub const MAX_INPUTS: usize = 64;
/// Most options of a `choice` input.
pub const MAX_OPTIONS: usize = 256;
/// Longest input value (and option), in bytes: values are filled into job text.
pub const MAX_INPUT_VALUE: usize = 4096;

/// What values an input takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputType {
    /// Any text up to [`MAX_INPUT_VALUE`] bytes.
    #[default]
    String,
    /// One of `options`.
    Choice,
    /// `true` or `false`.
    Boolean,
    /// A decimal number: `-12`, `3.5`.
    Number,
}

/// One declared input.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    /// The value when a run does not give one; already checked against the type.
    pub default: Option<String>,
    #[serde(default)]
    pub kind: InputType,
    /// A run must give a value (a default satisfies it).
    #[serde(default)]
    pub required: bool,
    /// The values a `choice` input takes, in the order forms show them.
    #[serde(default)]
    pub options: Vec<String>,
    /// Shown beside the input in the dashboard's form.
    #[serde(default)]
    pub description: Option<String>,
}

impl InputSpec {
    /// Why `value` is not a value of this input; `None` if it is.
    pub fn problem(&self, value: &str) -> Option<String> {
        if value.len() > MAX_INPUT_VALUE {
            return Some(format!(
                "is {} bytes; the most is {MAX_INPUT_VALUE}",
                value.len()
            ));
        }
        match self.kind {
            InputType::String => None,
            InputType::Choice => (!self.options.iter().any(|o| o == value)).then(|| {
                format!(
                    "\"{value}\" is not one of its options: {}",
                    self.options.join(", ")
                )
            }),
            InputType::Boolean => (!matches!(value, "true" | "false"))
                .then(|| format!("\"{value}\" is not a boolean; use true or false")),
            InputType::Number => (!is_number(value))
                .then(|| format!("\"{value}\" is not a number like 3, -1 or 2.5")),
        }
    }
}

/// A decimal number, optionally negative, at most 32 characters.
pub fn is_number(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
    text.len() <= 32
        && !whole.is_empty()
        && !fraction.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit())
}

/// Why the values given to a run cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("input \"{name}\" is not declared; declared inputs: {declared}")]
    Unknown { name: String, declared: String },
    #[error("input \"{name}\" is required; give it with --input {name}=VALUE")]
    Missing { name: String },
    #[error("input \"{name}\": {problem}")]
    Invalid { name: String, problem: String },
}

/// The inputs of a run: each given value checked against its declaration, then the
/// defaults of the ones not given. Every problem is reported, in name order.
pub fn resolve_inputs(
    declared: &BTreeMap<String, InputSpec>,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Vec<InputError>> {
    let mut errors = Vec::new();
    let mut values = BTreeMap::new();
    for (name, value) in given {
        match declared.get(name) {
            None => errors.push(InputError::Unknown {
                name: name.clone(),
                declared: if declared.is_empty() {
                    "(none)".to_owned()
                } else {
                    declared.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            }),
            Some(spec) => match spec.problem(value) {
                Some(problem) => errors.push(InputError::Invalid {
                    name: name.clone(),
                    problem,
                }),
                None => {
                    values.insert(name.clone(), value.clone());
                }
            },
        }
    }
    for (name, spec) in declared {
        if given.contains_key(name) {
            continue;
        }
        match &spec.default {
            Some(default) => {
                values.insert(name.clone(), default.clone());
            }
            None if spec.required => errors.push(InputError::Missing { name: name.clone() }),
            None => {}
        }
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: InputType, options: &[&str]) -> InputSpec {
        InputSpec {
            kind,
            options: options.iter().map(|o| (*o).to_owned()).collect(),
            ..InputSpec::default()
        }
    }

    #[test]
    fn each_type_takes_its_values() {
        let choice = spec(InputType::Choice, &["staging", "production"]);
        assert_eq!(choice.problem("staging"), None);
        assert!(choice
            .problem("prod")
            .is_some_and(|p| p.contains("not one of its options: staging, production")));
        let boolean = spec(InputType::Boolean, &[]);
        assert_eq!(boolean.problem("false"), None);
        assert!(boolean.problem("yes").is_some());
        let number = spec(InputType::Number, &[]);
        for good in ["0", "-3", "2.50"] {
            assert_eq!(number.problem(good), None, "{good}");
        }
        for bad in ["", "-", "1.", ".5", "1e3", "x", "1.2.3"] {
            assert!(number.problem(bad).is_some(), "{bad}");
        }
        let text = spec(InputType::String, &[]);
        assert_eq!(text.problem("anything at all"), None);
        assert!(text.problem(&"x".repeat(MAX_INPUT_VALUE + 1)).is_some());
    }

    #[test]
    fn runs_get_defaults_and_every_problem_is_named() {
        let declared = BTreeMap::from([
            (
                "env".to_owned(),
                InputSpec {
                    required: true,
                    ..spec(InputType::Choice, &["staging", "production"])
                },
            ),
            (
                "dry".to_owned(),
                InputSpec {
                    default: Some("true".into()),
                    ..spec(InputType::Boolean, &[])
                },
            ),
        ]);
        let given = BTreeMap::from([("env".to_owned(), "staging".to_owned())]);
        assert_eq!(
            resolve_inputs(&declared, &given),
            Ok(BTreeMap::from([
                ("dry".to_owned(), "true".to_owned()),
                ("env".to_owned(), "staging".to_owned())
            ]))
        );
        let given = BTreeMap::from([
            ("dry".to_owned(), "maybe".to_owned()),
            ("evn".to_owned(), "x".to_owned()),
        ]);
        let errors = resolve_inputs(&declared, &given).expect_err("three problems");
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "input \"dry\": \"maybe\" is not a boolean; use true or false",
                "input \"evn\" is not declared; declared inputs: dry, env",
                "input \"env\" is required; give it with --input env=VALUE",
            ]
        );
    }
}
