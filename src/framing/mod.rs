//! [`Framing`]: how [`Cmd::ReadFrame`](crate::Cmd::ReadFrame) and
//! [`Cmd::ReadFrames`](crate::Cmd::ReadFrames) cut a byte stream into messages, on the poller
//! thread, so that no user splits bytes by hand.

use std::fmt;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use bytes::Bytes;

mod delims;

/// How to cut a connection's byte stream into frames: lines, length-prefixed frames, or a
/// [`Decoder`] of your own. Each has a maximum frame length: a frame longer than that
/// completes its read with [`Error::FrameTooLong`](crate::Error::FrameTooLong), as soon as
/// the bytes that prove it arrived, so a peer can never make the poller buffer more.
///
/// Cheap to clone (a custom decoder is shared behind an `Arc`): keep one and send
/// `Cmd::ReadFrame(framing.clone())` for each frame.
///
/// ```
/// use proactor::Framing;
///
/// // Chat-style lines: up to 4,096 bytes before the `\n` (a trailing `\r` counted), the
/// // `\r` taken off the frame.
/// let lines = Framing::lines(4096).strip_cr(true);
/// // A 4-byte big-endian length, then that many bytes (at most 1 MiB).
/// let frames = Framing::length_prefixed(4, 1 << 20);
/// # drop((lines, frames));
/// ```
#[derive(Clone)]
pub struct Framing {
    kind: Kind,
    max: usize,
}

#[derive(Clone)]
enum Kind {
    Delimited {
        delim: u8,
        strip_cr: bool,
    },
    Prefixed {
        width: u8,
        little: bool,
        adjust: i64,
    },
    Custom(Arc<dyn Decoder>),
}

/// What a [`Decoder`] found at the start of the bytes it was shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A frame: the bytes `frame` (a range of the bytes shown) are the message, and the
    /// first `consumed` bytes (at least the frame's end) are gone from the stream. A header
    /// or a delimiter is left out of `frame` and counted in `consumed`.
    Frame {
        /// The message's bytes, within what was shown.
        frame: Range<usize>,
        /// How many bytes of the stream the frame took, header and trailer included.
        consumed: usize,
    },
    /// No whole frame yet: at least this many more bytes are needed (1 if unknown).
    NeedMore(usize),
    /// The bytes can never become a valid frame: the read completes with
    /// [`Error::BadFrame`](crate::Error::BadFrame) and this message.
    Invalid(String),
}

/// A framing of your own, for protocols the built-in ones do not cover. It runs on the
/// poller thread, so it must be quick and must not block; a panic in it is caught and
/// completes the read with [`Error::BadFrame`](crate::Error::BadFrame).
///
/// ```
/// use proactor::{Decoded, Decoder, Framing};
/// use std::sync::Arc;
///
/// /// Frames of `'<' payload '>'`.
/// struct Angles;
///
/// impl Decoder for Angles {
///     fn decode(&self, buf: &[u8]) -> Decoded {
///         if buf[0] != b'<' {
///             return Decoded::Invalid("a frame starts with <".into());
///         }
///         match buf.iter().position(|&b| b == b'>') {
///             Some(end) => Decoded::Frame { frame: 1..end, consumed: end + 1 },
///             None => Decoded::NeedMore(1),
///         }
///     }
/// }
///
/// let framing = Framing::custom(Arc::new(Angles), 1024);
/// # drop(framing);
/// ```
pub trait Decoder: Send + Sync + 'static {
    /// Looks at the bytes received and not yet taken (never empty; at most the framing's
    /// maximum plus what a header needs, and what already arrived).
    fn decode(&self, buf: &[u8]) -> Decoded;
}

/// What the parser found at the start of the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A frame (`frame` within the bytes), and how many bytes it took.
    Frame {
        frame: Range<usize>,
        consumed: usize,
    },
    /// Not yet; at least this many more bytes are needed.
    Need(usize),
    /// Longer than the maximum.
    TooLong,
    /// Never a frame (the decoder said so, or panicked).
    Invalid(String),
}

impl Framing {
    /// Lines ending with `\n`, at most `max` bytes each before the `\n` (the `\n` is not
    /// part of the frame). See [`Framing::delimited`].
    pub fn lines(max: usize) -> Framing {
        Framing::delimited(b'\n', max)
    }

    /// Frames ending with the byte `delim`, at most `max` bytes each before it (the
    /// delimiter is not part of the frame). A frame longer than `max` is detected as soon as
    /// `max + 1` bytes arrived without a delimiter.
    pub fn delimited(delim: u8, max: usize) -> Framing {
        Framing {
            kind: Kind::Delimited {
                delim,
                strip_cr: false,
            },
            max,
        }
    }

    /// Delimited frames only: whether a `\r` just before the delimiter is taken off the
    /// frame too (default: no). The maximum counts it either way.
    pub fn strip_cr(mut self, strip: bool) -> Framing {
        if let Kind::Delimited { strip_cr, .. } = &mut self.kind {
            *strip_cr = strip;
        }
        self
    }

    /// A `width`-byte length (1, 2, 4 or 8; big-endian, see [`little_endian`]), then that
    /// many bytes of payload, at most `max`: the frame is the payload. A length over `max` is
    /// detected as soon as the header arrived.
    ///
    /// # Panics
    ///
    /// If `width` is not 1, 2, 4 or 8.
    ///
    /// [`little_endian`]: Framing::little_endian
    pub fn length_prefixed(width: usize, max: usize) -> Framing {
        assert!(
            matches!(width, 1 | 2 | 4 | 8),
            "a length prefix is 1, 2, 4 or 8 bytes"
        );
        Framing {
            kind: Kind::Prefixed {
                width: width as u8,
                little: false,
                adjust: 0,
            },
            max,
        }
    }

    /// Length-prefixed frames only: the length is little-endian.
    pub fn little_endian(mut self) -> Framing {
        if let Kind::Prefixed { little, .. } = &mut self.kind {
            *little = true;
        }
        self
    }

    /// Length-prefixed frames only: `adjust` is added to the length field to get the
    /// payload's length (default 0). For a length that counts the header itself, give
    /// minus the width (`-4` for a 4-byte header); for one that counts a trailer, its size.
    /// A length that comes out negative is a [`BadFrame`](crate::Error::BadFrame).
    pub fn length_adjust(mut self, by: i64) -> Framing {
        if let Kind::Prefixed { adjust, .. } = &mut self.kind {
            *adjust = by;
        }
        self
    }

    /// Frames cut by `decoder`, at most `max` bytes of stream each (header included): a
    /// decoder that asks for more than that gets
    /// [`Error::FrameTooLong`](crate::Error::FrameTooLong).
    pub fn custom(decoder: Arc<dyn Decoder>, max: usize) -> Framing {
        Framing {
            kind: Kind::Custom(decoder),
            max,
        }
    }

    /// The maximum frame length.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Cuts the first frame off `buf` (what arrived and was not taken yet).
    pub(crate) fn parse(&self, buf: &[u8]) -> Parsed {
        match &self.kind {
            Kind::Delimited { delim, strip_cr } => {
                // Only the first max + 1 bytes matter: a line that long is too long.
                let window = &buf[..buf.len().min(self.max.saturating_add(1))];
                match memchr::memchr(*delim, window) {
                    Some(end) => {
                        let stop = if *strip_cr && end > 0 && buf[end - 1] == b'\r' {
                            end - 1
                        } else {
                            end
                        };
                        Parsed::Frame {
                            frame: 0..stop,
                            consumed: end + 1,
                        }
                    }
                    None if window.len() > self.max => Parsed::TooLong,
                    None => Parsed::Need(1),
                }
            }
            Kind::Prefixed {
                width,
                little,
                adjust,
            } => {
                let width = usize::from(*width);
                if buf.len() < width {
                    return Parsed::Need(width - buf.len());
                }
                let mut field = [0u8; 8];
                let value = if *little {
                    field[..width].copy_from_slice(&buf[..width]);
                    u64::from_le_bytes(field)
                } else {
                    field[8 - width..].copy_from_slice(&buf[..width]);
                    u64::from_be_bytes(field)
                };
                let len = i128::from(value) + i128::from(*adjust);
                if len < 0 {
                    return Parsed::Invalid(format!(
                        "length field {value} with adjustment {adjust} is negative"
                    ));
                }
                if len > self.max as i128 {
                    return Parsed::TooLong;
                }
                let end = width + len as usize;
                if buf.len() < end {
                    return Parsed::Need(end - buf.len());
                }
                Parsed::Frame {
                    frame: width..end,
                    consumed: end,
                }
            }
            Kind::Custom(decoder) => {
                let decoded = catch_unwind(AssertUnwindSafe(|| decoder.decode(buf)));
                match decoded {
                    Ok(Decoded::Frame { frame, consumed }) => {
                        if frame.start > frame.end
                            || frame.end > consumed
                            || consumed > buf.len()
                            || consumed == 0
                        {
                            return Parsed::Invalid(format!(
                                "the decoder returned frame {frame:?} and consumed {consumed} \
                                 of {} bytes",
                                buf.len()
                            ));
                        }
                        if consumed > self.max {
                            return Parsed::TooLong;
                        }
                        Parsed::Frame { frame, consumed }
                    }
                    Ok(Decoded::NeedMore(n)) => {
                        if buf.len().saturating_add(n.max(1)) > self.max {
                            Parsed::TooLong
                        } else {
                            Parsed::Need(n.max(1))
                        }
                    }
                    Ok(Decoded::Invalid(why)) => Parsed::Invalid(why),
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Parsed::Invalid(format!("the decoder panicked: {what}"))
                    }
                }
            }
        }
    }

    /// The bytes a frame found too long is dropped with: the `max + 1` bytes of a line that
    /// proved it, a length prefix; a decoder's frame: everything buffered.
    /// Frames at the start of `buf`, one after the other, at most `limit` of them: each
    /// goes to `frame` (its range within `buf`). Returns how many bytes they took, and what
    /// stopped the parse short of `limit` frames (`None`: the limit, or `buf` used up
    /// exactly; otherwise what [`parse`](Framing::parse) said at the byte where it stopped).
    /// Delimited frames are found in one pass over the bytes.
    pub(crate) fn parse_many(
        &self,
        buf: &[u8],
        limit: usize,
        mut frame: impl FnMut(Range<usize>),
    ) -> (usize, Option<Parsed>) {
        let (mut at, mut found) = (0, 0);
        if let Kind::Delimited { delim, strip_cr } = self.kind {
            for end in delims::delims(delim, buf) {
                if found == limit {
                    return (at, None);
                }
                if end - at > self.max {
                    return (at, Some(Parsed::TooLong));
                }
                let stop = if strip_cr && end > at && buf[end - 1] == b'\r' {
                    end - 1
                } else {
                    end
                };
                frame(at..stop);
                found += 1;
                at = end + 1;
            }
            if found == limit || at == buf.len() {
                return (at, None);
            }
            let stopped = if buf.len() - at > self.max {
                Parsed::TooLong
            } else {
                Parsed::Need(1)
            };
            return (at, Some(stopped));
        }
        while found < limit && at < buf.len() {
            match self.parse(&buf[at..]) {
                Parsed::Frame { frame: f, consumed } => {
                    frame(at + f.start..at + f.end);
                    found += 1;
                    at += consumed;
                }
                stopped => return (at, Some(stopped)),
            }
        }
        (at, None)
    }

    pub(crate) fn proof_len(&self) -> usize {
        match &self.kind {
            Kind::Delimited { .. } => self.max.saturating_add(1),
            Kind::Prefixed { width, .. } => usize::from(*width),
            Kind::Custom(_) => usize::MAX,
        }
    }
}

impl fmt::Debug for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Delimited { delim, strip_cr } => f
                .debug_struct("Delimited")
                .field("delim", delim)
                .field("strip_cr", strip_cr)
                .field("max", &self.max)
                .finish(),
            Kind::Prefixed {
                width,
                little,
                adjust,
            } => f
                .debug_struct("LengthPrefixed")
                .field("width", width)
                .field("little_endian", little)
                .field("adjust", adjust)
                .field("max", &self.max)
                .finish(),
            Kind::Custom(_) => f
                .debug_struct("Custom")
                .field("max", &self.max)
                .finish_non_exhaustive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(p: Parsed, buf: &[u8]) -> (Vec<u8>, usize) {
        match p {
            Parsed::Frame { frame, consumed } => (buf[frame].to_vec(), consumed),
            other => panic!("{other:?}"),
        }
    }

    /// `parse_many` one frame after another with `parse`, the slow way.
    fn parse_many_slowly(
        f: &Framing,
        buf: &[u8],
        limit: usize,
    ) -> (Vec<Range<usize>>, usize, Option<Parsed>) {
        let (mut frames, mut at) = (Vec::new(), 0);
        while frames.len() < limit && at < buf.len() {
            match f.parse(&buf[at..]) {
                Parsed::Frame { frame, consumed } => {
                    frames.push(at + frame.start..at + frame.end);
                    at += consumed;
                }
                stopped => return (frames, at, Some(stopped)),
            }
        }
        (frames, at, None)
    }

    proptest::proptest! {
        /// The one-pass split of delimited frames finds what frame-by-frame parsing finds,
        /// and stops where and why it stops.
        #[test]
        fn parse_many_agrees_with_parse(
            buf in proptest::collection::vec(proptest::sample::select(b"ab\r\n".to_vec()), 0..200),
            max in 0usize..12,
            limit in 1usize..20,
            strip_cr: bool,
        ) {
            let f = Framing::lines(max).strip_cr(strip_cr);
            let mut frames = Vec::new();
            let (at, stopped) = f.parse_many(&buf, limit, |r| frames.push(r));
            let (want, want_at, want_stopped) = parse_many_slowly(&f, &buf, limit);
            proptest::prop_assert_eq!((frames, at, stopped), (want, want_at, want_stopped));
        }
    }

    #[test]
    fn lines_with_and_without_cr_and_the_maximum() {
        let f = Framing::lines(5);
        assert_eq!(frame(f.parse(b"abc\nd"), b"abc\nd"), (b"abc".to_vec(), 4));
        assert_eq!(f.parse(b"abcde"), Parsed::Need(1));
        assert_eq!(
            frame(f.parse(b"abcde\n"), b"abcde\n"),
            (b"abcde".to_vec(), 6)
        );
        assert_eq!(f.parse(b"abcdef"), Parsed::TooLong);
        assert_eq!(f.parse(b"abcdef\n"), Parsed::TooLong);
        let f = Framing::lines(5).strip_cr(true);
        assert_eq!(frame(f.parse(b"abc\r\n"), b"abc\r\n"), (b"abc".to_vec(), 5));
        // The maximum counts the \r.
        assert_eq!(f.parse(b"abcde\r\n"), Parsed::TooLong);
        assert_eq!(frame(f.parse(b"\n"), b"\n"), (vec![], 1));
    }

    #[test]
    fn length_prefixes_of_every_width_and_order() {
        for width in [1usize, 2, 4, 8] {
            for little in [false, true] {
                let mut f = Framing::length_prefixed(width, 300);
                if little {
                    f = f.little_endian();
                }
                let len = if width == 1 { 200u64 } else { 300 };
                let field = if little {
                    len.to_le_bytes()[..width].to_vec()
                } else {
                    len.to_be_bytes()[8 - width..].to_vec()
                };
                let mut buf = field.clone();
                assert_eq!(f.parse(&buf[..width - 1]), Parsed::Need(1));
                assert_eq!(f.parse(&buf), Parsed::Need(len as usize));
                buf.extend(std::iter::repeat(7).take(len as usize));
                buf.push(9);
                let (payload, consumed) = frame(f.parse(&buf), &buf);
                assert_eq!(
                    (payload.len(), consumed),
                    (len as usize, width + len as usize)
                );
            }
        }
        // Over the maximum as soon as the header says so.
        let f = Framing::length_prefixed(2, 10);
        assert_eq!(f.parse(&[0, 11]), Parsed::TooLong);
        // A length that counts its own header.
        let f = Framing::length_prefixed(2, 10).length_adjust(-2);
        assert_eq!(
            frame(f.parse(&[0, 5, 1, 2, 3]), &[0, 5, 1, 2, 3]),
            (vec![1, 2, 3], 5)
        );
        assert!(matches!(f.parse(&[0, 1]), Parsed::Invalid(_)));
    }

    struct Twice;
    impl Decoder for Twice {
        fn decode(&self, buf: &[u8]) -> Decoded {
            match buf[0] {
                b'p' => panic!("asked to"),
                b'x' => Decoded::Frame {
                    frame: 0..5,
                    consumed: 1,
                },
                n if buf.len() > usize::from(n) => Decoded::Frame {
                    frame: 1..1 + usize::from(n),
                    consumed: 1 + usize::from(n),
                },
                n => Decoded::NeedMore(1 + usize::from(n) - buf.len()),
            }
        }
    }

    #[test]
    fn a_custom_decoder_is_checked_and_its_panic_contained() {
        let f = Framing::custom(Arc::new(Twice), 10);
        assert_eq!(
            frame(f.parse(&[2, 8, 9, 7]), &[2, 8, 9, 7]),
            (vec![8, 9], 3)
        );
        assert_eq!(f.parse(&[3, 1]), Parsed::Need(2));
        assert_eq!(f.parse(&[12]), Parsed::TooLong);
        match f.parse(b"p") {
            Parsed::Invalid(why) => assert!(why.contains("asked to"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A frame outside what it consumed is refused, not trusted.
        assert!(matches!(f.parse(b"xy"), Parsed::Invalid(_)));
    }
}

/// The frames a [`Cmd::ReadFrames`](crate::Cmd::ReadFrames) took, in order: one shared
/// [`Bytes`] and where each frame lies in it, so that looking at a frame costs nothing and
/// taking one as `Bytes` of its own ([`Frames::bytes`], or iterating by value) costs one
/// reference count, not a copy.
///
/// ```
/// # use proactor::bytes::Bytes;
/// # use proactor::Frames;
/// # #[allow(dead_code)]
/// # fn demo(frames: &Frames) {
/// for line in frames {
///     // `line` is a `&[u8]`, without its delimiter.
///     println!("{}", String::from_utf8_lossy(line));
/// }
/// let first: Option<Bytes> = frames.bytes(0); // kept beyond the completion, no copy
/// # drop(first);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Frames {
    data: Bytes,
    spans: Vec<(usize, usize)>,
}

impl Frames {
    pub(crate) const NONE: Frames = Frames {
        data: Bytes::new(),
        spans: Vec::new(),
    };

    /// No frames, over `data`; frames are pushed as ranges of it.
    pub(crate) fn over(data: Bytes, capacity: usize) -> Frames {
        Frames {
            data,
            spans: Vec::with_capacity(capacity),
        }
    }

    pub(crate) fn push(&mut self, frame: Range<usize>) {
        self.spans.push((frame.start, frame.end));
    }

    /// Ends the frames at `consumed` bytes of the data they lie in.
    pub(crate) fn truncate_data(&mut self, consumed: usize) {
        self.data.truncate(consumed);
    }

    /// How many frames there are.
    #[inline]
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are none.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Frame `i`, if there is one.
    #[inline]
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let &(start, end) = self.spans.get(i)?;
        Some(&self.data[start..end])
    }

    /// Frame `i` as [`Bytes`] of its own, sharing the memory (no copy), if there is one.
    #[inline]
    pub fn bytes(&self, i: usize) -> Option<Bytes> {
        let &(start, end) = self.spans.get(i)?;
        Some(self.data.slice(start..end))
    }

    /// The frames, in order, as byte slices.
    #[inline]
    pub fn iter(&self) -> FramesIter<'_> {
        FramesIter {
            frames: self,
            next: 0,
        }
    }

    /// Their total length (delimiters and headers not counted).
    pub fn total_len(&self) -> usize {
        self.spans.iter().map(|(s, e)| e - s).sum()
    }
}

impl fmt::Debug for Frames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Frames({} frames, {} bytes)",
            self.len(),
            self.total_len()
        )
    }
}

impl<'a> IntoIterator for &'a Frames {
    type Item = &'a [u8];
    type IntoIter = FramesIter<'a>;

    fn into_iter(self) -> FramesIter<'a> {
        self.iter()
    }
}

/// The frames as [`Bytes`] each, sharing the memory.
impl IntoIterator for Frames {
    type Item = Bytes;
    type IntoIter = FramesIntoIter;

    fn into_iter(self) -> FramesIntoIter {
        FramesIntoIter {
            data: self.data,
            spans: self.spans.into_iter(),
        }
    }
}

/// The frames of a [`Frames`], in order, as [`Bytes`] each (sharing the memory).
#[derive(Debug)]
pub struct FramesIntoIter {
    data: Bytes,
    spans: std::vec::IntoIter<(usize, usize)>,
}

impl Iterator for FramesIntoIter {
    type Item = Bytes;

    #[inline]
    fn next(&mut self) -> Option<Bytes> {
        let (start, end) = self.spans.next()?;
        Some(self.data.slice(start..end))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl ExactSizeIterator for FramesIntoIter {}

/// The frames of a [`Frames`], in order, as byte slices.
#[derive(Debug, Clone)]
pub struct FramesIter<'a> {
    frames: &'a Frames,
    next: usize,
}

impl<'a> Iterator for FramesIter<'a> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        let f = self.frames.get(self.next)?;
        self.next += 1;
        Some(f)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.frames.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for FramesIter<'_> {}
