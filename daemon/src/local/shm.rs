//! Shared memory from trainers: a sealed memfd mapped into the daemon.

use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use rustix::fs::SealFlags;
use rustix::mm::{MapFlags, ProtFlags};
use thiserror::Error;

/// Why a trainer's memory file was refused.
#[derive(Debug, Error)]
pub enum ShmError {
    /// The file cannot shrink below the mapping only if it is sealed; an
    /// unsealed file could be truncated under the daemon (SIGBUS).
    #[error("the memory file is not sealed against shrinking (memfd_create with ALLOW_SEALING, then F_SEAL_SHRINK)")]
    NotSealed,
    /// The file is smaller than the size claimed.
    #[error("the memory file holds {actual} bytes, the request claims {claimed}")]
    TooSmall {
        /// Claimed.
        claimed: u64,
        /// Actual.
        actual: u64,
    },
    /// The size is zero or beyond the limit.
    #[error("buffer of {len} bytes is outside 1..={max}")]
    BadSize {
        /// Claimed.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// The kernel refused.
    #[error("{what}: {source}")]
    Os {
        /// What was attempted.
        what: &'static str,
        /// The error.
        source: rustix::io::Errno,
    },
}

/// A trainer's buffer mapped read-write and shared.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain memory; the runner is its only user while an
// op runs over it (the trainer blocks until the op completes).
unsafe impl Send for Mapping {}
// SAFETY: as above; access goes through `range`, whose caller upholds it.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd`, which must be sealed against shrinking.
    pub fn map(fd: OwnedFd, len: u64, max: u64) -> Result<Mapping, ShmError> {
        if len == 0 || len > max {
            return Err(ShmError::BadSize { len, max });
        }
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|source| ShmError::Os {
            what: "reading seals",
            source,
        })?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(ShmError::NotSealed);
        }
        let stat = rustix::fs::fstat(&fd).map_err(|source| ShmError::Os {
            what: "fstat",
            source,
        })?;
        let actual = stat.st_size as u64;
        if actual < len {
            return Err(ShmError::TooSmall {
                claimed: len,
                actual,
            });
        }
        let len = usize::try_from(len).map_err(|_| ShmError::BadSize { len, max })?;
        // SAFETY: a fresh shared mapping of a file at least `len` long that
        // cannot shrink; nothing else in this process aliases it.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|source| ShmError::Os {
            what: "mmap",
            source,
        })?;
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            len,
            _fd: fd,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `map` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `offset..offset + len`.
    ///
    /// # Safety
    /// No other reference to these bytes may be alive, in this process: the
    /// runner holds one op per region at a time. The trainer writes only
    /// while no op of its is in flight, so it cannot race the daemon.
    ///
    /// # Panics
    /// When the range is not inside the mapping.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, offset: usize, len: usize) -> &mut [u8] {
        let end = offset.checked_add(len).expect("range overflows");
        assert!(end <= self.len, "range {offset}..{end} outside the mapping");
        // SAFETY: the caller guarantees exclusivity; the range is mapped.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped, once.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
