//! The Prometheus text format as the framework's `/metrics` serves it, parsed for tests: every
//! sample with its labels, and the declared type of every family.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (with its `_total`/`_bucket`/… suffix).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// One scrape: every sample, and the declared type of every metric family.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Every sample, in page order.
    pub samples: Vec<Sample>,
    /// Metric family → its `# TYPE`.
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses the text format (`name{label="value",...} value` lines and `# TYPE` comments).
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                        scrape.types.insert(name.to_owned(), kind.to_owned());
                    }
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            scrape
                .samples
                .push(parse_sample(line).map_err(|e| format!("{e} in line {line:?}"))?);
        }
        Ok(scrape)
    }

    /// The value of the one sample of `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self.matching(name, labels).map(|s| s.value).collect();
        match found.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    /// The sum over the samples of `name` whose labels include `labels` (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            // key
            let start = match chars.peek() {
                Some((_, '}')) => {
                    let (i, _) = chars.next().ok_or("unclosed labels")?;
                    rest = &after[i + 1..];
                    break;
                }
                Some((i, _)) => *i,
                None => return Err("unclosed labels".into()),
            };
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let eq = eq.ok_or("label without '='")?;
            let key = after[start..eq].trim().to_owned();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} without a quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            if let Some((_, ',')) = chars.peek() {
                chars.next();
            }
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("no value")?
        .parse::<f64>()
        .map_err(|e| format!("value: {e}"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_text_parser_reads_labels_escapes_and_types() {
        let s = Scrape::parse(
            "# HELP x_total A counter.\n# TYPE x counter\nx_total{job=\"a,b\",task=\"\\\"1\\\"\"} 3\nplain 2.5\n# EOF\n",
        )
        .unwrap();
        assert_eq!(s.types.get("x").map(String::as_str), Some("counter"));
        assert_eq!(
            s.value("x_total", &[("job", "a,b"), ("task", "\"1\"")]),
            Some(3.0)
        );
        assert_eq!(s.value("plain", &[]), Some(2.5));
        assert!(Scrape::parse("broken{job=\"x} 1\n").is_err());
    }
}
