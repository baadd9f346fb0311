//! Identifiers and units shared by every node.

use std::fmt;
use std::time::Duration;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                $name(v)
            }
        }
    };
}

id!(
    /// A live stream, chosen by whoever configures the network.
    StreamId(u32)
);
id!(
    /// One of the paths a copy of a stream travels; chosen by the sender of the copy.
    PathId(u8)
);
id!(
    /// A node of the network (capture, entry point, reflector, edge).
    NodeId(u64)
);
id!(
    /// A viewer, as named in its token.
    ClientId(u64)
);

/// A bit rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bitrate(pub u64);

impl Bitrate {
    /// `n` megabits per second.
    pub const fn mbps(n: u64) -> Bitrate {
        Bitrate(n * 1_000_000)
    }

    /// `n` kilobits per second.
    pub const fn kbps(n: u64) -> Bitrate {
        Bitrate(n * 1_000)
    }

    /// The rate at which `size` is moved in `elapsed` (zero for a zero duration).
    pub fn from_size_over(size: DataSize, elapsed: Duration) -> Bitrate {
        let nanos = elapsed.as_nanos();
        if nanos == 0 {
            return Bitrate(0);
        }
        let bits = u128::from(size.0) * 8 * 1_000_000_000;
        Bitrate(u64::try_from(bits / nanos).unwrap_or(u64::MAX))
    }

    /// Bits per second.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Bitrate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0 as f64;
        if v >= 1e9 {
            write!(f, "{:.2} Gbps", v / 1e9)
        } else if v >= 1e6 {
            write!(f, "{:.2} Mbps", v / 1e6)
        } else if v >= 1e3 {
            write!(f, "{:.1} kbps", v / 1e3)
        } else {
            write!(f, "{} bps", self.0)
        }
    }
}

/// An amount of data in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DataSize(pub u64);

impl DataSize {
    /// `n` bytes.
    pub const fn bytes(n: u64) -> DataSize {
        DataSize(n)
    }

    /// Bytes.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for DataSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitrate_from_size_over() {
        let cases = [
            (500_000, Duration::from_secs(1), 4_000_000),
            (125, Duration::from_millis(250), 4_000),
            (1, Duration::ZERO, 0),
            (u64::MAX, Duration::from_nanos(1), u64::MAX),
        ];
        for (bytes, elapsed, bps) in cases {
            assert_eq!(
                Bitrate::from_size_over(DataSize(bytes), elapsed),
                Bitrate(bps),
                "{bytes} B over {elapsed:?}"
            );
        }
    }

    #[test]
    fn bitrate_display() {
        assert_eq!(Bitrate::mbps(4).to_string(), "4.00 Mbps");
        assert_eq!(Bitrate::kbps(640).to_string(), "640.0 kbps");
    }
}
