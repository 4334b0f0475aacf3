//! NRI's connection multiplexing: two logical byte streams over one unix stream (the trunk).
//!
//! Every frame is `conn id (u32 BE) | payload length (u32 BE) | payload`. Connection 1 carries
//! the plugin's ttrpc server (the runtime calls it), connection 2 the runtime's ttrpc server
//! (the plugin calls it). There is no open or close signalling, frame boundaries mean nothing
//! to the byte streams, and frames for unknown connections are dropped.
//!
//! Writes follow the rule Go readers need (shared/docs/protocols.md §4): one ttrpc message per
//! frame when it fits in 4096 bytes, else its 10-byte header in one frame and its payload in
//! the next; never an empty frame, never two messages in one frame.

use std::{
    collections::HashMap,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{Mutex, mpsc},
    task::JoinHandle,
};

/// The plugin's ttrpc server (the runtime is the client).
pub const PLUGIN_CONN: u32 = 1;
/// The runtime's ttrpc server (the plugin is the client).
pub const RUNTIME_CONN: u32 = 2;
/// Frames a connection may have queued before the trunk is closed (as NRI does).
pub const QUEUE_FRAMES: usize = 256;
/// Bytes a connection may have queued before the trunk is closed: room for two of the largest
/// frames, so one trunk holds at most ~80 MiB (two connections and the frame being read), not
/// 256 frames of 16 MiB each.
pub const QUEUE_BYTES: usize = 2 * MAX_FRAME;
/// The largest frame accepted: older NRI sends whole 16 MiB messages in one frame.
pub const MAX_FRAME: usize = 16 << 20;
/// Messages up to this size (header included) go out in a single frame.
pub const SINGLE_FRAME_LIMIT: usize = 4096;
const FRAME_HEADER: usize = 8;

/// One frame on the wire.
pub fn encode_frame(conn: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("frames are far below 4 GiB");
    let mut frame = Vec::with_capacity(FRAME_HEADER + payload.len());
    frame.extend_from_slice(&conn.to_be_bytes());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The frames that carry one ttrpc message (`header` is its 10-byte header).
pub fn message_frames(conn: u32, header: &[u8], payload: &[u8]) -> Vec<Vec<u8>> {
    if header.len() + payload.len() <= SINGLE_FRAME_LIMIT || payload.is_empty() {
        let mut message = Vec::with_capacity(header.len() + payload.len());
        message.extend_from_slice(header);
        message.extend_from_slice(payload);
        vec![encode_frame(conn, &message)]
    } else {
        vec![encode_frame(conn, header), encode_frame(conn, payload)]
    }
}

/// The writing half of a trunk, shared by every logical connection; a message's frames are
/// written under one lock so messages never interleave.
#[derive(Clone)]
pub struct Sender {
    writer: Arc<Mutex<Box<dyn AsyncWrite + Send + Unpin>>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl Sender {
    /// Sends one ttrpc message on `conn`.
    pub async fn send_message(&self, conn: u32, header: &[u8], payload: &[u8]) -> io::Result<()> {
        let frames = message_frames(conn, header, payload);
        let mut writer = self.writer.lock().await;
        for frame in frames {
            writer.write_all(&frame).await?;
        }
        writer.flush().await
    }

    /// Sends raw frames (tests and fuzzing use this to send what a broken peer would).
    pub async fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        let mut writer = self.writer.lock().await;
        writer.write_all(bytes).await?;
        writer.flush().await
    }
}

/// A split trunk: the shared sender, a receiver of byte chunks per logical connection, and the
/// reader task (its result says why the trunk closed).
#[derive(Debug)]
pub struct Trunk {
    /// Writes frames.
    pub sender: Sender,
    /// Byte chunks per connection id, in order; ends when the trunk closes.
    pub receivers: HashMap<u32, Chunks>,
    /// The reader: `Ok` when the peer closed the stream, else the protocol or I/O error.
    pub reader: JoinHandle<io::Result<()>>,
}

/// The byte chunks of one logical connection, in order; what is received no longer counts
/// against the connection's [`QUEUE_BYTES`].
#[derive(Debug)]
pub struct Chunks {
    rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Chunks {
    /// The next chunk; `None` once the trunk closed and everything was received.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let chunk = self.rx.recv().await?;
        self.queued.fetch_sub(chunk.len(), Ordering::Relaxed);
        Some(chunk)
    }
}

/// The reader's side of a logical connection.
struct Route {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// Splits `stream` into the logical connections `conns`.
pub fn split<S>(stream: S, conns: &[u32]) -> Trunk
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let mut senders = HashMap::new();
    let mut receivers = HashMap::new();
    for &conn in conns {
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        let queued = Arc::new(AtomicUsize::new(0));
        senders.insert(
            conn,
            Route {
                tx,
                queued: Arc::clone(&queued),
            },
        );
        receivers.insert(conn, Chunks { rx, queued });
    }
    let reader = tokio::spawn(read_frames(read, senders));
    Trunk {
        sender: Sender {
            writer: Arc::new(Mutex::new(Box::new(write))),
        },
        receivers,
        reader,
    }
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut read: R,
    senders: HashMap<u32, Route>,
) -> io::Result<()> {
    let mut header = [0_u8; FRAME_HEADER];
    loop {
        match read.read_exact(&mut header).await {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        }
        let (conn, length) = parse_frame_header(&header);
        if length > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {length} bytes for connection {conn} exceeds {MAX_FRAME}"),
            ));
        }
        let Some(route) = senders.get(&conn) else {
            tracing::debug!(conn, length, "dropping a frame for an unknown connection");
            skip(&mut read, length).await?;
            continue;
        };
        if length == 0 {
            continue;
        }
        // Checked before the payload is read: a peer that does not read its answers cannot
        // make the trunk hold more than the budget.
        let queued = route.queued.load(Ordering::Relaxed);
        if queued + length > QUEUE_BYTES {
            return Err(io::Error::other(format!(
                "connection {conn} has {queued} bytes queued and a frame of {length} more \
                 exceeds {QUEUE_BYTES}; closing the trunk"
            )));
        }
        let mut payload = vec![0_u8; length];
        read.read_exact(&mut payload).await?;
        route.queued.fetch_add(length, Ordering::Relaxed);
        match route.tx.try_send(Bytes::from(payload)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                route.queued.fetch_sub(length, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(io::Error::other(format!(
                    "connection {conn} has {QUEUE_FRAMES} frames queued; closing the trunk"
                )));
            }
        }
    }
}

/// Reads and discards `length` bytes (a frame nobody listens to is not buffered whole).
async fn skip<R: AsyncRead + Unpin>(read: &mut R, length: usize) -> io::Result<()> {
    let length = u64::try_from(length).unwrap_or(u64::MAX);
    let skipped = tokio::io::copy(&mut read.take(length), &mut tokio::io::sink()).await?;
    if skipped < length {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// `(conn id, payload length)` of a frame header.
pub fn parse_frame_header(header: &[u8; FRAME_HEADER]) -> (u32, usize) {
    let conn = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let length = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    (conn, usize::try_from(length).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_messages_travel_in_one_frame_large_ones_in_two() {
        let header = [7_u8; 10];
        let small = message_frames(2, &header, &[1; 4086]);
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].len(), 8 + 4096);
        assert_eq!(&small[0][..8], &[0, 0, 0, 2, 0, 0, 0x10, 0]);
        let large = message_frames(2, &header, &[1; 4087]);
        assert_eq!(large.len(), 2);
        assert_eq!(large[0], encode_frame(2, &header));
        assert_eq!(large[1].len(), 8 + 4087);
        let empty = message_frames(1, &header, &[]);
        assert_eq!(
            empty,
            vec![encode_frame(1, &header)],
            "a header alone, never an empty frame"
        );
    }

    #[tokio::test]
    async fn frames_are_routed_by_connection_and_unknown_ones_dropped() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut trunk = split(ours, &[PLUGIN_CONN, RUNTIME_CONN]);
        let mut wire = Vec::new();
        wire.extend(encode_frame(1, b"one"));
        wire.extend(encode_frame(9, b"nobody"));
        wire.extend(encode_frame(2, b"two"));
        wire.extend(encode_frame(1, b"more"));
        theirs.write_all(&wire).await.unwrap();
        drop(theirs);
        let plugin = trunk.receivers.get_mut(&PLUGIN_CONN).unwrap();
        assert_eq!(plugin.recv().await.unwrap(), Bytes::from_static(b"one"));
        assert_eq!(plugin.recv().await.unwrap(), Bytes::from_static(b"more"));
        let runtime = trunk.receivers.get_mut(&RUNTIME_CONN).unwrap();
        assert_eq!(runtime.recv().await.unwrap(), Bytes::from_static(b"two"));
        assert!(trunk.reader.await.unwrap().is_ok(), "a clean close");
    }

    #[tokio::test]
    async fn oversized_frames_and_queue_overflow_close_the_trunk() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let trunk = split(ours, &[PLUGIN_CONN]);
        let mut header = Vec::new();
        header.extend_from_slice(&1_u32.to_be_bytes());
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        theirs.write_all(&header).await.unwrap();
        let err = trunk.reader.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");

        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let trunk = split(ours, &[PLUGIN_CONN]);
        let mut wire = Vec::new();
        for _ in 0..=QUEUE_FRAMES {
            wire.extend(encode_frame(1, b"x"));
        }
        theirs.write_all(&wire).await.unwrap();
        let err = trunk.reader.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("frames queued"), "{err}");
        drop(trunk.receivers);
    }

    /// Memory is bounded in bytes, not frames: a peer that sends large frames nobody reads
    /// gets the trunk closed once a connection's queue would pass [`QUEUE_BYTES`], before the
    /// frame that would pass it is even read; what is received frees its budget.
    #[tokio::test]
    async fn a_connection_queues_at_most_its_byte_budget() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let mut trunk = split(ours, &[PLUGIN_CONN]);
        let big = vec![7_u8; MAX_FRAME];
        let writer = tokio::spawn(async move {
            for _ in 0..2 {
                theirs.write_all(&encode_frame(1, &big)).await.unwrap();
            }
            theirs
        });
        let mut theirs = writer.await.unwrap();
        // Two full frames queued: the budget is used up. Taking one frees room for one more.
        let chunks = trunk.receivers.get_mut(&PLUGIN_CONN).unwrap();
        assert_eq!(chunks.recv().await.unwrap().len(), MAX_FRAME);
        theirs
            .write_all(&encode_frame(1, &vec![1; MAX_FRAME]))
            .await
            .unwrap();
        // Now the queue holds 2 × 16 MiB again; one byte more closes the trunk, and the
        // frame is refused on its header alone.
        let mut header = Vec::new();
        header.extend_from_slice(&1_u32.to_be_bytes());
        header.extend_from_slice(&1_u32.to_be_bytes());
        theirs.write_all(&header).await.unwrap();
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), trunk.reader).await;
        let err = closed.expect("the trunk closed").unwrap().unwrap_err();
        assert!(err.to_string().contains("bytes queued"), "{err}");
    }
}
