//! YAML: events from the block reader or yaml-rust2, pulled one at a time into the tree builder.

use super::{ParseError, from_problem};
use crate::domain::document::{INTEGER_RANGE, Problem, TreeBuilder, exact_float, is_integer_literal};
use serde_json::Value;
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::TScalarStyle;

/// YAML as yaml-rust2 reads it, through the block reader when the text is of its kind.
pub fn yaml(text: &str) -> Result<Value, ParseError> {
    match super::block::events(text) {
        Some(events) => yaml_tree(events.into_iter().map(Ok)),
        None => yaml_full(text),
    }
}

/// YAML read by yaml-rust2 alone: what [`yaml`] gives for every text, faster for the block
/// YAML that sops writes.
pub fn yaml_full(text: &str) -> Result<Value, ParseError> {
    let mut parser = Parser::new_from_str(text);
    yaml_tree(std::iter::from_fn(move || {
        Some(parser.next_token().map(|(event, mark)| (event, mark.line())).map_err(|e| ParseError {
            line: Some(e.marker().line()),
            pointer: None,
            message: e.info().to_string(),
        }))
    }))
}

fn yaml_tree(events: impl Iterator<Item = Result<(Event, usize), ParseError>>) -> Result<Value, ParseError> {
    let mut b = TreeBuilder::new();
    // For each open collection: None for a list; for a mapping, whether the next node is a key.
    let mut expecting_key: Vec<Option<bool>> = Vec::new();
    let mut documents = 0;
    for item in events {
        let (event, line) = item?;
        let line = Some(line);
        let refuse = |p: Problem| from_problem(p, line);
        let plain = |message: &str| ParseError {
            line,
            pointer: Some(b.here()),
            message: message.to_string(),
        };
        let is_key = expecting_key.last().copied().flatten().unwrap_or(false);
        match event {
            Event::StreamEnd => break,
            Event::StreamStart | Event::Nothing | Event::DocumentEnd => {}
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(plain("more than one YAML document in the file"));
                }
            }
            Event::Alias(_) => return Err(plain("YAML aliases are not allowed in tenant files")),
            Event::Scalar(_, _, anchor, _) | Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) if anchor > 0 => {
                return Err(plain("YAML anchors are not allowed in tenant files"));
            }
            Event::Scalar(text, style, _, tag) if is_key => {
                if tag.is_some() || !matches!(style, TScalarStyle::Plain | TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted) {
                    return Err(plain("keys must be plain or quoted scalars"));
                }
                b.key(text).map_err(refuse)?;
                *expecting_key.last_mut().expect("inside a mapping") = Some(false);
            }
            Event::SequenceStart(_, _) | Event::MappingStart(_, _) if is_key => {
                return Err(plain("keys must be scalars, not mappings or lists"));
            }
            Event::Scalar(text, style, _, tag) => {
                let v = yaml_scalar(text, style, tag.as_ref()).map_err(|m| refuse(Problem { pointer: b.here(), message: m }))?;
                b.scalar(v).map_err(refuse)?;
                value_done(&mut expecting_key);
            }
            Event::SequenceStart(_, tag) => {
                check_collection_tag(tag.as_ref(), "seq").map_err(|m| plain(&m))?;
                b.begin_seq().map_err(refuse)?;
                expecting_key.push(None);
            }
            Event::MappingStart(_, tag) => {
                check_collection_tag(tag.as_ref(), "map").map_err(|m| plain(&m))?;
                b.begin_map().map_err(refuse)?;
                expecting_key.push(Some(true));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                b.end().map_err(refuse)?;
                expecting_key.pop();
                value_done(&mut expecting_key);
            }
        }
    }
    b.finish().map_err(|p| from_problem(p, None))
}

/// After a value inside a mapping, the next node is a key again.
fn value_done(expecting_key: &mut [Option<bool>]) {
    if let Some(Some(top)) = expecting_key.last_mut() {
        *top = true;
    }
}

const CORE: &str = "tag:yaml.org,2002:";

fn core_tag(tag: Option<&Tag>) -> Result<Option<&str>, String> {
    match tag {
        None => Ok(None),
        Some(t) if t.handle == CORE || t.handle == "!!" => Ok(Some(t.suffix.as_str())),
        Some(t) if t.handle == "!" && t.suffix.is_empty() => Ok(Some("str")),
        Some(_) => Err("custom YAML tags are not allowed in tenant files".into()),
    }
}

fn check_collection_tag(tag: Option<&Tag>, kind: &str) -> Result<(), String> {
    match core_tag(tag)? {
        None => Ok(()),
        Some(s) if s == kind => Ok(()),
        Some(_) => Err("a collection has a scalar's tag".into()),
    }
}

/// A scalar's value under the YAML 1.2 core schema, as the sops CLI (go-yaml v3) reads it for
/// the values a tenant file holds.
pub(super) fn yaml_scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    let resolved = match core_tag(tag)? {
        Some("str") => return Ok(Value::String(text)),
        Some(t @ ("int" | "float" | "bool" | "null")) => Some(t),
        Some(_) => return Err("a scalar has a collection's tag".into()),
        None if style != TScalarStyle::Plain => return Ok(Value::String(text)),
        None => None,
    };
    let t = text.as_str();
    let null = matches!(t, "" | "~" | "null" | "Null" | "NULL");
    let boolean = match t {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    };
    match resolved {
        Some("null") if null => return Ok(Value::Null),
        Some("bool") => return boolean.map(Value::Bool).ok_or_else(|| "a !!bool that is not a boolean".into()),
        Some("null") => return Err("a !!null that is not null".into()),
        _ => {}
    }
    if resolved.is_none() {
        if null {
            return Ok(Value::Null);
        }
        if let Some(b) = boolean {
            return Ok(Value::Bool(b));
        }
    }
    if resolved != Some("float") {
        if let Some(i) = yaml_int(t) {
            return Ok(i);
        }
        if is_integer_literal(t) || is_radix_literal(t) {
            return Err(INTEGER_RANGE.into());
        }
    }
    if matches!(t.trim_start_matches(['+', '-']), ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN") {
        return Err("NaN and infinity are not allowed".into());
    }
    if is_yaml_float(t) {
        return exact_float(t).map(Value::Number);
    }
    match resolved {
        Some(tag) => Err(format!("a !!{tag} that is not one")),
        None => Ok(Value::String(text)),
    }
}

fn yaml_int(t: &str) -> Option<Value> {
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, body) = if let Some(h) = digits.strip_prefix("0x") {
        (16, h)
    } else if let Some(o) = digits.strip_prefix("0o") {
        (8, o)
    } else {
        (10, digits)
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) || (radix != 10 && neg) {
        return None;
    }
    let magnitude = u64::from_str_radix(body, radix).ok()?;
    if neg {
        let i = 0i64.checked_sub_unsigned(magnitude)?;
        Some(Value::from(i))
    } else {
        Some(Value::from(magnitude))
    }
}

/// `0x..` or `0o..` digits: an integer in YAML's core schema, whatever its size.
fn is_radix_literal(t: &str) -> bool {
    let (radix, body) = match t.get(..2) {
        Some("0x") => (16, &t[2..]),
        Some("0o") => (8, &t[2..]),
        _ => return false,
    };
    !body.is_empty() && body.chars().all(|c| c.is_digit(radix))
}

fn is_yaml_float(t: &str) -> bool {
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = (!int.is_empty() || !frac.is_empty()) && digits(int) && digits(frac);
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok && !mantissa.is_empty()
}
