//! A minimal CBOR (RFC 8949) encoder and decoder for the two formats we must share byte for byte
//! with Go HarmonyLite: the replication event and the sequence map.
//!
//! Why not a general crate: exact control of the encoding (Go's fxamacker encoder writes every
//! float64 as an 8-byte `0xfb` item, shortest integer heads, definite lengths), and a decoder for
//! hostile input: it never pre-allocates on a declared length, limits nesting depth, and keeps text
//! as raw bytes so a TEXT value holding invalid UTF-8 round-trips between Rust nodes, not poison.
//! Invariants: `decode` never panics and never allocates more than a small multiple of its input;
//! every encoder function appends exactly one well-formed item.

/// Nesting deeper than this is rejected (an event is at most 3 levels deep).
const MAX_DEPTH: usize = 32;

/// One decoded CBOR data item. Text keeps its bytes; validity is checked by whoever needs a `str`.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// Major type 0.
    Unsigned(u64),
    /// Major type 1: the value is `-1 - n`, kept as `n` so that the full range fits.
    Negative(u64),
    Bytes(Vec<u8>),
    Text(Vec<u8>),
    Array(Vec<Item>),
    Map(Vec<(Item, Item)>),
    Tag(u64, Box<Item>),
    Bool(bool),
    Null,
    Undefined,
    Float(f64),
    /// Any other simple value.
    Simple(u8),
}

impl Item {
    /// The text of a text item, if it is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Item::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// Why a byte string is not one well-formed CBOR item.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("empty input")]
    Empty,
    #[error("truncated CBOR item at byte {0}")]
    Truncated(usize),
    #[error("malformed CBOR at byte {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
    #[error("CBOR nesting deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// Decodes the first item of `input` and returns it with the number of bytes it used.
/// Trailing bytes are the caller's business (the seq map ignores them, as Go does).
pub fn decode_first(input: &[u8]) -> Result<(Item, usize), Error> {
    if input.is_empty() {
        return Err(Error::Empty);
    }
    let mut d = Decoder { buf: input, pos: 0 };
    let item = d.item(0)?;
    Ok((item, d.pos))
}

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// The argument of a head: a value, or "indefinite length".
enum Arg {
    Value(u64),
    Indefinite,
}

impl Decoder<'_> {
    fn byte(&mut self) -> Result<u8, Error> {
        let b = *self.buf.get(self.pos).ok_or(Error::Truncated(self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: u64) -> Result<&[u8], Error> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(Error::Truncated(self.pos));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn uint(&mut self, len: usize) -> Result<u64, Error> {
        let bytes = self.take(len as u64)?;
        Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn arg(&mut self, info: u8) -> Result<Arg, Error> {
        let offset = self.pos;
        match info {
            0..=23 => Ok(Arg::Value(u64::from(info))),
            24 => Ok(Arg::Value(self.uint(1)?)),
            25 => Ok(Arg::Value(self.uint(2)?)),
            26 => Ok(Arg::Value(self.uint(4)?)),
            27 => Ok(Arg::Value(self.uint(8)?)),
            31 => Ok(Arg::Indefinite),
            _ => Err(Error::Malformed {
                offset,
                what: "reserved additional information",
            }),
        }
    }

    /// A container may declare at most as many elements as there are bytes left, since every
    /// element takes at least one byte: this bounds allocation by the input size.
    fn capacity(&self, declared: u64) -> usize {
        declared.min((self.buf.len() - self.pos) as u64) as usize
    }

    fn is_break(&self) -> bool {
        self.buf.get(self.pos) == Some(&0xff)
    }

    fn string(&mut self, major: u8, info: u8) -> Result<Vec<u8>, Error> {
        match self.arg(info)? {
            Arg::Value(n) => Ok(self.take(n)?.to_vec()),
            Arg::Indefinite => {
                let mut out = Vec::new();
                loop {
                    let offset = self.pos;
                    let head = self.byte()?;
                    if head == 0xff {
                        return Ok(out);
                    }
                    if head >> 5 != major || head & 0x1f == 31 {
                        return Err(Error::Malformed {
                            offset,
                            what: "bad chunk in indefinite-length string",
                        });
                    }
                    let Arg::Value(n) = self.arg(head & 0x1f)? else {
                        unreachable!("indefinite chunk rejected above")
                    };
                    out.extend_from_slice(self.take(n)?);
                }
            }
        }
    }

    /// The elements of an array (or pairs of a map), definite or indefinite, each read by `one`.
    fn sequence<T>(
        &mut self,
        info: u8,
        mut one: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        match self.arg(info)? {
            Arg::Value(n) => {
                out.reserve(self.capacity(n));
                for _ in 0..n {
                    out.push(one(self)?);
                }
            }
            Arg::Indefinite => {
                while !self.is_break() {
                    out.push(one(self)?);
                }
                self.pos += 1;
            }
        }
        Ok(out)
    }

    fn item(&mut self, depth: usize) -> Result<Item, Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep);
        }
        let offset = self.pos;
        let head = self.byte()?;
        let (major, info) = (head >> 5, head & 0x1f);
        match major {
            0 | 1 | 6 => {
                let Arg::Value(v) = self.arg(info)? else {
                    return Err(Error::Malformed {
                        offset,
                        what: "indefinite length on an integer or tag",
                    });
                };
                Ok(match major {
                    0 => Item::Unsigned(v),
                    1 => Item::Negative(v),
                    _ => Item::Tag(v, Box::new(self.item(depth + 1)?)),
                })
            }
            2 => Ok(Item::Bytes(self.string(2, info)?)),
            3 => Ok(Item::Text(self.string(3, info)?)),
            4 => Ok(Item::Array(self.sequence(info, |d| d.item(depth + 1))?)),
            5 => Ok(Item::Map(self.sequence(info, |d| {
                Ok((d.item(depth + 1)?, d.item(depth + 1)?))
            })?)),
            _ => match info {
                20 => Ok(Item::Bool(false)),
                21 => Ok(Item::Bool(true)),
                22 => Ok(Item::Null),
                23 => Ok(Item::Undefined),
                24 => Ok(Item::Simple(self.byte()?)),
                25 => Ok(Item::Float(f16_to_f64(self.uint(2)? as u16))),
                26 => Ok(Item::Float(f64::from(f32::from_bits(self.uint(4)? as u32)))),
                27 => Ok(Item::Float(f64::from_bits(self.uint(8)?))),
                0..=19 => Ok(Item::Simple(info)),
                _ => Err(Error::Malformed {
                    offset,
                    what: "unexpected break or reserved simple value",
                }),
            },
        }
    }
}

fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f64::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        31 if frac == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        _ => sign * (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// Appends a head with the shortest encoding of `value`, as Go's encoder does.
pub fn put_head(out: &mut Vec<u8>, major: u8, value: u64) {
    let (info, len) = match value {
        0..=23 => (value as u8, 0),
        24..=0xff => (24, 1),
        0x100..=0xffff => (25, 2),
        0x1_0000..=0xffff_ffff => (26, 4),
        _ => (27, 8),
    };
    out.push((major << 5) | info);
    out.extend_from_slice(&value.to_be_bytes()[8 - len..]);
}

/// Appends a signed integer (major type 0 or 1).
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        put_head(out, 0, v as u64);
    } else {
        // -1 - v cannot overflow for any negative i64.
        put_head(out, 1, (-1 - v) as u64);
    }
}

/// Appends a text string. The bytes are written as given (Go does not validate either).
pub fn put_text(out: &mut Vec<u8>, s: &[u8]) {
    put_head(out, 3, s.len() as u64);
    out.extend_from_slice(s);
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_head(out, 2, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends a float64 as an 8-byte item: fxamacker's default never shortens floats.
pub fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.push(0xfb);
    out.extend_from_slice(&v.to_bits().to_be_bytes());
}

pub fn put_null(out: &mut Vec<u8>) {
    out.push(0xf6);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes from hex text with spaces (golden vectors), also used by `wire`'s tests.
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
            .collect()
    }

    #[test]
    fn shortest_heads() {
        let cases: [(u64, &str); 6] = [
            (0, "00"),
            (23, "17"),
            (24, "1818"),
            (300, "19012c"),
            (1_740_830_400, "1a67c2f6c0"),
            (u64::MAX, "1bffffffffffffffff"),
        ];
        for (v, want) in cases {
            let mut out = Vec::new();
            put_head(&mut out, 0, v);
            assert_eq!(out, hex(want), "value {v}");
        }
        let mut out = Vec::new();
        put_i64(&mut out, i64::MIN);
        assert_eq!(out, hex("3b7fffffffffffffff"));
        assert_eq!(
            decode_first(&out).map(|r| r.0),
            Ok(Item::Negative(i64::MAX as u64))
        );
    }

    #[test]
    fn floats_of_every_width_decode() {
        assert_eq!(
            decode_first(&hex("f93e00")).map(|r| r.0),
            Ok(Item::Float(1.5))
        );
        assert_eq!(
            decode_first(&hex("fa47c35000")).map(|r| r.0),
            Ok(Item::Float(100000.0))
        );
        let mut out = Vec::new();
        put_f64(&mut out, 2.5e-7);
        assert_eq!(out.len(), 9);
        assert_eq!(decode_first(&out).map(|r| r.0), Ok(Item::Float(2.5e-7)));
    }

    #[test]
    fn indefinite_containers_and_strings() {
        // [_ "a", (_ h'01' h'02')] followed by trailing garbage that must be ignored.
        let input = hex("9f 6161 5f 4101 4102 ff ff 00 00");
        let (item, used) = decode_first(&input).expect("decodes");
        assert_eq!(used, 10);
        assert_eq!(
            item,
            Item::Array(vec![Item::Text(b"a".to_vec()), Item::Bytes(vec![1, 2])])
        );
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        assert_eq!(decode_first(&[]), Err(Error::Empty));
        // A map that claims 2^64-1 entries in a 9-byte buffer.
        assert!(matches!(
            decode_first(&hex("bbffffffffffffffff")),
            Err(Error::Truncated(_))
        ));
        // A string longer than the input.
        assert!(matches!(
            decode_first(&hex("7a00010000 41")),
            Err(Error::Truncated(_))
        ));
        // Deep nesting.
        assert_eq!(decode_first(&vec![0x81; 1000]), Err(Error::TooDeep));
        // A lone break.
        assert!(matches!(
            decode_first(&[0xff]),
            Err(Error::Malformed { .. })
        ));
        // Every prefix of a valid item fails cleanly.
        let valid = hex("a2 6161 01 6162 82 f5 fb 400921f9f01b866e");
        for n in 0..valid.len() {
            assert!(decode_first(&valid[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn text_keeps_invalid_utf8_bytes() {
        let mut out = Vec::new();
        put_text(&mut out, &[0xff, 0x00, b'a']);
        let (item, _) = decode_first(&out).expect("decodes");
        assert_eq!(item, Item::Text(vec![0xff, 0x00, b'a']));
        assert_eq!(item.as_str(), None);
    }
}
