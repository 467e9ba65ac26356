//! The connection to the local daemon.

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;

use half::{bf16, f16};
use phalanx_protocol::local::{
    decode_local, encode_local, local_limits, CheckpointInfo, LocalErrorCode, LocalKind,
    LocalRequest, LocalResponse, StepMeta,
};
use phalanx_protocol::wire::{
    DType, EnvelopeHeader, Held, ReduceOp, ENVELOPE_LEN, PROTOCOL_VERSION,
};
use phalanx_protocol::{Epoch, MemberId, OpId};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use thiserror::Error;

/// An element type the daemon can reduce.
pub trait Element: bytemuck::Pod + Send + 'static {
    /// Its wire dtype.
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}

/// What a collective reports besides its result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpInfo {
    /// The group's id for the op.
    pub op: OpId,
    /// The membership epoch it ran in.
    pub epoch: Epoch,
    /// The members whose inputs the result combines (a `Mean` divides by
    /// their number).
    pub contributors: Vec<MemberId>,
    /// Members that (re)joined the group and wait for the trainers' state on
    /// this stream: call [`Client::admit`] at the next step boundary.
    pub waiting: Vec<MemberId>,
    /// The step's quorum (all-reduce under a quorum policy): who was left
    /// out and why, sample counts, whether this member is behind or a
    /// demoted observer.
    pub meta: StepMeta,
}

impl OpInfo {
    fn from_done(resp: LocalResponse) -> Result<OpInfo, ClientError> {
        match resp {
            LocalResponse::Done {
                op,
                epoch,
                contributors,
                waiting,
                meta,
            } => Ok(OpInfo {
                op,
                epoch,
                contributors,
                waiting,
                meta,
            }),
            other => Err(ClientError::Protocol(format!(
                "expected Done, got {other:?}"
            ))),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket or the shared memory failed.
    #[error("I/O with the daemon failed: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The daemon refused the request (bad sizes, unknown root, ...).
    #[error("the daemon refused the request: {0}")]
    BadRequest(String),
    /// The collective was aborted (a member went down, a timeout).
    #[error("the collective was aborted: {0}")]
    Aborted(String),
    /// The group cannot go on with this member: it is cut off from a
    /// majority of the daemons, or the group finished the op without it.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The daemon is shutting down.
    #[error("the daemon is shutting down: {0}")]
    ShuttingDown(String),
    /// The daemon speaks another protocol version.
    #[error("version mismatch: {0}")]
    Version(String),
    /// A checkpoint was not committed, and never will be.
    #[error("the checkpoint was not committed: {0}")]
    Checkpoint(String),
}

impl From<rustix::io::Errno> for ClientError {
    fn from(e: rustix::io::Errno) -> Self {
        ClientError::Io(e.into())
    }
}

/// A shared, sealed memory file mapped into this process.
#[derive(Debug)]
struct Arena {
    id: u32,
    ptr: NonNull<u8>,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: plain memory owned by this arena.
unsafe impl Send for Arena {}

impl Arena {
    fn new(id: u32, len: usize) -> Result<(Arena, OwnedFd), ClientError> {
        let fd = rustix::fs::memfd_create(
            "phalanx-tensor",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        // The daemon maps this file; sealing it against shrinking means no one
        // can truncate it under the daemon's mapping.
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::SEAL)?;
        // SAFETY: a fresh shared mapping of a file of `len` bytes.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        let dup = fd.try_clone()?;
        Ok((
            Arena {
                id,
                ptr: NonNull::new(ptr.cast()).expect("mmap success is non-null"),
                len,
                _fd: fd,
            },
            dup,
        ))
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: mapped for `len` bytes; `&mut self` gives exclusivity here,
        // and the daemon touches it only while a call blocks on it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A blocking connection to the node's daemon. One trainer per daemon; calls
/// must be made in the same order on every member (as with MPI or NCCL).
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    member: MemberId,
    members: Vec<MemberId>,
    arena: Arena,
    /// The last op completed on this connection: the state a trainer
    /// passes to [`Client::join`] includes its result.
    last_op: Option<Held>,
}

const MIN_ARENA: usize = 1 << 20;

impl Client {
    /// Connects to the daemon's socket and says hello, issuing stream 0.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_stream(path, 0)
    }

    /// Connects issuing collective stream `stream`. Each stream is an
    /// independent ordered sequence of collectives (like a NCCL
    /// communicator): every member must issue a stream's calls in the same
    /// order, and concurrent connections to one daemon need distinct streams.
    /// Collectives of different streams run concurrently.
    pub fn connect_stream(path: impl AsRef<Path>, stream_id: u32) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| {
            ClientError::Io(std::io::Error::new(
                e.kind(),
                format!("connecting to {}: {e}", path.display()),
            ))
        })?;
        let (arena, fd) = Arena::new(1, MIN_ARENA)?;
        let mut client = Client {
            stream,
            member: MemberId(0),
            members: Vec::new(),
            arena,
            last_op: None,
        };
        let hello = LocalRequest::Hello {
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            stream: stream_id,
        };
        match client.call(&hello, None)? {
            LocalResponse::Welcome {
                member, members, ..
            } => {
                client.member = member;
                client.members = members;
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected a welcome, got {other:?}"
                )))
            }
        }
        client.register(fd)?;
        Ok(client)
    }

    /// This node's member id.
    pub fn member(&self) -> MemberId {
        self.member
    }

    /// The group, in ring order.
    pub fn members(&self) -> &[MemberId] {
        &self.members
    }

    fn register(&mut self, fd: OwnedFd) -> Result<(), ClientError> {
        let req = LocalRequest::RegisterBuffer {
            buffer: self.arena.id,
            len_bytes: self.arena.len as u64,
        };
        match self.call(&req, Some(fd))? {
            LocalResponse::Registered { buffer } if buffer == self.arena.id => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "expected Registered, got {other:?}"
            ))),
        }
    }

    fn ensure_arena(&mut self, bytes: usize) -> Result<(), ClientError> {
        if bytes <= self.arena.len {
            return Ok(());
        }
        let len = bytes.max(self.arena.len * 2).next_multiple_of(4096);
        let (arena, fd) = Arena::new(self.arena.id + 1, len)?;
        self.arena = arena;
        self.register(fd)
    }

    fn call(
        &mut self,
        req: &LocalRequest,
        fd: Option<OwnedFd>,
    ) -> Result<LocalResponse, ClientError> {
        let bytes = encode_local(req);
        match fd {
            Some(fd) => {
                let fds = [fd.as_fd()];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut cmsg = SendAncillaryBuffer::new(&mut space);
                cmsg.push(SendAncillaryMessage::ScmRights(&fds));
                let sent = rustix::net::sendmsg(
                    &self.stream,
                    &[IoSlice::new(&bytes)],
                    &mut cmsg,
                    SendFlags::empty(),
                )?;
                self.stream.write_all(&bytes[sent..])?;
            }
            None => self.stream.write_all(&bytes)?,
        }
        let mut env = [0u8; ENVELOPE_LEN];
        self.stream.read_exact(&mut env)?;
        let header = EnvelopeHeader::decode(&env, &local_limits())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut body = vec![0u8; header.body_len as usize];
        self.stream.read_exact(&mut body)?;
        let resp: LocalResponse =
            decode_local(&header, &body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let LocalResponse::Done { op, epoch, .. } = &resp {
            self.last_op = Some(Held {
                seq: op.seq(),
                epoch: *epoch,
            });
        }
        match resp {
            LocalResponse::Error { code, message } => Err(match code {
                LocalErrorCode::BadRequest => ClientError::BadRequest(message),
                LocalErrorCode::Aborted => ClientError::Aborted(message),
                LocalErrorCode::ShuttingDown => ClientError::ShuttingDown(message),
                LocalErrorCode::UnsupportedVersion => ClientError::Version(message),
                LocalErrorCode::NoQuorum => ClientError::NoQuorum(message),
            }),
            ok => Ok(ok),
        }
    }

    /// Runs one collective over the arena's first `bytes` bytes.
    fn collective(
        &mut self,
        kind: LocalKind,
        dtype: DType,
        len: usize,
        samples: Option<u64>,
    ) -> Result<OpInfo, ClientError> {
        let req = LocalRequest::Collective {
            buffer: self.arena.id,
            offset_bytes: 0,
            kind,
            dtype,
            len: len as u64,
            samples,
        };
        OpInfo::from_done(self.call(&req, None)?)
    }

    fn stage<T: Element>(&mut self, offset: usize, data: &[T]) {
        let src: &[u8] = bytemuck::cast_slice(data);
        self.arena.bytes()[offset..offset + src.len()].copy_from_slice(src);
    }

    fn unstage<T: Element>(&mut self, offset: usize, out: &mut [T]) {
        let dst: &mut [u8] = bytemuck::cast_slice_mut(out);
        let n = dst.len();
        dst.copy_from_slice(&self.arena.bytes()[offset..offset + n]);
    }

    /// The shared-memory staging area viewed as `len` elements of `T`, grown
    /// if needed (growing discards its contents). Write inputs here and run a
    /// `*_staged` collective: no copy into or out of shared memory at all.
    pub fn staging<T: Element>(&mut self, len: usize) -> Result<&mut [T], ClientError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| ClientError::BadRequest(format!("{len} elements overflow")))?;
        self.ensure_arena(bytes)?;
        // The arena is page-aligned, so the cast cannot fail on alignment.
        Ok(bytemuck::cast_slice_mut(&mut self.arena.bytes()[..bytes]))
    }

    /// All-reduces the first `len` elements of the staging area in place
    /// (see [`Client::staging`]).
    pub fn all_reduce_staged<T: Element>(
        &mut self,
        len: usize,
        op: ReduceOp,
    ) -> Result<OpInfo, ClientError> {
        if len * std::mem::size_of::<T>() > self.arena.len {
            return Err(ClientError::BadRequest(format!(
                "{len} elements exceed the staging area; size it with staging() first"
            )));
        }
        self.collective(LocalKind::AllReduce(op), T::DTYPE, len, None)
    }

    /// Reduces `data` with every member's, in place.
    pub fn all_reduce<T: Element>(
        &mut self,
        data: &mut [T],
        op: ReduceOp,
    ) -> Result<OpInfo, ClientError> {
        self.ensure_arena(std::mem::size_of_val(data))?;
        self.stage(0, data);
        let info = self.collective(LocalKind::AllReduce(op), T::DTYPE, data.len(), None)?;
        self.unstage(0, data);
        Ok(info)
    }

    /// Averages `data` (a gradient computed from `samples` samples) with
    /// every contributing member's, weighted by their sample counts, in
    /// place. Every member of a stream calls this (or every member plain
    /// [`Client::all_reduce`]) for a step. The result's
    /// [`OpInfo::meta`] names the contributors' counts and, under a quorum
    /// policy, who was left out; a member that is
    /// [`StepMeta::behind`] may skip computing the next steps' gradients
    /// (their results are already decided) and pass any `data`.
    pub fn all_reduce_weighted<T: Element>(
        &mut self,
        data: &mut [T],
        samples: u64,
    ) -> Result<OpInfo, ClientError> {
        self.ensure_arena(std::mem::size_of_val(data))?;
        self.stage(0, data);
        let info = self.collective(
            LocalKind::AllReduce(ReduceOp::Mean),
            T::DTYPE,
            data.len(),
            Some(samples),
        )?;
        self.unstage(0, data);
        Ok(info)
    }

    /// All-reduces many tensors with few collectives (Horovod-style fusion):
    /// consecutive tensors are packed into one buffer of at most
    /// `max_fused_bytes` (a larger tensor goes alone) and each buffer is one
    /// all-reduce. Every member must pass the same tensor lengths in the same
    /// order, which makes the packing identical everywhere without any
    /// negotiation. Returns one [`OpInfo`] per collective run.
    pub fn all_reduce_fused<T: Element>(
        &mut self,
        tensors: &mut [&mut [T]],
        op: ReduceOp,
        max_fused_bytes: usize,
    ) -> Result<Vec<OpInfo>, ClientError> {
        let size = std::mem::size_of::<T>();
        let mut infos = Vec::new();
        let mut start = 0;
        while start < tensors.len() {
            let mut end = start + 1;
            let mut bytes = std::mem::size_of_val(&*tensors[start]);
            while end < tensors.len()
                && bytes + std::mem::size_of_val(&*tensors[end]) <= max_fused_bytes
            {
                bytes += std::mem::size_of_val(&*tensors[end]);
                end += 1;
            }
            self.ensure_arena(bytes)?;
            let mut offset = 0;
            for t in &tensors[start..end] {
                self.stage(offset, t);
                offset += std::mem::size_of_val(&**t);
            }
            infos.push(self.collective(LocalKind::AllReduce(op), T::DTYPE, bytes / size, None)?);
            let mut offset = 0;
            for t in tensors[start..end].iter_mut() {
                self.unstage(offset, t);
                offset += std::mem::size_of_val(&**t);
            }
            start = end;
        }
        Ok(infos)
    }

    /// Replaces `data` with `root`'s.
    pub fn broadcast<T: Element>(
        &mut self,
        data: &mut [T],
        root: MemberId,
    ) -> Result<OpInfo, ClientError> {
        self.ensure_arena(std::mem::size_of_val(data))?;
        self.stage(0, data);
        let info = self.collective(LocalKind::Broadcast(root), T::DTYPE, data.len(), None)?;
        self.unstage(0, data);
        Ok(info)
    }

    /// Hands this trainer's `state` (parameters, optimizer state: whatever a
    /// new member needs to continue) to the members waiting for it, as
    /// [`OpInfo::waiting`] reported. Every live trainer calls it at the same
    /// point of the stream (the result that reported the joiners is the same
    /// on every member); the state of the lowest live member is what every
    /// member holds afterwards.
    pub fn admit<T: Element>(&mut self, state: &mut [T]) -> Result<OpInfo, ClientError> {
        self.ensure_arena(std::mem::size_of_val(state))?;
        self.stage(0, state);
        let info = self.collective(LocalKind::StateSync, T::DTYPE, state.len(), None)?;
        self.unstage(0, state);
        Ok(info)
    }

    /// Joins (or rejoins) the group on this connection's stream: this
    /// daemon asks to be readmitted, the call waits until the live trainers
    /// hand over their state ([`Client::admit`]), writes it into `state`, and
    /// the stream continues from there. Call it after a restart, or after a
    /// call failed with [`ClientError::NoQuorum`] because the group went on
    /// without this member; not on a fresh group, where every trainer starts
    /// from the same state.
    ///
    /// Pass the state as it stands after this client's last completed call
    /// (the README's loop does). If no member's trainer holds the group's
    /// state any more — a lost quorum made every trainer rejoin — the
    /// joining trainers' states are compared and the group resumes from the
    /// most advanced one (its checksum must agree among those as advanced);
    /// the state of a `Client` that has completed no call counts for
    /// nothing — unless it was [`Client::restore`]d from a checkpoint, which
    /// counts as the group's state at that checkpoint. With no state
    /// anywhere the call fails with [`ClientError::BadRequest`] saying so.
    pub fn join<T: Element>(&mut self, state: &mut [T]) -> Result<OpInfo, ClientError> {
        self.ensure_arena(std::mem::size_of_val(state))?;
        self.stage(0, state);
        let req = LocalRequest::Join {
            buffer: self.arena.id,
            offset_bytes: 0,
            dtype: T::DTYPE,
            len: state.len() as u64,
            holds: self.last_op,
        };
        let info = OpInfo::from_done(self.call(&req, None)?)?;
        self.unstage(0, state);
        Ok(info)
    }

    /// Checkpoints `state` as the state after `step` of this connection's
    /// stream, and returns once the daemon has copied it out (the snapshot:
    /// one copy into shared memory, one out of it). The daemons then write
    /// it to the disks of `checkpoint.replicas` members and commit it
    /// through Raft while training goes on; [`Client::wait_checkpoint`]
    /// says when it is committed. Every trainer of a data-parallel stream
    /// checkpoints the same step with the same state. A step must be later
    /// than the stream's last checkpoint; while the stream's previous
    /// checkpoint is still being written here, the call waits for it.
    pub fn checkpoint<T: Element>(&mut self, state: &[T], step: u64) -> Result<(), ClientError> {
        let bytes = std::mem::size_of_val(state);
        self.ensure_arena(bytes)?;
        self.stage(0, state);
        let req = LocalRequest::Checkpoint {
            buffer: self.arena.id,
            offset_bytes: 0,
            len_bytes: bytes as u64,
            step,
            holds: self.last_op,
        };
        match self.call(&req, None)? {
            LocalResponse::Snapshotted { step: s } if s == step => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "expected the snapshot of step {step}, got {other:?}"
            ))),
        }
    }

    /// Waits until the checkpoint of `step` is committed and returns the
    /// daemon's word on it (the members holding a durable copy); fails with
    /// [`ClientError::Checkpoint`] saying why when it never will be (a
    /// later one was committed first, a copy could not be written).
    pub fn wait_checkpoint(&mut self, step: u64) -> Result<String, ClientError> {
        match self.call(&LocalRequest::AwaitCheckpoint { step }, None)? {
            LocalResponse::CheckpointEnded {
                committed: true,
                detail,
                ..
            } => Ok(detail),
            LocalResponse::CheckpointEnded { detail, .. } => Err(ClientError::Checkpoint(detail)),
            other => Err(ClientError::Protocol(format!(
                "expected the end of checkpoint {step}, got {other:?}"
            ))),
        }
    }

    /// Restores the stream's latest committed checkpoint into `state`,
    /// which must be its size, and returns its step. A copy whose chunks
    /// fail their checksums is passed over for an older checkpoint; the
    /// state is never a torn or mixed one. A [`Client::join`] after it
    /// offers the restored state as the group's state at the checkpoint:
    /// after the whole cluster restarted, every trainer restores and joins,
    /// and the group resumes from the checkpoint (or from a more advanced
    /// state a joiner still holds). This daemon reads its own copy
    /// (reading another holder's is not built yet: with
    /// `checkpoint.replicas` equal to the number of members, every member
    /// holds one).
    pub fn restore<T: Element>(&mut self, state: &mut [T]) -> Result<u64, ClientError> {
        let bytes = std::mem::size_of_val(state);
        self.ensure_arena(bytes)?;
        let req = LocalRequest::Restore {
            buffer: self.arena.id,
            offset_bytes: 0,
            len_bytes: bytes as u64,
        };
        match self.call(&req, None)? {
            LocalResponse::Restored { step, holds } => {
                self.unstage(0, state);
                // The state is what the group ran up to that op: a join()
                // offers it as such.
                self.last_op = holds;
                Ok(step)
            }
            other => Err(ClientError::Protocol(format!(
                "expected a restored state, got {other:?}"
            ))),
        }
    }

    /// The stream's committed checkpoints, oldest first.
    pub fn checkpoints(&mut self) -> Result<Vec<CheckpointInfo>, ClientError> {
        match self.call(&LocalRequest::ListCheckpoints, None)? {
            LocalResponse::Checkpoints { list } => Ok(list),
            other => Err(ClientError::Protocol(format!(
                "expected the checkpoint list, got {other:?}"
            ))),
        }
    }

    /// Every member's `input`, concatenated in ring order.
    pub fn all_gather<T: Element>(&mut self, input: &[T]) -> Result<(Vec<T>, OpInfo), ClientError> {
        let n = self.members.len();
        let me = self
            .members
            .iter()
            .position(|&m| m == self.member)
            .expect("member of its group");
        let block = std::mem::size_of_val(input);
        self.ensure_arena(block * n)?;
        self.stage(me * block, input);
        let info = self.collective(LocalKind::AllGather, T::DTYPE, input.len(), None)?;
        let mut out = vec![T::zeroed(); input.len() * n];
        self.unstage(0, &mut out);
        Ok((out, info))
    }

    /// Reduces `data` across members and returns this member's segment of the
    /// result (segment i of n near-equal parts, the first `len % n` one longer).
    pub fn reduce_scatter<T: Element>(
        &mut self,
        data: &[T],
        op: ReduceOp,
    ) -> Result<(Vec<T>, OpInfo), ClientError> {
        self.ensure_arena(std::mem::size_of_val(data))?;
        self.stage(0, data);
        let info = self.collective(LocalKind::ReduceScatter(op), T::DTYPE, data.len(), None)?;
        let n = self.members.len();
        let me = self
            .members
            .iter()
            .position(|&m| m == self.member)
            .expect("member of its group");
        let seg = phalanx_protocol::collective::schedule::segment(data.len(), n, me);
        let mut out = vec![T::zeroed(); seg.len()];
        self.unstage(seg.start * std::mem::size_of::<T>(), &mut out);
        Ok((out, info))
    }

    /// Returns once every member has entered the barrier.
    pub fn barrier(&mut self) -> Result<OpInfo, ClientError> {
        self.collective(LocalKind::Barrier, DType::F32, 0, None)
    }
}

/// The same calls for tokio code: each runs the blocking call on tokio's
/// blocking pool, so the runtime's workers never wait on the daemon. Buffers
/// are passed by value and handed back.
#[cfg(feature = "async")]
#[derive(Debug, Clone)]
pub struct AsyncClient {
    inner: std::sync::Arc<std::sync::Mutex<Client>>,
}

#[cfg(feature = "async")]
impl AsyncClient {
    /// Connects to the daemon's socket.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncClient, ClientError> {
        let path = path.as_ref().to_path_buf();
        let client = tokio::task::spawn_blocking(move || Client::connect(path))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))??;
        Ok(AsyncClient {
            inner: std::sync::Arc::new(std::sync::Mutex::new(client)),
        })
    }

    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<R, ClientError> + Send + 'static,
    ) -> Result<R, ClientError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.lock().expect("client poisoned")))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
    }

    /// [`Client::all_reduce`].
    pub async fn all_reduce<T: Element>(
        &self,
        mut data: Vec<T>,
        op: ReduceOp,
    ) -> Result<(Vec<T>, OpInfo), ClientError> {
        self.with(move |c| c.all_reduce(&mut data, op).map(|i| (data, i)))
            .await
    }

    /// [`Client::all_reduce_fused`], with owned tensors.
    pub async fn all_reduce_fused<T: Element>(
        &self,
        mut tensors: Vec<Vec<T>>,
        op: ReduceOp,
        max_fused_bytes: usize,
    ) -> Result<(Vec<Vec<T>>, Vec<OpInfo>), ClientError> {
        self.with(move |c| {
            let mut views: Vec<&mut [T]> = tensors.iter_mut().map(|t| t.as_mut_slice()).collect();
            let infos = c.all_reduce_fused(&mut views, op, max_fused_bytes)?;
            Ok((tensors, infos))
        })
        .await
    }

    /// [`Client::broadcast`].
    pub async fn broadcast<T: Element>(
        &self,
        mut data: Vec<T>,
        root: MemberId,
    ) -> Result<(Vec<T>, OpInfo), ClientError> {
        self.with(move |c| c.broadcast(&mut data, root).map(|i| (data, i)))
            .await
    }

    /// [`Client::all_gather`].
    pub async fn all_gather<T: Element>(
        &self,
        input: Vec<T>,
    ) -> Result<(Vec<T>, OpInfo), ClientError> {
        self.with(move |c| c.all_gather(&input)).await
    }

    /// [`Client::reduce_scatter`].
    pub async fn reduce_scatter<T: Element>(
        &self,
        data: Vec<T>,
        op: ReduceOp,
    ) -> Result<(Vec<T>, OpInfo), ClientError> {
        self.with(move |c| c.reduce_scatter(&data, op)).await
    }

    /// [`Client::barrier`].
    pub async fn barrier(&self) -> Result<OpInfo, ClientError> {
        self.with(|c| c.barrier()).await
    }
}
