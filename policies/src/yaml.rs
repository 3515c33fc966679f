//! A YAML document tree that remembers where every node came from, so each validation error can
//! say `file:line:col`. Built from yaml-rust2's event stream; anchors and aliases are expanded.
//!
//! Only syntax lives here. What the nodes must contain is `parse`'s business.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    fn from_marker(m: &Marker) -> Self {
        // yaml-rust2 markers: 1-based lines, 0-based columns.
        Self {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An explicit or implied null (`~`, `null`, or nothing).
    Null,
    /// `plain` is false for quoted and block scalars, which are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Keys in document order.
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// What a plain scalar would be read as by a YAML 1.2 core-schema reader, for messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
            Value::Scalar { plain: false, .. } => "a string",
            Value::Scalar { text, plain: true } => plain_kind(text),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find_map(|(k, v)| match &k.value {
                Value::Scalar { text, .. } if text == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }
}

fn plain_kind(text: &str) -> &'static str {
    match text {
        "true" | "false" | "True" | "False" | "TRUE" | "FALSE" => "a boolean",
        "null" | "Null" | "NULL" | "~" | "" => "null",
        _ if text.parse::<i64>().is_ok() => "an integer",
        _ if text.parse::<f64>().is_ok() && text.chars().any(|c| c.is_ascii_digit()) => "a number",
        _ => "a string",
    }
}

/// A YAML syntax error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses every document of a YAML stream. An empty document (`---` alone) is `Value::Null`.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut parser = Parser::new_from_str(text);
    let mut builder = Builder::default();
    loop {
        let (event, mark) = parser.next_token().map_err(|e| SyntaxError {
            pos: Pos::from_marker(e.marker()),
            message: e.info().to_owned(),
        })?;
        if event == Event::StreamEnd {
            break;
        }
        builder.push(event, Pos::from_marker(&mark))?;
    }
    Ok(builder.docs)
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    /// Open collections; a map collects alternating keys and values.
    stack: Vec<(Node, Vec<Node>, usize)>,
    anchors: HashMap<usize, Node>,
}

impl Builder {
    fn push(&mut self, event: Event, pos: Pos) -> Result<(), SyntaxError> {
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = style == TScalarStyle::Plain;
                let value = if plain && matches!(text.as_str(), "~" | "null" | "Null" | "NULL" | "")
                {
                    Value::Null
                } else {
                    Value::Scalar { text, plain }
                };
                self.finish(Node { value, pos }, anchor);
            }
            Event::SequenceStart(anchor, _) => self.stack.push((
                Node {
                    value: Value::Seq(Vec::new()),
                    pos,
                },
                Vec::new(),
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push((
                Node {
                    value: Value::Map(Vec::new()),
                    pos,
                },
                Vec::new(),
                anchor,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                let (mut node, items, anchor) = self.stack.pop().ok_or_else(|| SyntaxError {
                    pos,
                    message: "unbalanced collection end".into(),
                })?;
                match &mut node.value {
                    Value::Seq(seq) => *seq = items,
                    Value::Map(map) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            map.push((k, v));
                        }
                        // yaml-rust2 marks a block mapping at its first `:`; its first key is
                        // where a reader looks.
                        if let Some((k, _)) = map.first() {
                            node.pos = node.pos.min(k.pos);
                        }
                    }
                    _ => {}
                }
                self.finish(node, anchor);
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    pos,
                    message: "alias to an unknown anchor".into(),
                })?;
                self.finish(Node { pos, ..node }, 0);
            }
            Event::DocumentEnd => {
                // A document whose content was empty produced no node: record it as null.
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentStart | Event::Nothing => {}
        }
        Ok(())
    }

    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            Some((_, items, _)) => items.push(node),
            None => self.docs.push(node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_line_and_column() {
        let docs = parse_documents("a: 1\nb:\n  - x\n  - 'y'\n").expect("parse");
        assert_eq!(docs.len(), 1);
        let a = docs[0].get("a").expect("a");
        assert_eq!(a.pos, Pos { line: 1, col: 4 });
        assert_eq!(a.kind_name(), "an integer");
        let Value::Seq(items) = &docs[0].get("b").expect("b").value else {
            panic!("seq")
        };
        assert_eq!(items[0].pos, Pos { line: 3, col: 5 });
        assert_eq!(items[1].kind_name(), "a string");
    }

    #[test]
    fn multiple_documents_and_aliases() {
        let docs = parse_documents("a: &x {k: v}\nb: *x\n---\n- 1\n---\n").expect("parse");
        assert_eq!(docs.len(), 3);
        assert_eq!(
            docs[0]
                .get("b")
                .and_then(|b| b.get("k"))
                .and_then(Node::as_str),
            Some("v")
        );
        assert_eq!(docs[2].value, Value::Null);
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let e = parse_documents("a: [1, 2\nb: c\n").expect_err("unclosed");
        assert!(e.pos.line >= 1, "{e:?}");
        let e = parse_documents("a: b\n c: d\n").expect_err("bad indent");
        assert_eq!(e.pos.line, 2, "{e:?}");
    }
}
