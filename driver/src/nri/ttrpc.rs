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
use tokio::sync::oneshot;

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
    chunks: super::mux::Chunks,
    reassembler: Reassembler,
}

impl MessageReader {
    /// Reads from `chunks`.
    pub fn new(chunks: super::mux::Chunks) -> Self {
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

/// Requests one connection may have in flight; more are answered `RESOURCE_EXHAUSTED` at once
/// (the runtime sends one event per pod at a time, so this bounds a misbehaving peer only).
pub const MAX_IN_FLIGHT: usize = 64;

/// Serves requests on connection `conn` until it closes. Each request runs in its own task, at
/// most [`MAX_IN_FLIGHT`] at once. A request's deadline (`timeout_nano`) is honoured: when it
/// passes, the caller is answered `DEADLINE_EXCEEDED` and the work is left to finish in the
/// background (cutting a NIC's move short would leave it half-configured; the runtime's
/// next event for the pod sees the outcome).
pub async fn serve(
    mut reader: MessageReader,
    sender: Sender,
    conn: u32,
    service: Arc<dyn Service>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
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
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            let status = Status::new(
                code::RESOURCE_EXHAUSTED,
                format!("{MAX_IN_FLIGHT} requests are in flight already"),
            );
            respond(&sender, conn, header.stream_id, Err(status)).await;
            continue;
        };
        let deadline = u64::try_from(request.timeout_nano)
            .ok()
            .filter(|nanos| *nanos > 0)
            .map(Duration::from_nanos);
        let method = format!("{}/{}", request.service, request.method);
        let work = service.call(
            &request.service,
            &request.method,
            Bytes::from(request.payload),
        );
        // The slot is held by the work, also when it outlives the caller's deadline.
        let reply: Reply = Box::pin(async move {
            let result = work.await;
            drop(permit);
            result
        });
        let sender = sender.clone();
        tokio::spawn(async move {
            let result = within(deadline, &method, reply).await;
            respond(&sender, conn, header.stream_id, result).await;
        });
    }
}

/// `reply`'s result, or `DEADLINE_EXCEEDED` once `deadline` passed; the work itself then
/// goes on in a task of its own, its outcome logged.
async fn within(deadline: Option<Duration>, method: &str, reply: Reply) -> Result<Vec<u8>, Status> {
    let Some(deadline) = deadline else {
        return reply.await;
    };
    let mut work = tokio::spawn(reply);
    if let Ok(joined) = tokio::time::timeout(deadline, &mut work).await {
        return joined.unwrap_or_else(|error| Err(Status::new(code::INTERNAL, error.to_string())));
    }
    let name = method.to_owned();
    tokio::spawn(async move {
        let method = name;
        match work.await {
            Ok(Ok(_)) => tracing::warn!(%method, "finished after the caller's deadline"),
            Ok(Err(status)) => {
                tracing::warn!(%method, error = %status.message, "failed after the caller's deadline");
            }
            Err(error) => tracing::error!(%method, %error, "the request's task failed"),
        }
    });
    Err(Status::new(
        code::DEADLINE_EXCEEDED,
        format!("{method} did not finish within the caller's {deadline:?}"),
    ))
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

    /// A service whose `slow` takes 300 ms and whose `wait` waits until the test opens it.
    struct Work {
        finished: Arc<AtomicU32>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Service for Work {
        fn call(&self, _service: &str, method: &str, _payload: Bytes) -> Reply {
            let (finished, gate) = (Arc::clone(&self.finished), Arc::clone(&self.gate));
            let slow = method == "slow";
            Box::pin(async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                } else {
                    let _open = gate.acquire().await;
                }
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(Vec::new())
            })
        }
    }

    /// A server over an in-memory trunk; the runtime's side writes requests and reads answers.
    fn server() -> (Arc<Work>, Sender, MessageReader) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let mut plugin = super::super::mux::split(ours, &[1]);
        let mut runtime = super::super::mux::split(theirs, &[1]);
        let work = Arc::new(Work {
            finished: Arc::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        });
        tokio::spawn(serve(
            MessageReader::new(plugin.receivers.remove(&1).unwrap()),
            plugin.sender,
            1,
            Arc::clone(&work) as Arc<dyn Service>,
        ));
        let answers = MessageReader::new(runtime.receivers.remove(&1).unwrap());
        (work, runtime.sender, answers)
    }

    async fn request(sender: &Sender, stream_id: u32, method: &str, timeout: Duration) {
        let payload = wire::Request {
            service: "test".into(),
            method: method.into(),
            payload: Vec::new(),
            timeout_nano: i64::try_from(timeout.as_nanos()).unwrap(),
            metadata: Vec::new(),
        }
        .encode_to_vec();
        let header = Header {
            length: u32::try_from(payload.len()).unwrap(),
            stream_id,
            kind: REQUEST,
            flags: 0,
        };
        sender
            .send_message(1, &header.encode(), &payload)
            .await
            .unwrap();
    }

    /// `(stream id, status code)` of the next answer.
    async fn answer(answers: &mut MessageReader) -> (u32, i32) {
        let next = tokio::time::timeout(Duration::from_secs(5), answers.next()).await;
        let Ok(Some(Incoming::Message(header, payload))) = next else {
            panic!("no answer within 5 s");
        };
        let response = wire::Response::decode(payload).unwrap();
        (
            header.stream_id,
            response.status.map_or(code::OK, |s| s.code),
        )
    }

    /// The caller's deadline is honoured: past it the answer is `DEADLINE_EXCEEDED`, and the
    /// work is not cut short (a NIC half moved is worse than a late one).
    #[tokio::test]
    async fn a_request_past_its_deadline_is_answered_and_its_work_still_finishes() {
        let (work, sender, mut answers) = server();
        request(&sender, 1, "slow", Duration::from_millis(50)).await;
        assert_eq!(answer(&mut answers).await, (1, code::DEADLINE_EXCEEDED));
        assert_eq!(
            work.finished.load(Ordering::SeqCst),
            0,
            "answered before the work ended"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(work.finished.load(Ordering::SeqCst), 1, "the work finished");
        // Without a deadline (0), the answer waits for the work.
        request(&sender, 3, "slow", Duration::ZERO).await;
        assert_eq!(answer(&mut answers).await, (3, code::OK));
    }

    /// At most [`MAX_IN_FLIGHT`] requests run at once; one more is refused at once, and a slot
    /// frees when a request ends.
    #[tokio::test]
    async fn requests_beyond_the_bound_are_refused_at_once() {
        let (work, sender, mut answers) = server();
        let bound = u32::try_from(MAX_IN_FLIGHT).unwrap();
        for i in 0..=bound {
            request(&sender, 2 * i + 1, "wait", Duration::ZERO).await;
        }
        assert_eq!(
            answer(&mut answers).await,
            (2 * bound + 1, code::RESOURCE_EXHAUSTED)
        );
        work.gate.add_permits(MAX_IN_FLIGHT);
        for _ in 0..bound {
            assert_eq!(answer(&mut answers).await.1, code::OK);
        }
        request(&sender, 1001, "wait", Duration::ZERO).await;
        assert_eq!(answer(&mut answers).await, (1001, code::OK));
    }
}
