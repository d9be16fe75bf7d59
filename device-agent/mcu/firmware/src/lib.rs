//! What the firmware images share: the pieces a real board gets from its
//! HAL (a time driver, an executor, an RNG, a TCP socket), reduced to what
//! runs under QEMU without peripherals, the size-optimised memory routines,
//! plus the stack meter.
//!
//! Only [`stack`], the time driver, [`mem`] and [`trng`] need `unsafe` (raw
//! memory below the stack pointer; the `#[no_mangle]` hooks embassy-time and
//! the compiler link against; C's memory routines; a peripheral's
//! registers); the agent crate itself stays `forbid(unsafe_code)`.
#![no_std]
#![deny(unsafe_code)]

use core::future::Future;
use core::pin::pin;
use core::task::{Context, Poll, Waker};

use sha2::{Digest, Sha256};

/// Size-optimised memory routines, linked instead of compiler-builtins'.
///
/// Rust on a bare-metal target gets `memcpy`, `memset`, `memcmp` and the
/// ARM EABI variants (`__aeabi_memcpy4`, `__aeabi_memclr8`, …) from
/// compiler-builtins, which unrolls them for speed: 1.1–1.4 KiB of flash in
/// the verification core, 2.7–3.1 KiB in the whole agent
/// (docs/BENCHMARKS.md, "Microcontroller agent"), because each EABI variant
/// is its own copy loop. A C firmware built for size links newlib-nano's
/// one-byte-at-a-time routines instead; these are the same, about 130 B for
/// all of them. compiler-builtins defines its
/// routines as weak symbols, so these take their place in every image
/// (the empty baseline references none).
///
/// The agent copies at most a few hundred bytes per message, so the speed
/// lost is a few microseconds next to one SHA-256 compression. The loops
/// read and write through volatile accesses so that the optimiser cannot
/// turn them back into calls to `memcpy` — that is, into themselves.
#[allow(unsafe_code)]
pub mod mem {
    use core::ptr::{read_volatile, write_volatile};

    // The loops live under their own names: LLVM treats a call to anything
    // named `memcpy` or `memset` as its intrinsic, which it lowers on ARM to
    // `__aeabi_memcpy` — so an EABI entry point that called `memcpy` would
    // call itself.

    /// Copies forward, or backward when `d` is above an overlapping `s`.
    ///
    /// # Safety
    /// `n` bytes readable at `s` and writable at `d`.
    #[inline(never)]
    unsafe fn copy(d: *mut u8, s: *const u8, n: usize) {
        if (d as usize) <= (s as usize) {
            for i in 0..n {
                // SAFETY: within the `n` bytes the caller vouches for;
                // forward never overwrites a byte before it is read.
                unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
            }
        } else {
            for i in (0..n).rev() {
                // SAFETY: as above, backward.
                unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
            }
        }
    }

    /// # Safety
    /// `n` bytes writable at `d`.
    #[inline(never)]
    unsafe fn fill(d: *mut u8, byte: u8, n: usize) {
        for i in 0..n {
            // SAFETY: within the `n` bytes the caller vouches for.
            unsafe { write_volatile(d.add(i), byte) };
        }
    }

    /// # Safety
    /// As C's `memcpy`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
        // SAFETY: the caller's contract.
        unsafe { copy(d, s, n) };
        d
    }

    /// # Safety
    /// As C's `memmove`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
        // SAFETY: the caller's contract; `copy` handles overlap.
        unsafe { copy(d, s, n) };
        d
    }

    /// # Safety
    /// As C's `memset`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
        // SAFETY: the caller's contract; C's memset stores `c` as a byte.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        unsafe {
            fill(d, c as u8, n);
        }
        d
    }

    /// # Safety
    /// As C's `memcmp`: `n` bytes readable at `a` and at `b`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        for i in 0..n {
            // SAFETY: within the `n` bytes the caller vouches for.
            let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
            if x != y {
                return i32::from(x) - i32::from(y);
            }
        }
        0
    }

    /// # Safety
    /// As `memcmp`; only equality is reported.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: the caller's contract.
        unsafe { memcmp(a, b, n) }
    }

    /// The ARM EABI entry points (RTABI §4.3.4), which compiler-builtins
    /// implements separately; byte loops need none of the alignment they
    /// promise. The `memset` ones take `(dest, n, c)`, `memclr` `(dest, n)`.
    macro_rules! aeabi {
        ($($name:ident ($d:ident, $a:ident, $b:ident) => $body:expr;)*) => {$(
            /// # Safety
            /// As the C routine of the same family.
            #[unsafe(no_mangle)]
            pub unsafe extern "aapcs" fn $name($d: *mut u8, $a: usize, $b: usize) {
                // SAFETY: the caller's contract is the C routine's.
                unsafe { $body };
            }
        )*};
    }

    aeabi! {
        __aeabi_memcpy(d, s, n) => copy(d, s as *const u8, n);
        __aeabi_memcpy4(d, s, n) => copy(d, s as *const u8, n);
        __aeabi_memcpy8(d, s, n) => copy(d, s as *const u8, n);
        __aeabi_memmove(d, s, n) => copy(d, s as *const u8, n);
        __aeabi_memmove4(d, s, n) => copy(d, s as *const u8, n);
        __aeabi_memmove8(d, s, n) => copy(d, s as *const u8, n);
        __aeabi_memset(d, n, c) => fill(d, c as u8, n);
        __aeabi_memset4(d, n, c) => fill(d, c as u8, n);
        __aeabi_memset8(d, n, c) => fill(d, c as u8, n);
        __aeabi_memclr(d, n, _unused) => fill(d, 0, n);
        __aeabi_memclr4(d, n, _unused) => fill(d, 0, n);
        __aeabi_memclr8(d, n, _unused) => fill(d, 0, n);
    }
}

/// A generated copy of the protocol's challenge-mode vectors (build.rs).
pub mod vectors {
    use mqseal_proto::challenge::Registered;

    /// A positive vector of `challenge.json`, flattened.
    pub struct Positive {
        pub name: &'static str,
        pub kind: &'static str,
        pub device: &'static str,
        pub key: &'static [u8],
        pub frame: &'static [u8],
        pub request_msg_id: &'static [u8],
        pub rng_seed: &'static [u8],
        pub challenge: &'static [u8],
        pub hidden: bool,
        pub topic: &'static str,
        pub msg_id: &'static [u8],
        pub issued_at: u64,
        pub expires_at: u64,
        pub call_name: &'static str,
        pub call_args: &'static [&'static str],
        pub registered: &'static [Registered<'static>],
        pub matches: Option<u64>,
        pub in_reply_to: &'static [u8],
        pub outcome: (u8, i32, &'static [u8]),
        pub candidates: &'static [(u8, i32, &'static [u8])],
    }

    /// A frame given in full, or as `len` copies of one byte.
    pub enum Frame {
        Bytes(&'static [u8]),
        Fill(u8, usize),
    }

    /// A challenge-mode negative vector of `negative.json`, flattened.
    pub struct Negative {
        pub name: &'static str,
        pub controller: bool,
        pub device: &'static str,
        pub key: &'static [u8],
        pub arrived_on: &'static str,
        pub frame: Frame,
        pub expected: &'static str,
        pub monotonic_ms: u64,
        pub unix_secs: Option<u64>,
        pub lifetime_ms: u64,
        pub outstanding: &'static [(&'static [u8], u64)],
        pub executed: &'static [(&'static [u8], u64)],
        pub executed_floor: u64,
        pub registered: &'static [Registered<'static>],
        pub challenge: &'static [u8],
        pub in_reply_to: &'static [u8],
        pub candidates: &'static [(u8, i32, &'static [u8])],
    }

    include!(concat!(env!("OUT_DIR"), "/vectors.rs"));
}

/// Polls `f` until it completes: the smallest executor there is. A board
/// would sleep (`wfe`) between polls and be woken by its network interrupt;
/// under QEMU the scripted transport is always ready.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// Stops here for good (sleeping, not spinning): where a product would
/// reset, these images have nothing left to do.
pub fn halt() -> ! {
    loop {
        cortex_m::asm::wfi();
    }
}

/// The embassy-time driver of these images: time stands still at 0, so no
/// keepalive or timeout fires while a script runs. A board uses its HAL's
/// driver (a SysTick or RTC peripheral) instead.
#[allow(unsafe_code)] // the macro's #[unsafe(no_mangle)] link hooks
mod driver {
    struct Frozen;

    impl embassy_time_driver::Driver for Frozen {
        fn now(&self) -> u64 {
            0
        }
        fn schedule_wake(&self, _at: u64, waker: &core::task::Waker) {
            waker.wake_by_ref();
        }
    }

    embassy_time_driver::time_driver_impl!(static DRIVER: Frozen = Frozen);
}

/// The RNG of the test vectors (docs/PROTOCOL.md): the stream
/// `SHA-256(seed ‖ be64(0)) ‖ SHA-256(seed ‖ be64(1)) ‖ …`. Deterministic,
/// so a script can know the challenges the agent will issue. A board uses
/// its hardware RNG.
///
/// The first [`AHEAD`] bytes are computed when it is made, so that handing
/// them out costs what a hardware RNG read costs — a copy — and the stack
/// measured under `Agent::handle` is the agent's, not this stand-in's
/// SHA-256 (about 650 B of it). Later bytes are computed as they are asked for.
pub struct VectorRng {
    seed: &'static [u8],
    counter: u64,
    block: [u8; AHEAD],
    /// Valid bytes in `block`.
    len: usize,
    used: usize,
}

/// Bytes of the stream computed in advance: four challenges' or message
/// ids' worth, what one QEMU script asks for between two measurements.
pub const AHEAD: usize = 128;

impl VectorRng {
    /// The stream for `seed`.
    #[must_use]
    pub fn new(seed: &'static [u8]) -> Self {
        let mut rng = VectorRng { seed, counter: 0, block: [0; AHEAD], len: 0, used: 0 };
        rng.refill();
        rng
    }

    /// Computes the next [`AHEAD`] bytes of the stream.
    #[inline(never)]
    fn refill(&mut self) {
        for chunk in self.block.chunks_mut(32) {
            let mut h = Sha256::new();
            h.update(self.seed);
            h.update(self.counter.to_be_bytes());
            chunk.iter_mut().zip(h.finalize()).for_each(|(c, d)| *c = d);
            self.counter += 1;
        }
        self.len = AHEAD;
        self.used = 0;
    }
}

impl rand_core::TryRng for VectorRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for d in dst.iter_mut() {
            if self.used == self.len {
                self.refill();
            }
            *d = self.block.get(self.used).copied().unwrap_or(0);
            self.used += 1;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for VectorRng {}

/// A hardware RNG's data register, read as a footprint image's RNG: what
/// a product links instead of [`VectorRng`] (STM32's `RNG` peripheral: wait
/// for `DRDY` in `RNG_SR`, read 32 bits from `RNG_DR`). Only in the size
/// images, which are measured and never run.
#[allow(unsafe_code)]
pub mod trng {
    /// The peripheral's status and data registers (STM32F4's addresses).
    const SR: usize = 0x5006_0804;
    const DR: usize = 0x5006_0808;

    /// Reads the data register whenever the status says a word is ready.
    pub struct RegisterRng;

    fn word() -> u32 {
        // SAFETY: volatile reads of the RNG peripheral's registers, which
        // have no side effect but handing out the next word.
        unsafe {
            while core::ptr::read_volatile(SR as *const u32) & 1 == 0 {}
            core::ptr::read_volatile(DR as *const u32)
        }
    }

    impl rand_core::TryRng for RegisterRng {
        type Error = core::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(word())
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(u64::from(word()) << 32 | u64::from(word()))
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            let mut w = 0;
            for (i, d) in dst.iter_mut().enumerate() {
                if i % 4 == 0 {
                    w = word();
                }
                // The low byte; the word is used up a byte at a time.
                #[allow(clippy::cast_possible_truncation)]
                {
                    *d = w as u8;
                }
                w >>= 8;
            }
            Ok(())
        }
    }

    impl rand_core::TryCryptoRng for RegisterRng {}
}

/// An "RNG" that hands out given bytes: puts a vector's challenge into a
/// challenge table through its public `issue`.
pub struct Script<'a>(pub &'a [u8]);

impl rand_core::TryRng for Script<'_> {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(0)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(0)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for (d, s) in dst.iter_mut().zip(self.0) {
            *d = *s;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for Script<'_> {}

/// The stack meter: paint the free RAM below the stack with a pattern, run
/// something, then find the deepest word that no longer holds it.
///
/// The figure runs from the top of RAM (where the stack starts at reset),
/// so it includes `main`'s own frame and everything the measured code put
/// on the stack — buffers that live in `main` included.
#[allow(unsafe_code)]
pub mod stack {
    const PAINT: u32 = 0xCCCC_CCCC;
    /// Left unpainted below the painter's own stack pointer.
    const MARGIN: usize = 64;

    unsafe extern "C" {
        // cortex-m-rt's link.x: the end of .bss/.data and the initial SP.
        static __sheap: u32;
        static _stack_start: u32;
    }

    fn bounds() -> (usize, usize) {
        // Only the addresses of the linker symbols are taken, never their values.
        (core::ptr::addr_of!(__sheap) as usize, core::ptr::addr_of!(_stack_start) as usize)
    }

    /// Bytes of RAM taken by statics (.data + .bss): from the start of RAM
    /// to the end of the static sections.
    #[must_use]
    pub fn statics(ram_origin: usize) -> usize {
        bounds().0.saturating_sub(ram_origin)
    }

    /// Paints from the end of the statics up to just below the current SP.
    #[inline(never)]
    pub fn paint() {
        let (low, _) = bounds();
        let sp = cortex_m::register::msp::read() as usize;
        let mut p = low;
        while p + 4 <= sp.saturating_sub(MARGIN) {
            // SAFETY: [low, sp - MARGIN) is RAM between the statics and the
            // live stack; nothing owns it while we run single-threaded with
            // interrupts unused.
            unsafe { core::ptr::write_volatile(p as *mut u32, PAINT) };
            p += 4;
        }
    }

    /// The current stack pointer.
    #[must_use]
    #[inline(always)]
    pub fn sp() -> usize {
        cortex_m::register::msp::read() as usize
    }

    /// Peak stack use since [`paint`] below `base` (an earlier [`sp`]): what
    /// the code called from there used, its own locals included.
    #[must_use]
    #[inline(never)]
    pub fn peak_below(base: usize) -> usize {
        let (low, _) = bounds();
        let mut p = low;
        // SAFETY: reads of the painted region only, word-aligned.
        while p < base && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
            p += 4;
        }
        base.saturating_sub(p)
    }

    /// Peak stack use since [`paint`], in bytes from the top of RAM.
    #[must_use]
    #[inline(never)]
    pub fn peak() -> usize {
        let (low, top) = bounds();
        let mut p = low;
        // SAFETY: reads of the painted region only, word-aligned.
        while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
            p += 4;
        }
        top - p
    }
}

/// A transport that replays a scripted broker: reads come from `script`,
/// writes are captured into `sent` (what a TCP socket would carry). When
/// the script is exhausted, reads fail, which ends the connection.
pub struct ScriptIo<'a> {
    script: &'a [u8],
    read: usize,
    /// Everything written, up to its capacity.
    pub sent: &'a mut [u8],
    /// Bytes written so far.
    pub sent_len: usize,
}

impl<'a> ScriptIo<'a> {
    /// A transport replaying `script` and capturing into `sent`.
    pub fn new(script: &'a [u8], sent: &'a mut [u8]) -> Self {
        ScriptIo { script, read: 0, sent, sent_len: 0 }
    }
}

/// The script ran out, or the capture buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptEnd {
    /// No more scripted input.
    Exhausted,
    /// The capture buffer is full.
    Full,
}

impl core::fmt::Display for ScriptEnd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ScriptEnd::Exhausted => "script exhausted",
            ScriptEnd::Full => "capture buffer full",
        })
    }
}

impl core::error::Error for ScriptEnd {}

impl embedded_io_async::Error for ScriptEnd {
    fn kind(&self) -> embedded_io_async::ErrorKind {
        embedded_io_async::ErrorKind::BrokenPipe
    }
}

impl embedded_io_async::ErrorType for ScriptIo<'_> {
    type Error = ScriptEnd;
}

impl embedded_io_async::Read for ScriptIo<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ScriptEnd> {
        let rest = self.script.get(self.read..).unwrap_or(&[]);
        if rest.is_empty() {
            return Err(ScriptEnd::Exhausted);
        }
        let n = rest.len().min(buf.len());
        buf.get_mut(..n).ok_or(ScriptEnd::Exhausted)?.copy_from_slice(rest.get(..n).ok_or(ScriptEnd::Exhausted)?);
        self.read += n;
        Ok(n)
    }
}

impl embedded_io_async::Write for ScriptIo<'_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ScriptEnd> {
        let room = self.sent.get_mut(self.sent_len..).ok_or(ScriptEnd::Full)?;
        let n = room.len().min(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(ScriptEnd::Full);
        }
        room.get_mut(..n).ok_or(ScriptEnd::Full)?.copy_from_slice(buf.get(..n).ok_or(ScriptEnd::Full)?);
        self.sent_len += n;
        Ok(n)
    }

    async fn flush(&mut self) -> Result<(), ScriptEnd> {
        Ok(())
    }
}
