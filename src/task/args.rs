//! Celery `args`/`kwargs` → typed parameters, bound like a Python call (positional or keyword,
//! defaults, Python's `TypeError` wording), so a client sees the errors a Python worker gives.

use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};
use std::time::Duration;

/// One parameter of a task's signature: a name and, if optional, its default.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: &'static str,
    pub default: Option<Value>,
}

impl Param {
    /// A parameter the caller must pass.
    pub const fn required(name: &'static str) -> Self {
        Param { name, default: None }
    }

    /// A parameter with a default, as `name=default` in Python.
    pub fn optional(name: &'static str, default: impl Into<Value>) -> Self {
        Param { name, default: Some(default.into()) }
    }
}

impl From<&'static str> for Param {
    fn from(name: &'static str) -> Self {
        Param::required(name)
    }
}

/// A parameter type decodable from one Celery argument (JSON value).
///
/// The built-in impls give Python's wording (`must be int, not str`). For your own
/// `Deserialize` types an empty `impl Arg for MyType {}` decodes with serde; or wrap the
/// parameter in [`Json`].
pub trait Arg: DeserializeOwned {
    /// The Python type named in a `TypeError` (`int`, `str`, ...).
    const PY_TYPE: &'static str = "a valid value";

    /// Decode `v`, or say what is wrong as the end of the sentence
    /// "`f() argument 'x' ...`", e.g. `must be int, not str`.
    fn from_arg(v: &Value) -> Result<Self, String> {
        serde_json::from_value(v.clone()).map_err(|e| format!("{} ({e})", wrong_type(Self::PY_TYPE, v)))
    }
}

/// `must be <expected>, not <type of v>`: Python's text for a wrongly typed argument.
pub fn wrong_type(expected: &str, v: &Value) -> String {
    format!("must be {expected}, not {}", type_name(v))
}

/// The Python type name of a JSON value.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int",
        Value::Number(_) => "float",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// Any `Deserialize` type as a parameter, decoded by serde.
#[derive(Clone, Debug, PartialEq)]
pub struct Json<T>(pub T);

impl<'de, T: DeserializeOwned> serde::Deserialize<'de> for Json<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Json)
    }
}

impl<T: DeserializeOwned> Arg for Json<T> {}

impl Arg for Value {
    const PY_TYPE: &'static str = "any value";
    fn from_arg(v: &Value) -> Result<Self, String> {
        Ok(v.clone())
    }
}

impl Arg for String {
    const PY_TYPE: &'static str = "str";
    fn from_arg(v: &Value) -> Result<Self, String> {
        v.as_str().map(str::to_owned).ok_or_else(|| wrong_type(Self::PY_TYPE, v))
    }
}

impl Arg for bool {
    const PY_TYPE: &'static str = "bool";
    fn from_arg(v: &Value) -> Result<Self, String> {
        v.as_bool().ok_or_else(|| wrong_type(Self::PY_TYPE, v))
    }
}

/// Python ints are unbounded; an int beyond `i64` saturates rather than failing.
impl Arg for i64 {
    const PY_TYPE: &'static str = "int";
    fn from_arg(v: &Value) -> Result<Self, String> {
        match v {
            Value::Number(n) if n.is_i64() => Ok(n.as_i64().unwrap_or(0)),
            Value::Number(n) if n.is_u64() => Ok(i64::MAX),
            Value::Number(n) if is_big_int(n) => Ok(if n.as_str().starts_with('-') { i64::MIN } else { i64::MAX }),
            other => Err(wrong_type(Self::PY_TYPE, other)),
        }
    }
}

/// An int Python would accept whose value does not fit 64 bits (digits only).
fn is_big_int(n: &Number) -> bool {
    let s = n.as_str();
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

impl Arg for u64 {
    const PY_TYPE: &'static str = "int";
    fn from_arg(v: &Value) -> Result<Self, String> {
        match i64::from_arg(v)? {
            n if n < 0 => Err(format!("must be a non-negative int, got {v}")),
            _ if v.as_u64().is_none() => Ok(u64::MAX),
            _ => Ok(v.as_u64().unwrap_or(u64::MAX)),
        }
    }
}

impl Arg for f64 {
    const PY_TYPE: &'static str = "a real number";
    fn from_arg(v: &Value) -> Result<Self, String> {
        real(v).ok_or_else(|| wrong_type(Self::PY_TYPE, v))
    }
}

/// A number, or kombu's `{"__type__": "decimal", "__value__": "..."}` (a Python `Decimal`).
fn real(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64().filter(|f| f.is_finite()),
        Value::Object(o) if o.get("__type__").and_then(Value::as_str) == Some("decimal") => {
            o.get("__value__").and_then(Value::as_str).and_then(|s| s.parse::<f64>().ok()).filter(|f| f.is_finite())
        }
        _ => None,
    }
}

impl<T: Arg> Arg for Option<T> {
    const PY_TYPE: &'static str = T::PY_TYPE;
    fn from_arg(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            other => T::from_arg(other).map(Some),
        }
    }
}

impl<T: Arg> Arg for Vec<T> {
    const PY_TYPE: &'static str = "list";
    fn from_arg(v: &Value) -> Result<Self, String> {
        let Value::Array(items) = v else { return Err(wrong_type(Self::PY_TYPE, v)) };
        items.iter().enumerate().map(|(i, item)| T::from_arg(item).map_err(|e| format!("item {i} {e}"))).collect()
    }
}

/// A duration in seconds (int, float or decimal), kept with the value as the caller sent it
/// (a task that echoes its argument returns exactly that).
#[derive(Clone, Debug, PartialEq)]
pub struct Seconds {
    pub duration: Duration,
    pub given: Value,
}

impl<'de> serde::Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Seconds::from_arg(&v).map_err(serde::de::Error::custom)
    }
}

impl Arg for Seconds {
    const PY_TYPE: &'static str = "a real number";
    fn from_arg(v: &Value) -> Result<Self, String> {
        let secs = real(v).ok_or_else(|| wrong_type(Self::PY_TYPE, v))?;
        let duration = Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("must be a non-negative number of seconds, got {v}"))?;
        Ok(Seconds { duration, given: v.clone() })
    }
}

/// A tuple of parameter types, decoded from the values bound to `N` named parameters.
/// Implemented for tuples of 0 to 8 [`Arg`]s.
pub trait Args<const N: usize>: Sized {
    fn decode(func: &str, params: &[Param; N], values: [Value; N]) -> Result<Self, String>;
}

fn decode_one<T: Arg>(func: &str, param: &Param, v: &Value) -> Result<T, String> {
    T::from_arg(v).map_err(|e| format!("{func}() argument '{}' {e}", param.name))
}

macro_rules! impl_args {
    ($n:literal; $($t:ident $i:tt),*) => {
        impl<$($t: Arg),*> Args<$n> for ($($t,)*) {
            #[allow(unused_variables)]
            fn decode(func: &str, params: &[Param; $n], values: [Value; $n]) -> Result<Self, String> {
                Ok(($(decode_one::<$t>(func, &params[$i], &values[$i])?,)*))
            }
        }
    };
}

impl_args!(0;);
impl_args!(1; A 0);
impl_args!(2; A 0, B 1);
impl_args!(3; A 0, B 1, C 2);
impl_args!(4; A 0, B 1, C 2, D 3);
impl_args!(5; A 0, B 1, C 2, D 3, E 4);
impl_args!(6; A 0, B 1, C 2, D 3, E 4, F 5);
impl_args!(7; A 0, B 1, C 2, D 3, E 4, F 5, G 6);
impl_args!(8; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

/// Python's binding of positional and keyword arguments to parameters with defaults. `func`
/// is the short name used in the messages (`cpu_bound`, not `tasks.cpu_bound`).
pub fn bind<const N: usize>(
    func: &str,
    params: &[Param; N],
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> Result<[Value; N], String> {
    if args.len() > N {
        let plural = if N == 1 { "" } else { "s" };
        return Err(format!("{func}() takes {N} positional argument{plural} but {} were given", args.len()));
    }
    if let Some(unknown) = kwargs.keys().find(|k| !params.iter().any(|p| p.name == k.as_str())) {
        return Err(format!("{func}() got an unexpected keyword argument '{unknown}'"));
    }
    let mut out: [Value; N] = std::array::from_fn(|_| Value::Null);
    let mut missing = Vec::new();
    for (i, p) in params.iter().enumerate() {
        match (args.get(i), kwargs.get(p.name)) {
            (Some(_), Some(_)) => return Err(format!("{func}() got multiple values for argument '{}'", p.name)),
            (Some(v), None) | (None, Some(v)) => out[i] = v.clone(),
            (None, None) => match &p.default {
                Some(d) => out[i] = d.clone(),
                None => missing.push(format!("'{}'", p.name)),
            },
        }
    }
    match missing.len() {
        0 => Ok(out),
        1 => Err(format!("{func}() missing 1 required positional argument: {}", missing[0])),
        n => Err(format!("{func}() missing {n} required positional arguments: {}", missing.join(" and "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kw(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn call<A: Args<N>, const N: usize>(params: [Param; N], args: &[Value], kwargs: Value) -> Result<A, String> {
        let values = bind("f", &params, args, &kw(kwargs))?;
        A::decode("f", &params, values)
    }

    #[test]
    fn binds_like_python() {
        let p = || [Param::required("n")];
        assert_eq!(call::<(i64,), 1>(p(), &[json!(10)], json!({})), Ok((10,)));
        assert_eq!(call::<(i64,), 1>(p(), &[], json!({"n": 7})), Ok((7,)));
        assert_eq!(
            call::<(i64,), 1>(p(), &[], json!({})),
            Err("f() missing 1 required positional argument: 'n'".into())
        );
        assert_eq!(
            call::<(i64,), 1>(p(), &[json!(1), json!(2)], json!({})),
            Err("f() takes 1 positional argument but 2 were given".into())
        );
        assert_eq!(
            call::<(i64,), 1>(p(), &[json!(1)], json!({"n": 2})),
            Err("f() got multiple values for argument 'n'".into())
        );
        assert_eq!(
            call::<(i64,), 1>(p(), &[], json!({"m": 2})),
            Err("f() got an unexpected keyword argument 'm'".into())
        );
        let two = || [Param::required("a"), Param::required("b")];
        assert_eq!(
            call::<(i64, i64), 2>(two(), &[], json!({})),
            Err("f() missing 2 required positional arguments: 'a' and 'b'".into())
        );
        assert_eq!(
            call::<(i64, f64), 2>([Param::required("a"), Param::optional("b", 1.5)], &[json!(1)], json!({})),
            Ok((1, 1.5))
        );
        assert_eq!(
            call::<(), 0>([], &[json!(1)], json!({})),
            Err("f() takes 0 positional arguments but 1 were given".into())
        );
    }

    #[test]
    fn decodes_with_python_type_errors() {
        let one = |v: Value| [v];
        let dec = |v: Value| <(i64,) as Args<1>>::decode("f", &[Param::required("n")], one(v));
        assert_eq!(dec(json!("10")), Err("f() argument 'n' must be int, not str".into()));
        assert_eq!(dec(json!(1.5)), Err("f() argument 'n' must be int, not float".into()));
        assert_eq!(dec(json!(u64::MAX)), Ok((i64::MAX,)));
        let big: Value = serde_json::from_str("123456789012345678901234567890").unwrap();
        assert_eq!(dec(big), Ok((i64::MAX,)));
        let s = |v: Value| <(String,) as Args<1>>::decode("wc", &[Param::required("text")], one(v));
        assert_eq!(s(json!(3)), Err("wc() argument 'text' must be str, not int".into()));
        assert_eq!(s(json!(null)), Err("wc() argument 'text' must be str, not NoneType".into()));
        let secs = |v: Value| <(Seconds,) as Args<1>>::decode("io", &[Param::required("seconds")], one(v));
        assert_eq!(secs(json!(null)), Err("io() argument 'seconds' must be a real number, not NoneType".into()));
        assert_eq!(
            secs(json!(-1)),
            Err("io() argument 'seconds' must be a non-negative number of seconds, got -1".into())
        );
        assert_eq!(
            secs(json!(1e300)),
            Err("io() argument 'seconds' must be a non-negative number of seconds, got 1e+300".into())
        );
        let d = json!({"__type__": "decimal", "__value__": "0.25"});
        assert_eq!(secs(d.clone()), Ok((Seconds { duration: Duration::from_millis(250), given: d },)));
        let list = |v: Value| <(Vec<String>,) as Args<1>>::decode("f", &[Param::required("xs")], one(v));
        assert_eq!(list(json!(["a", 1])), Err("f() argument 'xs' item 1 must be str, not int".into()));
        assert_eq!(<(Option<u64>,) as Args<1>>::decode("f", &[Param::required("n")], [json!(null)]), Ok((None,)));

        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Point {
            x: i32,
        }
        impl Arg for Point {
            const PY_TYPE: &'static str = "a point dict";
        }
        let p = |v: Value| {
            <(Point, Json<Vec<u8>>) as Args<2>>::decode("f", &[Param::required("p"), "b".into()], [v, json!([1])])
        };
        assert_eq!(p(json!({"x": 1})), Ok((Point { x: 1 }, Json(vec![1]))));
        let e = p(json!("x")).unwrap_err();
        assert!(e.starts_with("f() argument 'p' must be a point dict, not str ("), "{e}");
    }
}
