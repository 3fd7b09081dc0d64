use serde::Serialize;
use std::fmt;

/// One problem with one tenant file. Validation collects these instead of stopping at the first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Issue {
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    pub message: String,
}

/// The `file` of a problem that is the configuration's, not any one file's. It sorts first.
pub const CONFIGURATION: &str = "(configuration)";

impl Issue {
    pub fn is_configuration(&self) -> bool {
        self.file == CONFIGURATION
    }

    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            file: file.into(),
            line: None,
            pointer: None,
            message: message.into(),
        }
    }

    pub fn at(mut self, pointer: impl Into<String>) -> Self {
        self.pointer = Some(pointer.into());
        self
    }

    pub fn line(mut self, line: Option<usize>) -> Self {
        self.line = line;
        self
    }
}

/// Escaped for a terminal: the file name, pointer and message may all carry a hostile file's bytes.
impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use super::escape::text;
        write!(f, "{}", text(&self.file))?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(pointer) = &self.pointer {
            write!(f, ": {}", text(pointer))?;
        }
        write!(f, ": {}", text(&self.message))
    }
}
