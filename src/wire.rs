//! The replication event as it travels through JetStream, byte-compatible with Go HarmonyLite.
//!
//! A message body is the CBOR map `{FromNodeId, Payload: {Id, Type, TableName, Row, sh}}` keyed
//! by Go's field names (upstream-behaviour §5.2), optionally one zstd frame. [`shard_hash`] (§5.3)
//! routes a row to the same stream from Go and Rust publishers.
//!
//! Invariants:
//! - Encoding sends each value exactly as SQLite stores it, not Go's lossy DATETIME/BOOLEAN
//!   conversion; Go receivers accept plain values.
//! - Decoding accepts everything a Go node sends: unsigned and negative integers, floats of any
//!   width, booleans (as 1/0), and the private tag-32 `{1: unix seconds}` time wrapper (as text
//!   `YYYY-MM-DD HH:MM:SS+00:00`, as Go's sqlite driver writes UTC).
//! - Decoding never panics; what it cannot represent is a [`DecodeError`], quarantined.

use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;

use crate::cbor::{self, Item};

/// The Go prefix of every node name (`cfg.NodeNamePrefix`).
pub const NODE_NAME_PREFIX: &str = "harmonylite-node";

/// A value of one SQLite storage class, as read from or written to a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    /// Text keeps raw bytes: SQLite does not enforce UTF-8, and neither does the wire format.
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

/// The operation a change-log row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    /// The string Go writes in `Type` and in the change-log `type` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }

    /// Parses the change-log / wire spelling.
    pub fn parse(s: &[u8]) -> Option<Op> {
        match s {
            b"insert" => Some(Op::Insert),
            b"update" => Some(Op::Update),
            b"delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// One row change (Go `ChangeLogEvent`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// The change-log row id on the originating node.
    pub id: i64,
    pub op: Op,
    pub table: String,
    /// Column name → value, in the publisher's column order.
    pub row: Vec<(String, Value)>,
    /// The sender's schema hash; empty when the sender had none (or was a Go node sending times).
    pub schema_hash: String,
}

/// A message body (Go `ReplicationEvent[ChangeLogEvent]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationEvent {
    pub from_node_id: u64,
    pub event: ChangeEvent,
}

/// Why a message body is not an event we can apply.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("zstd decompression failed: {0}")]
    Zstd(#[source] std::io::Error),
    #[error("invalid CBOR: {0}")]
    Cbor(#[from] cbor::Error),
    #[error("event is not a CBOR map with field {0:?}")]
    MissingField(&'static str),
    #[error("field {field:?} has the wrong type")]
    WrongType { field: &'static str },
    #[error("unknown operation type {0:?}")]
    UnknownOp(String),
    #[error("column {column:?}: {what}")]
    BadValue {
        column: String,
        #[source]
        what: ValueError,
    },
}

/// Why a decoded row value has no SQLite storage class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("unsigned integer {0} exceeds int64")]
    UnsignedTooLarge(u64),
    #[error("negative integer below int64")]
    NegativeTooSmall,
    #[error("unsupported CBOR tag {0}")]
    UnsupportedTag(u64),
    #[error("nested arrays and maps cannot be stored")]
    Nested,
    #[error("unsupported CBOR simple value {0}")]
    UnsupportedSimple(u8),
    #[error("tag 32 does not wrap a map")]
    TimeNotMap,
    /// A wrapped time whose seconds are not an integer (or a finite float).
    #[error("tag 32 time is not an integer")]
    TimeNotInteger,
    /// A wrapped time outside the years -9999 to 9999 (or outside `i64` seconds).
    #[error("time out of range")]
    TimeOutOfRange,
}

impl ReplicationEvent {
    /// Encodes the event as Go's fxamacker encoder does (definite map, declaration order).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.event.row.len() * 24);
        cbor::put_head(&mut out, 5, 2);
        cbor::put_text(&mut out, b"FromNodeId");
        cbor::put_head(&mut out, 0, self.from_node_id);
        cbor::put_text(&mut out, b"Payload");
        let e = &self.event;
        let fields = if e.schema_hash.is_empty() { 4 } else { 5 };
        cbor::put_head(&mut out, 5, fields);
        cbor::put_text(&mut out, b"Id");
        cbor::put_i64(&mut out, e.id);
        cbor::put_text(&mut out, b"Type");
        cbor::put_text(&mut out, e.op.as_str().as_bytes());
        cbor::put_text(&mut out, b"TableName");
        cbor::put_text(&mut out, e.table.as_bytes());
        cbor::put_text(&mut out, b"Row");
        cbor::put_head(&mut out, 5, e.row.len() as u64);
        for (name, value) in &e.row {
            cbor::put_text(&mut out, name.as_bytes());
            put_value(&mut out, value);
        }
        if !e.schema_hash.is_empty() {
            cbor::put_text(&mut out, b"sh");
            cbor::put_text(&mut out, e.schema_hash.as_bytes());
        }
        out
    }

    /// Decodes a decompressed body: a well-formed event whose values fit SQLite's storage classes.
    pub fn decode(body: &[u8]) -> Result<ReplicationEvent, DecodeError> {
        let (item, _) = cbor::decode_first(body)?;
        let wrong = |field| DecodeError::WrongType { field };
        let from_node_id = match field(&item, "FromNodeId") {
            None | Some(Item::Null) => 0,
            Some(Item::Unsigned(v)) => *v,
            Some(_) => return Err(wrong("FromNodeId")),
        };
        let payload = field(&item, "Payload").ok_or(DecodeError::MissingField("Payload"))?;
        let id = match field(payload, "Id") {
            None | Some(Item::Null) => 0,
            Some(Item::Unsigned(v)) if *v <= i64::MAX as u64 => *v as i64,
            Some(Item::Negative(v)) if *v <= i64::MAX as u64 => -1 - *v as i64,
            Some(_) => return Err(wrong("Id")),
        };
        let op_bytes = match field(payload, "Type") {
            Some(Item::Text(t)) => t.as_slice(),
            None | Some(Item::Null) => b"".as_slice(),
            Some(_) => return Err(wrong("Type")),
        };
        let op = Op::parse(op_bytes)
            .ok_or_else(|| DecodeError::UnknownOp(String::from_utf8_lossy(op_bytes).into()))?;
        let table =
            text_field(payload, "TableName")?.ok_or(DecodeError::MissingField("TableName"))?;
        let schema_hash = text_field(payload, "sh")?.unwrap_or_default();
        let row = match field(payload, "Row") {
            Some(Item::Map(pairs)) => pairs
                .iter()
                .map(|(k, v)| {
                    let name = k.as_str().ok_or(wrong("Row"))?;
                    let value = item_to_value(v).map_err(|what| DecodeError::BadValue {
                        column: name.to_owned(),
                        what,
                    })?;
                    Ok((name.to_owned(), value))
                })
                .collect::<Result<_, DecodeError>>()?,
            None | Some(Item::Null) => Vec::new(),
            Some(_) => return Err(wrong("Row")),
        };
        Ok(ReplicationEvent {
            from_node_id,
            event: ChangeEvent {
                id,
                op,
                table,
                row,
                schema_hash,
            },
        })
    }
}

/// Looks a struct field up the way fxamacker does: exact name first, then case-insensitively.
fn field<'a>(map: &'a Item, name: &str) -> Option<&'a Item> {
    let Item::Map(pairs) = map else { return None };
    pairs
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .or_else(|| {
            pairs
                .iter()
                .find(|(k, _)| k.as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
        })
        .map(|(_, v)| v)
}

fn text_field(map: &Item, name: &'static str) -> Result<Option<String>, DecodeError> {
    match field(map, name) {
        None | Some(Item::Null) => Ok(None),
        Some(item) => item
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or(DecodeError::WrongType { field: name }),
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => cbor::put_null(out),
        Value::Integer(i) => cbor::put_i64(out, *i),
        Value::Real(f) => cbor::put_f64(out, *f),
        Value::Text(t) => cbor::put_text(out, t),
        Value::Blob(b) => cbor::put_bytes(out, b),
    }
}

/// Maps a decoded row value onto a storage class, as Go's sqlite driver would bind it.
fn item_to_value(item: &Item) -> Result<Value, ValueError> {
    Ok(match item {
        Item::Null | Item::Undefined => Value::Null,
        Item::Unsigned(v) => {
            Value::Integer(i64::try_from(*v).map_err(|_| ValueError::UnsignedTooLarge(*v))?)
        }
        Item::Negative(v) => {
            let n = i64::try_from(*v).map_err(|_| ValueError::NegativeTooSmall)?;
            Value::Integer(-1 - n)
        }
        Item::Float(f) => Value::Real(*f),
        Item::Text(t) => Value::Text(t.clone()),
        Item::Bytes(b) => Value::Blob(b.clone()),
        Item::Bool(b) => Value::Integer(i64::from(*b)),
        Item::Tag(32, inner) => time_wrapper_to_value(inner)?,
        Item::Tag(n, _) => return Err(ValueError::UnsupportedTag(*n)),
        Item::Array(_) | Item::Map(_) => return Err(ValueError::Nested),
        Item::Simple(s) => return Err(ValueError::UnsupportedSimple(*s)),
    })
}

/// Go's `sensitiveTypeWrapper`: tag 32 around `{1: unix seconds}`; a missing or null time is NULL.
fn time_wrapper_to_value(inner: &Item) -> Result<Value, ValueError> {
    let Item::Map(pairs) = inner else {
        return Err(ValueError::TimeNotMap);
    };
    let secs = pairs.iter().find_map(|(k, v)| match k {
        Item::Unsigned(1) => Some(v),
        _ => None,
    });
    let secs = match secs {
        None | Some(Item::Null) | Some(Item::Undefined) => return Ok(Value::Null),
        Some(Item::Unsigned(v)) => i64::try_from(*v).map_err(|_| ValueError::TimeOutOfRange)?,
        Some(Item::Negative(v)) => {
            -1 - i64::try_from(*v).map_err(|_| ValueError::TimeOutOfRange)?
        }
        Some(Item::Float(f)) if f.is_finite() => f.floor() as i64,
        Some(_) => return Err(ValueError::TimeNotInteger),
    };
    let text = format_utc_time(secs).ok_or(ValueError::TimeOutOfRange)?;
    Ok(Value::Text(text.into_bytes()))
}

/// mattn `SQLiteTimestampFormats[0]` (`2006-01-02 15:04:05.999999999-07:00`) for UTC, no fraction.
const UTC_TEXT: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second]+00:00");

/// Unix seconds as Go's sqlite driver writes a UTC `time.Time`, `2006-01-02 15:04:05+00:00` (the
/// wrapper carries whole seconds); `None` outside the years -9999 to 9999.
pub fn format_utc_time(secs: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()?
        .format(UTC_TEXT)
        .ok()
}

/// FNV-1 64's starting value (the hash of no bytes).
pub const FNV1_64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1 64 (Go `hash/fnv.New64`, not FNV-1a): the shard hash, default node id and snapshot tag.
pub fn fnv1_64(bytes: &[u8]) -> u64 {
    fnv1_64_update(FNV1_64_OFFSET, bytes)
}

/// Continues the FNV-1 64 hash `h` over `bytes` (for data hashed piece by piece).
pub fn fnv1_64_update(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| {
        h.wrapping_mul(0x0000_0100_0000_01b3) ^ u64::from(*b)
    })
}

/// A primary-key column as the shard hash needs it.
#[derive(Debug, Clone)]
pub struct PkColumn<'a> {
    pub name: &'a str,
    /// Lower-cased declared type; Go hashes date/datetime/timestamp keys as unix seconds.
    pub decl_type: &'a str,
    pub value: &'a Value,
}

/// The shard hash of a row (Go `ChangeLogEvent.Hash`): FNV-1 64 over
/// `0x9f, cbor(table), for each PK sorted by name: cbor([name, value]), 0xff`.
pub fn shard_hash(table: &str, pks: &mut [PkColumn<'_>]) -> u64 {
    pks.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let mut buf = Vec::with_capacity(32);
    buf.push(0x9f);
    cbor::put_text(&mut buf, table.as_bytes());
    for pk in pks.iter() {
        buf.push(0x82);
        cbor::put_text(&mut buf, pk.name.as_bytes());
        match go_time_key(pk.decl_type, pk.value) {
            Some(Some(secs)) => cbor::put_i64(&mut buf, secs),
            Some(None) => cbor::put_null(&mut buf),
            None => put_value(&mut buf, pk.value),
        }
    }
    buf.push(0xff);
    fnv1_64(&buf)
}

/// Shard number (1-based) for a hash.
pub fn shard_for(hash: u64, shards: u64) -> u64 {
    hash % shards.max(1) + 1
}

/// A date/datetime/timestamp key as Go's driver presents it for hashing: `Some(Some(unix secs))`,
/// `Some(None)` for the zero time (unparseable text; encoded as null), or `None`: hashed as is.
fn go_time_key(decl_type: &str, value: &Value) -> Option<Option<i64>> {
    if !matches!(decl_type, "date" | "datetime" | "timestamp") {
        return None;
    }
    match value {
        Value::Integer(v) if v.unsigned_abs() > 1_000_000_000_000 => Some(Some(v.div_euclid(1000))),
        Value::Integer(v) => Some(Some(*v)),
        Value::Text(t) => Some(parse_go_time(t)),
        _ => None,
    }
}

/// `2006-01-02 15:04:05.999999999-07:00` and its `T` twin: Go's `15` is an hour of one or two
/// digits, and its `.999999999` an optional fraction after `.` or `,`.
const GO_TIME_OFFSET: &[BorrowedFormatItem<'_>] = format_description!(
    "[year]-[month]-[day][first [ ][T]][hour padding:none]:[minute]:[second][optional [[first [.][,]][subsecond digits:1+]]][offset_hour sign:mandatory]:[offset_minute]"
);
/// `2006-01-02 15:04:05.999999999` and `2006-01-02 15:04:05`, with their `T` twins (Go takes a
/// fraction after the seconds even when the layout has none).
const GO_TIME: &[BorrowedFormatItem<'_>] = format_description!(
    "[year]-[month]-[day][first [ ][T]][hour padding:none]:[minute]:[second][optional [[first [.][,]][subsecond digits:1+]]]"
);
/// `2006-01-02 15:04` and `2006-01-02T15:04`.
const GO_TIME_MINUTES: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day][first [ ][T]][hour padding:none]:[minute]");
/// `2006-01-02`.
const GO_DATE: &[BorrowedFormatItem<'_>] = format_description!("[year]-[month]-[day]");

/// Fraction digits Go keeps (it reads any number and ignores those past nanoseconds).
const GO_FRACTION_DIGITS: usize = 9;

/// Parses time-typed TEXT as Go's sqlite driver does (upstream §4.11): cut one trailing `Z`, try
/// mattn's `SQLiteTimestampFormats` in UTC. Go's rules: an unsigned four-digit year, a real date
/// (no February 31), two-digit minutes and seconds, offsets up to 24 hours.
fn parse_go_time(text: &[u8]) -> Option<i64> {
    use time::{Date, PrimitiveDateTime};
    let s = std::str::from_utf8(text).ok()?;
    let s = s.strip_suffix('Z').unwrap_or(s);
    // Go's `2006` starts with a digit; the time crate's `[year]` would also take a sign.
    if !s.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let s = truncate_fraction(s);
    if let Ok(t) = OffsetDateTime::parse(&s, GO_TIME_OFFSET) {
        // Go refuses offsets over 24 hours; the time crate allows 25.
        return (t.offset().whole_hours().unsigned_abs() <= 24).then(|| t.unix_timestamp());
    }
    if let Ok(t) = PrimitiveDateTime::parse(&s, GO_TIME)
        .or_else(|_| PrimitiveDateTime::parse(&s, GO_TIME_MINUTES))
    {
        return Some(t.assume_utc().unix_timestamp());
    }
    Date::parse(&s, GO_DATE)
        .ok()
        .map(|d| d.midnight().assume_utc().unix_timestamp())
}

/// Cuts a fraction of more than [`GO_FRACTION_DIGITS`] digits to that many: Go accepts any length
/// (`time/format.go` `parseNanoseconds`), the time crate at most 32 digits.
fn truncate_fraction(s: &str) -> std::borrow::Cow<'_, str> {
    let Some(dot) = s.find(['.', ',']) else {
        return s.into();
    };
    let digits = s[dot + 1..].bytes().take_while(u8::is_ascii_digit).count();
    if digits <= GO_FRACTION_DIGITS {
        return s.into();
    }
    let keep = dot + 1 + GO_FRACTION_DIGITS;
    format!("{}{}", &s[..keep], &s[dot + 1 + digits..]).into()
}

/// Stream name of a shard: `<stream_prefix>[-c]-<shard>` (Go `logstream/replicator.go`).
pub fn stream_name(stream_prefix: &str, compressed: bool, shard: u64) -> String {
    let c = if compressed { "-c" } else { "" };
    format!("{stream_prefix}{c}-{shard}")
}

/// Subject of a shard: `<subject_prefix>-<shard>`; compression does not change it.
pub fn subject_name(subject_prefix: &str, shard: u64) -> String {
    format!("{subject_prefix}-{shard}")
}

/// zstd level Go's klauspost encoder defaults to ("SpeedDefault" ≈ level 3).
const ZSTD_LEVEL: i32 = 3;

/// Largest decompressed body we accept; bounds memory on a hostile frame.
pub const MAX_DECOMPRESSED: usize = 256 * 1024 * 1024;

/// A reusable compression context: creating one per message costs more than compressing it.
pub struct Compressor(zstd::bulk::Compressor<'static>);

impl Compressor {
    /// Fails only if zstd cannot allocate its context.
    pub fn new() -> std::io::Result<Compressor> {
        let mut c = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
        // Record the content size in the frame header: receivers size their buffer from it.
        c.include_contentsize(true)?;
        c.include_checksum(true)?;
        Ok(Compressor(c))
    }

    /// Compresses one body into a single frame (fails only if zstd cannot allocate).
    pub fn compress(&mut self, body: &[u8]) -> std::io::Result<Vec<u8>> {
        self.0.compress(body)
    }
}

pub struct Decompressor(zstd::bulk::Decompressor<'static>);

impl Decompressor {
    /// Fails only if zstd cannot allocate its context.
    pub fn new() -> Result<Decompressor, DecodeError> {
        Ok(Decompressor(
            zstd::bulk::Decompressor::new().map_err(DecodeError::Zstd)?,
        ))
    }

    /// Decompresses one frame of at most `limit` bytes (else an error). Frames declaring their size
    /// (ours, Go's `EncodeAll`) are refused before allocating when over it, else decoded in one
    /// call; others are streamed and cut at the limit: a hostile frame costs at most `limit`.
    pub fn decompress_limited(
        &mut self,
        body: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, DecodeError> {
        use std::io::Read;
        let limit = limit.min(MAX_DECOMPRESSED);
        let too_big = || {
            DecodeError::Zstd(std::io::Error::other(format!(
                "decompressed event exceeds the limit of {limit} bytes"
            )))
        };
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(body) {
            if size > limit as u64 {
                return Err(too_big());
            }
            return self
                .0
                .decompress(body, size as usize)
                .map_err(DecodeError::Zstd);
        }
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(body)
            .map_err(DecodeError::Zstd)?
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(DecodeError::Zstd)?;
        if out.len() > limit {
            return Err(too_big());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbor::tests::hex;

    /// Decompresses one zstd frame, bounded by [`MAX_DECOMPRESSED`].
    fn decompress(body: &[u8]) -> Result<Vec<u8>, DecodeError> {
        Decompressor::new()?.decompress(body)
    }

    impl Decompressor {
        fn decompress(&mut self, body: &[u8]) -> Result<Vec<u8>, DecodeError> {
            self.decompress_limited(body, MAX_DECOMPRESSED)
        }
    }

    /// upstream-behaviour §5.2 example, byte for byte.
    const GOLDEN_EVENT: &str = "a2 6a 46726f6d4e6f64654964 01 67 5061796c6f6164 a5 62 4964 05 \
        64 54797065 66 696e73657274 69 5461626c654e616d65 65 426f6f6b73 63 526f77 a2 62 6964 08 \
        65 7469746c65 64 44756e65 62 7368 70 39303766383937633833383232346631";

    fn golden() -> ReplicationEvent {
        ReplicationEvent {
            from_node_id: 1,
            event: ChangeEvent {
                id: 5,
                op: Op::Insert,
                table: "Books".into(),
                row: vec![
                    ("id".into(), Value::Integer(8)),
                    ("title".into(), Value::Text(b"Dune".to_vec())),
                ],
                schema_hash: "907f897c838224f1".into(),
            },
        }
    }

    #[test]
    fn encodes_the_golden_event_exactly() {
        assert_eq!(golden().encode(), hex(GOLDEN_EVENT));
    }

    #[test]
    fn decodes_the_golden_event() {
        assert_eq!(
            ReplicationEvent::decode(&hex(GOLDEN_EVENT)).expect("decodes"),
            golden()
        );
    }

    #[test]
    fn no_sh_key_when_hash_is_empty() {
        let mut e = golden();
        e.event.schema_hash.clear();
        let bytes = e.encode();
        assert_eq!(bytes[21], 0xa4, "payload map has 4 fields");
        assert!(!bytes.windows(3).any(|w| w == [0x62, b's', b'h']));
        assert_eq!(ReplicationEvent::decode(&bytes).expect("decodes"), e);
    }

    #[test]
    fn go_time_wrapper_becomes_mattn_text() {
        // {"created_at": tag32{1: 1740830400}} from §5.2, inside a full event.
        let mut body = hex("a2 6a 46726f6d4e6f64654964 01 67 5061796c6f6164 a4 62 4964 01");
        body.extend(hex(
            "64 54797065 66 696e73657274 69 5461626c654e616d65 61 74 63 526f77",
        ));
        body.extend(hex("a2 6a 637265617465645f6174 d8 20 a1 01 1a 67c2f6c0"));
        body.extend(hex("62 6f6b f5")); // "ok": true
        let e = ReplicationEvent::decode(&body).expect("decodes");
        assert_eq!(
            e.event.row,
            vec![
                (
                    "created_at".into(),
                    Value::Text(b"2025-03-01 12:00:00+00:00".to_vec())
                ),
                ("ok".into(), Value::Integer(1)),
            ]
        );
        // The zero-time variant `d8 20 a1 01 f6` is NULL.
        assert_eq!(
            time_wrapper_to_value(&Item::Map(vec![(Item::Unsigned(1), Item::Null)])),
            Ok(Value::Null)
        );
    }

    #[test]
    fn unstorable_values_name_the_column_and_the_reason() {
        // {"Payload": {"Type": "insert", "TableName": "t", "Row": {"a": 2^63}}}
        let mut body = hex("a1 67 5061796c6f6164 a3 64 54797065 66 696e73657274");
        body.extend(hex("69 5461626c654e616d65 61 74 63 526f77 a1 61 61"));
        body.extend(hex("1b 8000000000000000"));
        let e = ReplicationEvent::decode(&body).expect_err("2^63 is not an int64");
        assert_eq!(
            e.to_string(),
            "column \"a\": unsigned integer 9223372036854775808 exceeds int64"
        );
        assert!(matches!(
            e,
            DecodeError::BadValue { ref column, what: ValueError::UnsignedTooLarge(_) } if column == "a"
        ));
        assert_eq!(
            time_wrapper_to_value(&Item::Array(Vec::new())),
            Err(ValueError::TimeNotMap)
        );
        let year_10000 = Item::Map(vec![(Item::Unsigned(1), Item::Unsigned(253_402_300_800))]);
        assert_eq!(
            time_wrapper_to_value(&year_10000),
            Err(ValueError::TimeOutOfRange)
        );
    }

    #[test]
    fn field_names_match_case_insensitively_as_fallback() {
        let mut body = hex("a2 6a 66726f6d6e6f64656964 07 67 7061796c6f6164 a3");
        body.extend(hex(
            "64 74797065 66 64656c657465 69 7461626c656e616d65 61 74 63 726f77 a0",
        ));
        let e = ReplicationEvent::decode(&body).expect("decodes");
        assert_eq!(e.from_node_id, 7);
        assert_eq!(e.event.op, Op::Delete);
        assert_eq!(e.event.table, "t");
    }

    #[test]
    fn every_storage_class_round_trips() {
        let row = vec![
            ("a".into(), Value::Integer(i64::MIN)),
            ("b".into(), Value::Integer(i64::MAX)),
            ("c".into(), Value::Real(-0.000_001_5)),
            ("d".into(), Value::Text("ünï\0cödé\x01".as_bytes().to_vec())),
            ("e".into(), Value::Blob(Vec::new())),
            ("f".into(), Value::Blob(vec![0; 70_000])),
            ("g".into(), Value::Null),
            ("h".into(), Value::Text(vec![0xff, 0xfe])),
        ];
        let e = ReplicationEvent {
            from_node_id: u64::MAX,
            event: ChangeEvent {
                id: 1,
                op: Op::Update,
                table: "weird \"table\"".into(),
                row,
                schema_hash: String::new(),
            },
        };
        let compressed = Compressor::new()
            .and_then(|mut c| c.compress(&e.encode()))
            .expect("compresses");
        let back = ReplicationEvent::decode(&decompress(&compressed).expect("decompresses"));
        assert_eq!(back.expect("decodes"), e);
    }

    #[test]
    fn garbage_is_an_error() {
        for body in [&b""[..], b"not cbor", &hex("a1 63 526f77 01"), &hex("f6")] {
            assert!(ReplicationEvent::decode(body).is_err(), "{body:?}");
        }
        let bad_op =
            hex("a1 67 5061796c6f6164 a2 64 54797065 63 666f6f 69 5461626c654e616d65 61 74");
        assert!(matches!(
            ReplicationEvent::decode(&bad_op),
            Err(DecodeError::UnknownOp(_))
        ));
        assert!(decompress(b"\x28\xb5\x2f\xfd garbage").is_err());
    }

    #[test]
    fn shard_hash_golden_vectors() {
        let one = Value::Integer(1);
        let h = shard_hash(
            "Books",
            &mut [PkColumn {
                name: "id",
                decl_type: "integer",
                value: &one,
            }],
        );
        assert_eq!(h, 106_701_964_456_278_618);
        assert_eq!(shard_for(h, 2), 1);
        let (x, n) = (Value::Text(b"x".to_vec()), Value::Integer(300));
        let mut pks = [
            PkColumn {
                name: "b",
                decl_type: "",
                value: &n,
            },
            PkColumn {
                name: "a",
                decl_type: "text",
                value: &x,
            },
        ];
        assert_eq!(shard_hash("t", &mut pks), 9_079_523_267_442_860_392);
    }

    #[test]
    fn time_typed_keys_hash_as_go_does() {
        let text = Value::Text(b"2025-03-01 12:00:00".to_vec());
        let secs = Value::Integer(1_740_830_400);
        let millis = Value::Integer(1_740_830_400_123);
        let h = |v: &Value| {
            shard_hash(
                "t",
                &mut [PkColumn {
                    name: "k",
                    decl_type: "datetime",
                    value: v,
                }],
            )
        };
        assert_eq!(h(&text), h(&secs));
        assert_eq!(h(&millis), h(&secs));
        assert_eq!(
            parse_go_time(b"2025-03-01T13:00:00+01:00"),
            Some(1_740_830_400)
        );
        assert_eq!(parse_go_time(b"2025-03-01"), Some(1_740_787_200));
        assert_eq!(parse_go_time(b"garbage"), None);
    }

    #[test]
    fn go_time_text_rejects_dates_that_do_not_exist() {
        assert_eq!(parse_go_time(b"2025-02-31"), None);
        assert_eq!(parse_go_time(b"2025-02-31 12:00:00"), None);
        assert_eq!(
            parse_go_time(b"2023-02-29"),
            None,
            "2023 is not a leap year"
        );
        assert_eq!(
            parse_go_time(b"2100-02-29"),
            None,
            "2100 is not a leap year"
        );
        assert_eq!(parse_go_time(b"2024-02-29"), Some(1_709_164_800));
        assert_eq!(parse_go_time(b"2024-02-29T00:00:01Z"), Some(1_709_164_801));
        assert_eq!(parse_go_time(b"2000-02-29"), Some(951_782_400));
    }

    #[test]
    fn go_time_text_follows_go_layouts() {
        let noon = Some(1_740_830_400); // 2025-03-01 12:00:00 UTC
        // Every mattn layout, with ' ' or 'T', and a trailing Z cut first.
        for ok in [
            "2025-03-01 12:00:00",
            "2025-03-01T12:00:00Z",
            "2025-03-01 12:00",
            "2025-03-01T12:00",
            "2025-03-01 13:00:00+01:00",
            "2025-03-01T11:30:00-00:30",
            "2025-03-01 12:00:00.5",
            "2025-03-01 12:00:00,5",
            "2025-03-01T12:00:00.123456789Z",
            "2025-03-01T13:00:00.1+01:00",
            // Go reads any number of fraction digits and keeps nine.
            "2025-03-01T12:00:00.1234567891234Z",
            "2025-03-01 13:00:00.1234567890123456789012345678901234567890+01:00",
        ] {
            assert_eq!(parse_go_time(ok.as_bytes()), noon, "{ok}");
        }
        // Go's `15` takes an hour of one digit.
        assert_eq!(parse_go_time(b"2025-03-01 2:00:00"), Some(1_740_794_400));
        // Go allows offsets up to 24 hours.
        assert_eq!(
            parse_go_time(b"2025-03-02 12:00:00+24:00"),
            noon,
            "offset of 24 hours"
        );
        for bad in [
            "",
            "garbage",
            "+2025-03-01",
            "2025-3-01",
            "2025-03-1",
            "25-03-01",
            "2025-13-01",
            "2025-03-01 ",
            "2025-03-01 24:00:00",
            "2025-03-01 12:60:00",
            "2025-03-01 12:00:60",
            "2025-03-01 12:0:00",
            "2025-03-01 12:00:00.",
            "2025-03-01 12:00:00.x",
            "2025-03-01 12:00+01:00",
            "2025-03-01 12:00:00+0100",
            "2025-03-01 12:00:00+25:00",
            "2025-03-01 12:00:00 +01:00",
            "2025-03-01 12:00:00ZZ",
            "2025-03-01 12:00:00.5 ",
        ] {
            assert_eq!(parse_go_time(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn frames_without_content_size_and_lies_are_handled() {
        let body = b"hello hello hello hello".repeat(50);
        let mut streamed = Vec::new();
        {
            let mut enc = zstd::stream::write::Encoder::new(&mut streamed, 3).expect("encoder");
            std::io::Write::write_all(&mut enc, &body).expect("write");
            enc.finish().expect("finish");
        }
        let mut d = Decompressor::new().expect("ctx");
        assert_eq!(d.decompress(&streamed).expect("streamed"), body);
        let framed = Compressor::new()
            .and_then(|mut c| c.compress(&body))
            .expect("compress");
        assert_eq!(d.decompress(&framed).expect("framed"), body);
        assert!(
            d.decompress(&framed[..framed.len() - 3]).is_err(),
            "truncated frame"
        );
    }

    #[test]
    fn fnv1_of_machine_id_vector() {
        assert_eq!(
            fnv1_64(b"0123456789abcdef0123456789abcdef"),
            13_327_427_942_603_214_261
        );
    }

    #[test]
    fn utc_time_formatting() {
        let f = |secs| format_utc_time(secs).expect("in range");
        assert_eq!(f(0), "1970-01-01 00:00:00+00:00");
        assert_eq!(f(-1), "1969-12-31 23:59:59+00:00");
        assert_eq!(f(951_782_400), "2000-02-29 00:00:00+00:00");
        assert_eq!(f(253_402_300_799), "9999-12-31 23:59:59+00:00");
        assert_eq!(format_utc_time(253_402_300_800), None, "year 10000");
    }

    #[test]
    fn stream_and_subject_names() {
        assert_eq!(
            stream_name("harmonylite-changes", true, 1),
            "harmonylite-changes-c-1"
        );
        assert_eq!(
            stream_name("harmonylite-changes", false, 2),
            "harmonylite-changes-2"
        );
        assert_eq!(
            subject_name("harmonylite-change-log", 1),
            "harmonylite-change-log-1"
        );
    }
}
