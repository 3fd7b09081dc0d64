//! The block YAML that sops and our own writer produce, read without yaml-rust2: indented
//! mappings and lists, one-line plain and quoted scalars, `|` literals. It gives the events
//! yaml-rust2 would, with their lines, or declines (`None`) and yaml-rust2 reads the file: flow
//! collections, anchors, aliases, tags, comments, directives, multi-line plain or quoted scalars,
//! tabs, carriage returns and non-ASCII text all go there. Why: yaml-rust2 scans a character at a
//! time through a queue of tokens, and YAML files took half of what `validate` adds to
//! decryption. That both readers agree wherever this one answers is the `yaml_fast_path` fuzz
//! target's property, and its unit tests compare the two event for event.

use yaml_rust2::parser::Event;
use yaml_rust2::scanner::TScalarStyle;

/// Deeper nesting is declined, for yaml-rust2 and the tree builder's own limit to refuse.
const MAX_DEPTH: usize = 24;
/// A longer key is declined: YAML caps implicit keys at 1024 characters, and tenant keys are short.
const MAX_KEY: usize = 128;

/// Each event with its line (1-based), as yaml-rust2's markers give it.
pub(super) type Events = Vec<(Event, usize)>;

pub(super) fn events(text: &str) -> Option<Events> {
    let lines = super::ascii_lines(text)?;
    if lines.iter().any(|l| l.trim_start_matches(' ').starts_with('#')) {
        return None;
    }
    let mut r = Reader {
        eof_line: lines.len() + 1,
        lines,
        pos: 0,
        events: Vec::with_capacity(64),
    };
    r.document()?;
    Some(r.events)
}

struct Reader<'a> {
    lines: Vec<&'a str>,
    /// The line being read (0-based).
    pos: usize,
    events: Events,
    eof_line: usize,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank(line: &str) -> bool {
    line.bytes().all(|b| b == b' ')
}

fn is_dash(t: &str) -> bool {
    t == "-" || t.starts_with("- ")
}

fn scalar(text: String, style: TScalarStyle) -> Event {
    Event::Scalar(text, style, 0, None)
}

impl<'a> Reader<'a> {
    fn push(&mut self, event: Event, line: usize) {
        self.events.push((event, line));
    }

    fn next_content(&self) -> Option<usize> {
        (self.pos..self.lines.len()).find(|&i| !is_blank(self.lines[i]))
    }

    /// The line of the token after what has been read: where yaml-rust2 marks the end of a
    /// collection and an empty value.
    fn next_token_line(&self) -> usize {
        self.next_content().map_or(self.eof_line, |i| i + 1)
    }

    /// The next line with content, if it starts at `col` exactly; one indented further is
    /// declined (a continuation, or an indentation yaml-rust2 would refuse).
    fn next_at(&mut self, col: usize) -> Option<Option<&'a str>> {
        let Some(i) = self.next_content() else { return Some(None) };
        let line = self.lines[i];
        match indent(line) {
            n if n > col => None,
            n if n == col => {
                self.pos = i;
                Some(Some(&line[col..]))
            }
            _ => Some(None),
        }
    }

    fn document(&mut self) -> Option<()> {
        let first = self.next_content()?;
        if indent(self.lines[first]) != 0 {
            return None;
        }
        self.push(Event::StreamStart, 1);
        self.push(Event::DocumentStart, first + 1);
        self.pos = first;
        self.mapping(0, 1)?;
        if self.next_content().is_some() {
            return None;
        }
        self.push(Event::DocumentEnd, self.eof_line);
        self.push(Event::StreamEnd, self.eof_line);
        Some(())
    }

    /// A mapping whose first key starts at `col` of the current line (after a dash, for a
    /// mapping that is a list item); its other keys start their lines at `col`.
    fn mapping(&mut self, col: usize, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.push(Event::MappingStart(0, None), self.pos + 1);
        let line: &'a str = self.lines[self.pos];
        let mut text = &line[col..];
        loop {
            self.entry(text, col, depth)?;
            match self.next_at(col)? {
                Some(t) if is_dash(t) => return None,
                Some(t) => text = t,
                None => break,
            }
        }
        self.push(Event::MappingEnd, self.next_token_line());
        Some(())
    }

    fn entry(&mut self, text: &str, col: usize, depth: usize) -> Option<()> {
        let (key, rest) = split_key(text)?;
        let line = self.pos + 1;
        self.push(scalar(key.to_string(), TScalarStyle::Plain), line);
        let rest = rest.trim_start_matches(' ');
        self.pos += 1;
        if rest.is_empty() {
            return self.block_value(col, true, depth);
        }
        if let Some(header) = rest.strip_prefix('|') {
            return self.literal(header, col);
        }
        self.inline(rest, line, depth)
    }

    /// A value that ends on its line: a scalar, or an empty `{}` or `[]`.
    fn inline(&mut self, text: &str, line: usize, depth: usize) -> Option<()> {
        let (start, end) = match text.trim_end_matches(' ') {
            "{}" => (Event::MappingStart(0, None), Event::MappingEnd),
            "[]" => (Event::SequenceStart(0, None), Event::SequenceEnd),
            _ => {
                let (value, style) = inline_scalar(text)?;
                self.push(scalar(value, style), line);
                return Some(());
            }
        };
        if depth >= MAX_DEPTH {
            return None;
        }
        self.push(start, line);
        self.push(end, line);
        Some(())
    }

    /// The value of a key or dash with nothing after it: a list or mapping indented further than
    /// `parent` (a key's list may also start at the key's own column), or else an empty scalar,
    /// a null.
    fn block_value(&mut self, parent: usize, list_at_parent: bool, depth: usize) -> Option<()> {
        if let Some(i) = self.next_content() {
            let col = indent(self.lines[i]);
            if (col > parent || (col == parent && list_at_parent)) && is_dash(&self.lines[i][col..]) {
                self.pos = i;
                return self.sequence(col, depth + 1);
            }
            if col > parent {
                self.pos = i;
                return self.mapping(col, depth + 1);
            }
        }
        self.push(scalar(String::new(), TScalarStyle::Plain), self.next_token_line());
        Some(())
    }

    /// A list whose dashes are at `col`; the current line holds the first.
    fn sequence(&mut self, col: usize, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.push(Event::SequenceStart(0, None), self.pos + 1);
        let line: &'a str = self.lines[self.pos];
        let mut text = &line[col..];
        loop {
            let after = &text[1..];
            let content = after.trim_start_matches(' ');
            let spaces = after.len() - content.len();
            if content.is_empty() {
                self.pos += 1;
                self.block_value(col, false, depth)?;
            } else if spaces == 0 {
                return None;
            } else if is_dash(content) {
                self.sequence(col + 1 + spaces, depth + 1)?;
            } else if split_key(content).is_some() {
                self.mapping(col + 1 + spaces, depth + 1)?;
            } else {
                self.inline(content, self.pos + 1, depth)?;
                self.pos += 1;
            }
            match self.next_at(col)? {
                Some(t) if is_dash(t) => text = t,
                _ => break,
            }
        }
        self.push(Event::SequenceEnd, self.next_token_line());
        Some(())
    }

    /// A `|` or `|-` literal of a key at `col`, from the next line: every line indented like the
    /// first, none blank (blank lines and chomping are yaml-rust2's to get right).
    fn literal(&mut self, header: &str, col: usize) -> Option<()> {
        let strip = match header.trim_end_matches(' ') {
            "" => false,
            "-" => true,
            _ => return None,
        };
        let first = self.pos;
        let at = indent(self.lines.get(first)?);
        if at <= col || is_blank(self.lines[first]) {
            return None;
        }
        let mut value = String::new();
        while let Some(&line) = self.lines.get(self.pos) {
            if is_blank(line) {
                return None;
            }
            if indent(line) < at {
                break;
            }
            value.push_str(&line[at..]);
            value.push('\n');
            self.pos += 1;
        }
        if strip {
            value.pop();
        }
        self.push(scalar(value, TScalarStyle::Literal), first + 1);
        Some(())
    }
}

/// `key:` or `key: rest` with a plain key of letters, digits and `_-./`.
fn split_key(text: &str) -> Option<(&str, &str)> {
    let colon = memchr::memchr(b':', text.as_bytes())?;
    let (key, rest) = (&text[..colon], &text[colon + 1..]);
    let first = *key.as_bytes().first()?;
    let key_ok =
        key.len() <= MAX_KEY && (first.is_ascii_alphanumeric() || first == b'_') && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b));
    (key_ok && (rest.is_empty() || rest.starts_with(' '))).then_some((key, rest))
}

/// A scalar that ends on its line: plain, single- or double-quoted.
fn inline_scalar(s: &str) -> Option<(String, TScalarStyle)> {
    let bytes = s.as_bytes();
    match bytes[0] {
        b'"' => double_quoted(&s[1..]),
        b'\'' => single_quoted(&s[1..]),
        b'-' if bytes.get(1).is_none_or(|&b| b == b' ') => None,
        b if b"[]{}#&*!|>%@`,?:".contains(&b) => None,
        _ if !plain_ends_on_its_line(bytes) => None,
        _ => Some((s.trim_end_matches(' ').to_string(), TScalarStyle::Plain)),
    }
}

/// No ` #` (a comment) and no `: ` or final `:` (a key) inside: the whole line is the scalar.
fn plain_ends_on_its_line(s: &[u8]) -> bool {
    let comment = memchr::memchr_iter(b'#', s).any(|i| s[i - 1] == b' ');
    let key = memchr::memchr_iter(b':', s).any(|i| s.get(i + 1).is_none_or(|&b| b == b' '));
    !comment && !key
}

fn double_quoted(s: &str) -> Option<(String, TScalarStyle)> {
    let (text, rest) = super::double_quoted(s, true)?;
    is_blank(rest).then_some((text, TScalarStyle::DoubleQuoted))
}

fn single_quoted(s: &str) -> Option<(String, TScalarStyle)> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let quote = rest.find('\'')?;
        out.push_str(&rest[..quote]);
        rest = &rest[quote + 1..];
        match rest.strip_prefix('\'') {
            Some(after) => {
                out.push('\'');
                rest = after;
            }
            None => return is_blank(rest).then_some((out, TScalarStyle::SingleQuoted)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::parser::Parser;

    fn full(text: &str) -> Events {
        let mut parser = Parser::new_from_str(text);
        let mut out = Vec::new();
        loop {
            let (event, mark) = parser.next_token().unwrap_or_else(|e| panic!("yaml-rust2 refuses {text:?}: {e}"));
            let end = event == Event::StreamEnd;
            out.push((event, mark.line()));
            if end {
                return out;
            }
        }
    }

    #[track_caller]
    fn agrees(text: &str) {
        let fast = events(text).unwrap_or_else(|| panic!("declined: {text:?}"));
        assert_eq!(fast, full(text), "{text}");
    }

    #[test]
    fn block_yaml_gives_yaml_rust2s_events_and_lines() {
        agrees("a: 1\nb:\n  c: x\n  d:\n  - e: 1\n    f: 2\n  - g\n  h: |\n    line1\n      line2\ni: 'q'\nj: \"dq\"\nk:\n    - 1\n    - 2\nl:\n");
        agrees("a:\nb: ~\nc:\n\n  d:   spaced out   \n\n\ne: x[y]\n");
        agrees("list:\n- - \nx: 1\n".replace("- - \n", "- a\n- b: c\n  d:\n    - e\n").as_str());
        agrees(
            "s: 'it''s'\nd: \"tab\\there \\\"q\\\" \\\\ \\/ \\u00e9 \\u0000 \\b\\f\\r\\n\"\nl: |-\n  stripped\n  text\nn: -5\nu: http://x.example/a?b=c#d\n",
        );
        agrees(
            "sops:\n    age:\n        - recipient: age1xyz\n          enc: |\n            -----BEGIN AGE ENCRYPTED FILE-----\n            YWdl\n            -----END AGE ENCRYPTED FILE-----\n    lastmodified: \"2024-01-01T00:00:00Z\"\n    version: 3.9.0\n",
        );
        agrees("m:\n-\n  - 1\n- \n  a: 1\n-\n- {}\n- []\ne: {}\nf: []   \n");
        agrees("m:\n- - 1\n  - - 2\n    - 3\n- - 4\nn: 5\n");
        agrees("deep:\n  a:\n    b:\n      c:\n        - d:\n            e: 1\n        - 2\nlast: x\n");
    }

    #[test]
    fn files_sops_and_our_writer_produce_are_read_here() {
        for text in crate::parse::example_texts("yaml") {
            agrees(&text);
        }
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sops/default.sops.yaml");
        agrees(&std::fs::read_to_string(fixtures).unwrap());
        let doc = serde_json::json!({"a": {"b": [1, {"c": "multi\nline \"quoted\""}, [2, 3]], "e": {}}, "f": [], "g": null, "h": "yes"});
        agrees(&crate::parse::to_yaml(&doc));
    }

    #[test]
    fn everything_else_is_left_to_yaml_rust2() {
        let declined = [
            "",
            "a: 1",              // no final line break
            "a: 1\r\n",          // carriage return
            "a:\t1\n",           // tab
            "a: caf\u{e9}\n",    // non-ASCII
            "# comment\na: 1\n", // comments
            "a: 1 # comment\n",
            "---\na: 1\n", // document markers, directives
            "%YAML 1.2\n---\na: 1\n",
            "- a\n", // not a mapping at the top
            "  a: 1\n",
            "a: {b: 1}\n", // flow collections
            "a: [1]\n",
            "a: &x 1\nb: *x\n", // anchors and aliases
            "a: !!str 1\n",     // tags
            "a: >\n  folded\n", // folded and kept literals, explicit indentation
            "a: |+\n  kept\n",
            "a: |2\n   x\n",
            "a: |\n  x\n\n  y\n", // a blank line in a literal
            "a: |\nb: 1\n",       // an empty literal
            "a: b\n  c\n",        // multi-line plain scalar
            "a: \"b\n  c\"\n",    // multi-line quoted scalar
            "a: 'b\n",
            "a: \"\\x41\"\n", // escapes beyond JSON's
            "a: \"\\ud83d\\ude00\"\n",
            "\"a\": 1\n", // quoted and complex keys
            "? a\n: 1\n",
            "a b: 1\n",
            "a:b: 1\n",
            "a: b: c\n",
            "a: b:\n",
            "a: - b\n",
            "a: 1\n- b\n",
            "a:\n  -\n  b: 1\n", // a dash's mapping at the dash's column
            "a: 1\n   b: 2\n",   // bad indentation
            "a:\n    b: 1\n  c: 2\n",
        ];
        for text in declined {
            assert_eq!(events(text), None, "{text:?}");
        }
        let deep = (0..MAX_DEPTH + 1).fold(String::new(), |acc, i| acc + &" ".repeat(i) + "a:\n") + &" ".repeat(MAX_DEPTH + 1) + "b: 1\n";
        assert_eq!(events(&deep), None);
    }
}
