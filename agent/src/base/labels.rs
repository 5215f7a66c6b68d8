//! Labels an agent reports: automatic ones about the host, the ones saved at enrollment,
//! and the ones given on the command line, merged in that order so the later source wins.
//! Also the host's capabilities, from what the runners found (pure: the Docker probe is
//! the Docker runner's).

use gantry_protocol::{limits, Labels};

/// Why a `--label` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label {0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("label key {0:?} must be 1 to {max} characters of letters, digits, '.', '_', '-' or '/'", max = limits::MAX_LABEL_KEY_LEN)]
    BadKey(String),
    #[error("label value for {0:?} is longer than {max} characters", max = limits::MAX_LABEL_VALUE_LEN)]
    ValueTooLong(String),
}

/// Parses one `KEY=VALUE` flag. Keys are restricted to a safe character set because they
/// end up in selectors, listings and logs; values may be anything up to the length limit.
pub fn parse_label(text: &str) -> Result<(String, String), LabelError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| LabelError::NotKeyValue(text.to_owned()))?;
    let key_ok = !key.is_empty()
        && key.len() <= limits::MAX_LABEL_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if !key_ok {
        return Err(LabelError::BadKey(key.to_owned()));
    }
    if value.len() > limits::MAX_LABEL_VALUE_LEN {
        return Err(LabelError::ValueTooLong(key.to_owned()));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Collects parsed flags into labels; a key given twice keeps its last value.
pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Labels {
    pairs.into_iter().collect()
}

/// Labels every agent reports about its host without being told.
pub fn automatic(hostname: &str) -> Labels {
    from_pairs([
        ("os".to_owned(), std::env::consts::OS.to_owned()),
        ("arch".to_owned(), std::env::consts::ARCH.to_owned()),
        ("hostname".to_owned(), hostname.to_owned()),
    ])
}

/// Merges label sources in order; for a key present in several, the last source wins.
pub fn merge<'a>(sources: impl IntoIterator<Item = &'a Labels>) -> Labels {
    let mut merged = Labels::new();
    for source in sources {
        merged.extend(source.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    merged
}

/// The capabilities of a host on which Docker answers (`docker`) or not.
pub fn capabilities_with(docker: bool) -> Vec<String> {
    let mut caps = vec!["shell".to_owned()];
    if docker {
        caps.push("docker".to_owned());
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn later_sources_win_and_nothing_is_lost() {
        let auto = automatic("web-1");
        let saved = labels(&[("role", "web"), ("hostname", "alias")]);
        let flags = labels(&[("role", "db"), ("zone", "eu")]);
        let merged = merge([&auto, &saved, &flags]);
        assert_eq!(
            merged.get("os").map(String::as_str),
            Some(std::env::consts::OS)
        );
        assert_eq!(
            merged.get("arch").map(String::as_str),
            Some(std::env::consts::ARCH)
        );
        assert_eq!(merged.get("hostname").map(String::as_str), Some("alias"));
        assert_eq!(merged.get("role").map(String::as_str), Some("db"));
        assert_eq!(merged.get("zone").map(String::as_str), Some("eu"));
        assert_eq!(merged.len(), 5);
    }

    #[test]
    fn flags_parse_and_bad_ones_say_why() {
        assert_eq!(parse_label("role=web"), Ok(("role".into(), "web".into())));
        assert_eq!(parse_label("note=a=b"), Ok(("note".into(), "a=b".into())));
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert_eq!(
            parse_label("role"),
            Err(LabelError::NotKeyValue("role".into()))
        );
        assert_eq!(parse_label("=web"), Err(LabelError::BadKey(String::new())));
        assert_eq!(
            parse_label("ro le=web"),
            Err(LabelError::BadKey("ro le".into()))
        );
        let long = format!("k={}", "v".repeat(limits::MAX_LABEL_VALUE_LEN + 1));
        assert_eq!(
            parse_label(&long),
            Err(LabelError::ValueTooLong("k".into()))
        );
        let repeated = from_pairs([("a".into(), "1".into()), ("a".into(), "2".into())]);
        assert_eq!(repeated, labels(&[("a", "2")]));
    }
}
