//! JSON exactly as Python's `json.dumps` writes it with its defaults: `", "` and `": "`
//! separators and `ensure_ascii=True` (everything outside printable ASCII becomes `\uXXXX`,
//! astral characters as surrogate pairs). Kombu serialises envelopes and the result backend
//! serialises task metadata this way, so bytes we write look like bytes Python writes.

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};
use std::io;

struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        // Python's ESCAPE_ASCII escapes everything that is not in ' '..='~'; serde_json has
        // already escaped quotes, backslashes and C0 controls before calling us.
        if fragment.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return w.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if (' '..='~').contains(&c) {
                continue;
            }
            w.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(&mut self, w: &mut W, escape: CharEscape) -> io::Result<()> {
        let s: &[u8] = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => return write!(w, "\\u{byte:04x}"),
        };
        w.write_all(s)
    }
}

/// Serialise `value` the way Python's `json.dumps(value)` does.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut ser = Serializer::with_formatter(&mut out, PythonFormatter);
    // Serialising a serde_json::Value or plain data into a Vec cannot fail.
    value.serialize(&mut ser).expect("JSON serialisation into memory");
    out
}

/// [`to_vec`] as a `String` (the output is pure ASCII).
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    String::from_utf8(to_vec(value)).expect("ensure_ascii output is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn separators_and_ascii_escapes_match_python() {
        let v = json!({"a": [1, 2.5, null, true], "s": "héllo ☃ 🎉\u{7f}\n\"/"});
        // python3 -c 'import json; print(json.dumps({"a": [1, 2.5, None, True], "s": "héllo ☃ 🎉\x7f\n\"/"}))'
        assert_eq!(to_string(&v), r#"{"a": [1, 2.5, null, true], "s": "h\u00e9llo \u2603 \ud83c\udf89\u007f\n\"/"}"#);
    }

    #[test]
    fn big_integers_survive() {
        let v: serde_json::Value = serde_json::from_str("[1180591620717411303424]").unwrap();
        assert_eq!(to_string(&v), "[1180591620717411303424]");
    }
}
