//! Compact JSON of a `serde_json::Value`, byte for byte what
//! `serde_json::to_writer` writes, with a faster string escaper: serde_json
//! checks every byte of a string against its escape table, while event data
//! is mostly long runs that need no escaping, which this skips eight bytes
//! at a time. Every event is written at least once per delivery (the line to
//! a Python child) and once more per networked publish, so this is on the
//! message path.
use serde_json::Value;

/// Appends the compact JSON of `value` to `out`.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            // Numbers are short; serde_json's own formatting keeps them identical.
            let _ = serde_json::to_writer(&mut *out, n);
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

/// Appends the compact JSON of an object (a CloudEvent's map) to `out`.
pub fn write_object(out: &mut Vec<u8>, map: &serde_json::Map<String, Value>) {
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_value(out, v);
    }
    out.push(b'}');
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes is below 0x20, a quote or a backslash
/// (bytes of 0x80 and above never are: they pass through unescaped).
fn needs_escape(w: u64) -> bool {
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    (below_space | has_zero(w ^ (ONES * u64::from(b'"'))) | has_zero(w ^ (ONES * u64::from(b'\\'))))
        != 0
}

/// The first byte of `bytes` that JSON must escape, or `bytes.len()`.
fn first_to_escape(bytes: &[u8]) -> usize {
    let mut at = 0;
    for chunk in bytes.chunks_exact(8) {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        if needs_escape(u64::from_le_bytes(word)) {
            break;
        }
        at += 8;
    }
    at + bytes[at..]
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
        .unwrap_or(bytes.len() - at)
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut rest = bytes;
    loop {
        let at = first_to_escape(rest);
        out.extend_from_slice(&rest[..at]);
        let Some(&b) = rest.get(at) else {
            break;
        };
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        rest = &rest[at + 1..];
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn same_as_serde_json(v: &Value) {
        let mut ours = Vec::new();
        write_value(&mut ours, v);
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            serde_json::to_string(v).unwrap(),
            "for {v:?}"
        );
    }

    #[test]
    fn every_ascii_byte_and_position_is_escaped_like_serde_json() {
        // Each character at each offset of a 17-byte run, so it falls in
        // the eight-byte fast path, its tail, and across their boundary.
        for c in (0u8..0x80).map(char::from).chain(['é', '€', '𝄞', '\u{7f}']) {
            for at in 0..17 {
                let mut s: String = "abcdefghijklmnopq".into();
                s.replace_range(at..at + 1, &c.to_string());
                same_as_serde_json(&Value::String(s));
            }
        }
    }

    #[test]
    fn values_of_every_kind_match_serde_json() {
        same_as_serde_json(&json!({
            "specversion": "1.0", "id": "a\"b\\c", "n": [0, -1, 1.5, 1e300, -2.5e-8,
            u64::MAX, i64::MIN, 3.0], "t": true, "f": false, "z": null,
            "nested": {"x": [[], {}, [{"y": "\u{1}\u{1f}\n\t"}]], "": ""},
            "data": "x".repeat(900)
        }));
        same_as_serde_json(&json!([]));
        same_as_serde_json(&json!("🙂 ünïcödé \u{2028}"));
    }
}
