//! What the fuzz targets share: the protocol's published test vectors and
//! keys (compiled in, so a target touches no file), and deterministic RNGs.
//! Nothing here is for production: [`Script`] and [`Counter`] are
//! predictable on purpose.
#![forbid(unsafe_code)]

use std::sync::LazyLock;

use serde_json::Value;

/// `proto/tests/vectors/*.json`.
pub static CHALLENGE: LazyLock<Value> =
    LazyLock::new(|| json(include_str!("../../proto/tests/vectors/challenge.json")));
/// The sealed-mode vectors.
pub static SEALED: LazyLock<Value> = LazyLock::new(|| json(include_str!("../../proto/tests/vectors/sealed.json")));
/// The published test keys.
pub static KEYS: LazyLock<Value> = LazyLock::new(|| json(include_str!("../../proto/tests/vectors/keys.json")));

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// The vector named `name` in `set`.
#[must_use]
pub fn vector<'a>(set: &'a Value, name: &str) -> &'a Value {
    set["vectors"].as_array().and_then(|v| v.iter().find(|x| x["name"] == name)).unwrap_or(&Value::Null)
}

/// Hex field as bytes (empty when absent).
#[must_use]
pub fn hex(v: &Value) -> Vec<u8> {
    v.as_str().and_then(|s| ::hex::decode(s).ok()).unwrap_or_default()
}

/// An "RNG" that hands out given bytes, then zeros: puts a vector's
/// challenge into a challenge table through its public `issue`.
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
        for (i, d) in dst.iter_mut().enumerate() {
            *d = self.0.get(i).copied().unwrap_or(0);
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for Script<'_> {}

/// A counter dressed as an RNG (RSA blinding, message ids): deterministic,
/// so a crash reproduces.
pub struct Counter(pub u64);

impl rand_core::TryRng for Counter {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        Ok((self.0 >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok((u64::from(self.try_next_u32()?) << 32) | u64::from(self.try_next_u32()?))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(4) {
            let v = self.try_next_u32()?.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for Counter {}
