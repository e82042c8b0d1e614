//! Kubernetes resource quantities (`"10"`, `"500m"`, `"1.5"`, `"2k"`, `"1Ki"`, `"1e3"`).
//!
//! Written by hand because k8s-openapi's `Quantity` is a plain string with no arithmetic, and the
//! HPA needs exactly two numbers from one: `Quantity.MilliValue()` for metric targets and
//! `Quantity.AsApproximateFloat64()` for the per-direction tolerances. Both are reproduced from
//! apimachinery's `resource` package (`quantity.go`, `amount.go`):
//!
//! - the grammar `<sign>? <digits>? (. <digits>?)? <suffix>` with at least one digit, where the
//!   suffix is a decimal SI prefix (`n u m "" k M G T P E`), a binary one (`Ki Mi Gi Ti Pi Ei`)
//!   or a decimal exponent (`e`/`E` followed by a signed integer);
//! - `MilliValue()` rounds up (away from zero) to a whole milli-unit, like `ScaledValue`;
//! - parsing rounds a value with more than nine fractional digits up to a whole nano-unit and
//!   caps the magnitude at 2^63−1, which `AsApproximateFloat64()` then sees.
//!
//! Arithmetic is exact (decimal digit strings), so no input is silently rounded differently
//! from Kubernetes; a value whose milli-units do not fit in an `i64` is an error rather than the
//! wrapped number Go would produce.

use std::fmt;
use std::str::FromStr;

/// Why a quantity string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "quantity {0:?} is not a Kubernetes quantity; expected a number with an optional suffix, \
         e.g. \"10\", \"500m\", \"1.5\", \"2k\", \"1Ki\" or \"1e3\""
    )]
    Format(String),
    #[error("quantity {0:?} is too large: its value in milli-units does not fit in 64 bits")]
    TooLarge(String),
}

/// The unit suffix of a quantity: a power of ten or a power of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suffix {
    Decimal(i64),
    Binary(u32),
}

/// A parsed quantity. The original text is kept for display, as Kubernetes does for canonical
/// input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    text: String,
    negative: bool,
    /// The integer digits followed by the fraction digits, as written.
    digits: String,
    /// How many of `digits` are after the decimal point.
    fraction_len: usize,
    suffix: Suffix,
}

impl Quantity {
    /// The value in milli-units rounded up (away from zero), like `Quantity.MilliValue()`.
    pub fn milli_value(&self) -> Result<i64, QuantityError> {
        let too_large = || QuantityError::TooLarge(self.text.clone());
        // value = digits × 2^binary × 10^(decimal − fraction_len); milli-units add 10^3.
        let (decimal, binary) = match self.suffix {
            Suffix::Decimal(e) => (e, 0),
            Suffix::Binary(e) => (0, e),
        };
        let mut magnitude = multiply_by_power_of_two(&self.digits, binary);
        let power_of_ten = decimal - self.fraction_len as i64 + 3;
        let magnitude = if is_zero(&magnitude) {
            0
        } else if power_of_ten >= 0 {
            if power_of_ten > 19 {
                return Err(too_large());
            }
            magnitude.extend(std::iter::repeat_n(0, power_of_ten as usize));
            digits_to_i64(&magnitude).ok_or_else(too_large)?
        } else {
            let cut = (-power_of_ten) as usize;
            let keep = magnitude.len().saturating_sub(cut);
            let has_remainder = magnitude[keep..].iter().any(|&d| d != 0);
            let whole = digits_to_i64(&magnitude[..keep]).ok_or_else(too_large)?;
            if has_remainder { whole.checked_add(1).ok_or_else(too_large)? } else { whole }
        };
        Ok(if self.negative { -magnitude } else { magnitude })
    }

    /// The value as `f64`, computed like `Quantity.AsApproximateFloat64()`: the unscaled integer
    /// converted to the nearest `f64`, times Go's `math.Pow10(exponent)`. Tolerances such as
    /// `"0.05"` therefore get exactly the bits the controller uses.
    pub fn approximate_f64(&self) -> f64 {
        let (decimal, binary) = match self.suffix {
            Suffix::Decimal(e) => (e, 0),
            Suffix::Binary(e) => (0, e),
        };
        let mut unscaled = multiply_by_power_of_two(&self.digits, binary);
        let mut exponent = decimal - self.fraction_len as i64;
        if !self.fits_int64_amount() {
            // The inf.Dec path of ParseQuantity: keep at most nine fractional digits, rounding
            // up (inf.RoundUp), then cap the magnitude at 2^63−1 (maxAllowed).
            if exponent < -9 && !is_zero(&unscaled) {
                let cut = (-9 - exponent) as usize;
                let keep = unscaled.len().saturating_sub(cut);
                let has_remainder = unscaled[keep..].iter().any(|&d| d != 0);
                unscaled.truncate(keep);
                if has_remainder {
                    increment(&mut unscaled);
                }
                exponent = -9;
            }
            if value_exceeds_max(&unscaled, exponent) {
                unscaled = b"9223372036854775807".iter().map(|b| b - b'0').collect();
                exponent = 0;
            }
        }
        let base = digits_to_f64(&unscaled);
        let magnitude = if exponent == 0 { base } else { base * go_pow10(exponent) };
        if self.negative { -magnitude } else { magnitude }
    }

    /// Whether ParseQuantity's fast path stores this value as an `int64Amount` (no rounding, no
    /// cap) rather than an `inf.Dec`.
    fn fits_int64_amount(&self) -> bool {
        let digits = self.digits.len() as i64;
        match self.suffix {
            Suffix::Decimal(exponent) => digits <= 18 && exponent - self.fraction_len as i64 >= -9,
            Suffix::Binary(exponent) => {
                // precision = 15 - len(num) - int32(float32(exponent)*3/10) - 1
                let precision = 14 - digits - i64::from(exponent) * 3 / 10;
                let value = multiply_by_power_of_two(&self.digits, exponent);
                self.fraction_len == 0 && precision >= 0 && digits_to_i64(&value).is_some()
            }
        }
    }

    /// True for a value below zero (used to reject negative targets and tolerances).
    pub fn is_negative(&self) -> bool {
        self.negative && !is_zero(&self.digits.bytes().map(|b| b - b'0').collect::<Vec<_>>())
    }

    /// True for a value above zero.
    pub fn is_positive(&self) -> bool {
        !self.negative && !is_zero(&self.digits.bytes().map(|b| b - b'0').collect::<Vec<_>>())
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || QuantityError::Format(text.to_owned());
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let integer_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (integer, rest) = rest.split_at(integer_len);
        let (fraction, suffix) = match rest.strip_prefix('.') {
            Some(after_point) => {
                let len = after_point.bytes().take_while(u8::is_ascii_digit).count();
                after_point.split_at(len)
            }
            None => ("", rest),
        };
        if integer.is_empty() && fraction.is_empty() {
            return Err(bad());
        }
        let suffix = parse_suffix(suffix).ok_or_else(bad)?;
        Ok(Quantity {
            text: text.to_owned(),
            negative,
            digits: format!("{integer}{fraction}"),
            fraction_len: fraction.len(),
            suffix,
        })
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_suffix(suffix: &str) -> Option<Suffix> {
    let decimal = |e| Some(Suffix::Decimal(e));
    match suffix {
        "n" => decimal(-9),
        "u" => decimal(-6),
        "m" => decimal(-3),
        "" => decimal(0),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => Some(Suffix::Binary(10)),
        "Mi" => Some(Suffix::Binary(20)),
        "Gi" => Some(Suffix::Binary(30)),
        "Ti" => Some(Suffix::Binary(40)),
        "Pi" => Some(Suffix::Binary(50)),
        "Ei" => Some(Suffix::Binary(60)),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Go's strconv.ParseInt: out-of-range exponents are a format error there too.
            exponent.parse::<i64>().ok().map(Suffix::Decimal)
        }
    }
}

/// Decimal digits (most significant first, values 0..=9) of `digits × 2^power`.
fn multiply_by_power_of_two(digits: &str, power: u32) -> Vec<u8> {
    let mut value: Vec<u8> = digits.bytes().map(|b| b - b'0').collect();
    for _ in 0..power {
        let mut carry = 0;
        for digit in value.iter_mut().rev() {
            let doubled = *digit * 2 + carry;
            *digit = doubled % 10;
            carry = doubled / 10;
        }
        if carry > 0 {
            value.insert(0, carry);
        }
    }
    value
}

fn is_zero(digits: &[u8]) -> bool {
    digits.iter().all(|&d| d == 0)
}

fn increment(digits: &mut Vec<u8>) {
    for digit in digits.iter_mut().rev() {
        if *digit == 9 {
            *digit = 0;
        } else {
            *digit += 1;
            return;
        }
    }
    digits.insert(0, 1);
}

fn significant(digits: &[u8]) -> &[u8] {
    let first = digits.iter().position(|&d| d != 0).unwrap_or(digits.len());
    &digits[first..]
}

fn digits_to_i64(digits: &[u8]) -> Option<i64> {
    significant(digits).iter().try_fold(0i64, |acc, &d| acc.checked_mul(10)?.checked_add(i64::from(d)))
}

fn digits_to_f64(digits: &[u8]) -> f64 {
    let text: String = significant(digits).iter().map(|&d| char::from(b'0' + d)).collect();
    // Rust's float parsing is correctly rounded, like big.Float.Float64().
    text.parse().unwrap_or(0.0)
}

/// Whether `digits × 10^exponent` is above 2^63−1.
fn value_exceeds_max(digits: &[u8], exponent: i64) -> bool {
    let significant = significant(digits);
    if significant.is_empty() {
        return false;
    }
    let integer_len = significant.len() as i64 + exponent;
    if integer_len <= 18 {
        return false;
    }
    if integer_len > 19 {
        return true;
    }
    // Exactly 19 integer digits: compare with 9223372036854775807 digit by digit.
    let max = b"9223372036854775807";
    let mut integer: Vec<u8> = significant.iter().copied().take(19).collect();
    integer.resize(19, 0);
    let has_fraction = significant.len() > 19 && !is_zero(&significant[19..]);
    let integer_bytes: Vec<u8> = integer.iter().map(|d| b'0' + d).collect();
    match integer_bytes.as_slice().cmp(max.as_slice()) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => has_fraction,
        std::cmp::Ordering::Less => false,
    }
}

/// Go's `math.Pow10`: a table of correctly rounded powers, combined by one multiplication or
/// division; reproduced so that `x * Pow10(n)` gives Go's bits.
fn go_pow10(n: i64) -> f64 {
    let power = |k: i64| -> f64 { format!("1e{k}").parse().unwrap_or(f64::INFINITY) };
    match n {
        0..=308 => power(n / 32 * 32) * power(n % 32),
        -323..=-1 => power(-(-n / 32 * 32)) / power(-n % 32),
        n if n > 0 => f64::INFINITY,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milli(text: &str) -> Result<i64, QuantityError> {
        text.parse::<Quantity>()?.milli_value()
    }

    #[test]
    fn decimal_suffixes_give_milli_units() {
        assert_eq!(milli("10"), Ok(10_000));
        assert_eq!(milli("500m"), Ok(500));
        assert_eq!(milli("1.5"), Ok(1_500));
        assert_eq!(milli("2k"), Ok(2_000_000));
        assert_eq!(milli("3M"), Ok(3_000_000_000));
        assert_eq!(milli("1G"), Ok(1_000_000_000_000));
        assert_eq!(milli("1T"), Ok(1_000_000_000_000_000));
        assert_eq!(milli("1P"), Ok(1_000_000_000_000_000_000));
        assert_eq!(milli("+7"), Ok(7_000));
        assert_eq!(milli("0"), Ok(0));
        assert_eq!(milli("1."), Ok(1_000));
        assert_eq!(milli(".5"), Ok(500));
    }

    #[test]
    fn small_units_round_up_to_a_whole_milli() {
        assert_eq!(milli("1n"), Ok(1));
        assert_eq!(milli("1u"), Ok(1));
        assert_eq!(milli("1000u"), Ok(1));
        assert_eq!(milli("1001u"), Ok(2));
        assert_eq!(milli("0.0001"), Ok(1));
        assert_eq!(milli("1.0001"), Ok(1_001));
        assert_eq!(milli("1500u"), Ok(2));
        // Away from zero for negative values, like ScaledValue.
        assert_eq!(milli("-1.0001"), Ok(-1_001));
        assert_eq!(milli("0.000000000000000000000000000000000001"), Ok(1));
    }

    #[test]
    fn binary_suffixes() {
        assert_eq!(milli("1Ki"), Ok(1_024_000));
        assert_eq!(milli("1.5Ki"), Ok(1_536_000));
        assert_eq!(milli("2Mi"), Ok(2 * 1_048_576 * 1000));
        assert_eq!(milli("1Gi"), Ok(1_073_741_824_000));
        assert_eq!(milli("0.001Ki"), Ok(1_024));
    }

    #[test]
    fn exponents() {
        assert_eq!(milli("1e3"), Ok(1_000_000));
        assert_eq!(milli("1E3"), Ok(1_000_000));
        assert_eq!(milli("1e+3"), Ok(1_000_000));
        assert_eq!(milli("15e-1"), Ok(1_500));
        assert_eq!(milli("1e-3"), Ok(1));
        assert_eq!(milli("1e-4"), Ok(1));
        assert_eq!(milli("1e-99999"), Ok(1));
        // "E" alone is the exa prefix, not an exponent.
        assert_eq!(milli("1mE"), Err(QuantityError::Format("1mE".into())));
        assert_eq!(milli("0.000001E"), Ok(1_000_000_000_000_000));
    }

    #[test]
    fn rejects_malformed_input_with_a_hint() {
        for bad in [
            "", " 10", "10 ", "abc", ".", "-", "1.2.3", "1e", "1e+", "1K", "1ki", "1m5", "1Kib", "--1", "1,5", "1e3.5",
            "0x10",
        ] {
            let err = bad.parse::<Quantity>().unwrap_err();
            assert!(err.to_string().contains("e.g. \"10\""), "{bad:?}: {err}");
        }
    }

    #[test]
    fn too_large_values_are_errors_not_wrapped_numbers() {
        assert!(matches!(milli("1E"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(milli("10P"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(milli("1e30"), Err(QuantityError::TooLarge(_))));
        assert_eq!(milli("9223372036854775m"), Ok(9_223_372_036_854_775));
        assert_eq!(milli("9223372036854775807m"), Ok(i64::MAX));
        assert!(matches!(milli("9223372036854775808m"), Err(QuantityError::TooLarge(_))));
    }

    #[test]
    fn approximate_float_follows_go() {
        let approx = |text: &str| text.parse::<Quantity>().unwrap().approximate_f64();
        assert_eq!(approx("0.1"), 0.1);
        assert_eq!(approx("0.05"), 5.0 * 0.01);
        assert_eq!(approx("100m"), 100.0 * 0.001);
        assert_eq!(approx("0"), 0.0);
        assert_eq!(approx("1Ki"), 1024.0);
        assert_eq!(approx("1.5Ki"), 15360.0 * 0.1);
        assert_eq!(approx("1e20"), 1e20);
        // More than nine fractional digits: rounded up to 1n first.
        assert_eq!(approx("0.0000000001"), 1.0 * go_pow10(-9));
        // The int64Amount fast path neither rounds nor caps ...
        assert_eq!(approx("1e30"), 1.0 * go_pow10(30));
        // ... the inf.Dec path (more than 18 digits) caps at 2^63-1.
        assert_eq!(approx("99999999999999999999"), i64::MAX as f64);
        assert_eq!(approx("1Ei"), 1_152_921_504_606_846_976.0);
    }

    #[test]
    fn go_pow10_matches_the_table_structure() {
        assert_eq!(go_pow10(0), 1.0);
        assert_eq!(go_pow10(-1), 1.0 / 10.0);
        assert_eq!(go_pow10(-2), 0.01);
        assert_eq!(go_pow10(40), 1e32 * 1e8);
        assert_eq!(go_pow10(-40), 1e-32 / 1e8);
        assert_eq!(go_pow10(400), f64::INFINITY);
        assert_eq!(go_pow10(-400), 0.0);
    }

    #[test]
    fn sign_helpers() {
        let q = |text: &str| text.parse::<Quantity>().unwrap();
        assert!(q("-1").is_negative());
        assert!(!q("-0").is_negative());
        assert!(q("1m").is_positive());
        assert!(!q("0").is_positive());
        assert_eq!(q("2k").to_string(), "2k");
    }
}
