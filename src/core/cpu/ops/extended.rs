//! Arithmetic on x87 80-bit extended-precision values: addition, multiplication,
//! division and square root, each computed exactly and rounded once to the FCW
//! precision (24, 53 or 64 bits) and rounding mode, with the 15-bit exponent range.

use super::softfloat::{round_shift, FloatEnv, DE, IE, OE, PE, UE, ZE};

const SIGN: u128 = 1 << 79;
const INTEGER_BIT: u64 = 1 << 63;
const EXPONENT_BIAS: i32 = 16383;
const EXPONENT_MAX: u128 = 0x7fff;
const QUIET_BIT: u128 = 1 << 62;
/// The "QNaN floating-point indefinite" of the 80-bit format.
pub(super) const INDEFINITE: u128 = 0xffff_c000_0000_0000_0000;
/// The exponent of the lowest significand bit of a denormal.
const MIN_LSB_EXPONENT: i32 = 1 - EXPONENT_BIAS - 63;

/// A decoded 80-bit operand.
#[derive(Clone, Copy)]
enum Operand {
    Zero {
        sign: bool,
    },
    /// A nonzero value `significand * 2^exponent`, with bit 63 of `significand` set.
    Finite {
        sign: bool,
        exponent: i32,
        significand: u64,
    },
    Infinity {
        sign: bool,
    },
    Nan,
    /// An encoding that 80387 and later processors reject: unnormals, pseudo-NaNs and
    /// pseudo-infinities (exponent nonzero with the integer bit clear).
    Unsupported,
}

fn sign_bits(sign: bool) -> u128 {
    if sign {
        SIGN
    } else {
        0
    }
}

fn infinity(sign: bool) -> u128 {
    sign_bits(sign) | EXPONENT_MAX << 64 | u128::from(INTEGER_BIT)
}

/// Decodes `value` and returns whether it is a denormal.
fn decode(value: u128) -> (Operand, bool) {
    let sign = value & SIGN != 0;
    let exponent = (value >> 64) & EXPONENT_MAX;
    let significand = value as u64;
    if exponent == EXPONENT_MAX {
        if significand & INTEGER_BIT == 0 {
            return (Operand::Unsupported, false);
        }
        if significand << 1 == 0 {
            return (Operand::Infinity { sign }, false);
        }
        return (Operand::Nan, false);
    }
    if exponent != 0 && significand & INTEGER_BIT == 0 {
        return (Operand::Unsupported, false);
    }
    if significand == 0 {
        return (Operand::Zero { sign }, false);
    }
    let shift = significand.leading_zeros();
    let operand = Operand::Finite {
        sign,
        exponent: exponent.max(1) as i32 - EXPONENT_BIAS - 63 - shift as i32,
        significand: significand << shift,
    };
    (operand, exponent == 0)
}

/// Returns the NaN result for NaN or unsupported operands: the NaN with the larger
/// significand, quieted, and IE for a signaling NaN or an unsupported encoding.
fn propagate_nan(env: &mut FloatEnv, a: u128, x: Operand, b: u128, y: Operand) -> u128 {
    let signaling =
        |value: u128, operand: Operand| matches!(operand, Operand::Nan) && value & QUIET_BIT == 0;
    if matches!(x, Operand::Unsupported) || matches!(y, Operand::Unsupported) {
        env.before |= IE;
        return INDEFINITE;
    }
    if signaling(a, x) || signaling(b, y) {
        env.before |= IE;
    }
    let magnitude = |value: u128| value as u64;
    let nan = match (x, y) {
        (Operand::Nan, Operand::Nan) => {
            if magnitude(a) >= magnitude(b) {
                a
            } else {
                b
            }
        }
        (Operand::Nan, _) => a,
        _ => b,
    };
    nan | QUIET_BIT
}

fn is_special(operand: Operand) -> bool {
    matches!(operand, Operand::Nan | Operand::Unsupported)
}

fn invalid(env: &mut FloatEnv) -> u128 {
    env.before |= IE;
    INDEFINITE
}

/// Rounds `(significand + sticky) * 2^exponent` to `precision` bits (24, 53 or 64)
/// under the rounding mode and masks of `env`, and records OE, UE and PE.
fn round(
    env: &mut FloatEnv,
    precision: i32,
    sign: bool,
    exponent: i32,
    significand: u128,
    sticky: bool,
) -> u128 {
    if significand == 0 {
        return round(env, precision, sign, exponent - 2, 1, sticky);
    }
    let mode = env.rounding();
    let length = 128 - significand.leading_zeros() as i32;
    let (mut rounded, inexact) = round_shift(significand, sticky, length - precision, sign, mode);
    let mut top = exponent + length - 1;
    if rounded >> precision != 0 {
        rounded >>= 1;
        top += 1;
    }
    if top > EXPONENT_BIAS {
        env.after |= OE | PE;
        // NOTE: with OE unmasked the processor delivers the result with its exponent
        // scaled by 2^-24576; the emulator stores infinity and sets ES instead.
        let to_infinity = match mode {
            0 => true,
            1 => sign,
            2 => !sign,
            _ => false,
        };
        if to_infinity || !env.is_masked(OE) {
            return infinity(sign);
        }
        let largest = ((1u64 << precision) - 1) << (64 - precision);
        return sign_bits(sign) | (EXPONENT_MAX - 1) << 64 | u128::from(largest);
    }
    if top < 1 - EXPONENT_BIAS {
        // A denormal keeps the bits down to 2^MIN_LSB_EXPONENT and no more than
        // `precision` of them.
        let shift = (length - precision).max(MIN_LSB_EXPONENT - exponent);
        let (denormal, inexact) = round_shift(significand, sticky, shift, sign, mode);
        if inexact || !env.is_masked(UE) {
            env.after |= UE;
        }
        if inexact {
            env.after |= PE;
        }
        let lsb_exponent = exponent + shift;
        let field = denormal << (lsb_exponent - MIN_LSB_EXPONENT) as u32;
        // A denormal that rounded up to 2^-16382 becomes the smallest normal number.
        let biased = u128::from(field >> 63 != 0);
        return sign_bits(sign) | biased << 64 | (field & u128::from(u64::MAX));
    }
    if inexact {
        env.after |= PE;
    }
    let biased = (top + EXPONENT_BIAS) as u128;
    sign_bits(sign) | biased << 64 | (rounded << (64 - precision) as u32)
}

/// Computes `a + b`, or `a - b` when `subtract`.
pub(super) fn add(env: &mut FloatEnv, precision: i32, a: u128, b: u128, subtract: bool) -> u128 {
    let (x, x_denormal) = decode(a);
    let (y, y_denormal) = decode(b);
    if is_special(x) || is_special(y) {
        return propagate_nan(env, a, x, b, y);
    }
    let denormal = if x_denormal || y_denormal { DE } else { 0 };
    let y = match y {
        Operand::Zero { sign } if subtract => Operand::Zero { sign: !sign },
        Operand::Infinity { sign } if subtract => Operand::Infinity { sign: !sign },
        Operand::Finite {
            sign,
            exponent,
            significand,
        } if subtract => Operand::Finite {
            sign: !sign,
            exponent,
            significand,
        },
        other => other,
    };
    let round_down = env.rounding() == 1;
    match (x, y) {
        (Operand::Infinity { sign: s }, Operand::Infinity { sign: t }) if s != t => invalid(env),
        (Operand::Infinity { sign }, _) | (_, Operand::Infinity { sign }) => infinity(sign),
        (Operand::Zero { sign: s }, Operand::Zero { sign: t }) => {
            sign_bits(if s == t { s } else { round_down })
        }
        (
            Operand::Zero { .. },
            Operand::Finite {
                sign,
                exponent,
                significand,
            },
        )
        | (
            Operand::Finite {
                sign,
                exponent,
                significand,
            },
            Operand::Zero { .. },
        ) => {
            env.before |= denormal;
            round(
                env,
                precision,
                sign,
                exponent,
                u128::from(significand),
                false,
            )
        }
        (
            Operand::Finite {
                sign: s,
                exponent: e,
                significand: m,
            },
            Operand::Finite {
                sign: t,
                exponent: f,
                significand: n,
            },
        ) => {
            env.before |= denormal;
            let ((s, e, m), (t, f, n)) = if e >= f {
                ((s, e, m), (t, f, n))
            } else {
                ((t, f, n), (s, e, m))
            };
            let difference = (e - f) as u32;
            // Align at the smaller exponent while both fit in 128 bits. Beyond that,
            // keep 63 guard bits below `big` and fold what `small` loses into `sticky`.
            let (exponent, big, small, sticky) = if difference <= 63 {
                (f, u128::from(m) << difference, u128::from(n), false)
            } else {
                let shift = difference - 63;
                let small = u128::from(n).checked_shr(shift).unwrap_or(0);
                let lost = small.checked_shl(shift).unwrap_or(0) != u128::from(n);
                (e - 63, u128::from(m) << 63, small, lost)
            };
            if s == t {
                return round(env, precision, s, exponent, big + small, sticky);
            }
            let difference = big - small - u128::from(sticky);
            if difference == 0 && !sticky {
                return sign_bits(round_down);
            }
            round(env, precision, s, exponent, difference, sticky)
        }
        _ => unreachable!("NaNs and unsupported encodings were handled above"),
    }
}

/// Computes `a * b`.
pub(super) fn mul(env: &mut FloatEnv, precision: i32, a: u128, b: u128) -> u128 {
    let (x, x_denormal) = decode(a);
    let (y, y_denormal) = decode(b);
    if is_special(x) || is_special(y) {
        return propagate_nan(env, a, x, b, y);
    }
    let denormal = if x_denormal || y_denormal { DE } else { 0 };
    let sign = (a ^ b) & SIGN != 0;
    match (x, y) {
        (Operand::Infinity { .. }, Operand::Zero { .. })
        | (Operand::Zero { .. }, Operand::Infinity { .. }) => invalid(env),
        (Operand::Infinity { .. }, _) | (_, Operand::Infinity { .. }) => infinity(sign),
        (
            Operand::Finite {
                exponent: e,
                significand: m,
                ..
            },
            Operand::Finite {
                exponent: f,
                significand: n,
                ..
            },
        ) => {
            env.before |= denormal;
            round(
                env,
                precision,
                sign,
                e + f,
                u128::from(m) * u128::from(n),
                false,
            )
        }
        _ => {
            env.before |= denormal;
            sign_bits(sign)
        }
    }
}

/// Computes `a / b`.
pub(super) fn div(env: &mut FloatEnv, precision: i32, a: u128, b: u128) -> u128 {
    let (x, x_denormal) = decode(a);
    let (y, y_denormal) = decode(b);
    if is_special(x) || is_special(y) {
        return propagate_nan(env, a, x, b, y);
    }
    let denormal = if x_denormal || y_denormal { DE } else { 0 };
    let sign = (a ^ b) & SIGN != 0;
    match (x, y) {
        (Operand::Infinity { .. }, Operand::Infinity { .. })
        | (Operand::Zero { .. }, Operand::Zero { .. }) => invalid(env),
        (Operand::Infinity { .. }, _) => infinity(sign),
        (_, Operand::Infinity { .. }) => {
            env.before |= denormal;
            sign_bits(sign)
        }
        (Operand::Finite { .. }, Operand::Zero { .. }) => {
            env.before |= ZE;
            infinity(sign)
        }
        (
            Operand::Finite {
                exponent: e,
                significand: m,
                ..
            },
            Operand::Finite {
                exponent: f,
                significand: n,
                ..
            },
        ) => {
            env.before |= denormal;
            // Both significands have bit 63 set, so the first quotient has 64 or 65
            // bits. Eight more from the remainder leave guard bits for 64-bit rounding.
            let divisor = u128::from(n);
            let dividend = u128::from(m) << 64;
            let remainder = dividend % divisor;
            let extended = remainder << 8;
            let quotient = ((dividend / divisor) << 8) | (extended / divisor);
            let sticky = extended % divisor != 0;
            round(env, precision, sign, e - f - 72, quotient, sticky)
        }
        _ => {
            env.before |= denormal;
            sign_bits(sign)
        }
    }
}

/// Computes the square root of `a`.
pub(super) fn sqrt(env: &mut FloatEnv, precision: i32, a: u128) -> u128 {
    let (operand, denormal) = decode(a);
    match operand {
        Operand::Nan if a & QUIET_BIT != 0 => a,
        Operand::Nan => {
            env.before |= IE;
            a | QUIET_BIT
        }
        Operand::Unsupported
        | Operand::Infinity { sign: true }
        | Operand::Finite { sign: true, .. } => invalid(env),
        Operand::Zero { .. } | Operand::Infinity { sign: false } => a,
        Operand::Finite {
            exponent,
            significand,
            ..
        } => {
            if denormal {
                env.before |= DE;
            }
            // Root of a 126- or 127-bit radicand with an even exponent, then two more
            // bits by the digit-by-digit method, for 65 bits in all.
            let (radicand, exponent) = if exponent % 2 != 0 {
                (u128::from(significand) << 63, exponent - 63)
            } else {
                (u128::from(significand) << 62, exponent - 62)
            };
            let mut root = radicand.isqrt();
            let mut remainder = radicand - root * root;
            for _ in 0..2 {
                let trial = 4 * root + 1;
                remainder *= 4;
                root *= 2;
                if remainder >= trial {
                    remainder -= trial;
                    root += 1;
                }
            }
            round(
                env,
                precision,
                false,
                exponent / 2 - 2,
                root,
                remainder != 0,
            )
        }
    }
}
