//! Live sources: where the capture's TS bytes come from, paced as a live stream.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use crate::ts::{self, PACKET, Synth, SynthConfig};

/// Which source, parsed from `--source`.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// The built-in synthetic stream.
    Synth,
    /// An MPEG-TS file paced in real time by its PCR.
    File(PathBuf),
    /// MPEG-TS on standard input (a pipe from ffmpeg), taken as it comes.
    Stdin,
    /// MPEG-TS or RTP/MPEG-TS datagrams arriving on this UDP address.
    Udp(std::net::SocketAddr),
}

impl std::str::FromStr for Spec {
    type Err = String;
    fn from_str(s: &str) -> Result<Spec, String> {
        match s {
            "synth" | "test" => Ok(Spec::Synth),
            "-" | "stdin" => Ok(Spec::Stdin),
            _ => {
                if let Some(addr) = s.strip_prefix("udp://").or_else(|| s.strip_prefix("udp:")) {
                    let addr = addr.trim_start_matches('@');
                    return addr
                        .parse()
                        .map(Spec::Udp)
                        .map_err(|e| format!("bad UDP source address {addr:?}: {e}"));
                }
                let path = s.strip_prefix("file:").unwrap_or(s);
                Ok(Spec::File(PathBuf::from(path)))
            }
        }
    }
}

/// One piece of the stream and whether the stream restarted before it.
#[derive(Debug)]
pub struct Piece {
    /// TS bytes.
    pub bytes: Bytes,
    /// The stream does not continue from the previous piece (a looped file).
    pub discontinuity: bool,
    /// RTP datagrams of the source found missing just before this piece.
    pub rtp_lost: u64,
}

/// The receive buffer the UDP source asks for: an encoder sends a keyframe's datagrams
/// in a burst (hundreds of them at 720p), far beyond the kernel's default.
pub const UDP_RECEIVE_BUFFER: usize = 8 << 20;

/// Follows the RTP sequence numbers of a source's datagrams: numbers skipped are
/// datagrams lost before the capture. A datagram behind the newest (reordered) was
/// counted lost when it was skipped, and is taken back.
#[derive(Debug, Default)]
pub struct RtpSeq {
    newest: Option<u16>,
    /// Datagrams missing so far.
    pub lost: u64,
}

impl RtpSeq {
    /// Takes sequence number `seq`; returns how many more are now counted lost (a late
    /// one may take one back: then 0).
    pub fn observe(&mut self, seq: u16) -> u64 {
        let Some(newest) = self.newest else {
            self.newest = Some(seq);
            return 0;
        };
        let step = seq.wrapping_sub(newest);
        if step == 0 {
            return 0;
        }
        if step < 0x8000 {
            self.newest = Some(seq);
            let lost = u64::from(step - 1);
            self.lost += lost;
            lost
        } else {
            self.lost = self.lost.saturating_sub(1);
            0
        }
    }
}

/// A running source.
pub enum Source {
    /// Synthetic frames at their frame times.
    Synth {
        /// The generator.
        synth: Synth,
        /// Time of frame 0.
        start: Instant,
        /// Frames per second.
        fps: u32,
        /// Frames made so far.
        frames: u64,
    },
    /// A file, paced by PCR.
    File(FileSource),
    /// Standard input.
    Stdin(tokio::io::Stdin),
    /// UDP datagrams.
    Udp(tokio::net::UdpSocket, RtpSeq),
}

impl Source {
    /// Opens the source.
    pub async fn open(spec: &Spec, synth: SynthConfig, looped: bool) -> anyhow::Result<Source> {
        Ok(match spec {
            Spec::Synth if synth.align => {
                // Frame n is due at n / fps seconds of Unix time; start at the next group
                // of pictures, so every capture of the ladder starts on a keyframe.
                let fps = u64::from(synth.fps.max(1));
                let gop = u64::from(synth.gop.max(1));
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let now = Instant::now();
                let frame = (unix.as_nanos() * u128::from(fps) / 1_000_000_000) as u64;
                let first = frame.div_ceil(gop) * gop;
                let due =
                    Duration::from_nanos((first as u128 * 1_000_000_000 / u128::from(fps)) as u64);
                Source::Synth {
                    synth: Synth::new(synth).starting_at(first),
                    start: now + due.saturating_sub(unix),
                    fps: synth.fps.max(1),
                    frames: 0,
                }
            }
            Spec::Synth => Source::Synth {
                synth: Synth::new(synth),
                start: Instant::now(),
                fps: synth.fps.max(1),
                frames: 0,
            },
            Spec::File(path) => {
                let data = tokio::fs::read(path)
                    .await
                    .with_context(|| format!("reading {}", path.display()))?;
                if data.len() < PACKET {
                    anyhow::bail!("{} holds no MPEG-TS packet", path.display());
                }
                Source::File(FileSource::new(Bytes::from(data), looped))
            }
            Spec::Stdin => Source::Stdin(tokio::io::stdin()),
            Spec::Udp(addr) => {
                let (sock, got) = braid_net::udp::bind_source(*addr, UDP_RECEIVE_BUFFER)
                    .with_context(|| format!("binding UDP source {addr}"))?;
                if got < UDP_RECEIVE_BUFFER {
                    tracing::warn!(
                        "the UDP source's receive buffer is {} KiB, not the {} KiB asked for: \
                         an encoder's keyframe bursts may overflow it (raise \
                         net.core.rmem_max, or run with CAP_NET_ADMIN)",
                        got / 1024,
                        UDP_RECEIVE_BUFFER / 1024
                    );
                }
                let sock = tokio::net::UdpSocket::from_std(sock)
                    .with_context(|| format!("registering UDP source {addr}"))?;
                Source::Udp(sock, RtpSeq::default())
            }
        })
    }

    /// Whether the source runs whether or not it is read (synthetic frames, UDP), so
    /// that what it makes before the stream may flow is read and dropped rather than
    /// sent late in a burst. A file or standard input waits for its reader instead.
    pub fn is_live(&self) -> bool {
        matches!(self, Source::Synth { .. } | Source::Udp(..))
    }

    /// The next piece, when it is due; `None` at the end of the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Piece>> {
        match self {
            Source::Synth {
                synth,
                start,
                fps,
                frames,
            } => {
                let due = *start + Duration::from_secs(*frames) / *fps;
                tokio::time::sleep_until(due.into()).await;
                *frames += 1;
                Ok(Some(Piece {
                    bytes: synth.next_frame(),
                    discontinuity: false,
                    rtp_lost: 0,
                }))
            }
            Source::File(f) => f.next().await,
            Source::Stdin(stdin) => {
                let mut buf = vec![0u8; 64 * PACKET];
                let n = stdin.read(&mut buf).await.context("reading stdin")?;
                if n == 0 {
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(Piece {
                    bytes: Bytes::from(buf),
                    discontinuity: false,
                    rtp_lost: 0,
                }))
            }
            Source::Udp(sock, rtp_seq) => {
                let mut buf = vec![0u8; 65_536];
                let n = sock
                    .recv(&mut buf)
                    .await
                    .context("receiving the UDP source")?;
                buf.truncate(n);
                let bytes = Bytes::from(buf);
                // RTP (version 2 in the top bits) carries TS in its payload; raw TS starts
                // with the sync byte.
                let mut rtp_lost = 0;
                let bytes = if bytes.first().is_some_and(|b| b >> 6 == 2) {
                    match braid_core::wire::Rtp::parse(bytes) {
                        Ok(rtp) => {
                            rtp_lost = rtp_seq.observe(rtp.fields().seq);
                            rtp.payload()
                        }
                        Err(e) => {
                            metrics::counter!("braid_capture_input_dropped_total", "reason" => "bad_rtp").increment(1);
                            tracing::debug!("dropping a bad RTP datagram: {e}");
                            Bytes::new()
                        }
                    }
                } else {
                    bytes
                };
                Ok(Some(Piece {
                    bytes,
                    discontinuity: false,
                    rtp_lost,
                }))
            }
        }
    }
}

/// An MPEG-TS file sent at the pace its PCRs say, optionally looped.
pub struct FileSource {
    data: Bytes,
    pos: usize,
    looped: bool,
    /// (first PCR of this pass, when it was due).
    anchor: Option<(u64, Instant)>,
    pass_start: bool,
    /// Time of the last PCR sent, to continue pacing across a loop.
    last_due: Instant,
    /// A piece cut and waiting for its time.
    pending: Option<(Piece, Option<Instant>)>,
}

impl FileSource {
    fn new(data: Bytes, looped: bool) -> FileSource {
        FileSource {
            data,
            pos: 0,
            looped,
            anchor: None,
            pass_start: false,
            last_due: Instant::now(),
            pending: None,
        }
    }

    /// Up to the next PCR (at most 64 packets), when that PCR is due. Cancel-safe: the
    /// piece is cut before the wait and kept across a cancelled call (the capture's loop
    /// `select!`s on this future), so nothing is skipped.
    async fn next(&mut self) -> anyhow::Result<Option<Piece>> {
        if self.pending.is_none() {
            self.pending = self.cut();
        }
        let Some((_, due)) = &self.pending else {
            return Ok(None);
        };
        if let Some(due) = *due {
            tokio::time::sleep_until(due.into()).await;
        }
        Ok(self.pending.take().map(|(piece, _)| piece))
    }

    /// The next piece and when it is due (`None`: now); `None` at the end of the file.
    fn cut(&mut self) -> Option<(Piece, Option<Instant>)> {
        if self.pos + PACKET > self.data.len() {
            if !self.looped {
                return None;
            }
            self.pos = 0;
            self.anchor = None;
            self.pass_start = true;
        }
        let start = self.pos;
        let mut due = None;
        while self.pos + PACKET <= self.data.len() && self.pos - start < 64 * PACKET {
            let p = &self.data[self.pos..self.pos + PACKET];
            self.pos += PACKET;
            if let Some(pcr) = ts::parse(p).and_then(|h| h.pcr) {
                let (first, at) = *self.anchor.get_or_insert((pcr, self.last_due));
                let ticks = pcr.saturating_sub(first);
                due = Some(at + Duration::from_nanos(ticks * 1000 / 27));
                break;
            }
        }
        if let Some(d) = due {
            // A PCR more than 10 s ahead of the last is a jump, not a pace: do not stall.
            if d.saturating_duration_since(self.last_due) < Duration::from_secs(10) {
                self.last_due = d;
            } else {
                self.anchor = None;
                due = None;
            }
        }
        let discontinuity = std::mem::take(&mut self.pass_start);
        Some((
            Piece {
                bytes: self.data.slice(start..self.pos),
                discontinuity,
                rtp_lost: 0,
            },
            due,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("synth".parse::<Spec>(), Ok(Spec::Synth));
        assert_eq!("-".parse::<Spec>(), Ok(Spec::Stdin));
        assert_eq!(
            "udp://127.0.0.1:5000".parse::<Spec>(),
            Ok(Spec::Udp("127.0.0.1:5000".parse().unwrap()))
        );
        assert_eq!(
            "udp://@127.0.0.1:5000".parse::<Spec>(),
            Ok(Spec::Udp("127.0.0.1:5000".parse().unwrap()))
        );
        assert!("udp://nonsense".parse::<Spec>().is_err());
        assert_eq!("a.ts".parse::<Spec>(), Ok(Spec::File("a.ts".into())));
    }

    #[test]
    fn rtp_numbers_skipped_are_lost_and_late_ones_taken_back() {
        let mut r = RtpSeq::default();
        assert_eq!(r.observe(65_533), 0);
        assert_eq!(r.observe(65_534), 0);
        // Wraps, two lost (65535 and 0).
        assert_eq!(r.observe(1), 2);
        // A repeat changes nothing; a late one was counted lost and is taken back.
        assert_eq!(r.observe(1), 0);
        assert_eq!(r.observe(0), 0);
        assert_eq!(r.lost, 1);
        assert_eq!(r.observe(2), 0);
        assert_eq!(r.lost, 1);
    }

    #[tokio::test]
    async fn the_udp_source_gets_a_large_receive_buffer_or_says_so() {
        let (sock, got) =
            braid_net::udp::bind_source("127.0.0.1:0".parse().unwrap(), UDP_RECEIVE_BUFFER)
                .expect("bind");
        assert!(sock.local_addr().is_ok());
        // With CAP_NET_ADMIN it may go beyond net.core.rmem_max; otherwise the kernel's
        // cap holds.
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        let net_admin = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let l = s.lines().find(|l| l.starts_with("CapEff:"))?;
                u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok()
            })
            .is_some_and(|caps| caps & (1 << 12) != 0);
        if net_admin {
            assert!(got >= UDP_RECEIVE_BUFFER, "{got}");
        } else if let Some(cap) = cap {
            assert_eq!(got, cap.min(UDP_RECEIVE_BUFFER), "{got}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn file_source_is_cancel_safe() {
        let mut s = Synth::new(SynthConfig {
            bitrate: 1_000_000,
            fps: 25,
            gop: 25,
            run: 0,
            align: false,
        });
        let data: Vec<u8> = (0..20).flat_map(|_| s.next_frame().to_vec()).collect();
        let mut f = FileSource::new(Bytes::from(data.clone()), false);
        let mut got = Vec::new();
        loop {
            // Race every call against a short timer, as the capture's select! does.
            tokio::select! {
                piece = f.next() => match piece.unwrap() {
                    Some(p) => got.extend_from_slice(&p.bytes),
                    None => break,
                },
                _ = tokio::time::sleep(Duration::from_millis(7)) => {}
            }
        }
        assert_eq!(got, data, "nothing skipped or repeated");
    }

    #[tokio::test(start_paused = true)]
    async fn file_is_paced_by_pcr() {
        let mut s = Synth::new(SynthConfig {
            bitrate: 1_000_000,
            fps: 25,
            gop: 25,
            run: 0,
            align: false,
        });
        let data: Vec<u8> = (0..50).flat_map(|_| s.next_frame().to_vec()).collect();
        let mut f = FileSource::new(Bytes::from(data.clone()), false);
        let t = tokio::time::Instant::now();
        let mut total = 0;
        while let Some(p) = f.next().await.unwrap() {
            total += p.bytes.len();
        }
        assert_eq!(total, data.len());
        let took = t.elapsed();
        // 50 frames at 25 fps: the last PCR is 49/25 s after the first.
        assert!(
            took >= Duration::from_millis(1950) && took < Duration::from_millis(2000),
            "{took:?}"
        );
    }
}
