//! The TOML that our writer and rops produce, read without the `toml` crate: `key = value` lines
//! of bare keys and strings, integers and booleans, `[table]` and `[[array]]` headers that open
//! each table once, in the order of the tree, and `"""` strings of whole lines. Anything else
//! (comments, dotted or quoted keys, floats, dates, arrays, inline tables, a table opened again
//! after another, escapes beyond JSON's, tabs, non-ASCII) is declined,
//! and so is a file the tree's rules refuse: the `toml` crate then reads it, and says what is
//! wrong where. Why: toml lexes and decodes into its own map before ours is built, 20 us of a
//! bench file. The `toml_fast_path` fuzz target holds the two readers to the same tree.

use crate::domain::document::TreeBuilder;
use serde_json::Value;

/// The tree of `text`, or None when it is not of the simple kind or breaks a rule.
pub(super) fn tree(text: &str) -> Option<Value> {
    let lines = super::ascii_lines(text)?;
    let mut r = Reader {
        b: TreeBuilder::new(),
        open: Vec::new(),
    };
    r.b.begin_map().ok()?;
    let mut i = 0;
    while let Some(&line) = lines.get(i) {
        i += 1;
        let line = line.trim_start_matches(' ');
        if line.is_empty() {
            continue;
        }
        if let Some(path) = header(line, "[[", "]]") {
            r.array_element(path)?;
        } else if let Some(path) = header(line, "[", "]") {
            r.table(path)?;
        } else {
            let (key, value) = line.split_once('=')?;
            let value = match value.trim_start_matches(' ') {
                "\"\"\"" => multi_line(&lines, &mut i)?,
                v => scalar(v)?,
            };
            r.b.key(bare_key(key.trim_end_matches(' '))?.to_string()).ok()?;
            r.b.scalar(value).ok()?;
        }
    }
    r.close_to(0)?;
    r.b.end().ok()?;
    r.b.finish().ok()
}

struct Reader<'a> {
    b: TreeBuilder,
    /// The tables open in the builder, outermost first: each key, and whether it names an array
    /// of tables (whose last element is the table open).
    open: Vec<(&'a str, bool)>,
}

impl<'a> Reader<'a> {
    /// Ends the open tables deeper than `depth`.
    fn close_to(&mut self, depth: usize) -> Option<()> {
        while self.open.len() > depth {
            let (_, array) = self.open.pop()?;
            self.b.end().ok()?;
            if array {
                self.b.end().ok()?;
            }
        }
        Some(())
    }

    /// Opens the last key of `path` in its parent, opening the parent's keys that are not open
    /// (a table named only by its sub-tables' headers). One that was open before and closed
    /// since is a key twice for the builder: the file is declined, though TOML allows it.
    fn enter(&mut self, path: Vec<&'a str>, array: bool) -> Option<()> {
        let (last, parent) = path.split_last()?;
        let common = self.open.iter().zip(parent).take_while(|((k, _), p)| k == *p).count();
        self.close_to(common)?;
        for key in &parent[common..] {
            self.b.key(key.to_string()).ok()?;
            self.b.begin_map().ok()?;
            self.open.push((key, false));
        }
        self.b.key(last.to_string()).ok()?;
        if array {
            self.b.begin_seq().ok()?;
        }
        self.b.begin_map().ok()?;
        self.open.push((last, array));
        Some(())
    }

    fn table(&mut self, path: Vec<&'a str>) -> Option<()> {
        self.enter(path, false)
    }

    /// `[[path]]`: the next element of the array open at `path`, or the array's first.
    fn array_element(&mut self, path: Vec<&'a str>) -> Option<()> {
        let same = self.open.len() == path.len() && self.open.last()?.1 && self.open.iter().zip(&path).all(|((k, _), p)| k == p);
        if !same {
            return self.enter(path, true);
        }
        self.b.end().ok()?;
        self.b.begin_map().ok()
    }
}

/// The dotted path of a `[a.b]` or `[[a.b]]` line, each part a bare key.
fn header<'a>(line: &'a str, open: &str, close: &str) -> Option<Vec<&'a str>> {
    let inner = line.strip_prefix(open)?.trim_end_matches(' ').strip_suffix(close)?;
    inner.split('.').map(bare_key).collect()
}

fn bare_key(key: &str) -> Option<&str> {
    let ok = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(key)
}

/// A value that ends on its line: a basic or literal string, an integer in decimal, a boolean.
fn scalar(v: &str) -> Option<Value> {
    let v = v.trim_end_matches(' ');
    match v.as_bytes().first()? {
        b'"' => match super::double_quoted(&v[1..], false)? {
            (text, "") => Some(Value::String(text)),
            _ => None,
        },
        b'\'' => {
            let (s, rest) = v[1..].split_once('\'')?;
            rest.is_empty().then(|| Value::String(s.to_string()))
        }
        _ if v == "true" || v == "false" => Some(Value::Bool(v == "true")),
        _ => integer(v),
    }
}

fn integer(v: &str) -> Option<Value> {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let plain = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
    if !plain {
        return None;
    }
    v.parse::<i64>().map(Value::from).ok()
}

/// A `"""` string opened at the end of a line: the lines up to one that ends with `"""`, with
/// the line breaks between them, none holding another quote or a backslash.
fn multi_line(lines: &[&str], i: &mut usize) -> Option<Value> {
    let mut out = String::new();
    loop {
        let line = *lines.get(*i)?;
        *i += 1;
        let (text, last) = match line.strip_suffix("\"\"\"") {
            Some(text) => (text, true),
            None => (line, false),
        };
        if memchr::memchr2(b'"', b'\\', text.as_bytes()).is_some() {
            return None;
        }
        out.push_str(text);
        if last {
            return Some(Value::String(out));
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn agrees(text: &str) {
        let simple = tree(text).unwrap_or_else(|| panic!("declined: {text:?}"));
        let full = crate::parse::toml_full(text).unwrap();
        assert_eq!(simple.to_string(), full.to_string(), "{text}");
    }

    #[test]
    fn simple_toml_reads_as_toml_does() {
        agrees("a = 1\nb = -20\nc = true\nd = false\ne = \"x \\\"q\\\" \\\\ \\u00e9 \\t\"\nf = 'lit \\ eral'\ng = ''\nh=0\n");
        agrees(
            "top = 1\n\n[t]\nx = 1\n\n[t.u]\ny = 2\n\n[t.v]\n\n[[t.w]]\nz = 3\n\n[[t.w]]\nz = 4\n[t.w.deep]\nq = 5\n\n[s]\n  indented = \"yes\"\n  [s.sub]\n",
        );
        agrees("k = \"\"\"\nno final break\"\"\"\nj = \"\"\"\n-----BEGIN-----\n  spaced line  \n-----END-----\n\"\"\"\nempty = \"\"\"\n\"\"\"\nafter = 1\n");
        agrees("[[a]]\n[[a]]\nx = 1\n[[a]]\n");
        agrees("[a.b.c]\nx = 1\n[a.b.d]\n[a.e]\n[[f.g]]\n[[f.g]]\n[f.g.h.i]\ny = 2\n");
    }

    #[test]
    fn files_our_writer_and_rops_produce_are_read_here() {
        for text in crate::parse::example_texts("toml") {
            agrees(&text);
        }
        let doc = serde_json::json!({"a": 1, "q": "\"quoted\"", "s": "multi\nline", "t": {"b": [{"c": "d"}, {"c": "e"}], "f": {}}, "g": "yes"});
        let written = crate::sops::serialize(crate::sops::Format::Toml, &doc).unwrap();
        agrees(&written);
    }

    #[test]
    fn everything_else_is_left_to_toml() {
        let declined = [
            "a = 1",               // no final line break
            "a = 1\r\n",           // carriage return
            "a =\t1\n",            // tab
            "a = \"caf\u{e9}\"\n", // non-ASCII
            "# comment\na = 1\n",  // comments
            "a = 1 # comment\n",
            "a = \"x\" # comment\n",
            "a.b = 1\n", // dotted and quoted keys
            "\"a\" = 1\n",
            "[\"a\"]\n",
            "[ a ]\n",
            "a = 1.5\n", // floats, dates, other integers
            "a = 1e3\n",
            "a = inf\n",
            "a = 1979-05-27\n",
            "a = 1_000\n",
            "a = 0x10\n",
            "a = +1\n",
            "a = 01\n",
            "a = 9223372036854775808\n",
            "a = [1, 2]\n", // arrays and inline tables
            "a = {b = 1}\n",
            "a = '''x'''\n", // multi-line literals, other multi-line forms
            "a = \"\"\"x\"\"\"\n",
            "a = \"\"\"\nsay \"x\"\n\"\"\"\n",
            "a = \"\"\"\nline \\\n\"\"\"\n",
            "a = \"\"\"\nunclosed\n",
            "a = \"\\/\"\n", // escapes beyond TOML's and JSON's common set
            "a = \"\\e\"\n",
            "a = \"\\U0001F600\"\n",
            "a = \"\\ud800\"\n",
            "a = \"x\n",
            "[a.b]\n[a]\n", // a table opened again after another
            "[a]\n[b]\n[a.c]\n",
            "[a]\n[a]\n", // twice: the tree's rules refuse it, toml says why
            "a = 1\na = 2\n",
            "a = 1\n[a]\n",
            "[[a]]\n[a.b]\n[[a]]\n",
            "a =\n",
            "= 1\n",
            "a\n",
        ];
        for text in declined {
            assert_eq!(tree(text), None, "{text:?}");
        }
    }
}
