//! The one definition of a legal tenant document, and the budgets that bound what a file from git
//! may cost us. Every parser (TOML, JSON, YAML) builds its tree through [`TreeBuilder`], so a value
//! that breaks a rule never leaves the parser; decrypted values are checked with [`check_string`].
//! docs/limits.md explains each number.

use super::json::child;
use serde_json::{Map, Number, Value};

/// Nesting deeper than this is refused: nobody writes it by hand, and it bounds every recursive walk.
pub const MAX_DEPTH: usize = 32;
/// Values (scalars, mappings and lists) in one document. A tenant file has about a hundred.
pub const MAX_NODES: usize = 20_000;
/// Bytes of one key name.
pub const MAX_KEY_BYTES: usize = 256;
/// Bytes of one string value, encrypted or decrypted.
pub const MAX_STRING_BYTES: usize = 128 * 1024;
/// Bytes of all keys and strings of one document together: with aliases refused, a document can
/// never be larger than its file, so this only backs up the file size limit.
pub const MAX_DOCUMENT_BYTES: usize = 2 * 1024 * 1024;

/// A rule a document broke, at a JSON pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub pointer: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.pointer, self.message)
        }
    }
}

fn problem(pointer: &str, message: impl Into<String>) -> Problem {
    Problem {
        pointer: pointer.to_string(),
        message: message.into(),
    }
}

/// A key name is legal when it is non-empty, short and free of control characters (which would
/// rewrite a terminal or forge lines in a plan). Messages describe the key without quoting it.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key names are not allowed".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("a key name is {} bytes; the limit is {MAX_KEY_BYTES}", key.len()));
    }
    // Printable ASCII, nearly every key, needs no decoding into chars.
    if key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(format!("key names may not contain control characters (found U+{:04X})", c as u32));
    }
    Ok(())
}

/// A string value is legal when PostgreSQL's jsonb can store it (no U+0000) and it is within budget.
pub fn check_string(s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err("strings may not contain U+0000 (PostgreSQL cannot store it)".into());
    }
    if s.len() > MAX_STRING_BYTES {
        return Err(format!("a string is {} bytes; the limit is {MAX_STRING_BYTES}", s.len()));
    }
    Ok(())
}

pub fn number_from_f64(f: f64) -> Result<Number, String> {
    Number::from_f64(f).ok_or_else(|| "NaN and infinity are not allowed".to_string())
}

/// Refusals name no digits: the value may sit under a secret path.
pub const INTEGER_RANGE: &str =
    "an integer outside the 64-bit range (-9223372036854775808 to 18446744073709551615) cannot be stored exactly; quote it to keep it as a string";
const INEXACT_FLOAT: &str =
    "a number with more digits than a 64-bit float holds cannot be stored exactly; quote it to keep it as a string, or use fewer digits";

/// Whether a number's text is an integer (no point, no exponent), in any of the formats' decimal
/// spellings.
pub fn is_integer_literal(text: &str) -> bool {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A number exactly as a file writes it: an integer within 64 bits, or a decimal that the 64-bit
/// float it becomes gives back digit for digit. Whatever else a file says would reach the
/// database as another number (`1e20` for an integer one past the range, `1.0` for
/// `1.0000000000000001`), so it is refused. Negative zero is zero, in every format.
pub fn exact_number(text: &str) -> Result<Number, String> {
    if is_integer_literal(text) {
        let unsigned = text.strip_prefix('+').unwrap_or(text);
        return match (unsigned.parse::<i64>(), unsigned.parse::<u64>()) {
            (Ok(i), _) => Ok(Number::from(i)),
            (_, Ok(u)) => Ok(Number::from(u)),
            _ => Err(INTEGER_RANGE.to_string()),
        };
    }
    exact_float(text)
}

/// A decimal (integer-looking or not) read as a 64-bit float, refused unless exact.
pub fn exact_float(text: &str) -> Result<Number, String> {
    let f: f64 = text.parse().map_err(|_| "not a number".to_string())?;
    if !f.is_finite() {
        return Err("NaN and infinity are not allowed".into());
    }
    let f = if f == 0.0 { 0.0 } else { f };
    match decimal(text) == decimal(&format!("{f}")) {
        true => number_from_f64(f),
        false => Err(INEXACT_FLOAT.to_string()),
    }
}

/// A decimal's value as (negative, significant digits, exponent): `0.<digits> * 10^exponent`,
/// without leading or trailing zeros; zero is `(false, "", 0)` whatever its sign.
fn decimal(text: &str) -> (bool, String, i64) {
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = rest.split_once(['e', 'E']).unwrap_or((rest, "0"));
    // An exponent past any f64's is clamped: the value is then infinite or zero, refused or
    // compared as such.
    let exponent: i64 = exponent
        .parse()
        .unwrap_or(if exponent.starts_with('-') { -100_000 } else { 100_000 })
        .clamp(-100_000, 100_000);
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all = format!("{int}{frac}");
    let leading = all.len() - all.trim_start_matches('0').len();
    let digits = all.trim_start_matches('0').trim_end_matches('0');
    if digits.is_empty() {
        return (false, String::new(), 0);
    }
    (negative, digits.to_string(), int.len() as i64 - leading as i64 + exponent)
}

// No pointer is kept per frame: it is needed only for an error, and built then from the keys and
// indexes on the stack (a string per collection and key was a tenth of parsing a file).
enum Frame {
    Map { map: Map<String, Value>, key: Option<String> },
    Seq { items: Vec<Value> },
}

impl Frame {
    /// The token of the value being built inside this collection.
    fn push_token(&self, pointer: String) -> String {
        match self {
            Frame::Map { key, .. } => child(&pointer, key.as_deref().unwrap_or("")),
            Frame::Seq { items } => child(&pointer, &items.len().to_string()),
        }
    }
}

/// Builds a document from a parser's events (`begin_map`, `key`, `scalar`, ..., `end`), refusing
/// it at the first broken rule or exhausted budget, before the rest of the file is read.
#[derive(Default)]
pub struct TreeBuilder {
    stack: Vec<Frame>,
    root: Option<Value>,
    nodes: usize,
    bytes: usize,
}

impl TreeBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pointer of the next value.
    pub fn here(&self) -> String {
        self.pointer_of(self.stack.len())
    }

    /// The pointer of the collection `depth` frames deep (0: the root's).
    fn pointer_of(&self, depth: usize) -> String {
        self.stack[..depth].iter().fold(String::new(), |pointer, f| f.push_token(pointer))
    }

    /// The pointer of the collection being built.
    fn container(&self) -> String {
        self.pointer_of(self.stack.len().saturating_sub(1))
    }

    fn count(&mut self, bytes: usize) -> Result<(), Problem> {
        self.nodes += 1;
        self.bytes += bytes;
        if self.nodes > MAX_NODES {
            return Err(problem(&self.here(), format!("the document has more than {MAX_NODES} values")));
        }
        if self.bytes > MAX_DOCUMENT_BYTES {
            return Err(problem(
                &self.here(),
                format!("the document's keys and strings exceed {MAX_DOCUMENT_BYTES} bytes"),
            ));
        }
        Ok(())
    }

    fn open(&mut self, frame: Frame) -> Result<(), Problem> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(problem(&self.here(), format!("nesting is deeper than {MAX_DEPTH} levels")));
        }
        self.count(0)?;
        self.stack.push(frame);
        Ok(())
    }

    pub fn begin_map(&mut self) -> Result<(), Problem> {
        self.open(Frame::Map { map: Map::new(), key: None })
    }

    pub fn begin_seq(&mut self) -> Result<(), Problem> {
        self.open(Frame::Seq { items: Vec::new() })
    }

    /// The next key of the mapping being built. Duplicates are refused in every format: the sops
    /// CLI keeps both, and two tools must never read two different documents from one file.
    pub fn key(&mut self, k: String) -> Result<(), Problem> {
        check_key(&k).map_err(|m| problem(&self.container(), m))?;
        self.bytes += k.len();
        match self.stack.last() {
            Some(Frame::Map { map, .. }) if map.contains_key(&k) => return Err(problem(&child(&self.container(), &k), "duplicate key")),
            Some(Frame::Map { .. }) => {}
            _ => return Err(problem(&self.container(), "a key outside a mapping")),
        }
        if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
            *key = Some(k);
        }
        Ok(())
    }

    /// A scalar value (string, number, boolean or null).
    pub fn scalar(&mut self, v: Value) -> Result<(), Problem> {
        let len = match &v {
            Value::String(s) => {
                check_string(s).map_err(|m| problem(&self.here(), m))?;
                s.len()
            }
            _ => 0,
        };
        self.count(len)?;
        self.place(v)
    }

    /// Closes the innermost mapping or list.
    pub fn end(&mut self) -> Result<(), Problem> {
        let v = match self.stack.pop() {
            Some(Frame::Map { map, .. }) => Value::Object(map),
            Some(Frame::Seq { items, .. }) => Value::Array(items),
            None => return Err(problem("", "unbalanced end of a collection")),
        };
        self.place(v)
    }

    fn place(&mut self, v: Value) -> Result<(), Problem> {
        match self.stack.last_mut() {
            None if self.root.is_none() => self.root = Some(v),
            None => return Err(problem("", "more than one document")),
            Some(Frame::Seq { items }) => items.push(v),
            Some(Frame::Map { key: None, .. }) => return Err(problem(&self.container(), "a value without a key")),
            Some(Frame::Map { map, key }) => {
                map.insert(key.take().expect("matched above"), v);
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Value, Problem> {
        if !self.stack.is_empty() {
            return Err(problem(&self.container(), "the document ends inside a collection"));
        }
        self.root.ok_or_else(|| problem("", "the file holds no document"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn build(f: impl FnOnce(&mut TreeBuilder) -> Result<(), Problem>) -> Result<Value, Problem> {
        let mut b = TreeBuilder::new();
        f(&mut b)?;
        b.finish()
    }

    #[test]
    fn builds_nested_documents_in_key_order() {
        let v = build(|b| {
            b.begin_map()?;
            b.key("z".into())?;
            b.scalar(json!(1))?;
            b.key("a".into())?;
            b.begin_seq()?;
            b.scalar(json!("x"))?;
            b.scalar(Value::Null)?;
            b.end()?;
            b.end()
        })
        .unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), r#"{"z":1,"a":["x",null]}"#);
    }

    #[test]
    fn each_rule_is_refused_with_its_pointer() {
        type Steps = Box<dyn Fn(&mut TreeBuilder) -> Result<(), Problem>>;
        let cases: Vec<(&str, Steps, &str)> = vec![
            (
                "duplicate",
                Box::new(|b| {
                    b.begin_map()?;
                    b.key("a".into())?;
                    b.scalar(json!(1))?;
                    b.key("a".into())
                }),
                "/a",
            ),
            (
                "duplicate, inside a list, under an escaped key",
                Box::new(|b| {
                    b.begin_map()?;
                    b.key("x/y".into())?;
                    b.begin_seq()?;
                    b.scalar(json!(0))?;
                    b.begin_map()?;
                    b.key("a".into())?;
                    b.scalar(json!(1))?;
                    b.key("a".into())
                }),
                "/x~1y/1/a",
            ),
            (
                "empty key",
                Box::new(|b| {
                    b.begin_map()?;
                    b.key("".into())
                }),
                "",
            ),
            (
                "control",
                Box::new(|b| {
                    b.begin_map()?;
                    b.key("x".into())?;
                    b.begin_map()?;
                    b.key("a\x1b[2Jb".into())
                }),
                "/x",
            ),
            (
                "nul",
                Box::new(|b| {
                    b.begin_map()?;
                    b.key("s".into())?;
                    b.scalar(json!("a\0b"))
                }),
                "/s",
            ),
            (
                "long key",
                Box::new(|b| {
                    b.begin_map()?;
                    b.key("k".repeat(MAX_KEY_BYTES + 1))
                }),
                "",
            ),
            (
                "long string",
                Box::new(|b| {
                    b.begin_seq()?;
                    b.scalar(json!("s".repeat(MAX_STRING_BYTES + 1)))
                }),
                "/0",
            ),
        ];
        for (name, f, pointer) in cases {
            let err = build(|b| f(b)).unwrap_err();
            assert_eq!(err.pointer, pointer, "{name}: {err}");
            assert!(!err.message.contains("\x1b"), "{name}: the message quotes the key");
        }
    }

    #[test]
    fn depth_and_node_budgets_stop_the_build_early() {
        let mut b = TreeBuilder::new();
        let mut failed_at = None;
        for i in 0..100 {
            if b.begin_seq().is_err() {
                failed_at = Some(i);
                break;
            }
        }
        assert_eq!(failed_at, Some(MAX_DEPTH));

        let mut b = TreeBuilder::new();
        b.begin_seq().unwrap();
        let n = (0..MAX_NODES + 10).position(|_| b.scalar(json!(1)).is_err());
        assert_eq!(n, Some(MAX_NODES - 1), "the list itself is a node");
    }

    #[test]
    fn numbers_are_exact_or_refused() {
        for (text, want) in [
            ("0", json!(0)),
            ("-0", json!(0)),
            ("+7", json!(7)),
            ("-9223372036854775808", json!(i64::MIN)),
            ("18446744073709551615", json!(u64::MAX)),
            ("0.1", json!(0.1)),
            ("-0.0", json!(0.0)),
            ("1.5e300", json!(1.5e300)),
            ("1E-7", json!(1e-7)),
            ("100.250", json!(100.25)),
            (".5", json!(0.5)),
            ("2.", json!(2.0)),
            ("0.000123e3", json!(0.123)),
            ("1e20", json!(1e20)),
        ] {
            assert_eq!(Value::Number(exact_number(text).unwrap_or_else(|e| panic!("{text}: {e}"))), want, "{text}");
        }
        assert!(exact_number("0.0").unwrap().as_f64().unwrap().is_sign_positive());
        assert!(exact_number("-0.0").unwrap().as_f64().unwrap().is_sign_positive(), "negative zero is zero");
        for text in ["18446744073709551616", "-9223372036854775809", "100000000000000000000"] {
            assert!(exact_number(text).unwrap_err().contains("64-bit range"), "{text}");
        }
        for text in ["1.0000000000000001", "0.30000000000000000001", "4.9e-324", "1e-400", "123456789012345678.5"] {
            assert!(exact_number(text).unwrap_err().contains("more digits"), "{text}");
        }
        assert!(exact_number("1e400").unwrap_err().contains("infinity"));
        // sops writes a whole float without its point: a float, still held to exactness.
        assert_eq!(Value::Number(exact_float("100000000000000000000").unwrap()), json!(1e20));
        assert!(exact_float("100000000000000000001").is_err());
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        assert!(number_from_f64(f64::NAN).is_err());
        assert!(number_from_f64(f64::INFINITY).is_err());
        assert_eq!(number_from_f64(0.5).unwrap(), Number::from_f64(0.5).unwrap());
    }
}
