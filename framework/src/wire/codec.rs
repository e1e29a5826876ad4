//! The gRPC codec of the generated service: prost encoding into a buffer sized once for the
//! whole message (prost's own encoder lets the buffer grow from 8 KiB, which for a payload of
//! many megabytes means a reallocation and a second copy of the payload), plus a decoder that
//! refuses an undecodable message with `InvalidArgument` + [`Rejection::Malformed`] instead of
//! prost's default `Internal`.
//!
//! Payload fields are `bytes::Bytes` (see `build.rs`): decoding slices them out of the received
//! frame without a copy; encoding copies each payload once, into the outgoing frame.

use std::marker::PhantomData;
use std::sync::Arc;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use super::rejection::Rejection;

/// `tonic-prost-build` is pointed at this type through `codec_path` (see `build.rs`).
#[derive(Debug, Clone)]
pub(crate) struct WireCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = WireEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder { _pd: PhantomData }
    }
}

/// Encodes a `T` with prost into a buffer reserved for its whole encoded length.
#[derive(Debug, Clone)]
pub(crate) struct WireEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message> Encoder for WireEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        // Cannot fail once the room is reserved (an `EncodeBuf` also grows on demand).
        item.encode(buf)
            .map_err(|err| Status::internal(format!("encoding a message: {err}")))
    }
}

/// Decodes a `U` with prost; see the module docs for the error mapping.
#[derive(Debug, Clone)]
pub(crate) struct WireDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|err| {
            let mut status = Status::from(Rejection::Malformed {
                reason: format!("undecodable {}: {err}", short_type_name::<U>()),
            });
            // The source never crosses the wire. On a client it tells `classify` that the
            // *response* could not be decoded locally (a protocol error), as opposed to a
            // Malformed rejection sent by the server about our request.
            status.set_source(Arc::new(LocalDecodeError));
            status
        })
    }
}

/// `PullRequest` rather than `taskgraph::wire::proto::PullRequest`.
fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Marker source attached to statuses produced by [`WireDecoder`] in this process.
#[derive(Debug, thiserror::Error)]
#[error("message decoded locally was malformed")]
pub(crate) struct LocalDecodeError;
