//! The one table of codes this crate puts on the wire: connection close codes (why a peer
//! was refused) and stream codes (why one message was refused).

use std::fmt;

macro_rules! code_table {
    ($(#[$doc:meta])* $name:ident { $($(#[$cdoc:meta])* $konst:ident = $value:literal, $text:literal;)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u32);

        impl $name {
            $($(#[$cdoc])* pub const $konst: $name = $name($value);)*

            /// A short description of a known code, or `None` for an application's own code.
            pub fn describe(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some($text),)*
                    _ => None,
                }
            }

            pub(crate) fn to_varint(self) -> quinn::VarInt {
                quinn::VarInt::from_u32(self.0)
            }

            pub(crate) fn from_varint(v: quinn::VarInt) -> Self {
                $name(u32::try_from(v.into_inner()).unwrap_or(u32::MAX))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.describe() {
                    Some(text) => write!(f, "{:#x} ({})", self.0, text),
                    None => write!(f, "{:#x}", self.0),
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }
    };
}

code_table!(
    /// Why a connection was closed: the application close code a refused peer receives.
    ///
    /// | code | name | meaning |
    /// |---|---|---|
    /// | `0x0` | `SHUTDOWN` | the endpoint or connection is closing normally |
    /// | `0x101` | `NO_CERTIFICATE` | no client certificate on a protocol that requires one |
    /// | `0x102` | `BAD_CERTIFICATE` | the certificate carries no valid node identity |
    /// | `0x103` | `WRONG_CLUSTER` | the certificate belongs to another cluster |
    /// | `0x104` | `ROLE_FORBIDDEN` | the peer's role may not use this protocol |
    /// | `0x105` | `UNEXPECTED_NODE` | the peer is not the node that was dialed |
    /// | `0x106` | `UNKNOWN_PROTOCOL` | no protocol is listening on the negotiated ALPN |
    /// | `0x107` | `ADMISSION_FAILED` | the admission step after the handshake failed |
    /// | `0x108` | `OVERLOADED` | the protocol's accept queue is full |
    /// | `0x109` | `REVOKED` | the peer's node was removed from the cluster |
    CloseCode {
        /// The endpoint or connection is closing normally.
        SHUTDOWN = 0x0, "shutdown";
        /// No client certificate on a protocol that requires one.
        NO_CERTIFICATE = 0x101, "no client certificate";
        /// The certificate carries no valid node identity.
        BAD_CERTIFICATE = 0x102, "certificate has no valid node identity";
        /// The certificate belongs to another cluster.
        WRONG_CLUSTER = 0x103, "certificate of another cluster";
        /// The peer's role may not use this protocol.
        ROLE_FORBIDDEN = 0x104, "role not allowed on this protocol";
        /// The peer is not the node that was dialed.
        UNEXPECTED_NODE = 0x105, "peer is not the node that was dialed";
        /// No protocol is listening on the negotiated ALPN.
        UNKNOWN_PROTOCOL = 0x106, "no such protocol";
        /// The admission step after the handshake failed.
        ADMISSION_FAILED = 0x107, "admission failed";
        /// The protocol's accept queue is full.
        OVERLOADED = 0x108, "overloaded";
        /// The peer's node was removed from the cluster ([`Endpoint::revoke`](crate::Endpoint::revoke)).
        REVOKED = 0x109, "node removed from the cluster";
    }
);

code_table!(
    /// Why a single stream (one request or message) was refused: the code of a
    /// `STOP_SENDING` or `RESET_STREAM`. Applications may use codes from `0x1000` up for
    /// their own refusals.
    ///
    /// | code | name | meaning |
    /// |---|---|---|
    /// | `0x10` | `FRAME_TOO_LARGE` | the frame is over the receiver's limit |
    /// | `0x11` | `MALFORMED_FRAME` | truncated frame, or bytes after it |
    /// | `0x12` | `UNDECODABLE` | the body is not a valid message of the expected type |
    /// | `0x13` | `TIMEOUT` | the frame or the answer took too long |
    /// | `0x14` | `DROPPED` | the handler dropped the request without answering |
    StreamCode {
        /// The frame is over the receiver's limit.
        FRAME_TOO_LARGE = 0x10, "frame too large";
        /// Truncated frame, or bytes after it.
        MALFORMED_FRAME = 0x11, "malformed frame";
        /// The body is not a valid message of the expected type.
        UNDECODABLE = 0x12, "undecodable message";
        /// The frame or the answer took too long.
        TIMEOUT = 0x13, "timeout";
        /// The handler dropped the request without answering.
        DROPPED = 0x14, "request dropped without an answer";
    }
);
