//! NRI's wire layers on arbitrary bytes from the runtime's side of the socket: connection
//! multiplexing, ttrpc reassembly, request decoding and NRI message decoding. Never a panic,
//! and everything the plugin writes back is well-formed: frames on connection 1 carrying whole
//! ttrpc responses.
#![no_main]
#![allow(dead_code, reason = "the target uses part of the modules")]

use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

mod proto {
    pub mod ttrpc {
        include!(concat!(env!("OUT_DIR"), "/ttrpc.rs"));
    }
    pub mod nri {
        include!(concat!(env!("OUT_DIR"), "/nri.pkg.api.v1alpha1.rs"));
    }
}
#[path = "../../src/nri/mux.rs"]
mod mux;
#[path = "../../src/nri/ttrpc.rs"]
mod ttrpc;

use proto::nri as api;

/// Decodes requests the way knd's plugin does, by method.
struct Decoder;

impl ttrpc::Service for Decoder {
    fn call(&self, _service: &str, method: &str, payload: Bytes) -> ttrpc::Reply {
        let decoded = match method {
            "Configure" => api::ConfigureRequest::decode(payload).map(|_| ()),
            "Synchronize" => api::SynchronizeRequest::decode(payload).map(|_| ()),
            "StateChange" => api::StateChangeEvent::decode(payload).map(|_| ()),
            "CreateContainer" => api::CreateContainerRequest::decode(payload).map(|_| ()),
            "RunPodSandbox" | "StopPodSandbox" | "RemovePodSandbox" => {
                api::PodSandboxRequest::decode(payload).map(|_| ())
            }
            _ => Ok(()),
        };
        let answer = decoded
            .map(|()| api::Empty {}.encode_to_vec())
            .map_err(|e| ttrpc::Status::new(ttrpc::code::INVALID_ARGUMENT, e.to_string()));
        Box::pin(async move { answer })
    }
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let written = runtime.block_on(async {
        let (plugin_end, runtime_end) = tokio::io::duplex(1 << 16);
        let mut trunk = mux::split(plugin_end, &[mux::PLUGIN_CONN, mux::RUNTIME_CONN]);
        let requests = trunk.receivers.remove(&mux::PLUGIN_CONN).expect("requested");
        let server = tokio::spawn(ttrpc::serve(
            ttrpc::MessageReader::new(requests),
            trunk.sender.clone(),
            mux::PLUGIN_CONN,
            Arc::new(Decoder),
        ));
        drop(trunk.sender);
        drop(trunk.receivers);
        let (mut from_plugin, mut to_plugin) = tokio::io::split(runtime_end);
        let write = async {
            let _ = to_plugin.write_all(data).await;
            let _ = to_plugin.shutdown().await;
            drop(to_plugin);
            let _ = trunk.reader.await;
            let _ = server.await;
        };
        let read = async {
            let mut out = Vec::new();
            let _ = from_plugin.read_to_end(&mut out).await;
            out
        };
        let ((), out) = tokio::join!(write, read);
        out
    });
    // Whatever came back: whole frames on connection 1, each message a decodable response.
    let mut rest = &written[..];
    let mut reassembler = ttrpc::Reassembler::default();
    while !rest.is_empty() {
        assert!(rest.len() >= 8, "a partial frame header");
        let header: [u8; 8] = rest[..8].try_into().expect("8 bytes");
        let (conn, length) = mux::parse_frame_header(&header);
        assert_eq!(conn, mux::PLUGIN_CONN);
        assert!(length > 0 && rest.len() >= 8 + length, "an empty or partial frame");
        reassembler.push(&rest[8..8 + length]);
        rest = &rest[8 + length..];
        while let Some(message) = reassembler.pop() {
            let ttrpc::Incoming::Message(header, payload) = message else {
                panic!("the plugin wrote an oversized message");
            };
            assert_eq!(header.kind, ttrpc::RESPONSE);
            proto::ttrpc::Response::decode(payload).expect("a decodable response");
        }
    }
});
