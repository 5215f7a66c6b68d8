//! Glob matching for branch, tag and path filters.
//!
//! `*` matches any run of characters except `/`, `**` matches any run including `/`,
//! `**/` also matches nothing (so `src/**/a.rs` matches `src/a.rs`), `?` matches one
//! character except `/`. Matching is a dynamic programme over (pattern, text), so its
//! cost is at most the product of their lengths, never exponential.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Char(char),
    Any,
    Star,
    DoubleStar,
    DoubleStarSlash,
}

fn tokenize(pattern: &str) -> Vec<Token> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                // A third star adds nothing.
                i += 2;
                while chars.get(i) == Some(&'*') {
                    i += 1;
                }
                if chars.get(i) == Some(&'/') {
                    tokens.push(Token::DoubleStarSlash);
                    i += 1;
                } else {
                    tokens.push(Token::DoubleStar);
                }
            }
            '*' => {
                tokens.push(Token::Star);
                i += 1;
            }
            '?' => {
                tokens.push(Token::Any);
                i += 1;
            }
            c => {
                tokens.push(Token::Char(c));
                i += 1;
            }
        }
    }
    tokens
}

/// Whether `text` matches the glob `pattern` as a whole.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let tokens = tokenize(pattern);
    let text: Vec<char> = text.chars().collect();
    // `row[j]`: the tokens consumed so far match `text[..j]`.
    let mut row = vec![false; text.len() + 1];
    row[0] = true;
    for token in &tokens {
        let mut next = vec![false; text.len() + 1];
        match token {
            Token::Char(c) => {
                for j in 0..text.len() {
                    next[j + 1] = row[j] && text[j] == *c;
                }
            }
            Token::Any => {
                for j in 0..text.len() {
                    next[j + 1] = row[j] && text[j] != '/';
                }
            }
            Token::Star => {
                next[0] = row[0];
                for j in 0..text.len() {
                    next[j + 1] = row[j + 1] || (next[j] && text[j] != '/');
                }
            }
            Token::DoubleStar => {
                next[0] = row[0];
                for j in 0..text.len() {
                    next[j + 1] = row[j + 1] || next[j];
                }
            }
            Token::DoubleStarSlash => {
                // Either nothing, or anything that ends in `/`.
                let mut seen = false;
                for j in 0..=text.len() {
                    if j > 0 && text[j - 1] == '/' && seen {
                        next[j] = true;
                    }
                    if row[j] {
                        seen = true;
                        next[j] = true;
                    }
                }
            }
        }
        row = next;
    }
    row[text.len()]
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn glob_table() {
        for (pattern, text, want) in [
            ("main", "main", true),
            ("main", "mainx", false),
            ("release/*", "release/1.0", true),
            ("release/*", "release/1.0/hotfix", false),
            ("release/**", "release/1.0/hotfix", true),
            ("v*", "v1.2.3", true),
            ("v*", "x1", false),
            ("*", "", true),
            ("src/**", "src/a/b/c.rs", true),
            ("src/**", "docs/a.md", false),
            ("src/**/*.rs", "src/lib.rs", true),
            ("src/**/*.rs", "src/a/b/lib.rs", true),
            ("src/**/*.rs", "src/a/b/lib.md", false),
            ("**/*.md", "README.md", true),
            ("**/*.md", "docs/x/README.md", true),
            ("*.md", "docs/README.md", false),
            ("a?c", "abc", true),
            ("a?c", "a/c", false),
            ("**", "any/thing", true),
            ("a/***/b", "a/x/y/b", true),
        ] {
            assert_eq!(glob_match(pattern, text), want, "{pattern} vs {text}");
        }
    }

    #[test]
    fn pathological_patterns_are_fast() {
        let pattern = "*a".repeat(200) + "b";
        let text = "a".repeat(4000);
        assert!(!glob_match(&pattern, &text));
    }
}
