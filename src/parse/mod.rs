//! TOML, JSON and YAML text to one tree, through [`TreeBuilder`]: every format obeys the same
//! rules and budgets, and a file that breaks one is refused with the line and pointer of the
//! first place it does. YAML anchors and aliases are refused (sops never writes them, and they
//! let a small file expand without bound); so are custom tags and more than one document.

//!
//! One file per format: `json.rs`, `toml.rs` (with `simple_toml.rs`, its line reader), `yaml.rs`
//! (with `block.rs`, its line reader) and `yaml_writer.rs`.

use crate::domain::document::Problem;
use std::fmt;

mod block;
mod json;
mod simple_toml;
mod toml;
mod yaml;
mod yaml_writer;

pub use json::json;
pub use toml::{toml, toml_full};
pub use yaml::{yaml, yaml_full};
pub use yaml_writer::{YamlStyle, to_yaml, to_yaml_styled};

/// Why a text is not a legal document. Messages never quote the text (it may hold a secret).
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: Option<usize>,
    /// Where a rule was broken ("" for the whole document); None for a syntax error.
    pub pointer: Option<String>,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pointer {
            Some(p) if !p.is_empty() => write!(f, "{p}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

fn from_problem(p: Problem, line: Option<usize>) -> ParseError {
    ParseError {
        line,
        pointer: Some(p.pointer),
        message: p.message,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// The lines of a text of printable ASCII that ends with a line break, without their breaks;
/// None for any other text. What the simple readers of YAML and TOML take.
fn ascii_lines(text: &str) -> Option<Vec<&str>> {
    let body = text.strip_suffix('\n')?;
    // Without a branch per byte, so that it runs a vector at a time.
    let outside = body.bytes().fold(false, |out, b| out | ((b < 0x20) & (b != b'\n')) | (b > 0x7e));
    if outside {
        return None;
    }
    let mut lines = Vec::with_capacity(body.len() / 32);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', body.as_bytes()).chain([body.len()]) {
        lines.push(&body[start..end]);
        start = end + 1;
    }
    Some(lines)
}

/// A one-line string in double quotes, from after its opening quote: its text with JSON's escapes
/// decoded (`\/` only where `slash`, as YAML has it and TOML does not), and what follows the
/// closing quote. None for any other escape or no closing quote. What the simple readers take.
fn double_quoted(s: &str, slash: bool) -> Option<(String, &str)> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let special = memchr::memchr2(b'"', b'\\', rest.as_bytes())?;
        out.push_str(&rest[..special]);
        if rest.as_bytes()[special] == b'"' {
            return Some((out, &rest[special + 1..]));
        }
        let escape = *rest.as_bytes().get(special + 1)?;
        rest = &rest[special + 2..];
        out.push(match escape {
            b'"' | b'\\' => escape as char,
            b'/' if slash => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hex = rest.get(..4).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))?;
                rest = &rest[4..];
                char::from_u32(u32::from_str_radix(hex, 16).ok()?)?
            }
            _ => return None,
        });
    }
}

/// The texts of example-repo's tenant files with extension `ext`.
#[cfg(test)]
fn example_texts(ext: &str) -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/example-repo/tenants");
    let paths = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path());
    let texts: Vec<String> = paths
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(texts.len() >= 2, "example-repo has {} .{ext} files", texts.len());
    texts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::document::INTEGER_RANGE;
    use serde_json::json;

    #[test]
    fn the_three_formats_read_the_same_document() {
        let want = json!({"a": 1, "b": {"c": [true, "x", 1.5]}, "d": "ENC[AES256_GCM,data:x,iv:y,tag:z,type:str]"});
        let toml_text = "a = 1\nd = \"ENC[AES256_GCM,data:x,iv:y,tag:z,type:str]\"\n[b]\nc = [true, \"x\", 1.5]\n";
        let yaml_text = "a: 1\nb:\n    c:\n        - true\n        - x\n        - 1.5\nd: ENC[AES256_GCM,data:x,iv:y,tag:z,type:str]\n";
        let json_text = serde_json::to_string(&want).unwrap();
        let mut from_toml = toml(toml_text).unwrap();
        // TOML puts sub-tables last; compare as sets of keys.
        from_toml.as_object_mut().unwrap().sort_keys();
        let mut sorted = want.clone();
        sorted.as_object_mut().unwrap().sort_keys();
        assert_eq!(from_toml, sorted);
        assert_eq!(yaml(yaml_text).unwrap(), want);
        assert_eq!(json(&json_text).unwrap(), want);
        assert_eq!(yaml(&to_yaml(&want)).unwrap(), want);
    }

    #[test]
    fn duplicate_keys_are_refused_in_every_format() {
        let e = json("{\"a\": 1,\n \"a\": 2}").unwrap_err();
        assert_eq!((e.line, e.pointer.as_deref()), (Some(2), Some("/a")), "{e:?}");
        let e = yaml("x:\n  a: 1\n  a: 2\n").unwrap_err();
        assert_eq!((e.line, e.pointer.as_deref()), (Some(3), Some("/x/a")), "{e:?}");
        assert!(toml("a = 1\na = 2\n").unwrap_err().line.is_some());
    }

    #[test]
    fn yaml_aliases_anchors_tags_and_streams_are_refused() {
        for (text, needle) in [
            ("a: &x 1\nb: *x\n", "anchors"),
            ("a: !custom 1\n", "custom YAML tags"),
            ("a: 1\n---\nb: 2\n", "more than one"),
            ("? [a]\n: 1\n", "keys must be scalars"),
        ] {
            let e = yaml(text).unwrap_err();
            assert!(e.message.contains(needle), "{text:?}: {e:?}");
        }
    }

    #[test]
    fn non_finite_numbers_are_refused_in_toml_and_yaml() {
        assert!(toml("a = nan\n").unwrap_err().message.contains("NaN"));
        assert!(toml("a = -inf\n").unwrap_err().message.contains("NaN"));
        assert!(yaml("a: .inf\n").unwrap_err().message.contains("NaN"));
    }

    #[test]
    fn yaml_scalars_follow_the_core_schema() {
        let v = yaml("a: 012\nb: -3\nc: 0x1f\nd: 1e3\ne: ~\nf: 'true'\ng: yes\nh: !!str 5\ni: 1.0\n").unwrap();
        assert_eq!(
            v,
            json!({"a": 12, "b": -3, "c": 31, "d": 1000.0, "e": null, "f": "true", "g": "yes", "h": "5", "i": 1.0})
        );
    }

    #[test]
    fn yaml_strings_round_trip_whatever_they_hold() {
        for s in [
            "",
            "true",
            "no",
            "1.5",
            "a: b",
            "- x",
            "#c",
            "multi\nline",
            "tab\there",
            "ünï",
            "[x]",
            " lead",
            "trail ",
            "null",
            "0x1",
        ] {
            let doc = json!({"k": s, "list": [s, {"inner": s}]});
            assert_eq!(yaml(&to_yaml(&doc)).unwrap(), doc, "{s:?}:\n{}", to_yaml(&doc));
        }
    }

    #[test]
    fn yaml_writes_what_yaml_1_1_readers_break_or_drop_as_escapes() {
        let s = "a\u{7f}b\u{80}c\u{85}d\u{9f}e\u{2028}f\u{2029}g";
        let doc = json!({"k\u{2028}\u{2029}": s});
        let text = to_yaml(&doc);
        assert_eq!(text, "\"k\\u2028\\u2029\": \"a\\u007Fb\\u0080c\\u0085d\\u009Fe\\u2028f\\u2029g\"\n");
        assert_eq!(yaml(&text).unwrap(), doc);
        // Raw, the readers take them as YAML 1.2 does: content, not line breaks.
        assert_eq!(yaml("k: \"a\u{2028}b\u{85}c\"\n").unwrap(), json!({"k": "a\u{2028}b\u{85}c"}));
    }

    #[test]
    fn toml_refusals_name_their_line_and_pointer() {
        let e = toml("a = 1\n[b]\nc = [1, nan]\n").unwrap_err();
        assert_eq!((e.line, e.pointer.as_deref()), (Some(3), Some("/b/c/1")), "{e:?}");
        assert!(e.message.contains("NaN"), "{e:?}");
        let e = toml("a = 1\n\"\" = 2\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e:?}");
        let e = toml("a = 1\nb = 18446744073709551616\n").unwrap_err();
        assert_eq!((e.line, e.pointer.as_deref(), e.message.as_str()), (Some(2), Some("/b"), INTEGER_RANGE));
    }

    #[test]
    fn numbers_reach_the_tree_exactly_or_are_refused_alike_in_every_format() {
        let texts = |n: &str| {
            [
                format!("{{\"a\": 1,\n\"b\": {{\"c\": {n}}}}}"),
                format!("a: 1\nb:\n  c: {n}\n"),
                format!("a = 1\n[b]\nc = {n}\n"),
            ]
        };
        let read = |i: usize, t: &str| [json, yaml, toml][i](t);
        for n in [
            "100000000000000000000",
            "-9223372036854775809",
            "1.0000000000000001",
            "123456789012345678901234567890.5",
        ] {
            for (i, t) in texts(n).iter().enumerate() {
                let e = read(i, t).expect_err(t);
                assert_eq!((e.line, e.pointer.as_deref()), (Some(2 + (i > 0) as usize), Some("/b/c")), "{t}: {e:?}");
                assert!(e.message.contains("cannot be stored exactly"), "{t}: {e:?}");
                assert!(!e.message.contains(n), "the digits are not repeated (they may be secret): {e:?}");
            }
        }
        for (n, want) in [
            ("-0", json!(0)),
            ("-0.0", json!(0.0)),
            ("18446744073709551615", json!(u64::MAX)),
            ("0.1", json!(0.1)),
            ("1e300", json!(1e300)),
        ] {
            for (i, t) in texts(n).iter().enumerate() {
                let v = read(i, t).unwrap_or_else(|e| panic!("{t}: {e:?}"));
                assert_eq!(v["b"]["c"], want, "{t}");
                assert_eq!(v["b"]["c"].to_string(), want.to_string(), "{t}: same spelling, so the same jsonb");
            }
        }
        // YAML's other integer spellings are integers too, and held to the same range.
        assert!(yaml("a: 0x1ffffffffffffffff\n").unwrap_err().message.contains("64-bit range"));
        assert_eq!(yaml("a: !!float 100000000000000000000\n").unwrap(), json!({"a": 1e20}));
    }

    #[test]
    fn toml_integers_are_read_as_i64_or_u64() {
        let v = toml("a = 18446744073709551615\nb = -9223372036854775808\nc = 0x1f\nd = 1_000\ne = 0o17\n").unwrap();
        assert_eq!(v, json!({"a": 18446744073709551615u64, "b": i64::MIN, "c": 31, "d": 1000, "e": 15}));
    }

    #[test]
    fn toml_datetimes_become_strings() {
        assert_eq!(toml("t = 1979-05-27T07:32:00Z\n").unwrap(), json!({"t": "1979-05-27T07:32:00Z"}));
        // The key the toml crate's serde layer hands a datetime under is an ordinary key in JSON.
        let doc = json!({"t": {"$__toml_private_datetime": "1979-05-27T07:32:00Z"}});
        assert_eq!(json(&doc.to_string()).unwrap(), doc);
    }
}
