//! `${{ expr }}` references in pipeline text, as both sides expand them: the coordinator
//! fills in `inputs.*` and `env.*` when it builds an assignment, the agent fills in
//! `secrets.*` just before a step runs (so secret values never sit in stored scripts).

/// Replaces each `${{ expr }}` (spaces around `expr` optional) for which `resolve`
/// returns a value; every other reference, and an unclosed `${{`, is left as written.
pub fn expand(text: &str, mut resolve: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        match resolve(after[..end].trim()) {
            Some(value) => out.push_str(&value),
            None => out.push_str(&rest[start..start + 3 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_references_expand_and_the_rest_stay_as_written() {
        let resolve = |e: &str| (e == "inputs.x").then(|| "1".to_owned());
        assert_eq!(
            expand("a ${{ inputs.x }} b ${{inputs.x}}", resolve),
            "a 1 b 1"
        );
        assert_eq!(
            expand("${{ secrets.S }} ${{ inputs.x", resolve),
            "${{ secrets.S }} ${{ inputs.x"
        );
        assert_eq!(expand("plain", resolve), "plain");
    }
}
