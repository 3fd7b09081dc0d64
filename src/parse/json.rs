//! JSON: serde drives a visitor that feeds the tree builder.

use super::{ParseError, from_problem};
use crate::domain::document::{Problem, TreeBuilder, exact_number, number_from_f64};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

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

fn with_seed<E>(
    text: &str,
    run: impl FnOnce(Seed<'_, '_>) -> Result<(), E>,
    error: impl FnOnce(E, Option<Problem>) -> ParseError,
) -> Result<Value, ParseError> {
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
