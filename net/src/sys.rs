//! Batched datagram I/O: `sendmmsg` and `recvmmsg`, one system call for many datagrams.
//!
//! This is the only module of Braid with `unsafe`: the libc calls take raw pointers into
//! buffers that live on this function's stack or in the caller's slices for the length of
//! the call, and nothing else.
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use socket2::SockAddr;

/// Most datagrams per system call.
pub const BATCH: usize = 32;

/// Sets socket option `name` (level `SOL_SOCKET`) of `fd` to `value`.
fn set_option<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is borrowed across the call and the size given is its type's; the
    // kernel copies what it reads.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `SO_REUSEPORT` on `fd` (before it is bound): sockets of this process may then
/// bind the same address, as a group.
pub fn reuse_port(fd: RawFd) -> io::Result<()> {
    set_option(fd, libc::SO_REUSEPORT, &(1 as libc::c_int))
}

/// Makes the first socket bound in `fd`'s `SO_REUSEPORT` group receive every datagram
/// that comes to the group (a classic BPF program that returns index 0): the others
/// only send.
pub fn steer_to_first(fd: RawFd) -> io::Result<()> {
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    // `code` outlives the call that copies the program from it.
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    set_option(fd, libc::SO_ATTACH_REUSEPORT_CBPF, &prog)
}

/// Sends every message in `sendmmsg` batches; one the kernel will not take (would block,
/// or refused, e.g. ECONNREFUSED from an earlier ICMP) is skipped. Returns how many were
/// skipped.
pub fn send_all(fd: RawFd, msgs: &[(SocketAddr, &[u8])]) -> u64 {
    let mut done = 0;
    let mut failed = 0u64;
    while done < msgs.len() {
        match send_batch(fd, &msgs[done..]) {
            Ok(n) if n > 0 => done += n,
            Ok(_) | Err(_) => {
                failed += 1;
                done += 1;
            }
        }
    }
    failed
}

/// Sends each `(destination, bytes)` as one datagram with as few `sendmmsg` calls as
/// possible. Returns how many were sent; fewer than `msgs.len()` means the socket would
/// block (or failed) at that message.
pub fn send_batch(fd: RawFd, msgs: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < msgs.len() {
        let chunk = &msgs[sent..msgs.len().min(sent + BATCH)];
        let addrs: Vec<SockAddr> = chunk.iter().map(|(a, _)| SockAddr::from(*a)).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|i| {
                // SAFETY: mmsghdr is plain data; all-zero is a valid value.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = addrs[i].len();
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: `hdrs` points at `addrs` and `iovs`, which outlive the call, and at the
        // caller's byte slices, which are borrowed for the whole function.
        let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), hdrs.len() as libc::c_uint, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if sent > 0 && err.kind() == io::ErrorKind::WouldBlock {
                return Ok(sent);
            }
            return if sent > 0 { Ok(sent) } else { Err(err) };
        }
        sent += n as usize;
        if (n as usize) < chunk.len() {
            return Ok(sent);
        }
    }
    Ok(sent)
}

/// One received datagram: its length in its buffer and where it came from.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes received (the datagram was truncated if this equals the buffer size).
    pub len: usize,
    /// The sender.
    pub from: SocketAddr,
}

/// Receives up to `bufs.len()` datagrams (at most [`BATCH`]) with one `recvmmsg` call,
/// without blocking. Datagram `i` lands in `bufs[i]`.
pub fn recv_batch<const N: usize>(
    fd: RawFd,
    bufs: &mut [[u8; N]],
    out: &mut Vec<Received>,
) -> io::Result<usize> {
    out.clear();
    let count = bufs.len().min(BATCH);
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: Vec<libc::iovec> = bufs[..count]
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: N,
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = (0..count)
        .map(|i| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut names[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    // SAFETY: every header points at a buffer of `bufs`, an iovec of `iovs` and a name of
    // `names`, all alive and exclusively borrowed for the call.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    for (i, h) in hdrs.iter().take(n as usize).enumerate() {
        if let Some(from) = socket_addr(&names[i]) {
            out.push(Received {
                len: h.msg_len as usize,
                from,
            });
        }
    }
    Ok(out.len())
}

/// The address the kernel wrote into a `sockaddr_storage`, if it is IPv4 or IPv6.
fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // and aligned enough for.
            let a = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Asks for a receive buffer of `bytes` beyond the kernel's `net.core.rmem_max`
/// (`SO_RCVBUFFORCE`, allowed with `CAP_NET_ADMIN`); an error otherwise.
pub fn force_recv_buffer(fd: RawFd, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `v` outlives the call and its size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn batch_round_trip_over_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let msgs: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, &p[..])).collect();
        assert_eq!(send_batch(tx.as_raw_fd(), &msgs).unwrap(), 40);

        let mut bufs = vec![[0u8; 2048]; BATCH];
        let mut got = Vec::new();
        let mut out = Vec::new();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        for _ in 0..1_000_000 {
            if got.len() == 40 {
                break;
            }
            match recv_batch(rx.as_raw_fd(), &mut bufs, &mut out) {
                Ok(_) => {
                    for (i, r) in out.iter().enumerate() {
                        assert_eq!(r.from, tx.local_addr().unwrap());
                        got.push(bufs[i][..r.len].to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payloads);
    }
}
