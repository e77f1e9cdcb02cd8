//! IEEE 754 binary32 and binary64 arithmetic in software, as SSE computes it under
//! MXCSR: the four rounding modes, DAZ, FTZ and the six exception flags.
//!
//! Every operation first computes the exact result as an integer significand, an
//! exponent and a sticky bit (set when nonzero bits were dropped below the significand),
//! then rounds it once in [`round_pack`]. Underflow is detected after rounding, as
//! Intel and AMD processors do for SSE.

/// MXCSR exception flags, also used as the flags that an operation raises.
pub(super) const IE: u32 = 1 << 0;
pub(super) const DE: u32 = 1 << 1;
pub(super) const ZE: u32 = 1 << 2;
pub(super) const OE: u32 = 1 << 3;
pub(super) const UE: u32 = 1 << 4;
pub(super) const PE: u32 = 1 << 5;
/// Exceptions detected before the computation: invalid operation, denormal operand and
/// division by zero. An unmasked one stops the instruction before any result exists.
pub(super) const PRECOMPUTATION: u32 = IE | DE | ZE;
const DAZ: u32 = 1 << 6;
const FTZ: u32 = 1 << 15;
const MASK_SHIFT: u32 = 7;

/// A binary interchange format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Format {
    /// Total width in bits.
    pub(super) bits: u32,
    /// Significand precision in bits, the implicit bit included.
    precision: u32,
    exponent_bits: u32,
}

pub(super) const F32: Format = Format {
    bits: 32,
    precision: 24,
    exponent_bits: 8,
};
pub(super) const F64: Format = Format {
    bits: 64,
    precision: 53,
    exponent_bits: 11,
};

impl Format {
    fn bias(self) -> i32 {
        (1 << (self.exponent_bits - 1)) - 1
    }
    fn fraction_mask(self) -> u64 {
        (1 << (self.precision - 1)) - 1
    }
    fn sign_bit(self) -> u64 {
        1 << (self.bits - 1)
    }
    fn exponent_field(self, bits: u64) -> u64 {
        (bits >> (self.precision - 1)) & ((1 << self.exponent_bits) - 1)
    }
    fn infinity(self, sign: bool) -> u64 {
        self.sign_of(sign) | (((1 << self.exponent_bits) - 1) << (self.precision - 1))
    }
    fn sign_of(self, sign: bool) -> u64 {
        if sign {
            self.sign_bit()
        } else {
            0
        }
    }
    /// Returns the "QNaN floating-point indefinite": negative, with only the top
    /// fraction bit set.
    pub(super) fn default_nan(self) -> u64 {
        self.infinity(true) | 1 << (self.precision - 2)
    }
    fn quiet_bit(self) -> u64 {
        1 << (self.precision - 2)
    }
    /// Returns the exponent of the lowest significand bit of a denormal, which is also
    /// that of the smallest normal number.
    fn min_lsb_exponent(self) -> i32 {
        1 - self.bias() - (self.precision as i32 - 1)
    }
}

/// A decoded operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Value {
    Zero {
        sign: bool,
    },
    /// A nonzero finite value `significand * 2^exponent`.
    Finite {
        sign: bool,
        exponent: i32,
        significand: u64,
    },
    Infinity {
        sign: bool,
    },
    Nan {
        signaling: bool,
    },
}

/// The MXCSR modes of one instruction and the exception flags its lanes raised.
pub(super) struct FloatEnv {
    mxcsr: u32,
    /// Flags of exceptions detected before the computation (IE, DE, ZE).
    pub(super) before: u32,
    /// Flags of exceptions detected in rounding (OE, UE, PE).
    pub(super) after: u32,
}

impl FloatEnv {
    pub(super) fn new(mxcsr: u32) -> Self {
        Self {
            mxcsr,
            before: 0,
            after: 0,
        }
    }

    pub(super) fn rounding(&self) -> u32 {
        (self.mxcsr >> 13) & 3
    }

    /// Returns whether MXCSR masks exception `flag`.
    pub(super) fn is_masked(&self, flag: u32) -> bool {
        (self.mxcsr >> MASK_SHIFT) & flag != 0
    }

    /// Returns the flags of exceptions whose masks MXCSR clears.
    pub(super) fn unmasked(&self, flags: u32) -> u32 {
        flags & !(self.mxcsr >> MASK_SHIFT) & 0x3f
    }

    /// Decodes `bits` and returns whether it is a denormal. Under DAZ a denormal decodes
    /// as a zero instead. The caller raises DE for a denormal unless an invalid
    /// operation takes precedence.
    pub(super) fn unpack(&self, bits: u64, format: Format) -> (Value, bool) {
        let sign = bits & format.sign_bit() != 0;
        let exponent_field = format.exponent_field(bits);
        let fraction = bits & format.fraction_mask();
        let all_ones = (1 << format.exponent_bits) - 1;
        if exponent_field == all_ones {
            if fraction == 0 {
                return (Value::Infinity { sign }, false);
            }
            let signaling = fraction & format.quiet_bit() == 0;
            return (Value::Nan { signaling }, false);
        }
        if exponent_field == 0 {
            if fraction == 0 {
                return (Value::Zero { sign }, false);
            }
            if self.mxcsr & DAZ != 0 {
                return (Value::Zero { sign }, false);
            }
            let value = Value::Finite {
                sign,
                exponent: format.min_lsb_exponent(),
                significand: fraction,
            };
            return (value, true);
        }
        let value = Value::Finite {
            sign,
            exponent: exponent_field as i32 - format.bias() - (format.precision as i32 - 1),
            significand: fraction | 1 << (format.precision - 1),
        };
        (value, false)
    }

    /// Returns `bits` with a denormal replaced by a zero of the same sign under DAZ.
    pub(super) fn denormal_as_zero(&self, bits: u64, format: Format) -> u64 {
        let is_denormal = format.exponent_field(bits) == 0 && bits & format.fraction_mask() != 0;
        if is_denormal && self.mxcsr & DAZ != 0 {
            bits & format.sign_bit()
        } else {
            bits
        }
    }

    /// Rounds `(significand + sticky) * 2^exponent` to `format` under the current
    /// rounding mode, FTZ and exception masks, and records OE, UE and PE.
    pub(super) fn round_pack(
        &mut self,
        format: Format,
        sign: bool,
        exponent: i32,
        significand: u128,
        sticky: bool,
    ) -> u64 {
        let sign_bits = format.sign_of(sign);
        if significand == 0 {
            if sticky {
                // The value is positive but below the lowest bit of `significand`, so
                // round a tiny stand-in below the lowest representable bit instead.
                return self.round_pack(format, sign, exponent - 2, 1, false);
            }
            return sign_bits;
        }
        let precision = format.precision as i32;
        let length = 128 - significand.leading_zeros() as i32;
        let mode = self.rounding();

        // Round to the precision as if the exponent range were unbounded, which decides
        // overflow and (after rounding) tininess.
        let (mut rounded, inexact) =
            round_shift(significand, sticky, length - precision, sign, mode);
        let mut top = exponent + length - 1;
        if rounded >> precision != 0 {
            rounded >>= 1;
            top += 1;
        }
        let max_exponent = format.bias();
        let min_exponent = 1 - format.bias();
        if top > max_exponent {
            self.after |= OE;
            if !self.is_masked(OE) {
                if inexact {
                    self.after |= PE;
                }
                return format.infinity(sign);
            }
            self.after |= PE;
            let to_infinity = match mode {
                0 => true,
                1 => sign,
                2 => !sign,
                _ => false,
            };
            return if to_infinity {
                format.infinity(sign)
            } else {
                format.infinity(sign) - 1
            };
        }
        if top < min_exponent {
            if !self.is_masked(UE) {
                self.after |= UE;
                if inexact {
                    self.after |= PE;
                }
                return sign_bits;
            }
            if self.mxcsr & FTZ != 0 {
                self.after |= UE | PE;
                return sign_bits;
            }
            let shift = format.min_lsb_exponent() - exponent;
            let (denormal, inexact) = round_shift(significand, sticky, shift, sign, mode);
            if inexact {
                self.after |= UE | PE;
            }
            return sign_bits | denormal as u64;
        }
        if inexact {
            self.after |= PE;
        }
        let biased = (top + format.bias()) as u64;
        sign_bits | biased << (format.precision - 1) | (rounded as u64 & format.fraction_mask())
    }

    /// Returns the NaN result of an operation with NaN operands: the first NaN operand,
    /// quieted, and IE for a signaling one.
    fn propagate_nan(
        &mut self,
        format: Format,
        a: u64,
        a_value: Value,
        b: u64,
        b_value: Value,
    ) -> u64 {
        let signaling = matches!(a_value, Value::Nan { signaling: true })
            || matches!(b_value, Value::Nan { signaling: true });
        if signaling {
            self.before |= IE;
        }
        let nan = if matches!(a_value, Value::Nan { .. }) {
            a
        } else {
            b
        };
        nan | format.quiet_bit()
    }

    fn invalid(&mut self, format: Format) -> u64 {
        self.before |= IE;
        format.default_nan()
    }

    /// Computes `a + b` (or `a - b` with `subtract`).
    pub(super) fn add(&mut self, format: Format, a: u64, b: u64, subtract: bool) -> u64 {
        let (x, x_denormal) = self.unpack(a, format);
        let (mut y, y_denormal) = self.unpack(b, format);
        if matches!(x, Value::Nan { .. }) || matches!(y, Value::Nan { .. }) {
            return self.propagate_nan(format, a, x, b, y);
        }
        if subtract {
            y = negate(y);
        }
        if let (Value::Infinity { sign: s }, Value::Infinity { sign: t }) = (x, y) {
            if s != t {
                return self.invalid(format);
            }
        }
        // A denormal operand is reported even when the other one is infinite.
        if x_denormal || y_denormal {
            self.before |= DE;
        }
        if let (Value::Infinity { sign }, _) | (_, Value::Infinity { sign }) = (x, y) {
            return format.infinity(sign);
        }
        let round_down = self.rounding() == 1;
        match (x, y) {
            (Value::Zero { sign: s }, Value::Zero { sign: t }) => {
                format.sign_of(if s == t { s } else { round_down })
            }
            (Value::Zero { .. }, Value::Finite { .. }) => self.repack(format, y),
            (Value::Finite { .. }, Value::Zero { .. }) => self.repack(format, x),
            (
                Value::Finite {
                    sign: s,
                    exponent: e,
                    significand: m,
                },
                Value::Finite {
                    sign: t,
                    exponent: f,
                    significand: n,
                },
            ) => {
                // Order by exponent so that `big` has the higher one.
                let ((s, e, m), (t, f, n)) = if e >= f {
                    ((s, e, m), (t, f, n))
                } else {
                    ((t, f, n), (s, e, m))
                };
                let difference = (e - f) as u32;
                let (exponent, big, small, sticky) = if difference <= 64 {
                    (f, u128::from(m) << difference, u128::from(n), false)
                } else {
                    // `small` lies below every bit of `big` and its guard bits, so it only
                    // decides the rounding, through the sticky bit.
                    (e - 3, u128::from(m) << 3, 0, true)
                };
                if s == t {
                    return self.round_pack(format, s, exponent, big + small, sticky);
                }
                if sticky {
                    return self.round_pack(format, s, exponent, big - 1, true);
                }
                match big.cmp(&small) {
                    std::cmp::Ordering::Equal => format.sign_of(round_down),
                    std::cmp::Ordering::Greater => {
                        self.round_pack(format, s, exponent, big - small, false)
                    }
                    std::cmp::Ordering::Less => {
                        self.round_pack(format, t, exponent, small - big, false)
                    }
                }
            }
            _ => unreachable!("infinities and NaNs were handled above"),
        }
    }

    /// Packs a zero or finite operand again. A denormal still flushes to zero under FTZ,
    /// as any tiny result does.
    fn repack(&mut self, format: Format, value: Value) -> u64 {
        match value {
            Value::Finite {
                sign,
                exponent,
                significand,
            } => self.round_pack(format, sign, exponent, u128::from(significand), false),
            Value::Zero { sign } => format.sign_of(sign),
            Value::Infinity { sign } => format.infinity(sign),
            Value::Nan { .. } => format.default_nan(),
        }
    }

    /// Computes `a * b`.
    pub(super) fn mul(&mut self, format: Format, a: u64, b: u64) -> u64 {
        let (x, x_denormal) = self.unpack(a, format);
        let (y, y_denormal) = self.unpack(b, format);
        if matches!(x, Value::Nan { .. }) || matches!(y, Value::Nan { .. }) {
            return self.propagate_nan(format, a, x, b, y);
        }
        let sign = value_sign(x) != value_sign(y);
        if let (Value::Infinity { .. }, Value::Zero { .. })
        | (Value::Zero { .. }, Value::Infinity { .. }) = (x, y)
        {
            return self.invalid(format);
        }
        // A denormal operand is reported even when the other one is infinite.
        if x_denormal || y_denormal {
            self.before |= DE;
        }
        if let (Value::Infinity { .. }, _) | (_, Value::Infinity { .. }) = (x, y) {
            return format.infinity(sign);
        }
        match (x, y) {
            (
                Value::Finite {
                    exponent: e,
                    significand: m,
                    ..
                },
                Value::Finite {
                    exponent: f,
                    significand: n,
                    ..
                },
            ) => self.round_pack(format, sign, e + f, u128::from(m) * u128::from(n), false),
            _ => format.sign_of(sign),
        }
    }

    /// Computes `a / b`.
    pub(super) fn div(&mut self, format: Format, a: u64, b: u64) -> u64 {
        let (x, x_denormal) = self.unpack(a, format);
        let (y, y_denormal) = self.unpack(b, format);
        if matches!(x, Value::Nan { .. }) || matches!(y, Value::Nan { .. }) {
            return self.propagate_nan(format, a, x, b, y);
        }
        let sign = value_sign(x) != value_sign(y);
        match (x, y) {
            (Value::Infinity { .. }, Value::Infinity { .. })
            | (Value::Zero { .. }, Value::Zero { .. }) => return self.invalid(format),
            (Value::Infinity { .. }, _) => return format.infinity(sign),
            (_, Value::Infinity { .. }) => {
                if x_denormal {
                    self.before |= DE;
                }
                return format.sign_of(sign);
            }
            (Value::Finite { .. }, Value::Zero { .. }) => {
                self.before |= ZE;
                return format.infinity(sign);
            }
            _ => {}
        }
        if x_denormal || y_denormal {
            self.before |= DE;
        }
        match (x, y) {
            (
                Value::Finite {
                    exponent: e,
                    significand: m,
                    ..
                },
                Value::Finite {
                    exponent: f,
                    significand: n,
                    ..
                },
            ) => {
                // Normalize both significands to 64 bits, so that the quotient of the
                // dividend shifted by 64 has at least 64 bits.
                let (m, e) = normalize(m, e);
                let (n, f) = normalize(n, f);
                let dividend = u128::from(m) << 64;
                let divisor = u128::from(n);
                let quotient = dividend / divisor;
                let sticky = dividend % divisor != 0;
                self.round_pack(format, sign, e - 64 - f, quotient, sticky)
            }
            _ => format.sign_of(sign),
        }
    }

    /// Computes the square root of `b`.
    pub(super) fn sqrt(&mut self, format: Format, b: u64) -> u64 {
        let (y, y_denormal) = self.unpack(b, format);
        match y {
            Value::Nan { signaling } => {
                if signaling {
                    self.before |= IE;
                }
                b | format.quiet_bit()
            }
            Value::Zero { sign } => format.sign_of(sign),
            Value::Infinity { sign: false } => format.infinity(false),
            Value::Infinity { sign: true } | Value::Finite { sign: true, .. } => {
                self.invalid(format)
            }
            Value::Finite {
                exponent,
                significand,
                ..
            } => {
                if y_denormal {
                    self.before |= DE;
                }
                // A radicand of 125 or 126 bits with an even exponent gives a root of at
                // least 62 bits, more than the 55 that rounding needs.
                let (m, e) = normalize(significand, exponent);
                let (radicand, e) = if e % 2 != 0 {
                    (u128::from(m) << 61, e - 61)
                } else {
                    (u128::from(m) << 62, e - 62)
                };
                let root = radicand.isqrt();
                let sticky = root * root != radicand;
                self.round_pack(format, false, e / 2, root, sticky)
            }
        }
    }

    /// Computes MINSS/MAXSS (and the packed forms): the second operand when either is a
    /// NaN (raising IE even for a quiet NaN) or when both are zeros.
    pub(super) fn min_max(&mut self, format: Format, a: u64, b: u64, max: bool) -> u64 {
        let (x, x_denormal) = self.unpack(a, format);
        let (y, y_denormal) = self.unpack(b, format);
        if matches!(x, Value::Nan { .. }) || matches!(y, Value::Nan { .. }) {
            self.before |= IE;
            return b;
        }
        if x_denormal || y_denormal {
            self.before |= DE;
        }
        let a = self.denormal_as_zero(a, format);
        let b = self.denormal_as_zero(b, format);
        let (x, y) = (as_f64(format, a), as_f64(format, b));
        let pick_a = if max { x > y } else { x < y };
        if pick_a {
            a
        } else {
            b
        }
    }

    /// Compares `a` with `b` and returns their ordering (`None` when unordered).
    /// `signal_quiet` makes a quiet NaN raise IE too, as the ordered comparisons (LT,
    /// LE, their negations and COMISS) do; a signaling NaN always raises it.
    pub(super) fn compare(
        &mut self,
        format: Format,
        a: u64,
        b: u64,
        signal_quiet: bool,
    ) -> Option<std::cmp::Ordering> {
        let (x, x_denormal) = self.unpack(a, format);
        let (y, y_denormal) = self.unpack(b, format);
        let signaling = matches!(x, Value::Nan { signaling: true })
            || matches!(y, Value::Nan { signaling: true });
        let nan = matches!(x, Value::Nan { .. }) || matches!(y, Value::Nan { .. });
        if signaling || (nan && signal_quiet) {
            self.before |= IE;
        }
        if nan {
            return None;
        }
        if x_denormal || y_denormal {
            self.before |= DE;
        }
        let x = as_f64(format, self.denormal_as_zero(a, format));
        let y = as_f64(format, self.denormal_as_zero(b, format));
        x.partial_cmp(&y)
    }

    /// Converts `bits` of format `from` to format `to` (CVTSS2SD, CVTSD2SS).
    pub(super) fn convert(&mut self, from: Format, to: Format, bits: u64) -> u64 {
        let (value, denormal) = self.unpack(bits, from);
        match value {
            Value::Nan { signaling } => {
                if signaling {
                    self.before |= IE;
                }
                // Keep the sign and the top fraction bits, and set the quiet bit.
                let sign = bits & from.sign_bit() != 0;
                let fraction = bits & from.fraction_mask();
                let fraction = if from.precision > to.precision {
                    fraction >> (from.precision - to.precision)
                } else {
                    fraction << (to.precision - from.precision)
                };
                to.infinity(sign) | fraction | to.quiet_bit()
            }
            Value::Zero { sign } => to.sign_of(sign),
            Value::Infinity { sign } => to.infinity(sign),
            Value::Finite {
                sign,
                exponent,
                significand,
            } => {
                if denormal {
                    self.before |= DE;
                }
                self.round_pack(to, sign, exponent, u128::from(significand), false)
            }
        }
    }

    /// Converts a signed integer to `format` (CVTSI2SS, CVTDQ2PS and the like).
    pub(super) fn integer_to_float(&mut self, format: Format, integer: i64) -> u64 {
        self.round_pack(
            format,
            integer < 0,
            0,
            u128::from(integer.unsigned_abs()),
            false,
        )
    }

    /// Converts `bits` to a signed integer of `size` bytes (4 or 8), rounding by
    /// `rounding` (0 nearest, 1 down, 2 up, 3 toward zero). NaNs and out-of-range
    /// values raise IE and return the "integer indefinite", only the sign bit set.
    pub(super) fn float_to_integer(
        &mut self,
        format: Format,
        bits: u64,
        size: u8,
        rounding: u32,
    ) -> u64 {
        let indefinite = 1u64 << (u32::from(size) * 8 - 1);
        let (value, _) = self.unpack(bits, format);
        let (sign, exponent, significand) = match value {
            Value::Zero { .. } => return 0,
            Value::Nan { .. } | Value::Infinity { .. } => {
                self.before |= IE;
                return indefinite;
            }
            Value::Finite {
                sign,
                exponent,
                significand,
            } => (sign, exponent, significand),
        };
        let (magnitude, inexact) = if exponent >= 0 {
            if exponent > 64 {
                (None, false)
            } else {
                (u128::from(significand).checked_shl(exponent as u32), false)
            }
        } else {
            let (rounded, inexact) =
                round_shift(u128::from(significand), false, -exponent, sign, rounding);
            (Some(rounded), inexact)
        };
        let limit = u128::from(indefinite) - u128::from(!sign);
        match magnitude {
            Some(magnitude) if magnitude <= limit => {
                if inexact {
                    self.after |= PE;
                }
                let value = if sign {
                    (magnitude as u64).wrapping_neg()
                } else {
                    magnitude as u64
                };
                value & (indefinite | (indefinite - 1))
            }
            // An out-of-range conversion reports only IE.
            _ => {
                self.before |= IE;
                indefinite
            }
        }
    }
}

/// Widens `bits` of `format` to an `f64`, exactly.
fn as_f64(format: Format, bits: u64) -> f64 {
    if format == F32 {
        f64::from(f32::from_bits(bits as u32))
    } else {
        f64::from_bits(bits)
    }
}

fn negate(value: Value) -> Value {
    match value {
        Value::Zero { sign } => Value::Zero { sign: !sign },
        Value::Infinity { sign } => Value::Infinity { sign: !sign },
        Value::Finite {
            sign,
            exponent,
            significand,
        } => Value::Finite {
            sign: !sign,
            exponent,
            significand,
        },
        nan => nan,
    }
}

fn value_sign(value: Value) -> bool {
    match value {
        Value::Zero { sign } | Value::Infinity { sign } | Value::Finite { sign, .. } => sign,
        Value::Nan { .. } => false,
    }
}

/// Shifts a nonzero significand left until bit 63 is set.
fn normalize(significand: u64, exponent: i32) -> (u64, i32) {
    let shift = significand.leading_zeros();
    (significand << shift, exponent - shift as i32)
}

/// Drops the low `shift` bits of `significand` (shifts left for a negative `shift`),
/// rounding by `mode` (0 nearest even, 1 down, 2 up, 3 toward zero) for a value of sign
/// `sign`. `sticky` stands for nonzero bits below `significand`. Returns the rounded
/// value and whether it is inexact.
pub(super) fn round_shift(
    significand: u128,
    sticky: bool,
    shift: i32,
    sign: bool,
    mode: u32,
) -> (u128, bool) {
    if shift <= 0 {
        let kept = significand << (-shift) as u32;
        // Only the sticky part is lost, and it is less than half a unit.
        let up = sticky && matches!((mode, sign), (1, true) | (2, false));
        return (kept + u128::from(up), sticky);
    }
    let (kept, remainder, half) = if shift >= 129 {
        (0, significand, None)
    } else if shift == 128 {
        (0, significand, Some(1u128 << 127))
    } else {
        let shift = shift as u32;
        (
            significand >> shift,
            significand & ((1u128 << shift) - 1),
            Some(1u128 << (shift - 1)),
        )
    };
    let inexact = remainder != 0 || sticky;
    let up = match mode {
        0 => match half {
            Some(half) => remainder > half || (remainder == half && (sticky || kept & 1 == 1)),
            None => false,
        },
        1 => inexact && sign,
        2 => inexact && !sign,
        _ => false,
    };
    (kept + u128::from(up), inexact)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: u32 = 0x1f80;

    fn add32(mxcsr: u32, a: f32, b: f32) -> (f32, u32) {
        let mut env = FloatEnv::new(mxcsr);
        let bits = env.add(F32, u64::from(a.to_bits()), u64::from(b.to_bits()), false);
        (f32::from_bits(bits as u32), env.before | env.after)
    }

    #[test]
    fn add_matches_host_in_nearest() {
        let values = [1.0f32, 3.0e-39, 1.0e38, -2.5, 0.1, 1.0e-7, -3.4e38, 7.0e-46];
        for a in values {
            for b in values {
                let (sum, _) = add32(DEFAULT, a, b);
                assert_eq!(sum.to_bits(), (a + b).to_bits(), "{a} + {b}");
            }
        }
    }

    #[test]
    fn inexact_sum_sets_pe() {
        let (_, flags) = add32(DEFAULT, 1.0, 1.0e-8);
        assert_eq!(flags, PE);
        let (_, flags) = add32(DEFAULT, 1.0, 2.0);
        assert_eq!(flags, 0);
    }

    #[test]
    fn rounding_up_and_down_differ() {
        let (up, _) = add32(DEFAULT | 2 << 13, 1.0, 1.0e-8);
        let (down, _) = add32(DEFAULT | 1 << 13, 1.0, 1.0e-8);
        assert_eq!(up, f32::from_bits(1.0f32.to_bits() + 1));
        assert_eq!(down, 1.0);
        let (toward_zero, _) = add32(DEFAULT | 3 << 13, -1.0, -1.0e-8);
        assert_eq!(toward_zero, -1.0);
    }

    #[test]
    fn overflow_and_division_by_zero_flags() {
        let (sum, flags) = add32(DEFAULT, f32::MAX, f32::MAX);
        assert_eq!(sum, f32::INFINITY);
        assert_eq!(flags, OE | PE);
        let mut env = FloatEnv::new(DEFAULT);
        let quotient = env.div(F64, 1.0f64.to_bits(), 0.0f64.to_bits());
        assert_eq!(f64::from_bits(quotient), f64::INFINITY);
        assert_eq!(env.before, ZE);
    }

    #[test]
    fn denormals_under_daz_and_ftz() {
        let tiny = f32::from_bits(1);
        let (_, flags) = add32(DEFAULT, tiny, 1.0);
        assert_eq!(flags, DE | PE);
        let (sum, flags) = add32(DEFAULT | DAZ, tiny, tiny);
        assert_eq!((sum, flags), (0.0, 0));
        let (sum, flags) = add32(DEFAULT | FTZ, 2.0e-38, -1.5e-38);
        assert_eq!(sum, 0.0);
        assert_eq!(flags, UE | PE);
    }

    #[test]
    fn division_and_sqrt_match_host() {
        let values = [1.0f64, 3.0, 1.0e-310, 2.0e300, 0.7, 123456.789];
        for a in values {
            for b in values {
                let mut env = FloatEnv::new(DEFAULT);
                let quotient = env.div(F64, a.to_bits(), b.to_bits());
                assert_eq!(quotient, (a / b).to_bits(), "{a} / {b}");
                let product = env.mul(F64, a.to_bits(), b.to_bits());
                assert_eq!(product, (a * b).to_bits(), "{a} * {b}");
            }
            let mut env = FloatEnv::new(DEFAULT);
            assert_eq!(env.sqrt(F64, a.to_bits()), a.sqrt().to_bits(), "sqrt {a}");
        }
    }

    #[test]
    fn integer_conversion_rounds_and_saturates() {
        let mut env = FloatEnv::new(DEFAULT);
        assert_eq!(env.float_to_integer(F64, 2.5f64.to_bits(), 4, 0), 2);
        assert_eq!(env.after, PE);
        assert_eq!(
            env.float_to_integer(F64, (-2.5f64).to_bits(), 4, 1),
            (-3i32) as u32 as u64
        );
        assert_eq!(
            env.float_to_integer(F64, 3.0e9f64.to_bits(), 4, 0),
            0x8000_0000
        );
        assert_eq!(env.before, IE);
    }
}
