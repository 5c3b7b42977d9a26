//! Budgets: how much worse a metric may get, written `+2%` (may grow by 2%), `+10%`,
//! `-0.5` (may drop by 0.5 absolute units, e.g. accuracy points), `+1024` or `off`
//! (reported, never fails). Keys name a metric (`net/latency_p50`), a metric of every case
//! (`latency_p90`, `.text`) or a kind (`size`, `latency`, `accuracy`); the most specific wins.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use crate::measure::Kind;

/// Budgets used where neither the baseline nor a budgets file sets one.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("size", "+2%"),
    ("latency", "+10%"),
    ("accuracy", "-0.5"),
    ("cosine", "-0.005"),
];

/// Default width of the noise band, in standard deviations of the difference.
pub const DEFAULT_NOISE_SIGMAS: f64 = 3.0;

/// One parsed budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// As written (`+2%`).
    pub text: String,
    /// `None` for `off`.
    pub limit: Option<Limit>,
}

/// A budget's meaning: which way is worse and by how much it may move that way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Growth is worse (`+`); else a drop is.
    pub worse_up: bool,
    /// Allowed movement in the worse direction (>= 0).
    pub amount: f64,
    /// `amount` is percent of the baseline value, else in the metric's unit.
    pub relative: bool,
}

impl Budget {
    /// Parses `+N%`, `-N%`, `+N`, `-N` or `off`; `key` names it in errors.
    pub fn parse(text: &str, key: &str) -> Result<Budget> {
        let t = text.trim();
        let hint = "write +N% (may grow by N percent), -N (may drop by N units), +N, -N% or off";
        if t.eq_ignore_ascii_case("off") {
            return Ok(Budget {
                text: "off".into(),
                limit: None,
            });
        }
        let (worse_up, rest) = match t.chars().next() {
            Some('+') => (true, &t[1..]),
            Some('-') => (false, &t[1..]),
            _ => bail!("budget `{text}` for `{key}` has no sign: {hint}"),
        };
        let (number, relative) = match rest.strip_suffix('%') {
            Some(n) => (n.trim(), true),
            None => (rest.trim(), false),
        };
        let amount: f64 = number
            .parse()
            .ok()
            .filter(|a: &f64| a.is_finite() && *a >= 0.0)
            .with_context(|| format!("budget `{text}` for `{key}` is not a number: {hint}"))?;
        Ok(Budget {
            text: t.to_string(),
            limit: Some(Limit {
                worse_up,
                amount,
                relative,
            }),
        })
    }
}

/// The budgets in force: parsed rules by key, and the noise band width.
#[derive(Debug, Clone, PartialEq)]
pub struct Budgets {
    /// Rules by key (defaults included).
    pub rules: BTreeMap<String, Budget>,
    /// A change must also exceed this many standard deviations of the measured noise.
    pub noise_sigmas: f64,
}

impl Budgets {
    /// The defaults overlaid with `map` (from a baseline or a budgets file); every value is
    /// parsed now, so a bad one is reported (with `origin`) before anything is measured.
    pub fn new(map: &BTreeMap<String, String>, noise_sigmas: f64, origin: &str) -> Result<Budgets> {
        let mut rules = BTreeMap::new();
        for (k, v) in DEFAULTS {
            rules.insert(k.to_string(), Budget::parse(v, k)?);
        }
        for (k, v) in map {
            let b = Budget::parse(v, k).with_context(|| format!("in {origin}"))?;
            rules.insert(k.clone(), b);
        }
        if !noise_sigmas.is_finite() || noise_sigmas < 0.0 {
            bail!("in {origin}: noise_sigmas must be a number >= 0 (got {noise_sigmas})");
        }
        Ok(Budgets {
            rules,
            noise_sigmas,
        })
    }

    /// The budget of metric `name` (`case/metric`) of kind `kind`, and the key it came from:
    /// the exact name, else the metric part, else the kind.
    pub fn for_metric(&self, name: &str, kind: Kind) -> (Budget, String) {
        let suffix = name.rsplit_once('/').map_or(name, |(_, s)| s);
        for key in [name, suffix, kind.name()] {
            if let Some((k, b)) = self.rules.get_key_value(key) {
                return (b.clone(), k.clone());
            }
        }
        // Only reachable for a hand-built `Budgets` without the defaults.
        let text = DEFAULTS
            .iter()
            .find(|(k, _)| *k == kind.name())
            .map_or("off", |(_, v)| v);
        let b = Budget::parse(text, kind.name()).unwrap_or(Budget {
            text: "off".into(),
            limit: None,
        });
        (b, kind.name().to_string())
    }
}

/// A budgets TOML file: top-level `noise_sigmas = 3` and a `[budgets]` table of strings.
pub fn parse_toml(text: &str, origin: &str) -> Result<(BTreeMap<String, String>, Option<f64>)> {
    let v: toml::Table = text
        .parse()
        .with_context(|| format!("{origin} is not valid TOML"))?;
    let mut map = BTreeMap::new();
    let mut sigmas = None;
    for (k, val) in &v {
        match (k.as_str(), val) {
            ("budgets", toml::Value::Table(t)) => {
                for (mk, mv) in t {
                    let s = mv.as_str().with_context(|| {
                        format!("{origin}: budget `{mk}` must be a string like \"+2%\" (got {mv})")
                    })?;
                    map.insert(mk.clone(), s.to_string());
                }
            }
            ("noise_sigmas", toml::Value::Integer(i)) => sigmas = Some(*i as f64),
            ("noise_sigmas", toml::Value::Float(f)) => sigmas = Some(*f),
            _ => bail!(
                "{origin}: unexpected key `{k}` (expected `noise_sigmas = N` and a [budgets] table)"
            ),
        }
    }
    Ok((map, sigmas))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<Option<(bool, f64, bool)>, &str>) {
        match (Budget::parse(text, "m"), expected) {
            (Ok(b), Ok(want)) => assert_eq!(
                b.limit.map(|l| (l.worse_up, l.amount, l.relative)),
                want,
                "{text}"
            ),
            (Err(e), Err(needle)) => {
                let msg = format!("{e:#}");
                assert!(msg.contains(needle) && msg.contains("`m`"), "{msg}");
            }
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parses_budgets() {
        check("+2%", Ok(Some((true, 2.0, true))));
        check(" -0.5 ", Ok(Some((false, 0.5, false))));
        check("+1024", Ok(Some((true, 1024.0, false))));
        check("-1.5%", Ok(Some((false, 1.5, true))));
        check("OFF", Ok(None));
        check("2%", Err("no sign"));
        check("+abc%", Err("not a number"));
        check("+", Err("not a number"));
        check("+inf", Err("not a number"));
        check("", Err("no sign"));
    }

    #[test]
    fn most_specific_key_wins() {
        let map: BTreeMap<String, String> = [
            ("net/latency_p50", "+20%"),
            ("latency_p90", "+30%"),
            ("size", "+5%"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let b = Budgets::new(&map, 3.0, "b.toml").unwrap();
        let key = |n: &str, k: Kind| b.for_metric(n, k).1;
        assert_eq!(key("net/latency_p50", Kind::Latency), "net/latency_p50");
        assert_eq!(key("other/latency_p50", Kind::Latency), "latency");
        assert_eq!(key("other/latency_p90", Kind::Latency), "latency_p90");
        assert_eq!(key("net/.text", Kind::Size), "size");
        assert_eq!(b.for_metric("net/.text", Kind::Size).0.text, "+5%");
        assert_eq!(key("net/cosine", Kind::Accuracy), "cosine");
        assert_eq!(key("net/accuracy", Kind::Accuracy), "accuracy");
        let bad: BTreeMap<String, String> = [("size".to_string(), "big".to_string())].into();
        let e = format!("{:#}", Budgets::new(&bad, 3.0, "b.toml").unwrap_err());
        assert!(e.contains("b.toml") && e.contains("`size`"), "{e}");
    }

    #[test]
    fn budgets_toml() {
        let (m, s) = parse_toml("noise_sigmas = 2\n[budgets]\nsize = \"+1%\"\n", "b.toml").unwrap();
        assert_eq!(m["size"], "+1%");
        assert_eq!(s, Some(2.0));
        let e = |t: &str| format!("{:#}", parse_toml(t, "b.toml").unwrap_err());
        assert!(e("[budgets]\nsize = 2\n").contains("budget `size` must be a string"));
        assert!(e("sizes = 1\n").contains("unexpected key `sizes`"));
        assert!(e("[budgets\n").contains("b.toml is not valid TOML"));
    }
}
