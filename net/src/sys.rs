//! Batched datagram I/O: `sendmmsg` and `recvmmsg`, one system call for many datagrams.
//!
//! This is the only module of Braid with `unsafe`: the libc calls take raw pointers into
//! buffers that live on this function's stack or in the caller's slices for the length of
//! the call, and nothing else.
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

/// Most datagrams one segmentation-offload message carries (`UDP_MAX_SEGMENTS` in
/// kernels before 6.9).
const GSO_SEGMENTS: usize = 64;
/// Most bytes one carries (a UDP datagram's limit, less room for its headers).
const GSO_BYTES: usize = 60_000;
/// Set when the kernel refused segmentation offload: from then on every datagram goes
/// as a message of its own.
static GSO_OFF: AtomicBool = AtomicBool::new(false);
/// Datagrams that left in segmentation-offload messages, in this process.
static GSO_DATAGRAMS: AtomicU64 = AtomicU64::new(0);

/// How many datagrams this process sent in segmentation-offload messages (several to
/// one address, cut apart by the kernel).
pub fn gso_datagrams() -> u64 {
    GSO_DATAGRAMS.load(Ordering::Relaxed)
}

/// How many of `msgs`, from the first, go as one message: with `gso`, the datagrams to
/// the first one's address that follow it, each of its size but the last (which may be
/// shorter), within the kernel's limits; otherwise one.
fn run_len(msgs: &[(SocketAddr, &[u8])], gso: bool) -> usize {
    let Some(&(to, first)) = msgs.first() else {
        return 0;
    };
    let size = first.len();
    if !gso || size == 0 {
        return 1;
    }
    let (mut n, mut bytes) = (1, size);
    while let Some(&(a, b)) = msgs.get(n) {
        if n == GSO_SEGMENTS || a != to || b.is_empty() || b.len() > size {
            break;
        }
        if bytes + b.len() > GSO_BYTES {
            break;
        }
        n += 1;
        bytes += b.len();
        if b.len() < size {
            break;
        }
    }
    n
}

/// Sends each `(destination, bytes)` as one datagram with as few `sendmmsg` calls as
/// possible. Datagrams to one address in a row (a viewer's catch-up at its join, a
/// repair, what one wake-up had for it) go as one message that the kernel cuts into
/// datagrams (UDP segmentation offload, `UDP_SEGMENT`) when it offers it: one pass
/// through the socket layer and the route for many datagrams. Returns how many were
/// sent; fewer than `msgs.len()` means the socket would block (or failed) at that
/// message.
pub fn send_batch(fd: RawFd, msgs: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
    send_with(fd, msgs, gso_on())
}

/// Whether segmentation offload is to be tried: not after the kernel refused it, nor
/// when the environment says `BRAID_NO_GSO=1` (to compare, or to rule it out).
fn gso_on() -> bool {
    static NOT_WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let not_wanted =
        *NOT_WANTED.get_or_init(|| std::env::var_os("BRAID_NO_GSO").is_some_and(|v| v == "1"));
    !not_wanted && !GSO_OFF.load(Ordering::Relaxed)
}

/// [`send_batch`], with segmentation offload or without.
fn send_with(fd: RawFd, msgs: &[(SocketAddr, &[u8])], gso: bool) -> io::Result<usize> {
    let mut sent = 0;
    while sent < msgs.len() {
        // Up to BATCH messages: (first datagram, datagrams).
        let mut runs = [(0usize, 0usize); BATCH];
        let (mut count, mut end) = (0, sent);
        while count < BATCH && end < msgs.len() {
            let n = run_len(&msgs[end..], gso);
            runs[count] = (end, n);
            count += 1;
            end += n;
        }
        let runs = &runs[..count];
        let addrs: Vec<SockAddr> = runs
            .iter()
            .map(|&(i, _)| SockAddr::from(msgs[i].0))
            .collect();
        let mut iovs: Vec<libc::iovec> = msgs[sent..end]
            .iter()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let iov_base = iovs.as_mut_ptr();
        // Room for one control message of a u16 per message (aligned as a cmsghdr).
        // SAFETY: cmsghdr is plain data; all-zero is a valid value.
        let mut controls: [[libc::cmsghdr; 2]; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(runs.len());
        for (k, &(i, n)) in runs.iter().enumerate() {
            // SAFETY: mmsghdr is plain data; all-zero is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = addrs[k].as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = addrs[k].len();
            // SAFETY: `i - sent` indexes `iovs`, which has a place for every datagram
            // from `sent` to `end`.
            h.msg_hdr.msg_iov = unsafe { iov_base.add(i - sent) };
            h.msg_hdr.msg_iovlen = n as _;
            if n > 1 {
                h.msg_hdr.msg_control = controls[k].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = space as _;
                // SAFETY: the header's control buffer is `controls[k]`, 32 bytes aligned
                // for a cmsghdr, more than CMSG_SPACE(2); CMSG_FIRSTHDR returns its
                // start, and CMSG_DATA points inside it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(
                        libc::CMSG_DATA(c).cast::<u16>(),
                        msgs[i].1.len() as u16,
                    );
                }
            }
            hdrs.push(h);
        }
        // SAFETY: `hdrs` points at `addrs`, `iovs` and `controls`, which outlive the
        // call, and at the caller's byte slices, which are borrowed for the whole
        // function.
        let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), hdrs.len() as libc::c_uint, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            let (i, len) = runs[0];
            if len > 1 && err.kind() != io::ErrorKind::WouldBlock {
                // Refused as one message: this kernel or device has no offload (then
                // never again), or this run does not suit it (larger than the path's
                // MTU, say). Its datagrams go one by one, as they would without it.
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                ) {
                    GSO_OFF.store(true, Ordering::Relaxed);
                }
                match send_with(fd, &msgs[i..i + len], false) {
                    Ok(k) if k == len => {
                        sent += k;
                        continue;
                    }
                    Ok(k) => return Ok(sent + k),
                    Err(e) => return if sent > 0 { Ok(sent) } else { Err(e) },
                }
            }
            return if sent > 0 { Ok(sent) } else { Err(err) };
        }
        let n = n as usize;
        let done: usize = runs[..n].iter().map(|r| r.1).sum();
        let offloaded: usize = runs[..n].iter().filter(|r| r.1 > 1).map(|r| r.1).sum();
        if offloaded > 0 {
            GSO_DATAGRAMS.fetch_add(offloaded as u64, Ordering::Relaxed);
        }
        sent += done;
        if n < runs.len() {
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

    /// Datagrams received on `rx` until `n` came (or a second passed without one).
    fn receive(rx: &UdpSocket, n: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut bufs = vec![[0u8; 2048]; BATCH];
        let (mut got, mut out) = (Vec::new(), Vec::new());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while got.len() < n && std::time::Instant::now() < deadline {
            match recv_batch(rx.as_raw_fd(), &mut bufs, &mut out) {
                Ok(_) => got.extend(
                    out.iter()
                        .enumerate()
                        .map(|(i, r)| (r.from, bufs[i][..r.len].to_vec())),
                ),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    /// Runs of datagrams to one address (equal sizes, a shorter last one, runs longer
    /// than one message may carry) go as segmentation-offload messages, and arrive as
    /// the datagrams they were, in order, each destination's apart from the other's.
    #[test]
    fn runs_to_one_address_arrive_as_the_datagrams_they_were() {
        let bind = || {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            s.set_recv_buffer_size(4 << 20).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
                .unwrap();
            s.set_nonblocking(true).unwrap();
            UdpSocket::from(s)
        };
        let (a, b, tx) = (bind(), bind(), bind());
        let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        // 100 full datagrams and a short one to `a` (more than one message's 64), then
        // one to `b`, then 3 of 1,300 bytes to `a` and 2 of varying sizes to `b`.
        let mut sends: Vec<(SocketAddr, Vec<u8>)> = (0..100u8)
            .map(|i| (to_a, vec![i; 1316]))
            .chain([(to_a, vec![200; 400]), (to_b, vec![201; 1316])])
            .chain((0..3u8).map(|i| (to_a, vec![210 + i; 1300])))
            .collect();
        sends.extend([(to_b, vec![220; 10]), (to_b, vec![221; 900])]);
        let msgs: Vec<(SocketAddr, &[u8])> = sends.iter().map(|(t, p)| (*t, &p[..])).collect();
        let before = gso_datagrams();
        assert_eq!(send_batch(tx.as_raw_fd(), &msgs).unwrap(), msgs.len());
        let from = tx.local_addr().unwrap();
        for (rx, to) in [(&a, to_a), (&b, to_b)] {
            let want: Vec<(SocketAddr, Vec<u8>)> = sends
                .iter()
                .filter(|(t, _)| *t == to)
                .map(|(_, p)| (from, p.clone()))
                .collect();
            assert_eq!(receive(rx, want.len()), want);
        }
        // Linux has had UDP_SEGMENT since 4.18: the runs to `a` went offloaded.
        assert!(
            !GSO_OFF.load(Ordering::Relaxed),
            "the kernel took the offload"
        );
        assert!(
            gso_datagrams() - before >= 104,
            "{} offloaded",
            gso_datagrams() - before
        );
    }

    #[test]
    fn a_run_is_datagrams_to_one_address_of_one_size_and_a_shorter_last() {
        let (x, y) = (
            SocketAddr::from(([127, 0, 0, 1], 1)),
            SocketAddr::from(([127, 0, 0, 1], 2)),
        );
        let (big, small, empty) = (vec![0u8; 1000], vec![0u8; 10], Vec::new());
        let run = |m: &[(SocketAddr, &Vec<u8>)], gso| {
            let m: Vec<(SocketAddr, &[u8])> = m.iter().map(|(a, b)| (*a, &b[..])).collect();
            run_len(&m, gso)
        };
        assert_eq!(run(&[], true), 0);
        assert_eq!(run(&[(x, &big), (x, &big), (y, &big)], true), 2);
        assert_eq!(run(&[(x, &big), (x, &big), (y, &big)], false), 1);
        assert_eq!(run(&[(x, &big), (x, &small), (x, &small)], true), 2);
        assert_eq!(run(&[(x, &small), (x, &big)], true), 1);
        assert_eq!(run(&[(x, &empty), (x, &empty)], true), 1);
        assert_eq!(run(&[(x, &big), (x, &empty)], true), 1);
        let many: Vec<(SocketAddr, &Vec<u8>)> = (0..100).map(|_| (x, &big)).collect();
        assert_eq!(run(&many, true), GSO_SEGMENTS.min(GSO_BYTES / 1000));
        let tiny: Vec<(SocketAddr, &Vec<u8>)> = (0..100).map(|_| (x, &small)).collect();
        assert_eq!(run(&tiny, true), GSO_SEGMENTS);
    }
}
