//! YAML out: block style, as sops writes it, or as a given file is laid out.

use serde_json::Value;
use yaml_rust2::scanner::TScalarStyle;

/// How a YAML file is laid out, as far as writing it again needs: the indentation of a mapping
/// nested under its key, and of a list under its key (0: the dashes under the key's first letter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct YamlStyle {
    pub indent: usize,
    pub list_indent: usize,
}

impl Default for YamlStyle {
    /// sops's own: four spaces for both.
    fn default() -> YamlStyle {
        YamlStyle { indent: 4, list_indent: 4 }
    }
}

impl YamlStyle {
    /// The layout of `text`, from its first nested mapping and its first list under a key;
    /// what it does not show is sops's.
    pub fn of(text: &str) -> YamlStyle {
        let mut style = YamlStyle::default();
        let (mut indent, mut list) = (None, None);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).collect();
        for pair in lines.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let (ia, ib) = (a.len() - a.trim_start().len(), b.len() - b.trim_start().len());
            // A key whose value follows on the next lines.
            let opens = a.trim_end().ends_with(':') && !a.trim_start().starts_with("- ");
            if !opens {
                continue;
            }
            match b.trim_start().starts_with("- ") {
                true if list.is_none() && ib >= ia => list = Some(ib - ia),
                false if indent.is_none() && ib > ia => indent = Some(ib - ia),
                _ => {}
            }
            if indent.is_some() && list.is_some() {
                break;
            }
        }
        style.indent = indent.unwrap_or(style.indent);
        style.list_indent = list.unwrap_or(style.indent);
        style
    }
}

/// Block-style YAML for a tree, in sops's layout: mappings and lists nested by indentation,
/// strings plain where they would read back as the same string and double-quoted (JSON escapes)
/// otherwise.
pub fn to_yaml(v: &Value) -> String {
    to_yaml_styled(v, YamlStyle::default())
}

/// As [`to_yaml`], laid out as `style` says; a string of several lines ending in a line break is
/// a literal block (`|`), as sops writes the age stanzas.
pub fn to_yaml_styled(v: &Value, style: YamlStyle) -> String {
    let mut out = String::new();
    let w = Writer { style };
    match v {
        Value::Object(m) if m.is_empty() => out.push_str("{}\n"),
        Value::Array(a) if a.is_empty() => out.push_str("[]\n"),
        Value::Object(_) | Value::Array(_) => w.block(v, 0, &mut out),
        scalar => {
            out.push_str(&yaml_scalar_text(scalar));
            out.push('\n');
        }
    }
    out
}

struct Writer {
    style: YamlStyle,
}

impl Writer {
    fn block(&self, v: &Value, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    out.push_str(&pad);
                    out.push_str(&yaml_string(k));
                    out.push(':');
                    self.child(child, indent, out);
                }
            }
            Value::Array(items) => {
                for item in items {
                    out.push_str(&pad);
                    out.push_str("- ");
                    match item {
                        Value::Object(m) if !m.is_empty() => {
                            // The first key shares the dash's line, the rest align under it.
                            let mut first = String::new();
                            self.block(item, indent + 2, &mut first);
                            out.push_str(&first[indent + 2..]);
                        }
                        Value::Array(a) if !a.is_empty() => {
                            out.push('\n');
                            self.block(item, indent + 2, out);
                        }
                        other => {
                            out.push_str(&yaml_scalar_text(other));
                            out.push('\n');
                        }
                    }
                }
            }
            _ => unreachable!("a block is a collection"),
        }
    }

    /// The value of a key at `indent`.
    fn child(&self, v: &Value, indent: usize, out: &mut String) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                out.push('\n');
                self.block(v, indent + self.style.indent, out);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                self.block(v, indent + self.style.list_indent, out);
            }
            Value::String(s) if literal_block_fits(s) => {
                out.push_str(" |\n");
                let pad = " ".repeat(indent + self.style.indent);
                for line in s.lines() {
                    out.push_str(&pad);
                    out.push_str(line);
                    out.push('\n');
                }
            }
            other => {
                out.push(' ');
                out.push_str(&yaml_scalar_text(other));
                out.push('\n');
            }
        }
    }
}

/// Whether `s` reads back the same from a literal block (`|`, clipped): several lines, one line
/// break at the end, none of them starting with a space or holding a character a block cannot.
fn literal_block_fits(s: &str) -> bool {
    s.contains('\n')
        && s.ends_with('\n')
        && !s.ends_with("\n\n")
        && !s.starts_with([' ', '\n'])
        && !s.lines().any(|l| l.is_empty() || l.ends_with(' '))
        && !s.chars().any(|c| c != '\n' && (c.is_control() || yaml_must_escape(c)))
}

fn yaml_scalar_text(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_string(s),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    }
}

/// A string as YAML: plain when reading it back gives the same string, else double-quoted.
fn yaml_string(s: &str) -> String {
    if plain_reads_back(s) {
        return s.to_string();
    }
    let json = Value::String(s.to_string()).to_string();
    if !json.chars().any(yaml_must_escape) {
        return json;
    }
    // JSON leaves these raw; YAML 1.2 does not allow DEL and C1 controls in a stream, and YAML 1.1
    // readers take U+0085, U+2028 and U+2029 for line breaks and fold them away.
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if yaml_must_escape(c) {
            out.push_str(&format!("\\u{:04X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `s`, written plain, is read back as the same string by YAML 1.1 and 1.2 readers alike:
/// no indicator that starts or ends a plain scalar where it stands, nothing a 1.1 reader takes
/// for a boolean, and our own reader agrees.
fn plain_reads_back(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_alphanumeric() || " _-./@+=,[]():^$~".contains(c))
        && !s.starts_with([' ', '-', '[', ']', ',', '@', ':', '~'])
        && !s.ends_with([' ', ':'])
        && !s.contains(": ")
        && matches!(super::yaml::yaml_scalar(s.to_string(), TScalarStyle::Plain, None), Ok(Value::String(_)))
        && !matches!(
            s,
            "y" | "Y" | "yes" | "Yes" | "YES" | "n" | "N" | "no" | "No" | "NO" | "on" | "On" | "ON" | "off" | "Off" | "OFF"
        )
}

fn yaml_must_escape(c: char) -> bool {
    matches!(c, '\u{7F}'..='\u{9F}' | '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_files_layout_is_read_from_it() {
        let two = "a: 1\nb:\n  c: 2\n  d:\n  - x\n";
        assert_eq!(YamlStyle::of(two), YamlStyle { indent: 2, list_indent: 0 });
        let four = "b:\n    c: 2\n    d:\n        - x\n";
        assert_eq!(YamlStyle::of(four), YamlStyle { indent: 4, list_indent: 4 });
        assert_eq!(YamlStyle::of("a: 1\n"), YamlStyle::default());
    }

    #[test]
    fn written_in_a_files_layout_it_reads_back_the_same() {
        let doc = json!({
            "url": "https://a.example/v1", "when": "2026-11-26T17:48:09Z", "re": "^secrets$", "version": "3.9.4",
            "list": [{"recipient": "age1xyz", "enc": "-----BEGIN-----\nabc\n-----END-----\n"}],
            "nested": {"deep": {"n": 1, "t": "yes", "colon": "a: b", "lead": "-x", "end": "x:"}}
        });
        let style = YamlStyle { indent: 2, list_indent: 0 };
        let text = to_yaml_styled(&doc, style);
        assert!(text.contains("url: https://a.example/v1\n"), "{text}");
        assert!(text.contains("when: 2026-11-26T17:48:09Z\n"), "{text}");
        assert!(text.contains("list:\n- recipient: age1xyz\n  enc: |\n    -----BEGIN-----\n    abc\n"), "{text}");
        assert!(
            text.contains("\"yes\"") && text.contains("\"a: b\"") && text.contains("\"-x\"") && text.contains("\"x:\""),
            "{text}"
        );
        assert_eq!(crate::parse::yaml(&text).unwrap(), doc, "{text}");
        assert_eq!(YamlStyle::of(&text), style);
        assert_eq!(crate::parse::yaml(&to_yaml(&doc)).unwrap(), doc);
    }
}
