//! Labels (`key=value`) as users write them and as the wire carries them: one set of
//! rules (key shape, reserved `gantry.` keys, sizes, how many) for the CLI, join
//! tokens, hellos, environments and fleet commands.

use gantry_protocol::{limits, Labels, UNTRUSTED_WORK_LABEL};

/// Why a label or a set of labels is refused; the message names the label and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("invalid label {0:?}: expected key=value")]
    NotAPair(String),
    #[error(
        "invalid label key {0:?}: use 1 to 63 of a-z 0-9 . _ / -, starting with a letter or digit"
    )]
    BadKey(String),
    #[error("invalid label key {0:?}: keys starting with \"gantry.\" are Gantry's own; choose another name")]
    ReservedKey(String),
    #[error("invalid label value for {0:?}: at most {max} printable characters", max = limits::MAX_LABEL_VALUE_LEN)]
    BadValue(String),
    #[error("too many labels ({0}): at most {max}", max = limits::MAX_LABELS)]
    TooMany(usize),
}

/// Parses `key=value` labels, checking their shape and size.
pub fn parse_labels(pairs: &[String]) -> Result<Labels, LabelError> {
    let mut labels = Labels::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| LabelError::NotAPair(pair.clone()))?;
        check_label_key(k)?;
        if v.len() > limits::MAX_LABEL_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(LabelError::BadValue(k.to_owned()));
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    if labels.len() > limits::MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    Ok(labels)
}

/// Label keys: 1 to 63 of `[a-z0-9._/-]`, starting with a letter or digit.
pub fn check_label_key(k: &str) -> Result<(), LabelError> {
    let ok = (1..=limits::MAX_LABEL_KEY_LEN).contains(&k.len())
        && k.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
    if !ok {
        return Err(LabelError::BadKey(k.to_owned()));
    }
    if k.starts_with("gantry.") {
        return Err(LabelError::ReservedKey(k.to_owned()));
    }
    Ok(())
}

/// Checks labels that came over the wire (a hello, an admin request) with the same rules
/// as the CLI's.
pub fn check_labels(labels: &Labels) -> Result<Labels, LabelError> {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parse_labels(&pairs)
}

/// Checks the labels an agent announces in its hello: the rules of [`check_labels`],
/// except that an agent may announce [`UNTRUSTED_WORK_LABEL`]`=true` (its
/// `--untrusted-work`). That reserved label only narrows what the agent is given (the
/// scheduler hands it untrusted runs' jobs and nothing else), so announcing it grants
/// nothing; every other `gantry.` key stays refused, since some grant work (the deploy
/// runner's).
pub fn check_agent_labels(labels: &Labels) -> Result<Labels, LabelError> {
    let mut others = labels.clone();
    let untrusted = others.remove(UNTRUSTED_WORK_LABEL);
    let mut checked = check_labels(&others)?;
    match untrusted.as_deref() {
        None => {}
        Some("true") => {
            checked.insert(UNTRUSTED_WORK_LABEL.to_owned(), "true".to_owned());
        }
        Some(_) => return Err(LabelError::ReservedKey(UNTRUSTED_WORK_LABEL.to_owned())),
    }
    Ok(checked)
}

/// A host selector as people read it: `role=web,site=paris`, or `(every host)`.
pub fn labels_text(labels: &Labels) -> String {
    if labels.is_empty() {
        return "(every host)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_bad_ones_are_named() {
        let l = parse_labels(&["role=web".into(), "site=paris".into()]).expect("ok");
        assert_eq!(l["role"], "web");
        for bad in ["role", "=x", "Role=x", "-a=x", "a b=x"] {
            let err = parse_labels(&[bad.to_owned()]).expect_err(bad).to_string();
            assert!(err.contains("invalid label"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_agent_may_announce_untrusted_work_and_no_other_reserved_label() {
        let mut hello = Labels::from([("role".to_owned(), "ci".to_owned())]);
        hello.insert(UNTRUSTED_WORK_LABEL.to_owned(), "true".to_owned());
        assert_eq!(check_agent_labels(&hello), Ok(hello.clone()));
        // Anyone else announcing it (a token, an admin request) is still refused.
        assert_eq!(
            check_labels(&hello),
            Err(LabelError::ReservedKey(UNTRUSTED_WORK_LABEL.to_owned()))
        );
        hello.insert(UNTRUSTED_WORK_LABEL.to_owned(), "false".to_owned());
        assert!(check_agent_labels(&hello).is_err());
        let deploy = Labels::from([("gantry.reserved/deploy".to_owned(), "true".to_owned())]);
        assert_eq!(
            check_agent_labels(&deploy),
            Err(LabelError::ReservedKey("gantry.reserved/deploy".to_owned()))
        );
    }
}
