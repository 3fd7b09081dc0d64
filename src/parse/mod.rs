//! TOML, JSON and YAML text to one tree, through [`TreeBuilder`]: every format obeys the same
//! rules and budgets, and a file that breaks one is refused with the line and pointer of the
//! first place it does. YAML anchors and aliases are refused (sops never writes them, and they
//! let a small file expand without bound); so are custom tags and more than one document.

use crate::domain::document::{Problem, TreeBuilder, INTEGER_RANGE, exact_float, exact_number, is_integer_literal, number_from_f64};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::TScalarStyle;

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

// ---------- JSON: serde drives a visitor that feeds the builder ----------

/// Where the builder's refusal waits while serde unwinds with a plain message.
struct Seed<'b, 't> {
    builder: &'b mut TreeBuilder,
    refusal: &'b mut Option<Problem>,
    floats: &'b mut FloatTokens<'t>,
}

/// The number tokens of a JSON text that serde_json hands over as f64 (those with a point or an
/// exponent, `-0`, and integers past 64 bits), found in order as it asks for them: serde gives
/// no position, and the token is needed to tell an exact number from one it rounded. Texts
/// without such numbers are never scanned.
struct FloatTokens<'t> {
    text: &'t str,
    at: usize,
}

impl<'t> FloatTokens<'t> {
    fn next(&mut self) -> Option<&'t str> {
        let bytes = self.text.as_bytes();
        while self.at < bytes.len() {
            match bytes[self.at] {
                b'"' => {
                    self.at += 1;
                    while self.at < bytes.len() && bytes[self.at] != b'"' {
                        self.at += if bytes[self.at] == b'\\' { 2 } else { 1 };
                    }
                    self.at += 1;
                }
                b'-' | b'0'..=b'9' => {
                    let start = self.at;
                    while self.at < bytes.len() && matches!(bytes[self.at], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                        self.at += 1;
                    }
                    let token = &self.text[start..self.at];
                    let integer = token.parse::<i64>().is_ok() || token.parse::<u64>().is_ok();
                    if token.contains(['.', 'e', 'E']) || token == "-0" || !integer {
                        return Some(token);
                    }
                }
                _ => self.at += 1,
            }
        }
        None
    }
}

impl<'t> Seed<'_, 't> {
    fn fail<E: de::Error>(&mut self, p: Problem) -> E {
        let e = E::custom(&p);
        *self.refusal = Some(p);
        e
    }

    fn nested(&mut self) -> Seed<'_, 't> {
        Seed {
            builder: self.builder,
            refusal: self.refusal,
            floats: self.floats,
        }
    }

    fn scalar<E: de::Error>(&mut self, v: Value) -> Result<(), E> {
        self.builder.scalar(v).map_err(|p| self.fail(p))
    }
}

impl<'de> DeserializeSeed<'de> for Seed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value")
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        self.scalar(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<(), E> {
        self.scalar(Value::from(v))
    }
    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<(), E> {
        self.scalar(Value::from(v))
    }
    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        let exact = match self.floats.next() {
            Some(token) => exact_number(token),
            None => number_from_f64(v),
        };
        match exact {
            Ok(n) => self.scalar(Value::Number(n)),
            Err(message) => {
                let pointer = self.builder.here();
                Err(self.fail(Problem { pointer, message }))
            }
        }
    }
    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        self.scalar(Value::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(mut self, v: String) -> Result<(), E> {
        self.scalar(Value::String(v))
    }
    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.scalar(Value::Null)
    }
    fn visit_none<E: de::Error>(mut self) -> Result<(), E> {
        self.scalar(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.builder.begin_seq().map_err(|p| self.fail(p))?;
        while seq.next_element_seed(self.nested())?.is_some() {}
        self.builder.end().map_err(|p| self.fail(p))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let mut first = true;
        while let Some(key) = map.next_key::<String>()? {
            if first {
                self.builder.begin_map().map_err(|p| self.fail(p))?;
                first = false;
            }
            self.builder.key(key).map_err(|p| self.fail(p))?;
            map.next_value_seed(self.nested())?;
        }
        if first {
            self.builder.begin_map().map_err(|p| self.fail(p))?;
        }
        self.builder.end().map_err(|p| self.fail(p))
    }
}

fn with_seed<E>(text: &str, run: impl FnOnce(Seed<'_, '_>) -> Result<(), E>, error: impl FnOnce(E, Option<Problem>) -> ParseError) -> Result<Value, ParseError> {
    let mut builder = TreeBuilder::new();
    let mut refusal = None;
    let mut floats = FloatTokens { text, at: 0 };
    let seed = Seed {
        builder: &mut builder,
        refusal: &mut refusal,
        floats: &mut floats,
    };
    match run(seed) {
        Ok(()) => builder.finish().map_err(|p| from_problem(p, None)),
        Err(e) => Err(error(e, refusal)),
    }
}

/// The text of an error from serde_json, without its position (given as a line).
fn bare(message: &str) -> String {
    message.split(" at line ").next().unwrap_or(message).trim().to_string()
}

pub fn json(text: &str) -> Result<Value, ParseError> {
    with_seed(
        text,
        |seed| {
            let mut de = serde_json::Deserializer::from_str(text);
            seed.deserialize(&mut de)?;
            de.end()
        },
        |e, refusal| match refusal {
            Some(p) => from_problem(p, Some(e.line())),
            None => ParseError {
                line: Some(e.line()),
                pointer: None,
                message: bare(&e.to_string()),
            },
        },
    )
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

mod simple_toml;

/// TOML as the `toml` crate reads it, through the simple reader when the text is of its kind.
pub fn toml(text: &str) -> Result<Value, ParseError> {
    match simple_toml::tree(text) {
        Some(tree) => Ok(tree),
        None => toml_full(text),
    }
}

/// TOML read by the `toml` crate alone: what [`toml`] gives for every text, faster for the TOML
/// our writer and rops produce. toml's parsed tables are walked, not its serde layer: 2% fewer
/// instructions, and the serde layer's datetime key no longer needs a case in the JSON visitor. A
/// refusal names the line of the key or value it is about.
pub fn toml_full(text: &str) -> Result<Value, ParseError> {
    let root = toml::de::DeTable::parse(text).map_err(|e| ParseError {
        line: e.span().map(|s| line_of(text, s.start)),
        pointer: None,
        message: e.message().trim().to_string(),
    })?;
    let mut b = TreeBuilder::new();
    toml_table(&mut b, text, root.get_ref(), root.span())?;
    b.finish().map_err(|p| from_problem(p, None))
}

/// The refusal of a TOML item whose text starts at `span.start`.
fn toml_at(text: &str, span: std::ops::Range<usize>) -> impl FnOnce(Problem) -> ParseError {
    move |p| from_problem(p, Some(line_of(text, span.start)))
}

fn toml_table(b: &mut TreeBuilder, text: &str, table: &toml::de::DeTable<'_>, span: std::ops::Range<usize>) -> Result<(), ParseError> {
    b.begin_map().map_err(toml_at(text, span.clone()))?;
    for (key, value) in table {
        b.key(key.get_ref().to_string()).map_err(toml_at(text, key.span()))?;
        toml_value(b, text, value)?;
    }
    b.end().map_err(toml_at(text, span))
}

fn toml_value(b: &mut TreeBuilder, text: &str, value: &toml::Spanned<toml::de::DeValue<'_>>) -> Result<(), ParseError> {
    use toml::de::DeValue;
    let at = || toml_at(text, value.span());
    let scalar = match value.get_ref() {
        DeValue::String(s) => Ok(Value::String(s.to_string())),
        DeValue::Integer(i) => toml_integer(i).ok_or_else(|| INTEGER_RANGE.to_string()),
        DeValue::Float(f) => exact_float(&f.as_str().replace('_', "")).map(Value::Number),
        DeValue::Boolean(v) => Ok(Value::Bool(*v)),
        DeValue::Datetime(d) => Ok(Value::String(d.to_string())),
        DeValue::Array(items) => {
            b.begin_seq().map_err(at())?;
            for item in items {
                toml_value(b, text, item)?;
            }
            return b.end().map_err(at());
        }
        DeValue::Table(t) => return toml_table(b, text, t, value.span()),
    };
    match scalar {
        Ok(v) => b.scalar(v).map_err(at()),
        Err(message) => Err(at()(Problem { pointer: b.here(), message })),
    }
}

/// As the `toml` crate's serde layer reads an integer: an i64, else a u64.
fn toml_integer(i: &toml::de::DeInteger<'_>) -> Option<Value> {
    let (digits, radix) = (i.as_str(), i.radix());
    i64::from_str_radix(digits, radix)
        .map(Value::from)
        .or_else(|_| u64::from_str_radix(digits, radix).map(Value::from))
        .ok()
}

// ---------- YAML: events from the block reader or yaml-rust2, pulled one at a time ----------

mod block;

/// YAML as yaml-rust2 reads it, through the block reader when the text is of its kind.
pub fn yaml(text: &str) -> Result<Value, ParseError> {
    match block::events(text) {
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
fn yaml_scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
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

// ---------- YAML out ----------

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
        && matches!(yaml_scalar(s.to_string(), TScalarStyle::Plain, None), Ok(Value::String(_)))
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

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(
            (e.line, e.pointer.as_deref(), e.message.as_str()),
            (Some(2), Some("/b"), INTEGER_RANGE)
        );
    }

    #[test]
    fn numbers_reach_the_tree_exactly_or_are_refused_alike_in_every_format() {
        let texts = |n: &str| [format!("{{\"a\": 1,\n\"b\": {{\"c\": {n}}}}}"), format!("a: 1\nb:\n  c: {n}\n"), format!("a = 1\n[b]\nc = {n}\n")];
        let read = |i: usize, t: &str| [json, yaml, toml][i](t);
        for n in ["100000000000000000000", "-9223372036854775809", "1.0000000000000001", "123456789012345678901234567890.5"] {
            for (i, t) in texts(n).iter().enumerate() {
                let e = read(i, t).expect_err(t);
                assert_eq!((e.line, e.pointer.as_deref()), (Some(2 + (i > 0) as usize), Some("/b/c")), "{t}: {e:?}");
                assert!(e.message.contains("cannot be stored exactly"), "{t}: {e:?}");
                assert!(!e.message.contains(n), "the digits are not repeated (they may be secret): {e:?}");
            }
        }
        for (n, want) in [("-0", json!(0)), ("-0.0", json!(0.0)), ("18446744073709551615", json!(u64::MAX)), ("0.1", json!(0.1)), ("1e300", json!(1e300))] {
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
