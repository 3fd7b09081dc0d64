//! YAML out: block style, as sops writes it.

use serde_json::Value;
use yaml_rust2::scanner::TScalarStyle;

/// Block-style YAML for a tree: mappings and lists nested by indentation, strings plain where
/// they would read back as the same string and double-quoted (JSON escapes) otherwise.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if m.is_empty() => out.push_str("{}\n"),
        Value::Array(a) if a.is_empty() => out.push_str("[]\n"),
        Value::Object(_) | Value::Array(_) => write_block(v, 0, &mut out),
        scalar => {
            out.push_str(&yaml_scalar_text(scalar));
            out.push('\n');
        }
    }
    out
}

fn write_block(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                out.push_str(&pad);
                out.push_str(&yaml_string(k));
                out.push(':');
                write_child(child, indent + 4, out);
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
                        write_block(item, indent + 2, &mut first);
                        out.push_str(&first[indent + 2..]);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        write_block(item, indent + 2, out);
                    }
                    other => {
                        out.push_str(&yaml_scalar_text(other));
                        out.push('\n');
                    }
                }
            }
        }
        _ => unreachable!("write_block takes collections"),
    }
}

fn write_child(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_block(v, indent, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_block(v, indent, out);
        }
        other => {
            out.push(' ');
            out.push_str(&yaml_scalar_text(other));
            out.push('\n');
        }
    }
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
    let plain_safe = !s.is_empty()
        && s.chars().all(|c| c.is_alphanumeric() || " _-./@+=,[]()".contains(c))
        && !s.starts_with([' ', '-', '[', ']', ',', '@'])
        && !s.ends_with(' ')
        && matches!(super::yaml::yaml_scalar(s.to_string(), TScalarStyle::Plain, None), Ok(Value::String(_)))
        && !matches!(
            s,
            "y" | "Y" | "yes" | "Yes" | "YES" | "n" | "N" | "no" | "No" | "NO" | "on" | "On" | "ON" | "off" | "Off" | "OFF"
        );
    if plain_safe {
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

fn yaml_must_escape(c: char) -> bool {
    matches!(c, '\u{7F}'..='\u{9F}' | '\u{2028}' | '\u{2029}')
}
