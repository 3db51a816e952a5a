//! gRPC plumbing for the collective data plane, in domain types only.
//!
//! * Server side: implement [`PushHandler`] and wrap it with [`push_service`];
//!   add the result (optionally behind an interceptor) to a tonic `Server`.
//! * Client side: [`PushClient::push`] streams [`Frame`]s to a neighbour.

use std::future::Future;

use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::collective::{Frame, WireError};
use crate::wire;
use crate::wire::collective_client::CollectiveClient;
use crate::wire::collective_server::{Collective, CollectiveServer};

/// An error and its sources on one line, each cause once: transport errors say little
/// ("transport error") and keep the cause (a refused TLS certificate, say) in their sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        source = s.source();
    }
    line
}

/// Metadata key carrying the shared job token.
pub const TOKEN_METADATA_KEY: &str = "x-ringtrain-token";
/// The interceptor both services (coordinator and ring links) put in front of every call:
/// a request must carry `token` under [`TOKEN_METADATA_KEY`], compared in constant time (no
/// early exit that would tell a prober how much of a guess was right), or it is refused as
/// unauthenticated before the service sees it.
pub fn token_check(token: &str) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    let token: std::sync::Arc<[u8]> = std::sync::Arc::from(token.as_bytes());
    move |req: Request<()>| match req.metadata().get(TOKEN_METADATA_KEY) {
        Some(v) if constant_time_eq(v.as_bytes(), &token) => Ok(req),
        Some(_) => Err(Status::unauthenticated("wrong job token")),
        None => Err(Status::unauthenticated(format!(
            "missing job token (metadata {TOKEN_METADATA_KEY})"
        ))),
    }
}

/// Equal contents, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Metadata key carrying the sender's rank (decimal).
pub const RANK_METADATA_KEY: &str = "x-ringtrain-rank";
/// Metadata key carrying the job id.
pub const JOB_METADATA_KEY: &str = "x-ringtrain-job";
/// Metadata key carrying the ring's membership generation (decimal).
pub const GENERATION_METADATA_KEY: &str = "x-ringtrain-generation";

/// Why the next inbound frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// The stream broke (peer gone, connection reset, protocol error).
    #[error("stream failed: {0}")]
    Transport(Status),
    /// The peer sent a message that is not a valid frame.
    #[error("invalid frame: {0}")]
    Invalid(#[from] WireError),
    /// The peer sent bytes that are no message at all: over the size limit, or not protobuf.
    #[error("undecodable message: {}", .0.message())]
    Undecodable(Status),
}

/// The frames of one inbound `Push` stream, validated one by one.
#[derive(Debug)]
pub struct InboundFrames {
    inner: Streaming<wire::Frame>,
}

impl InboundFrames {
    /// Next frame; `Ok(None)` when the sender closed the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Frame>, InboundError> {
        match self.inner.message().await {
            Ok(Some(frame)) => Ok(Some(Frame::try_from(frame)?)),
            Ok(None) => Ok(None),
            // tonic's codec reports the peer's bytes with these codes; the transport's own
            // failures (reset, h2 protocol errors) come with others.
            Err(status)
                if status.code() == Code::OutOfRange
                    || (status.code() == Code::Internal && status.message().contains("decode")) =>
            {
                Err(InboundError::Undecodable(status))
            }
            Err(status) => Err(InboundError::Transport(status)),
        }
    }
}

/// Server-side handler of inbound `Push` streams.
pub trait PushHandler: Send + Sync + 'static {
    /// Handle one stream until it ends. Returns how many frames were accepted;
    /// an `Err` status is sent back to the pushing client.
    fn push(&self, metadata: MetadataMap, frames: InboundFrames) -> impl Future<Output = Result<u64, Status>> + Send;
}

/// Adapts a [`PushHandler`] to the generated tonic service trait.
#[derive(Debug)]
pub struct PushAdapter<H>(H);

#[tonic::async_trait]
impl<H: PushHandler> Collective for PushAdapter<H> {
    async fn push(&self, request: Request<Streaming<wire::Frame>>) -> Result<Response<wire::PushSummary>, Status> {
        let (metadata, _extensions, inner) = request.into_parts();
        let frames_received = self.0.push(metadata, InboundFrames { inner }).await?;
        Ok(Response::new(wire::PushSummary { frames_received }))
    }
}

/// The tonic service for `ringtrain.v1.Collective`, accepting messages of up to
/// `max_message_bytes` bytes.
pub fn push_service<H: PushHandler>(handler: H, max_message_bytes: usize) -> CollectiveServer<PushAdapter<H>> {
    CollectiveServer::new(PushAdapter(handler)).max_decoding_message_size(max_message_bytes)
}

/// Client for a neighbour's `Collective` service.
#[derive(Debug, Clone)]
pub struct PushClient {
    inner: CollectiveClient<Channel>,
}

impl PushClient {
    /// Wrap an established channel; messages up to `max_message_bytes` may be sent.
    pub fn new(channel: Channel, max_message_bytes: usize) -> Self {
        Self {
            inner: CollectiveClient::new(channel).max_encoding_message_size(max_message_bytes),
        }
    }

    /// Open a `Push` stream with the given request metadata and send `frames`
    /// on it. Resolves when the server answers: after the stream ends, or
    /// early when the server refuses the stream or rejects a frame. Returns the
    /// number of frames the server accepted.
    pub async fn push<S>(&mut self, metadata: MetadataMap, frames: S) -> Result<u64, Status>
    where
        S: Stream<Item = Frame> + Send + 'static,
    {
        let mut request = Request::new(frames.map(wire::Frame::from));
        *request.metadata_mut() = metadata;
        let response = self.inner.push(request).await?;
        Ok(response.into_inner().frames_received)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_token_check_lets_only_the_whole_token_through() {
        let check = token_check("s3cret");
        let with = |t: Option<&str>| {
            let mut r = Request::new(());
            if let Some(t) = t {
                r.metadata_mut().insert(TOKEN_METADATA_KEY, t.parse().unwrap());
            }
            check(r).map(drop).map_err(|s| (s.code(), s.message().to_owned()))
        };
        assert!(with(Some("s3cret")).is_ok());
        for wrong in ["s3creT", "s3cre", "s3crets", ""] {
            let err = with(Some(wrong)).unwrap_err();
            assert_eq!(
                err,
                (tonic::Code::Unauthenticated, "wrong job token".into()),
                "{wrong:?}"
            );
        }
        let err = with(None).unwrap_err();
        assert_eq!(err.0, tonic::Code::Unauthenticated);
        assert!(err.1.contains("missing job token"), "{}", err.1);
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
    }
}
