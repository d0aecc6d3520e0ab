//! Activations on the wire: little-endian f32 or bf16, row-major `[tokens, hidden]`.
//! Every length is checked before a byte is interpreted.

use bytes::Bytes;

use crate::pb::WireDtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    F32,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown or unspecified wire dtype {0}")]
    DType(i32),
    #[error("activation bytes {got} != tokens {tokens} x hidden {hidden} x {size} bytes")]
    Length {
        got: usize,
        tokens: usize,
        hidden: usize,
        size: usize,
    },
    #[error("activations hold a non-finite value at index {0}")]
    NonFinite(usize),
}

impl WireFormat {
    pub fn size(self) -> usize {
        match self {
            WireFormat::F32 => 4,
            WireFormat::Bf16 => 2,
        }
    }

    pub fn to_proto(self) -> WireDtype {
        match self {
            WireFormat::F32 => WireDtype::F32,
            WireFormat::Bf16 => WireDtype::Bf16,
        }
    }

    pub fn from_proto(v: i32) -> Result<Self, CodecError> {
        match WireDtype::try_from(v) {
            Ok(WireDtype::F32) => Ok(WireFormat::F32),
            Ok(WireDtype::Bf16) => Ok(WireFormat::Bf16),
            _ => Err(CodecError::DType(v)),
        }
    }
}

impl std::str::FromStr for WireFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(WireFormat::F32),
            "bf16" | "bfloat16" => Ok(WireFormat::Bf16),
            other => Err(format!(
                "unknown wire dtype `{other}` (expected bf16 or f32)"
            )),
        }
    }
}

pub fn encode_activations(values: &[f32], format: WireFormat) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * format.size());
    encode_activations_into(values, format, &mut out);
    Bytes::from(out)
}

/// [`encode_activations`], appending to `out`: a large answer is encoded piece by piece
/// into one buffer instead of being held whole in f32 first.
pub fn encode_activations_into(values: &[f32], format: WireFormat, out: &mut Vec<u8>) {
    match format {
        WireFormat::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        WireFormat::Bf16 => {
            for v in values {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
    }
}

/// The index of the first NaN or infinity in encoded activations, read in place: lets a
/// large request be refused for a bad value before any of it is decoded or computed.
/// A trailing partial value is ignored (lengths are checked elsewhere).
pub fn find_non_finite(bytes: &[u8], format: WireFormat) -> Option<usize> {
    match format {
        WireFormat::F32 => bytes
            .chunks_exact(4)
            .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        // A bf16 is NaN or infinite exactly when its eight exponent bits are all set.
        WireFormat::Bf16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
    }
}

/// Decodes `[tokens, hidden]` values, refusing a wrong length or a NaN/Inf (which would
/// otherwise spread silently through every later layer).
pub fn decode_activations(
    bytes: &[u8],
    format: WireFormat,
    tokens: usize,
    hidden: usize,
) -> Result<Vec<f32>, CodecError> {
    let size = format.size();
    let expected = tokens.checked_mul(hidden).and_then(|n| n.checked_mul(size));
    if expected != Some(bytes.len()) {
        return Err(CodecError::Length {
            got: bytes.len(),
            tokens,
            hidden,
            size,
        });
    }
    let mut out = Vec::with_capacity(tokens * hidden);
    match format {
        WireFormat::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        WireFormat::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
        ),
    }
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::NonFinite(i));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly_and_bf16_within_its_precision() {
        let v: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        let e = encode_activations(&v, WireFormat::F32);
        assert_eq!(decode_activations(&e, WireFormat::F32, 4, 16).unwrap(), v);
        let e = encode_activations(&v, WireFormat::Bf16);
        assert_eq!(e.len(), 128);
        let d = decode_activations(&e, WireFormat::Bf16, 4, 16).unwrap();
        for (a, b) in d.iter().zip(&v) {
            assert!((a - b).abs() <= b.abs() * (1.0 / 256.0), "{a} vs {b}");
            assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
        }
    }

    #[test]
    fn bad_lengths_dtypes_and_values_are_refused() {
        let e = encode_activations(&[1.0; 8], WireFormat::F32);
        assert!(matches!(
            decode_activations(&e, WireFormat::F32, 3, 4),
            Err(CodecError::Length { .. })
        ));
        assert!(matches!(
            decode_activations(&e, WireFormat::Bf16, 2, 4),
            Err(CodecError::Length { .. })
        ));
        // tokens x hidden overflowing usize is a length error, not a panic.
        assert!(decode_activations(&e, WireFormat::F32, usize::MAX, 3).is_err());
        let e = encode_activations(&[1.0, f32::NAN], WireFormat::F32);
        assert_eq!(
            decode_activations(&e, WireFormat::F32, 1, 2),
            Err(CodecError::NonFinite(1))
        );
        assert!(WireFormat::from_proto(0).is_err());
        assert!(WireFormat::from_proto(99).is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            // CI runs 1024 cases per property (a fraction of a second); PROPTEST_CASES raises it
            // for a longer session (SECURITY.md).
            #![proptest_config(ProptestConfig {
                cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1024),
                ..ProptestConfig::default()
            })]

            /// Any bytes with any declared shape: a length error, a non-finite error, or
            /// exactly tokens x hidden values; never a panic or an allocation the bytes
            /// do not justify.
            #[test]
            fn decoding_arbitrary_bytes_never_panics(
                bytes in prop::collection::vec(any::<u8>(), 0..512),
                tokens in prop_oneof![0usize..64, Just(usize::MAX), any::<usize>()],
                hidden in prop_oneof![0usize..64, Just(usize::MAX / 2 + 1), any::<usize>()],
                bf16 in any::<bool>(),
            ) {
                let format = if bf16 { WireFormat::Bf16 } else { WireFormat::F32 };
                match decode_activations(&bytes, format, tokens, hidden) {
                    Ok(v) => {
                        prop_assert_eq!(v.len() * format.size(), bytes.len());
                        prop_assert_eq!(Some(v.len()), tokens.checked_mul(hidden));
                        prop_assert!(v.iter().all(|x| x.is_finite()));
                    }
                    Err(CodecError::Length { got, .. }) => prop_assert_eq!(got, bytes.len()),
                    Err(CodecError::NonFinite(i)) => prop_assert!(i * format.size() < bytes.len()),
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }

            /// Finite values survive the wire: exactly in f32, as bf16 rounds them in bf16.
            #[test]
            fn finite_values_round_trip(
                values in prop::collection::vec(-1e30f32..1e30f32, 0..256),
            ) {
                let e = encode_activations(&values, WireFormat::F32);
                prop_assert_eq!(decode_activations(&e, WireFormat::F32, 1, values.len()), Ok(values.clone()));
                let e = encode_activations(&values, WireFormat::Bf16);
                let d = decode_activations(&e, WireFormat::Bf16, values.len(), 1).unwrap();
                for (a, b) in d.iter().zip(&values) {
                    prop_assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
                }
            }

            /// The in-place scan finds exactly the value decoding would refuse.
            #[test]
            fn the_in_place_scan_agrees_with_decoding(
                bytes in prop::collection::vec(prop_oneof![any::<u8>(), Just(0x7f), Just(0xff), Just(0x80)], 0..256),
                bf16 in any::<bool>(),
            ) {
                let format = if bf16 { WireFormat::Bf16 } else { WireFormat::F32 };
                let whole = &bytes[..bytes.len() / format.size() * format.size()];
                let n = whole.len() / format.size();
                let decoded = decode_activations(whole, format, 1, n);
                match find_non_finite(whole, format) {
                    Some(i) => prop_assert_eq!(decoded, Err(CodecError::NonFinite(i))),
                    None => prop_assert!(decoded.is_ok()),
                }
            }

            #[test]
            fn any_dtype_number_is_known_or_refused(v in any::<i32>()) {
                match WireFormat::from_proto(v) {
                    Ok(f) => prop_assert_eq!(f.to_proto() as i32, v),
                    Err(e) => prop_assert_eq!(e, CodecError::DType(v)),
                }
            }
        }
    }
}
