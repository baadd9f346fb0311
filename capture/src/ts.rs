//! MPEG-TS: what the capture reads of it, and a synthetic stream it can make.
//!
//! The capture never changes a TS byte; it only looks: packet boundaries, PIDs, the
//! PAT/PMT (to know which PIDs are video), random-access indicators and PCRs (for pacing
//! a file).

use bytes::{BufMut, Bytes, BytesMut};

/// Size of a TS packet.
pub const PACKET: usize = 188;
/// The TS sync byte.
pub const SYNC: u8 = 0x47;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_MPEG_2);

/// The fields of a TS packet header the capture uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Packet identifier.
    pub pid: u16,
    /// Payload unit start indicator.
    pub pusi: bool,
    /// Random access indicator from the adaptation field.
    pub random_access: bool,
    /// Program clock reference in 27 MHz ticks, if present.
    pub pcr: Option<u64>,
    /// Offset of the payload in the packet.
    pub payload_offset: usize,
}

/// Parses a 188-byte TS packet's header; `None` if it is not one.
pub fn parse(p: &[u8]) -> Option<Header> {
    if p.len() != PACKET || p[0] != SYNC {
        return None;
    }
    let pid = (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
    let pusi = p[1] & 0x40 != 0;
    let afc = (p[3] >> 4) & 0x3;
    let mut random_access = false;
    let mut pcr = None;
    let mut payload_offset = 4;
    if afc & 0x2 != 0 {
        let len = usize::from(p[4]);
        if 5 + len > PACKET {
            return None;
        }
        if len > 0 {
            let flags = p[5];
            random_access = flags & 0x40 != 0;
            if flags & 0x10 != 0 && len >= 7 {
                let b = &p[6..12];
                let base = (u64::from(b[0]) << 25)
                    | (u64::from(b[1]) << 17)
                    | (u64::from(b[2]) << 9)
                    | (u64::from(b[3]) << 1)
                    | (u64::from(b[4]) >> 7);
                let ext = (u64::from(b[4] & 1) << 8) | u64::from(b[5]);
                pcr = Some(base * 300 + ext);
            }
        }
        payload_offset = 5 + len;
    }
    if afc & 0x1 == 0 {
        payload_offset = PACKET;
    }
    Some(Header {
        pid,
        pusi,
        random_access,
        pcr,
        payload_offset,
    })
}

/// Checks each PID's continuity counter (ISO/IEC 13818-1, 2.4.3.3): it steps by one on
/// every packet with a payload, modulo 16; one repeat of a packet is allowed, and a
/// discontinuity indicator lets it jump. Anything else means TS packets were lost (or
/// reordered) before the capture, which it cannot repair, only count and report.
#[derive(Debug, Default)]
pub struct Continuity {
    /// The last counter seen on each PID (at most 8192 of them).
    last: std::collections::HashMap<u16, u8>,
    /// Times a counter did not follow the one before.
    pub errors: u64,
    /// Packets missing, as far as the 4-bit counters tell (a run of 16 or more counts
    /// short).
    pub missing: u64,
}

impl Continuity {
    /// Looks at one 188-byte packet.
    pub fn observe(&mut self, p: &[u8]) {
        if p.len() != PACKET || p[0] != SYNC {
            return;
        }
        let pid = (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
        let afc = (p[3] >> 4) & 0x3;
        if pid == 0x1fff || afc & 0x1 == 0 {
            // Null packets carry no counter; without a payload it does not move.
            return;
        }
        let cc = p[3] & 0x0f;
        let jump_allowed = afc & 0x2 != 0 && p[4] > 0 && p[5] & 0x80 != 0;
        if let Some(prev) = self.last.insert(pid, cc) {
            let step = cc.wrapping_sub(prev) & 0x0f;
            if step != 1 && step != 0 && !jump_allowed {
                self.errors += 1;
                self.missing += u64::from(step.wrapping_sub(1) & 0x0f);
            }
        }
    }

    /// The stream starts over (a looped file): counters may jump once.
    pub fn reset(&mut self) {
        self.last.clear();
    }
}

/// Stream types that carry video (MPEG-1/2, MPEG-4 part 2, H.264, HEVC).
fn is_video_type(t: u8) -> bool {
    matches!(t, 0x01 | 0x02 | 0x10 | 0x1b | 0x24)
}

/// Tracks the PAT and PMT to learn which PIDs are video, and says which packets start a
/// keyframe.
#[derive(Debug, Default)]
pub struct Program {
    pmt_pids: Vec<u16>,
    video_pids: Vec<u16>,
    seen_pmt: bool,
}

impl Program {
    /// Looks at one packet; returns whether it starts a keyframe (a random access point
    /// on a video PID, or on any PID while no PMT says which are video).
    pub fn observe(&mut self, p: &[u8], h: &Header) -> bool {
        if h.pusi && h.payload_offset < PACKET {
            let payload = &p[h.payload_offset..];
            if h.pid == 0 {
                self.parse_pat(payload);
            } else if self.pmt_pids.contains(&h.pid) {
                self.parse_pmt(payload);
            }
        }
        if !h.random_access {
            return false;
        }
        !self.seen_pmt || self.video_pids.is_empty() || self.video_pids.contains(&h.pid)
    }

    /// Whether `pid` carries the PAT or a PMT.
    pub fn is_psi(&self, pid: u16) -> bool {
        pid == 0 || self.pmt_pids.contains(&pid)
    }

    fn section(payload: &[u8]) -> Option<&[u8]> {
        let pointer = usize::from(*payload.first()?);
        let s = payload.get(1 + pointer..)?;
        let len = (usize::from(*s.get(1)? & 0x0f) << 8) | usize::from(*s.get(2)?);
        s.get(..3 + len)
    }

    fn parse_pat(&mut self, payload: &[u8]) {
        let Some(s) = Self::section(payload) else {
            return;
        };
        if s.len() < 12 || s[0] != 0x00 {
            return;
        }
        let entries = &s[8..s.len() - 4];
        self.pmt_pids = entries
            .chunks_exact(4)
            .filter(|e| (u16::from(e[0]) << 8 | u16::from(e[1])) != 0)
            .map(|e| (u16::from(e[2] & 0x1f) << 8) | u16::from(e[3]))
            .collect();
    }

    fn parse_pmt(&mut self, payload: &[u8]) {
        let Some(s) = Self::section(payload) else {
            return;
        };
        if s.len() < 16 || s[0] != 0x02 {
            return;
        }
        let info_len = (usize::from(s[10] & 0x0f) << 8) | usize::from(s[11]);
        let Some(mut es) = s.get(12 + info_len..s.len() - 4) else {
            return;
        };
        let mut video = Vec::new();
        while es.len() >= 5 {
            let stream_type = es[0];
            let pid = (u16::from(es[1] & 0x1f) << 8) | u16::from(es[2]);
            let es_info = (usize::from(es[3] & 0x0f) << 8) | usize::from(es[4]);
            if is_video_type(stream_type) {
                video.push(pid);
            }
            es = es.get(5 + es_info..).unwrap_or(&[]);
        }
        self.video_pids = video;
        self.seen_pmt = true;
    }
}

/// Settings of the synthetic source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthConfig {
    /// Bit rate of the TS stream, bits per second.
    pub bitrate: u64,
    /// Frames per second.
    pub fps: u32,
    /// Frames per group of pictures (a keyframe every `gop` frames).
    pub gop: u32,
    /// Written into every packet, so two runs of the source (a capture started again)
    /// never make the same bytes: the daemon takes it from the wall clock.
    pub run: u32,
    /// Frames numbered from the wall clock, and keyframes on its multiples of the group
    /// of pictures: captures of several renditions on synchronised clocks make aligned
    /// keyframes with the same time stamps (a ladder).
    pub align: bool,
}

/// PIDs of the synthetic stream.
const PMT_PID: u16 = 0x1000;
const DATA_PID: u16 = 0x0100;

/// A synthetic live stream that any receiver can check packet by packet: valid MPEG-TS
/// (PAT, PMT, one private-data elementary stream in PES packets with PTS, PCR,
/// continuity counters), one PES per frame, a random-access point every `gop` frames,
/// and payload bytes that encode the run, the frame number and position, so no two TS
/// packets of a run, or of two runs, are alike.
#[derive(Debug)]
pub struct Synth {
    config: SynthConfig,
    frame: u64,
    cc_pat: u8,
    cc_pmt: u8,
    cc_data: u8,
}

impl Synth {
    /// A synthetic stream.
    pub fn new(config: SynthConfig) -> Synth {
        Synth {
            config,
            frame: 0,
            cc_pat: 0,
            cc_pmt: 0,
            cc_data: 0,
        }
    }

    /// Starts at frame `frame` (see [`SynthConfig::align`]).
    #[must_use]
    pub fn starting_at(mut self, frame: u64) -> Synth {
        self.frame = frame;
        self
    }

    /// TS packets per frame, so the stream carries the configured bit rate.
    pub fn packets_per_frame(&self) -> usize {
        let bytes = self.config.bitrate / 8 / u64::from(self.config.fps.max(1));
        (bytes as usize / PACKET).max(1)
    }

    /// The next frame's TS packets (PAT and PMT first on keyframes and every 5th frame).
    pub fn next_frame(&mut self) -> Bytes {
        let n = self.packets_per_frame();
        let key = self.frame % u64::from(self.config.gop.max(1)) == 0;
        let mut out = BytesMut::with_capacity((n + 2) * PACKET);
        if key || self.frame % 5 == 0 {
            self.put_pat(&mut out);
            self.put_pmt(&mut out);
        }
        // 90 kHz PTS and 27 MHz PCR from the frame number (33-bit clocks, wrapping).
        const WRAP: u64 = (1 << 33) - 1;
        let pts = (self.frame * 90_000 / u64::from(self.config.fps.max(1)) + 90_000) & WRAP;
        let pcr = (pts.wrapping_sub(45_000) & WRAP) * 300;
        for i in 0..n {
            let mut p = [0xffu8; PACKET];
            p[0] = SYNC;
            p[1] = if i == 0 { 0x40 } else { 0x00 } | (DATA_PID >> 8) as u8;
            p[2] = DATA_PID as u8;
            let mut at = 4;
            if i == 0 {
                // Adaptation field: PCR, and the random access indicator on keyframes.
                p[3] = 0x30 | self.cc_data;
                p[4] = 7;
                p[5] = 0x10 | if key { 0x40 } else { 0 };
                let base = pcr / 300;
                let ext = pcr % 300;
                p[6] = (base >> 25) as u8;
                p[7] = (base >> 17) as u8;
                p[8] = (base >> 9) as u8;
                p[9] = (base >> 1) as u8;
                p[10] = ((base & 1) << 7) as u8 | 0x7e | ((ext >> 8) as u8 & 1);
                p[11] = ext as u8;
                at = 12;
                // PES header: private_stream_1, unbounded length, PTS only.
                let pes = [
                    0x00,
                    0x00,
                    0x01,
                    0xbd,
                    0x00,
                    0x00,
                    0x80,
                    0x80,
                    0x05,
                    0x21 | (((pts >> 30) & 0x07) << 1) as u8,
                    (pts >> 22) as u8,
                    0x01 | (((pts >> 15) & 0x7f) << 1) as u8,
                    (pts >> 7) as u8,
                    0x01 | ((pts & 0x7f) << 1) as u8,
                ];
                p[at..at + pes.len()].copy_from_slice(&pes);
                at += pes.len();
            } else {
                p[3] = 0x10 | self.cc_data;
            }
            self.cc_data = (self.cc_data + 1) & 0x0f;
            // Checkable content: frame number, packet index, then a counting pattern.
            let mut body = &mut p[at..];
            let tag = [
                b'B',
                b'R',
                b'D',
                key as u8,
                (self.frame >> 24) as u8,
                (self.frame >> 16) as u8,
                (self.frame >> 8) as u8,
                self.frame as u8,
                (i >> 8) as u8,
                i as u8,
                (self.config.run >> 24) as u8,
                (self.config.run >> 16) as u8,
                (self.config.run >> 8) as u8,
                self.config.run as u8,
            ];
            let k = tag.len().min(body.len());
            body[..k].copy_from_slice(&tag[..k]);
            body = &mut body[k..];
            for (j, b) in body.iter_mut().enumerate() {
                *b = (self.frame as u8)
                    .wrapping_add(i as u8)
                    .wrapping_add(j as u8);
            }
            out.put_slice(&p);
        }
        self.frame += 1;
        out.freeze()
    }

    fn put_section(out: &mut BytesMut, pid: u16, cc: &mut u8, section: &[u8]) {
        let mut p = [0xffu8; PACKET];
        p[0] = SYNC;
        p[1] = 0x40 | (pid >> 8) as u8;
        p[2] = pid as u8;
        p[3] = 0x10 | *cc;
        *cc = (*cc + 1) & 0x0f;
        p[4] = 0; // pointer field
        p[5..5 + section.len()].copy_from_slice(section);
        out.put_slice(&p);
    }

    fn with_crc(mut section: Vec<u8>) -> Vec<u8> {
        let crc = CRC.checksum(&section);
        section.extend_from_slice(&crc.to_be_bytes());
        section
    }

    fn put_pat(&mut self, out: &mut BytesMut) {
        // table 0, section length 13, ts id 1, version 0 current, program 1 -> PMT_PID.
        let section = Self::with_crc(vec![
            0x00,
            0xb0,
            13,
            0x00,
            0x01,
            0xc1,
            0x00,
            0x00,
            0x00,
            0x01,
            0xe0 | (PMT_PID >> 8) as u8,
            PMT_PID as u8,
        ]);
        let mut cc = self.cc_pat;
        Self::put_section(out, 0, &mut cc, &section);
        self.cc_pat = cc;
    }

    fn put_pmt(&mut self, out: &mut BytesMut) {
        // table 2, section length 18, program 1, PCR on DATA_PID, one stream of type 0x06.
        let section = Self::with_crc(vec![
            0x02,
            0xb0,
            18,
            0x00,
            0x01,
            0xc1,
            0x00,
            0x00,
            0xe0 | (DATA_PID >> 8) as u8,
            DATA_PID as u8,
            0xf0,
            0x00,
            0x06,
            0xe0 | (DATA_PID >> 8) as u8,
            DATA_PID as u8,
            0xf0,
            0x00,
        ]);
        let mut cc = self.cc_pmt;
        Self::put_section(out, PMT_PID, &mut cc, &section);
        self.cc_pmt = cc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synth_is_valid_ts_with_keyframes_every_gop() {
        let mut s = Synth::new(SynthConfig {
            bitrate: 4_000_000,
            fps: 25,
            gop: 10,
            run: 0,
            align: false,
        });
        let mut program = Program::default();
        let mut keys = Vec::new();
        let mut pcrs = Vec::new();
        let mut cc: std::collections::HashMap<u16, u8> = Default::default();
        let mut all = Vec::new();
        for f in 0..30 {
            let frame = s.next_frame();
            assert_eq!(frame.len() % PACKET, 0);
            for p in frame.chunks(PACKET) {
                let h = parse(p).expect("a TS packet");
                if let Some(last) = cc.insert(h.pid, p[3] & 0x0f) {
                    assert_eq!(
                        (last + 1) & 0x0f,
                        p[3] & 0x0f,
                        "continuity on pid {}",
                        h.pid
                    );
                }
                if program.observe(p, &h) {
                    keys.push(f);
                }
                if let Some(pcr) = h.pcr {
                    pcrs.push(pcr);
                }
                all.push(p.to_vec());
            }
        }
        assert_eq!(keys, vec![0, 10, 20]);
        assert_eq!(
            program.video_pids,
            Vec::<u16>::new(),
            "private data is not video"
        );
        assert!(program.seen_pmt);
        assert!(pcrs.windows(2).all(|w| w[1] - w[0] == 27_000_000 / 25));
        let data: Vec<_> = all
            .iter()
            .filter(|p| parse(p).unwrap().pid == DATA_PID)
            .collect();
        let data_unique: std::collections::HashSet<_> = data.iter().collect();
        assert_eq!(
            data_unique.len(),
            data.len(),
            "every data packet is distinct"
        );
        let bytes_per_sec = s.packets_per_frame() * PACKET * 25 * 8;
        assert!(
            (3_900_000..=4_000_000).contains(&bytes_per_sec),
            "{bytes_per_sec}"
        );
    }

    #[test]
    fn pat_and_pmt_crc_verify() {
        let mut s = Synth::new(SynthConfig {
            bitrate: 1_000_000,
            fps: 25,
            gop: 25,
            run: 0,
            align: false,
        });
        let frame = s.next_frame();
        for p in frame.chunks(PACKET).take(2) {
            let len = (usize::from(p[6] & 0x0f) << 8) | usize::from(p[7]);
            let section = &p[5..8 + len];
            assert_eq!(
                CRC.checksum(section),
                0,
                "CRC over a section with its CRC is 0"
            );
        }
    }

    #[test]
    fn parse_refuses_non_packets() {
        assert!(parse(&[0u8; PACKET]).is_none());
        assert!(parse(&[SYNC; 10]).is_none());
        let mut p = [0u8; PACKET];
        p[0] = SYNC;
        p[3] = 0x30;
        p[4] = 200; // adaptation field longer than the packet
        assert!(parse(&p).is_none());
    }

    #[test]
    fn program_marks_only_video_random_access() {
        // PMT with an H.264 stream on 0x100 and AAC (0x0f) on 0x101.
        let mut prog = Program {
            pmt_pids: vec![0x1000],
            ..Program::default()
        };
        let pmt = Synth::with_crc(vec![
            0x02, 0xb0, 23, 0x00, 0x01, 0xc1, 0x00, 0x00, 0xe1, 0x00, 0xf0, 0x00, 0x1b, 0xe1, 0x00,
            0xf0, 0x00, 0x0f, 0xe1, 0x01, 0xf0, 0x00,
        ]);
        let mut p = [0xffu8; PACKET];
        p[..4].copy_from_slice(&[SYNC, 0x50, 0x00, 0x10]);
        p[4] = 0;
        p[5..5 + pmt.len()].copy_from_slice(&pmt);
        let h = parse(&p).unwrap();
        assert!(!prog.observe(&p, &h));
        assert_eq!(prog.video_pids, vec![0x100]);
        let rai = |pid: u16| {
            let mut p = [0xffu8; PACKET];
            p[..6].copy_from_slice(&[SYNC, 0x40 | (pid >> 8) as u8, pid as u8, 0x30, 1, 0x40]);
            p
        };
        let audio = rai(0x101);
        let video = rai(0x100);
        assert!(!prog.observe(&audio, &parse(&audio).unwrap()));
        assert!(prog.observe(&video, &parse(&video).unwrap()));
    }

    /// A packet on `pid` with counter `cc`; `afc` its adaptation field control, and a
    /// discontinuity indicator if `jump`.
    fn counted(pid: u16, cc: u8, afc: u8, jump: bool) -> [u8; PACKET] {
        let mut p = [0xffu8; PACKET];
        p[..4].copy_from_slice(&[SYNC, (pid >> 8) as u8, pid as u8, (afc << 4) | cc]);
        if afc & 0x2 != 0 {
            p[4] = 1;
            p[5] = if jump { 0x80 } else { 0 };
        }
        p
    }

    #[test]
    fn continuity_counts_what_went_missing_and_nothing_else() {
        let mut c = Continuity::default();
        for cc in 0..16 {
            c.observe(&counted(0x100, cc, 1, false));
        }
        // Wraps; a repeat; another PID counts apart; adaptation only does not step.
        c.observe(&counted(0x100, 0, 1, false));
        c.observe(&counted(0x100, 0, 1, false));
        c.observe(&counted(0x101, 9, 1, false));
        c.observe(&counted(0x100, 0, 2, false));
        c.observe(&counted(0x100, 1, 3, false));
        // Null packets have no counter.
        c.observe(&counted(0x1fff, 7, 1, false));
        assert_eq!((c.errors, c.missing), (0, 0));
        // Three packets lost: 2, 3, 4.
        c.observe(&counted(0x100, 5, 1, false));
        assert_eq!((c.errors, c.missing), (1, 3));
        // A flagged discontinuity may jump.
        c.observe(&counted(0x100, 12, 3, true));
        assert_eq!(c.errors, 1);
        // After a reset (a looped file) the first packet of each PID starts over.
        c.reset();
        c.observe(&counted(0x101, 3, 1, false));
        assert_eq!(c.errors, 1);
        c.observe(&counted(0x101, 3, 1, false));
        c.observe(&counted(0x101, 2, 1, false));
        assert_eq!((c.errors, c.missing), (2, 17));
    }

    proptest::proptest! {
        #[test]
        fn continuity_takes_any_bytes(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let mut c = Continuity::default();
            for p in data.chunks(PACKET) {
                c.observe(p);
            }
        }
    }
}
