//! The local plane: the trainer socket. Each trainer connection is served by
//! its own thread with blocking IO (trainers per node are few, and a blocking
//! `recvmsg` is the simplest way to receive the memory file descriptors that
//! ride along as `SCM_RIGHTS`). Every request is validated before it reaches
//! the runner; a bad one gets an error answer and the connection stays up.
//! The HTTP endpoint (metrics and the admin API) lives here too.

pub mod admin;
pub mod http;
pub mod shm;

use std::collections::{HashMap, VecDeque};
use std::io::{IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use phalanx_protocol::checkpoint::{CheckpointId, SaveOutcome};
use phalanx_protocol::local::CheckpointInfo;
use phalanx_protocol::local::{
    decode_local, encode_local, local_limits, stream_op_id, LocalErrorCode, LocalKind,
    LocalRequest, LocalResponse,
};
use phalanx_protocol::node::{Buffer, JoinRequest, OpDone, OpError, Request, RequestId};
use phalanx_protocol::wire::{DType, EnvelopeHeader, ENVELOPE_LEN, PROTOCOL_VERSION};
use phalanx_protocol::{MemberId, OpId, Step};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::bus::{CheckpointCall, GroupView, Reply, TrainerCall};
use shm::Mapping;

/// A byte range of a trainer's shared buffer: the memory a trainer's op
/// runs in.
#[derive(Clone, Debug)]
pub struct Region {
    map: Arc<Mapping>,
    offset: usize,
    len: usize,
}

impl Buffer for Region {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: a region is lent to the runner for one request at a time
        // (the trainer does not touch it until the request is answered), and
        // no two regions of one connection are lent at once.
        unsafe { self.map.range(self.offset, self.len) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above.
        unsafe { self.map.range(self.offset, self.len) }
    }
}

/// What the local plane needs from the daemon.
#[derive(Clone, Debug)]
pub struct LocalContext {
    /// This member.
    pub me: MemberId,
    /// The group as the control plane last applied it.
    pub view: tokio::sync::watch::Receiver<GroupView>,
    /// The runner.
    pub runner: mpsc::Sender<TrainerCall<Region>>,
    /// Largest tensor a trainer may submit.
    pub max_tensor_bytes: u64,
    /// Every stream trainers have issued: whether a connection holds it now
    /// (two at once would number ops inconsistently) and how many ops it has
    /// issued (a reconnecting trainer continues the numbering, so op ids stay
    /// unique within the epoch).
    pub streams: Arc<Mutex<std::collections::BTreeMap<u32, StreamState>>>,
    /// The checkpoint task.
    pub checkpoints: mpsc::Sender<CheckpointCall>,
}

/// Binds the socket with mode 0660. A stale socket file (no daemon behind it)
/// is replaced; a live one is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running daemon", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the trainer socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Trainer connections: a handle on each socket, to close it, and its thread.
type Connections = Arc<Mutex<Vec<(UnixStream, std::thread::JoinHandle<()>)>>>;

/// The accept loop and its connections, stoppable from another thread.
#[derive(Debug)]
pub struct LocalServer {
    path: PathBuf,
    conns: Connections,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    accept_thread: Option<std::thread::JoinHandle<()>>,
}

impl LocalServer {
    /// Starts accepting trainers on `listener`.
    pub fn start(listener: UnixListener, path: PathBuf, ctx: LocalContext) -> LocalServer {
        let conns: Connections = Arc::default();
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s) = (conns.clone(), stopping.clone());
        let accept_thread = std::thread::Builder::new()
            .name("phalanx-local".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if s.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let Ok(clone) = stream.try_clone() else { continue };
                    let ctx = ctx.clone();
                    let spawned = std::thread::Builder::new().name("phalanx-trainer".into()).spawn(move || {
                        if let Err(e) = serve(stream, &ctx) {
                            warn!(error = %format!("{e:#}"), "trainer connection ended with an error");
                        }
                    });
                    if let Ok(handle) = spawned {
                        c.lock().expect("poisoned").push((clone, handle));
                    }
                }
            })
            .expect("spawning the local accept thread");
        LocalServer {
            path,
            conns,
            stopping,
            accept_thread: Some(accept_thread),
        }
    }

    /// Stops accepting, disconnects every trainer and removes the socket file.
    /// Call it after the runner has stopped: each connection first writes the
    /// answer to its pending request (the runner's "shutting down"), then sees
    /// its read side closed and ends.
    pub fn stop(mut self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path); // wakes the accept loop
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let conns: Vec<_> = self.conns.lock().expect("poisoned").drain(..).collect();
        for (stream, handle) in conns {
            let _ = stream.shutdown(std::net::Shutdown::Read);
            let _ = handle.join();
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads exactly `buf.len()` bytes, keeping any descriptors that arrive.
fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let res = rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut buf[got..])],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for msg in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = msg {
                fds.extend(received);
            }
        }
        if res.bytes == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += res.bytes;
    }
    Ok(true)
}

fn send(stream: &mut UnixStream, resp: &LocalResponse) -> std::io::Result<()> {
    let bytes = encode_local(resp);
    stream.write_all(&bytes)
}

fn done_response(done: OpDone) -> LocalResponse {
    LocalResponse::Done {
        op: done.op,
        epoch: done.epoch,
        contributors: done.contributors,
        waiting: done.waiting,
        meta: done.meta,
    }
}

/// The trainer's answer for a failed op.
fn op_error(e: OpError) -> LocalResponse {
    match e {
        OpError::Rejected(m) => error(LocalErrorCode::BadRequest, m),
        OpError::Aborted(r) => error(LocalErrorCode::Aborted, r.to_string()),
        OpError::NoQuorum(m) => error(LocalErrorCode::NoQuorum, m),
        OpError::ShuttingDown => error(LocalErrorCode::ShuttingDown, "the daemon is shutting down"),
    }
}

fn error(code: LocalErrorCode, message: impl Into<String>) -> LocalResponse {
    LocalResponse::Error {
        code,
        message: message.into(),
    }
}

fn serve(mut stream: UnixStream, ctx: &LocalContext) -> Result<()> {
    // A second handle, for the stream registry's liveness check.
    let conn_handle = stream
        .try_clone()
        .context("cloning the trainer connection")?;
    let mut fds = VecDeque::new();
    let mut buffers: HashMap<u32, Arc<Mapping>> = HashMap::new();
    // The stream this connection claimed, released when it ends.
    let mut claim = StreamClaim {
        streams: ctx.streams.clone(),
        stream: None,
        id: NEXT_CLAIM.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    };
    let limits = local_limits();
    let mut env = [0u8; ENVELOPE_LEN];
    loop {
        if !recv_exact(&stream, &mut env, &mut fds)? {
            debug!("trainer disconnected");
            return Ok(());
        }
        let header = match EnvelopeHeader::decode(&env, &limits) {
            Ok(h) => h,
            Err(e) => {
                // Framing is lost: answer and hang up.
                send(
                    &mut stream,
                    &error(LocalErrorCode::BadRequest, format!("bad envelope: {e}")),
                )?;
                bail!("bad envelope from trainer: {e}");
            }
        };
        let mut body = vec![0u8; header.body_len as usize];
        if !recv_exact(&stream, &mut body, &mut fds)? {
            bail!("trainer hung up inside a message");
        }
        let req: LocalRequest = match decode_local(&header, &body) {
            Ok(r) => r,
            Err(e) => {
                send(
                    &mut stream,
                    &error(LocalErrorCode::BadRequest, format!("bad request: {e}")),
                )?;
                continue;
            }
        };
        let resp = match req {
            LocalRequest::Hello {
                protocol_version,
                pid,
                stream,
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    error(
                        LocalErrorCode::UnsupportedVersion,
                        format!("client protocol {protocol_version}, daemon {PROTOCOL_VERSION}"),
                    )
                } else if stream > OpId::MAX_STREAM {
                    // Op ids carry the stream in 24 bits: a larger id would
                    // share ops with another stream.
                    error(
                        LocalErrorCode::BadRequest,
                        format!(
                            "stream {stream} is too large: stream ids go up to {}",
                            OpId::MAX_STREAM
                        ),
                    )
                } else if let Err(message) = claim.claim(stream, &conn_handle) {
                    error(LocalErrorCode::BadRequest, message)
                } else {
                    info!(pid, stream, "trainer connected");
                    let view = ctx.view.borrow();
                    LocalResponse::Welcome {
                        member: ctx.me,
                        members: view.group.ring(),
                        epoch: view.group.epoch,
                    }
                }
            }
            LocalRequest::RegisterBuffer { buffer, len_bytes } => match fds.pop_front() {
                None => error(
                    LocalErrorCode::BadRequest,
                    "RegisterBuffer must carry a memory fd (SCM_RIGHTS)",
                ),
                Some(fd) => {
                    match Mapping::map(fd, len_bytes, ctx.max_tensor_bytes.saturating_mul(2)) {
                        Ok(map) => {
                            buffers.insert(buffer, Arc::new(map));
                            LocalResponse::Registered { buffer }
                        }
                        Err(e) => {
                            error(LocalErrorCode::BadRequest, format!("buffer {buffer}: {e}"))
                        }
                    }
                }
            },
            LocalRequest::Join {
                buffer,
                offset_bytes,
                dtype,
                len,
                holds,
            } => match claim
                .stream
                .ok_or_else(|| "say hello before joining".to_string())
                .and_then(|stream| {
                    let kind = LocalKind::StateSync;
                    region(ctx, &buffers, buffer, offset_bytes, kind, dtype, len)
                        .map(|region| (stream, region))
                }) {
                Err(message) => error(LocalErrorCode::BadRequest, message),
                Ok((stream, region)) => {
                    let (reply, rx) = oneshot::channel();
                    let join = JoinRequest {
                        // The runner names the request.
                        id: RequestId(0),
                        stream,
                        dtype,
                        len: len as usize,
                        holds,
                        buffer: region,
                    };
                    let join = TrainerCall::Join(join, reply);
                    match call(ctx, join, rx) {
                        Ok(done) => {
                            // The stream goes on after the hand-over op.
                            claim.continue_after(done.op);
                            info!(stream, op = %done.op, "trainer joined");
                            done_response(done)
                        }
                        Err(e) => op_error(e),
                    }
                }
            },
            LocalRequest::Collective {
                buffer,
                offset_bytes,
                kind,
                dtype,
                len,
                samples,
            } => match claim.next_op().and_then(|op| {
                if samples.is_some() && !matches!(kind, LocalKind::AllReduce(_)) {
                    return Err("sample counts are for all-reduce only".into());
                }
                region(ctx, &buffers, buffer, offset_bytes, kind, dtype, len)
                    .map(|region| (op, region))
            }) {
                Err(message) => error(LocalErrorCode::BadRequest, message),
                Ok((op, region)) => {
                    let (reply, rx) = oneshot::channel();
                    let req = Request {
                        id: RequestId(0),
                        op,
                        kind,
                        dtype,
                        len: len as usize,
                        samples,
                        buffer: region,
                    };
                    let submit = TrainerCall::Submit(req, reply);
                    match call(ctx, submit, rx) {
                        Ok(done) => done_response(done),
                        Err(e) => op_error(e),
                    }
                }
            },
            LocalRequest::Checkpoint {
                buffer,
                offset_bytes,
                len_bytes,
                step,
                holds,
            } => match claim.stream_range(&buffers, buffer, offset_bytes, len_bytes) {
                Err(message) => error(LocalErrorCode::BadRequest, message),
                Ok((stream, region)) => checkpoint(
                    ctx,
                    CheckpointId {
                        stream,
                        step: Step(step),
                    },
                    holds,
                    &region,
                ),
            },
            LocalRequest::AwaitCheckpoint { step } => match claim.stream {
                None => error(LocalErrorCode::BadRequest, "say hello first"),
                Some(stream) => {
                    let id = CheckpointId {
                        stream,
                        step: Step(step),
                    };
                    match ask(ctx, |reply| CheckpointCall::Await { id, reply }) {
                        Some(outcome) => ended(step, outcome, &ctx.view.borrow(), id),
                        None => stopping(),
                    }
                }
            },
            LocalRequest::Restore {
                buffer,
                offset_bytes,
                len_bytes,
            } => match claim.stream_range(&buffers, buffer, offset_bytes, len_bytes) {
                Err(message) => error(LocalErrorCode::BadRequest, message),
                Ok((stream, mut region)) => restore(ctx, stream, &mut region),
            },
            LocalRequest::ListCheckpoints => match claim.stream {
                None => error(LocalErrorCode::BadRequest, "say hello first"),
                Some(stream) => LocalResponse::Checkpoints {
                    list: ctx
                        .view
                        .borrow()
                        .group
                        .checkpoints
                        .committed
                        .get(&stream)
                        .into_iter()
                        .flatten()
                        .map(|m| CheckpointInfo {
                            step: m.id.step.0,
                            epoch: m.epoch,
                            bytes: m.size(),
                            holders: m.holders.clone(),
                        })
                        .collect(),
                },
            },
        };
        send(&mut stream, &resp)?;
    }
}

/// Bytes `offset_bytes..offset_bytes + len_bytes` of a registered buffer.
fn bytes_of(
    buffers: &HashMap<u32, Arc<Mapping>>,
    buffer: u32,
    offset_bytes: u64,
    len_bytes: u64,
) -> Result<Region, String> {
    let map = buffers
        .get(&buffer)
        .ok_or_else(|| format!("buffer {buffer} is not registered"))?;
    let end = offset_bytes
        .checked_add(len_bytes)
        .ok_or("range overflows")?;
    if end > map.len() as u64 {
        return Err(format!(
            "bytes {offset_bytes}..{end} lie outside buffer {buffer} ({} bytes)",
            map.len()
        ));
    }
    Ok(Region {
        map: map.clone(),
        offset: offset_bytes as usize,
        len: len_bytes as usize,
    })
}

/// The snapshot phase: waits until the keeper lets this state be copied
/// (the stream's previous copy may still be being written), copies it out,
/// and answers; the checkpoint task persists it after.
fn checkpoint(
    ctx: &LocalContext,
    id: CheckpointId,
    holds: Option<phalanx_protocol::wire::Held>,
    region: &Region,
) -> LocalResponse {
    match ask(ctx, |reply| CheckpointCall::Save { id, holds, reply }) {
        None => stopping(),
        Some(Err(why)) => error(LocalErrorCode::BadRequest, why),
        Some(Ok(())) => {
            let t = std::time::Instant::now();
            let bytes = region.as_bytes().to_vec();
            metrics::histogram!(crate::metrics::CHECKPOINT_SNAPSHOT_SECONDS)
                .record(t.elapsed().as_secs_f64());
            if ctx
                .checkpoints
                .blocking_send(CheckpointCall::Snapped { id, bytes })
                .is_err()
            {
                return stopping();
            }
            LocalResponse::Snapshotted { step: id.step.0 }
        }
    }
}

/// Asks the checkpoint task and waits for its answer; `None` when the
/// daemon is stopping.
fn ask<T>(
    ctx: &LocalContext,
    call: impl FnOnce(oneshot::Sender<T>) -> CheckpointCall,
) -> Option<T> {
    let (reply, rx) = oneshot::channel();
    ctx.checkpoints.blocking_send(call(reply)).ok()?;
    rx.blocking_recv().ok()
}

fn stopping() -> LocalResponse {
    error(LocalErrorCode::ShuttingDown, "the daemon is stopping")
}

fn ended(step: u64, outcome: SaveOutcome, view: &GroupView, id: CheckpointId) -> LocalResponse {
    let (committed, detail) = match outcome {
        SaveOutcome::Committed => {
            let holders = view
                .group
                .checkpoints
                .get(id)
                .map(|m| m.holders.clone())
                .unwrap_or_default();
            (true, format!("committed, held by {holders:?}"))
        }
        SaveOutcome::Superseded(by) => (
            false,
            format!(
                "step {} of the stream was committed first; this one never will be",
                by.step.0
            ),
        ),
        SaveOutcome::Failed(why) => (false, why),
    };
    LocalResponse::CheckpointEnded {
        step,
        committed,
        detail,
    }
}

/// Reads the stream's latest committed checkpoint into `region`, which must
/// be its size.
fn restore(ctx: &LocalContext, stream: u32, region: &mut Region) -> LocalResponse {
    match ask(ctx, |reply| CheckpointCall::Restore { stream, reply }) {
        None => stopping(),
        Some(Err(why)) => error(LocalErrorCode::Aborted, why),
        Some(Ok((manifest, bytes))) => {
            let id = manifest.id;
            if bytes.len() != region.len {
                return error(
                    LocalErrorCode::BadRequest,
                    format!(
                        "the checkpoint of step {} holds {} bytes; the buffer given is {}",
                        id.step.0,
                        bytes.len(),
                        region.len
                    ),
                );
            }
            region.as_bytes_mut().copy_from_slice(&bytes);
            LocalResponse::Restored {
                step: id.step.0,
                holds: manifest.held,
            }
        }
    }
}

/// Hands `call` to the runner and waits for its answer.
fn call(
    ctx: &LocalContext,
    call: TrainerCall<Region>,
    rx: oneshot::Receiver<Reply<Region>>,
) -> Result<OpDone, OpError> {
    ctx.runner
        .blocking_send(call)
        .map_err(|_| OpError::ShuttingDown)?;
    match rx.blocking_recv() {
        Ok(reply) => reply.outcome,
        Err(_) => Err(OpError::ShuttingDown),
    }
}

/// One collective stream at this daemon.
#[derive(Debug, Default)]
pub struct StreamState {
    /// The connection issuing it now: an id and a handle to check it is alive.
    holder: Option<(u64, UnixStream)>,
    issued: u64,
}

/// Whether the trainer behind `stream` has hung up (its end is closed).
fn hung_up(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        rustix::net::recv(stream, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT),
        Ok((0, _)) | Err(rustix::io::Errno::CONNRESET)
    )
}

/// A connection's claim on its stream.
struct StreamClaim {
    streams: Arc<Mutex<std::collections::BTreeMap<u32, StreamState>>>,
    stream: Option<u32>,
    id: u64,
}

static NEXT_CLAIM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl StreamClaim {
    /// The claimed stream and bytes `offset_bytes..offset_bytes +
    /// len_bytes` of a registered buffer: what a checkpoint or a restore
    /// works on.
    fn stream_range(
        &self,
        buffers: &HashMap<u32, Arc<Mapping>>,
        buffer: u32,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(u32, Region), String> {
        let stream = self.stream.ok_or("say hello first")?;
        bytes_of(buffers, buffer, offset_bytes, len_bytes).map(|r| (stream, r))
    }

    fn claim(&mut self, stream: u32, conn: &UnixStream) -> Result<(), String> {
        if self.stream.is_some() {
            return Err("hello was already said on this connection".into());
        }
        let mut streams = self.streams.lock().expect("poisoned");
        let state = streams.entry(stream).or_default();
        // A trainer that restarts quickly finds its old connection not yet
        // reaped: if that one has hung up, the new one takes the stream over.
        if let Some((_, old)) = &state.holder {
            if !hung_up(old) {
                return Err(format!(
                    "stream {stream} is already issued by another connection to this daemon; \
                     give each concurrent trainer connection its own stream"
                ));
            }
        }
        let handle = conn
            .try_clone()
            .map_err(|e| format!("cloning the connection: {e}"))?;
        state.holder = Some((self.id, handle));
        self.stream = Some(stream);
        Ok(())
    }

    /// After a join: the stream's next op follows `op`.
    fn continue_after(&mut self, op: OpId) {
        if let Some(stream) = self.stream {
            if let Some(state) = self.streams.lock().expect("poisoned").get_mut(&stream) {
                state.issued = op.seq();
            }
        }
    }

    fn next_op(&mut self) -> Result<OpId, String> {
        let stream = self.stream.ok_or("say hello before issuing collectives")?;
        let mut streams = self.streams.lock().expect("poisoned");
        let state = streams.get_mut(&stream).expect("claimed");
        if state.holder.as_ref().map(|(id, _)| *id) != Some(self.id) {
            return Err(format!(
                "stream {stream} was taken over by a newer connection"
            ));
        }
        state.issued += 1;
        Ok(stream_op_id(stream, state.issued))
    }
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        if let Some(s) = self.stream {
            if let Some(state) = self.streams.lock().expect("poisoned").get_mut(&s) {
                if state.holder.as_ref().map(|(id, _)| *id) == Some(self.id) {
                    state.holder = None;
                }
            }
        }
    }
}

/// The bytes of `buffer` an op of `len` elements of `kind` works in,
/// checked against the mapping and the tensor bound.
fn region(
    ctx: &LocalContext,
    buffers: &HashMap<u32, Arc<Mapping>>,
    buffer: u32,
    offset_bytes: u64,
    kind: LocalKind,
    dtype: DType,
    len: u64,
) -> Result<Region, String> {
    if !buffers.contains_key(&buffer) {
        return Err(format!("buffer {buffer} is not registered"));
    }
    let ring = ctx.view.borrow().group.ring();
    let n = ring.len() as u64;
    let elems = match kind {
        LocalKind::AllGather => len.checked_mul(n).ok_or("length overflows")?,
        LocalKind::Barrier => 0,
        _ => len,
    };
    if let LocalKind::Broadcast(root) = kind {
        if !ring.contains(&root) {
            return Err(format!("broadcast root {root} is not a member"));
        }
    }
    let bytes = elems
        .checked_mul(dtype.size_bytes() as u64)
        .ok_or("length overflows")?;
    if bytes > ctx.max_tensor_bytes {
        return Err(format!(
            "tensor of {bytes} bytes exceeds the limit of {}",
            ctx.max_tensor_bytes
        ));
    }
    bytes_of(buffers, buffer, offset_bytes, bytes)
}
