//! ttrpc over one logical connection: message framing and reassembly, a server that dispatches
//! requests by service and method, and a client with odd stream ids. Unary calls only, which is
//! all NRI uses.
//!
//! A message is a 10-byte header — payload length (u32 BE, at most 4 MiB), stream id (u32 BE),
//! type (1 request, 2 response, 3 data), flags — followed by a protobuf `Request` or `Response`.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

use super::{mux::Sender, proto::ttrpc as wire};

/// Header size.
pub const HEADER_LEN: usize = 10;
/// The largest payload ttrpc accepts.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Message type: request.
pub const REQUEST: u8 = 1;
/// Message type: response.
pub const RESPONSE: u8 = 2;

/// gRPC status codes ttrpc uses.
pub mod code {
    /// Success.
    pub const OK: i32 = 0;
    /// The request is malformed.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// The deadline passed.
    pub const DEADLINE_EXCEEDED: i32 = 4;
    /// The message is too large.
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    /// No such service or method.
    pub const UNIMPLEMENTED: i32 = 12;
    /// The handler failed.
    pub const INTERNAL: i32 = 13;
    /// The connection is gone.
    pub const UNAVAILABLE: i32 = 14;
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length.
    pub length: u32,
    /// Stream id (odd for client-initiated streams).
    pub stream_id: u32,
    /// Message type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
}

impl Header {
    /// The wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0_u8; HEADER_LEN];
        out[..4].copy_from_slice(&self.length.to_be_bytes());
        out[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        out[8] = self.kind;
        out[9] = self.flags;
        out
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Self {
        Self {
            length: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            stream_id: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            kind: bytes[8],
            flags: bytes[9],
        }
    }
}

/// What the reassembler yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A whole message.
    Message(Header, Bytes),
    /// A message longer than [`MAX_MESSAGE`]; its payload was skipped.
    Oversized(Header),
}

/// Turns a connection's byte chunks (frame boundaries are arbitrary) back into messages.
#[derive(Debug, Default)]
pub struct Reassembler {
    buffer: BytesMut,
    /// An oversized message being skipped, and how many of its bytes are still to come.
    skipping: Option<(Header, usize)>,
}

impl Reassembler {
    /// Adds bytes received on the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete message, if the buffer holds one.
    pub fn pop(&mut self) -> Option<Incoming> {
        if let Some((header, remaining)) = self.skipping.take() {
            let skipped = remaining.min(self.buffer.len());
            self.buffer.advance(skipped);
            if skipped < remaining {
                self.skipping = Some((header, remaining - skipped));
                return None;
            }
            return Some(Incoming::Oversized(header));
        }
        let head: [u8; HEADER_LEN] = self.buffer.get(..HEADER_LEN)?.try_into().ok()?;
        let header = Header::decode(&head);
        let length = usize::try_from(header.length).unwrap_or(usize::MAX);
        if length > MAX_MESSAGE {
            self.buffer.advance(HEADER_LEN);
            self.skipping = Some((header, length));
            return self.pop();
        }
        if self.buffer.len() < HEADER_LEN + length {
            return None;
        }
        self.buffer.advance(HEADER_LEN);
        let payload = self.buffer.split_to(length).freeze();
        Some(Incoming::Message(header, payload))
    }
}

/// Reads messages from a connection's chunks.
#[derive(Debug)]
pub struct MessageReader {
    chunks: mpsc::Receiver<Bytes>,
    reassembler: Reassembler,
}

impl MessageReader {
    /// Reads from `chunks`.
    pub fn new(chunks: mpsc::Receiver<Bytes>) -> Self {
        Self {
            chunks,
            reassembler: Reassembler::default(),
        }
    }

    /// The next message; `None` when the connection is closed.
    pub async fn next(&mut self) -> Option<Incoming> {
        loop {
            if let Some(message) = self.reassembler.pop() {
                return Some(message);
            }
            let chunk = self.chunks.recv().await?;
            self.reassembler.push(&chunk);
        }
    }
}

/// A ttrpc error status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ttrpc status {code}: {message}")]
pub struct Status {
    /// gRPC code.
    pub code: i32,
    /// Message.
    pub message: String,
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A boxed handler future.
pub type Reply = Pin<Box<dyn Future<Output = Result<Vec<u8>, Status>> + Send>>;

/// What a ttrpc server dispatches to.
pub trait Service: Send + Sync + 'static {
    /// Handles `service`/`method` with the encoded request; answers the encoded response.
    fn call(&self, service: &str, method: &str, payload: Bytes) -> Reply;
}

/// Serves requests on connection `conn` until it closes. Each request runs in its own task.
pub async fn serve(
    mut reader: MessageReader,
    sender: Sender,
    conn: u32,
    service: Arc<dyn Service>,
) {
    while let Some(incoming) = reader.next().await {
        let (header, payload) = match incoming {
            Incoming::Oversized(header) => {
                if header.kind == REQUEST {
                    let status = Status::new(
                        code::RESOURCE_EXHAUSTED,
                        format!("message of {} bytes exceeds {MAX_MESSAGE}", header.length),
                    );
                    respond(&sender, conn, header.stream_id, Err(status)).await;
                }
                continue;
            }
            Incoming::Message(header, payload) => (header, payload),
        };
        if header.kind != REQUEST {
            tracing::debug!(
                kind = header.kind,
                "ignoring a non-request message on the server side"
            );
            continue;
        }
        if header.stream_id % 2 == 0 {
            let status = Status::new(
                code::INVALID_ARGUMENT,
                format!(
                    "stream id {} is even; clients use odd ids",
                    header.stream_id
                ),
            );
            respond(&sender, conn, header.stream_id, Err(status)).await;
            continue;
        }
        let request = match wire::Request::decode(payload) {
            Ok(request) => request,
            Err(err) => {
                let status =
                    Status::new(code::INVALID_ARGUMENT, format!("malformed request: {err}"));
                respond(&sender, conn, header.stream_id, Err(status)).await;
                continue;
            }
        };
        let reply = service.call(
            &request.service,
            &request.method,
            Bytes::from(request.payload),
        );
        let sender = sender.clone();
        tokio::spawn(async move {
            let result = reply.await;
            respond(&sender, conn, header.stream_id, result).await;
        });
    }
}

async fn respond(sender: &Sender, conn: u32, stream_id: u32, result: Result<Vec<u8>, Status>) {
    let mut response = match result {
        Ok(payload) => wire::Response {
            status: None,
            payload,
        },
        Err(status) => wire::Response {
            status: Some(wire::Status {
                code: status.code,
                message: status.message,
            }),
            payload: Vec::new(),
        },
    };
    if response.encoded_len() > MAX_MESSAGE {
        response = wire::Response {
            status: Some(wire::Status {
                code: code::RESOURCE_EXHAUSTED,
                message: format!(
                    "response of {} bytes exceeds {MAX_MESSAGE}",
                    response.encoded_len()
                ),
            }),
            payload: Vec::new(),
        };
    }
    let payload = response.encode_to_vec();
    let header = Header {
        length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        stream_id,
        kind: RESPONSE,
        flags: 0,
    };
    if let Err(err) = sender.send_message(conn, &header.encode(), &payload).await {
        tracing::debug!(%err, "cannot send a ttrpc response; the connection is gone");
    }
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<Bytes, Status>>>>>;

/// A ttrpc client on one connection.
#[derive(Debug, Clone)]
pub struct Client {
    sender: Sender,
    conn: u32,
    next_id: Arc<AtomicU32>,
    pending: Pending,
}

impl Client {
    /// A client writing on `conn` and reading responses from `reader`.
    pub fn new(reader: MessageReader, sender: Sender, conn: u32) -> Self {
        let pending: Pending = Arc::default();
        tokio::spawn(dispatch_responses(reader, Arc::clone(&pending)));
        Self {
            sender,
            conn,
            next_id: Arc::new(AtomicU32::new(1)),
            pending,
        }
    }

    /// Calls `service`/`method`; the answer's payload, or the error status.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        request: &impl prost::Message,
        timeout: Duration,
    ) -> Result<Bytes, Status> {
        let stream_id = self.next_id.fetch_add(2, Ordering::Relaxed);
        let payload = wire::Request {
            service: service.to_owned(),
            method: method.to_owned(),
            payload: request.encode_to_vec(),
            timeout_nano: i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
            metadata: Vec::new(),
        }
        .encode_to_vec();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending calls lock poisoned")
            .insert(stream_id, tx);
        let header = Header {
            length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            stream_id,
            kind: REQUEST,
            flags: 0,
        };
        let forget = || {
            self.pending
                .lock()
                .expect("pending calls lock poisoned")
                .remove(&stream_id);
        };
        if let Err(err) = self
            .sender
            .send_message(self.conn, &header.encode(), &payload)
            .await
        {
            forget();
            return Err(Status::new(code::UNAVAILABLE, err.to_string()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::new(code::UNAVAILABLE, "the connection closed")),
            Err(_) => {
                forget();
                Err(Status::new(
                    code::DEADLINE_EXCEEDED,
                    format!("{service}/{method}: no answer in {timeout:?}"),
                ))
            }
        }
    }
}

async fn dispatch_responses(mut reader: MessageReader, pending: Pending) {
    while let Some(incoming) = reader.next().await {
        let Incoming::Message(header, payload) = incoming else {
            continue;
        };
        if header.kind != RESPONSE {
            continue;
        }
        let Some(waiter) = pending
            .lock()
            .expect("pending calls lock poisoned")
            .remove(&header.stream_id)
        else {
            continue;
        };
        let result = match wire::Response::decode(payload) {
            Ok(response) => match response.status {
                Some(status) if status.code != code::OK => {
                    Err(Status::new(status.code, status.message))
                }
                _ => Ok(Bytes::from(response.payload)),
            },
            Err(err) => Err(Status::new(
                code::INTERNAL,
                format!("malformed response: {err}"),
            )),
        };
        let _ignored = waiter.send(result);
    }
    // Closed: every waiter learns it through its dropped sender.
    pending.lock().expect("pending calls lock poisoned").clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let header = Header {
            length: u32::try_from(payload.len()).unwrap(),
            stream_id,
            kind: REQUEST,
            flags: 0,
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn messages_are_reassembled_across_arbitrary_chunks() {
        let mut wire = message(1, b"hello");
        wire.extend(message(3, &[9; 5000]));
        wire.extend(message(5, b""));
        for chunk_size in [1, 3, 10, 11, 4096, wire.len()] {
            let mut reassembler = Reassembler::default();
            let mut seen = Vec::new();
            for chunk in wire.chunks(chunk_size) {
                reassembler.push(chunk);
                while let Some(Incoming::Message(header, payload)) = reassembler.pop() {
                    seen.push((header.stream_id, payload.len()));
                }
            }
            assert_eq!(seen, [(1, 5), (3, 5000), (5, 0)], "chunks of {chunk_size}");
        }
    }

    #[test]
    fn oversized_messages_are_skipped_and_reported() {
        let mut reassembler = Reassembler::default();
        let huge = Header {
            length: u32::try_from(MAX_MESSAGE + 1).unwrap(),
            stream_id: 7,
            kind: REQUEST,
            flags: 0,
        };
        reassembler.push(&huge.encode());
        reassembler.push(&vec![0; MAX_MESSAGE]);
        assert_eq!(reassembler.pop(), None, "one byte still to skip");
        reassembler.push(&[0]);
        reassembler.push(&message(9, b"next"));
        assert_eq!(reassembler.pop(), Some(Incoming::Oversized(huge)));
        assert!(matches!(reassembler.pop(), Some(Incoming::Message(h, _)) if h.stream_id == 9));
    }
}
