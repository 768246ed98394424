//! Glob matching for channel and type patterns (config `[[channels]] pattern`, JWT `channels` /
//! `publish` claims, registry subscriptions, SSE `types=`).
//!
//! Owns: the one glob dialect of the relay. `*` matches any run of characters, possibly empty,
//! dots and slashes included; every other character, `?` and `[` included, matches only itself.
//! Must never: recurse, allocate while matching, or panic on any pattern or text. Matching is
//! the classic two-pointer walk with one backtrack point, so a hostile pattern costs at most
//! O(pattern × text) steps and usually O(pattern + text).
//!
//! An empty `GlobSet` matches nothing; whether an absent claim means "allow all" is the caller's
//! decision, not this module's.

/// Whether `text` matches `pattern` in full.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    // Bytes are enough: `*` is ASCII, and a literal run after a `*` starts with a UTF-8 lead or
    // ASCII byte, which can only line up with a char boundary in `text`. So a `*` never ends
    // up swallowing half a character, and byte matching equals char matching.
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let mut pi = 0;
    let mut ti = 0;
    // The most recent `*`: pattern index just after it, and where its match in `text` ends.
    // Only the latest star needs remembering: a later star can absorb anything an earlier one
    // would have had to give up, which is what keeps this free of recursion.
    let mut backtrack: Option<(usize, usize)> = None;

    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                pi += 1;
                backtrack = Some((pi, ti));
            }
            Some(&c) if t.get(ti) == Some(&c) => {
                pi += 1;
                ti += 1;
            }
            _ => match backtrack {
                Some((after_star, star_end)) => {
                    // Let the star eat one more byte and retry the rest of the pattern.
                    pi = after_star;
                    ti = star_end + 1;
                    backtrack = Some((after_star, ti));
                }
                None => return false,
            },
        }
    }
    // Text is used up; whatever pattern remains must be able to match nothing.
    p.iter().skip(pi).all(|&c| c == b'*')
}

/// A set of patterns checked together, built once (per config load or per token) and then
/// matched on every publish or subscribe.
#[derive(Debug, Clone, Default)]
pub struct GlobSet {
    /// Patterns without `*`: a string comparison is cheaper than the glob walk.
    exact: Vec<String>,
    /// Patterns with at least one `*`.
    globs: Vec<String>,
    /// Set when some pattern is only stars, so the common "allow all" claim costs nothing.
    match_all: bool,
}

impl GlobSet {
    /// Builds a set from patterns. Duplicates are dropped; an empty pattern matches only "".
    pub fn new(patterns: impl IntoIterator<Item = impl Into<String>>) -> GlobSet {
        let mut set = GlobSet::default();
        for pattern in patterns {
            let pattern: String = pattern.into();
            if !pattern.is_empty() && pattern.bytes().all(|b| b == b'*') {
                set.match_all = true;
            }
            if pattern.contains('*') {
                set.globs.push(pattern);
            } else {
                set.exact.push(pattern);
            }
        }
        // Sort then dedup rather than checking on insert: a token may carry many patterns and
        // the check-on-insert way is quadratic. Order is irrelevant to "any pattern matches".
        set.exact.sort_unstable();
        set.exact.dedup();
        set.globs.sort_unstable();
        set.globs.dedup();
        set
    }

    /// True when the set holds no pattern at all, so it matches nothing.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.globs.is_empty()
    }

    /// Whether any pattern of the set matches `text`.
    pub fn matches(&self, text: &str) -> bool {
        self.match_all
            || self.exact.iter().any(|e| e == text)
            || self.globs.iter().any(|g| glob_match(g, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_patterns() {
        assert!(glob_match("doc.42", "doc.42"));
        assert!(!glob_match("doc.42", "doc.43"));
        assert!(!glob_match("doc.42", "doc.421"));
        assert!(!glob_match("doc.421", "doc.42"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        assert!(!glob_match("a", ""));
    }

    #[test]
    fn star_matches_any_run_including_dots_slashes_and_nothing() {
        assert!(glob_match("doc.*", "doc.42"));
        assert!(glob_match("doc.*", "doc."));
        assert!(glob_match("doc.*", "doc.a.b/c:d"));
        assert!(!glob_match("doc.*", "doc"));
        assert!(!glob_match("doc.*", "docs.1"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything/at.all"));
        assert!(glob_match("**", ""));
        assert!(glob_match("*.edit", "document.edit"));
        assert!(!glob_match("*.edit", "document.edits"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("user/*/inbox", "user/alice/inbox"));
        assert!(glob_match("user/*/inbox", "user/a/b/inbox"));
    }

    #[test]
    fn backtracking_cases() {
        // The first candidate for the literal after `*` is wrong; the star must grow past it.
        assert!(glob_match("*ab", "aab"));
        assert!(glob_match("*aab", "aaab"));
        assert!(glob_match("a*ab", "aXab"));
        assert!(!glob_match("a*ab", "aXa"));
        assert!(glob_match("*a*b", "xaxaxb"));
        assert!(glob_match("*.*.x", "a.b.c.x"));
        assert!(!glob_match("*.*.x", "a.x"));
        // Trailing text after the last literal must be covered by a star.
        assert!(!glob_match("*a", "ab"));
        assert!(glob_match("*a*", "ab"));
    }

    #[test]
    fn question_mark_and_brackets_are_literal() {
        assert!(glob_match("a?c", "a?c"));
        assert!(!glob_match("a?c", "abc"));
        assert!(glob_match("[ab]", "[ab]"));
        assert!(!glob_match("[ab]", "a"));
    }

    #[test]
    fn multibyte_text_and_patterns() {
        assert!(glob_match("é*", "éa"));
        assert!(glob_match("*€", "x€"));
        assert!(glob_match("a*€*b", "a¢€€b"));
        assert!(!glob_match("*€", "x¢"));
        assert!(!glob_match("é", "e"));
    }

    #[test]
    fn hostile_pattern_finishes() {
        // Exponential for naive recursion; the two-pointer walk is bounded by |p|·|t|.
        let pattern = format!("{}b", "*a".repeat(50));
        let text = "a".repeat(5_000);
        assert!(!glob_match(&pattern, &text));
        let text_ok = format!("{}b", "a".repeat(5_000));
        assert!(glob_match(&pattern, &text_ok));
    }

    #[test]
    fn set_empty_matches_nothing() {
        let set = GlobSet::new(Vec::<String>::new());
        assert!(set.is_empty());
        assert!(!set.matches(""));
        assert!(!set.matches("doc.1"));
        assert!(GlobSet::default().is_empty());
    }

    #[test]
    fn set_any_pattern_matches() {
        let set = GlobSet::new(["doc.*", "chat.lobby", "user/*/inbox"]);
        assert!(!set.is_empty());
        assert!(set.matches("doc.1"));
        assert!(set.matches("chat.lobby"));
        assert!(set.matches("user/bob/inbox"));
        assert!(!set.matches("chat.lobby2"));
        assert!(!set.matches("chat"));
        assert!(!set.matches("user/bob/outbox"));
    }

    #[test]
    fn set_exact_only() {
        let set = GlobSet::new(vec![String::from("a"), String::from("b")]);
        assert!(set.matches("a"));
        assert!(set.matches("b"));
        assert!(!set.matches("ab"));
        assert!(!set.matches(""));
    }

    #[test]
    fn set_star_allows_all_and_empty_pattern_is_exact() {
        assert!(GlobSet::new(["*"]).matches(""));
        assert!(GlobSet::new(["***"]).matches("x.y/z"));
        let set = GlobSet::new([""]);
        assert!(!set.is_empty());
        assert!(set.matches(""));
        assert!(!set.matches("a"));
    }

    #[test]
    fn set_drops_duplicates() {
        let set = GlobSet::new(["a", "a", "b*", "b*"]);
        assert_eq!(set.exact.len(), 1);
        assert_eq!(set.globs.len(), 1);
    }
}
