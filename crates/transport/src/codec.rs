//! Messages (rkyv 0.8) and frames (a 4-byte big-endian length, then the body).
//!
//! Every received body lands in a 16-byte-aligned buffer and is validated with
//! `rkyv::access` (bytecheck) before any field is read; nothing here uses
//! `access_unchecked`, so a hostile peer's bytes produce a [`DecodeError`], never undefined
//! behaviour or a panic.

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::BoxedError;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Portable, Serialize};

/// Length of a frame header: the body length as a big-endian u32.
pub(crate) const FRAME_HEADER: usize = 4;

/// A message could not be encoded. Nothing was sent.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(String);

/// Received bytes are not a valid archived message of the expected type. The bytes came
/// from the peer; nothing was changed locally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {type_name}: {reason}")]
pub struct DecodeError {
    /// The Rust type the bytes were checked against.
    pub type_name: &'static str,
    /// What the validator found.
    pub reason: String,
}

/// A type that can be sent: anything rkyv can serialize into an aligned buffer.
pub trait Encode {
    /// Serializes `self` into an aligned buffer.
    fn encode(&self) -> Result<AlignedVec, EncodeError>;
}

impl<T> Encode for T
where
    T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, BoxedError>>,
{
    fn encode(&self) -> Result<AlignedVec, EncodeError> {
        rkyv::to_bytes::<BoxedError>(self).map_err(|e| EncodeError(e.to_string()))
    }
}

/// A type that can be received: its archived form can be validated and deserialized.
pub trait Decode: Sized {
    /// Validates and deserializes `bytes`, which must start at a 16-byte-aligned address
    /// (use [`Frame`] or [`decode`], which guarantee it).
    fn decode_aligned(bytes: &[u8]) -> Result<Self, DecodeError>;
}

impl<T> Decode for T
where
    T: Archive,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, BoxedError>>
        + Deserialize<T, HighDeserializer<BoxedError>>,
{
    fn decode_aligned(bytes: &[u8]) -> Result<Self, DecodeError> {
        let err = |e: BoxedError| DecodeError {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        };
        let archived = rkyv::access::<T::Archived, BoxedError>(bytes).map_err(err)?;
        rkyv::deserialize::<T, BoxedError>(archived).map_err(err)
    }
}

/// Decodes a message from any byte slice, copying it into an aligned buffer first.
pub fn decode<T: Decode>(bytes: &[u8]) -> Result<T, DecodeError> {
    Frame::copy_from(bytes).decode()
}

/// One received message body, in a 16-byte-aligned buffer.
#[derive(Clone, Default)]
pub struct Frame(AlignedVec);

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for Frame {}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({} bytes)", self.0.len())
    }
}

impl Frame {
    /// A frame holding a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut v = AlignedVec::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        Frame(v)
    }

    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Frame(AlignedVec::with_capacity(capacity))
    }

    pub(crate) fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// The body's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// The body's length.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Validates the body as a `T` and deserializes it.
    pub fn decode<T: Decode>(&self) -> Result<T, DecodeError> {
        T::decode_aligned(self.as_bytes())
    }

    /// Validates the body as a `T` and returns the archived value without copying it.
    pub fn access<T>(&self) -> Result<&T::Archived, DecodeError>
    where
        T: Archive,
        T::Archived: Portable + for<'a> CheckBytes<HighValidator<'a, BoxedError>>,
    {
        rkyv::access::<T::Archived, BoxedError>(self.as_bytes()).map_err(|e| DecodeError {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
    }
}

impl From<AlignedVec> for Frame {
    fn from(v: AlignedVec) -> Self {
        Frame(v)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Ping {
        seq: u64,
        note: String,
        items: Vec<u32>,
    }

    #[test]
    fn round_trip() {
        let p = Ping {
            seq: 7,
            note: "hello".into(),
            items: vec![1, 2, 3],
        };
        let bytes = p.encode().unwrap();
        assert_eq!(decode::<Ping>(&bytes).unwrap(), p);
        let f = Frame::from(bytes);
        assert_eq!(f.access::<Ping>().unwrap().seq, 7);
    }

    #[test]
    fn unaligned_input_is_copied_not_rejected() {
        let p = Ping {
            seq: 1,
            note: String::new(),
            items: vec![],
        };
        let bytes = p.encode().unwrap();
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode::<Ping>(&shifted[1..]).unwrap(), p);
    }

    #[test]
    fn truncated_input_is_a_typed_error() {
        let p = Ping {
            seq: 1,
            note: "abc".into(),
            items: vec![9; 10],
        };
        let bytes = p.encode().unwrap();
        let err = decode::<Ping>(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.type_name.contains("Ping"), "{err}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Ping>(&bytes);
            let _ = decode::<String>(&bytes);
            let _ = decode::<Vec<u64>>(&bytes);
        }

        #[test]
        fn any_ping_round_trips(seq in any::<u64>(), note in ".*", items in proptest::collection::vec(any::<u32>(), 0..64)) {
            let p = Ping { seq, note, items };
            prop_assert_eq!(decode::<Ping>(&p.encode().unwrap()).unwrap(), p);
        }
    }
}
