//! `ia2run --learn`: read the shim's audit summary (JSON lines, one
//! `audit_summary` object per process) and turn it into the environment
//! that makes the next run clean: carveout toggles, `IA2_SHARE` pages and,
//! with `IA2_HEAP=compartment`, the `IA2_HEAP_SHARED` allocation sites. Also a small JSON reader, enough for the
//! shim's reports (tests use it to check that every line parses).

use std::fmt;

/// A parsed JSON value. Numbers are kept as `f64`.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses one complete JSON text (for example one line of a JSON-lines file).
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at byte {}", p.i));
        }
        Ok(v)
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            None => self.err("unexpected end"),
            Some(b'{') => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(Json::Obj(members));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return self.err("expected a member name");
                    }
                    let k = self.string()?;
                    self.ws();
                    if !self.eat(":") {
                        return self.err("expected ':'");
                    }
                    members.push((k, self.value()?));
                    self.ws();
                    if self.eat("}") {
                        return Ok(Json::Obj(members));
                    }
                    if !self.eat(",") {
                        return self.err("expected ',' or '}'");
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    if self.eat("]") {
                        return Ok(Json::Arr(items));
                    }
                    if !self.eat(",") {
                        return self.err("expected ',' or ']'");
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') if self.eat("true") => Ok(Json::Bool(true)),
            Some(b'f') if self.eat("false") => Ok(Json::Bool(false)),
            Some(b'n') if self.eat("null") => Ok(Json::Null),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                self.i += 1;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'
                    )
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                match t.parse::<f64>() {
                    Ok(n) if !t.starts_with("-.") && !t.starts_with('.') => Ok(Json::Num(n)),
                    _ => {
                        self.i = start;
                        self.err("bad number")
                    }
                }
            }
            Some(_) => self.err("unexpected character"),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else {
                return self.err("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return self.err("unterminated escape");
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self
                                .s
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok());
                            let Some(code) = hex else {
                                return self.err("bad \\u escape");
                            };
                            self.i += 4;
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        _ => return self.err("bad escape"),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c if c < 0x20 => return self.err("control character in string"),
                c => out.push(c),
            }
        }
        String::from_utf8(out).or_else(|_| self.err("invalid UTF-8"))
    }
}

/// What one or more audit runs learned: the union of every summary's
/// toggles and `IA2_SHARE` entries, in first-seen order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `IA2_SHARE_X=1` assignments.
    pub toggles: Vec<String>,
    /// `IA2_SHARE` entries (`obj:symbol` or `0xPAGE+4096`).
    pub share: Vec<String>,
    /// `IA2_HEAP_SHARED` allocation sites (`obj+0xOFF@gate:symbol`, ...).
    pub heap_shared: Vec<String>,
    /// How many `audit_summary` lines were read (one per process).
    pub summaries: usize,
    /// Protection-key faults over all of them.
    pub faults: u64,
    /// Some process printed its summary on a fatal signal, so the run may
    /// have stopped before reaching every fault.
    pub stopped: bool,
    /// Why each toggle or entry is needed: (fix, what faulted where), from
    /// the summaries' `audit_group` lines.
    pub reasons: Vec<(String, String)>,
}

impl Policy {
    /// Reads a report file: lines that are not JSON objects are skipped, an
    /// object line that does not parse is an error.
    pub fn from_report(text: &str) -> Result<Policy, String> {
        let mut p = Policy::default();
        for (n, line) in text.lines().enumerate() {
            if !line.trim_start().starts_with('{') {
                continue;
            }
            let v = Json::parse(line).map_err(|e| format!("line {}: {e}", n + 1))?;
            if v.get("type").and_then(Json::as_str) == Some("audit_group") {
                p.add_reason(&v);
                continue;
            }
            if v.get("type").and_then(Json::as_str) != Some("audit_summary") {
                continue;
            }
            p.summaries += 1;
            p.faults += v.get("faults").and_then(Json::as_u64).unwrap_or(0);
            p.stopped |= v.get("reason").and_then(Json::as_str) != Some("exit");
            let strings = |key: &str| -> Result<Vec<String>, String> {
                v.get(key)
                    .and_then(Json::as_array)
                    .ok_or_else(|| format!("line {}: no {key} array", n + 1))?
                    .iter()
                    .map(|e| {
                        e.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| format!("line {}: {key} holds a non-string", n + 1))
                    })
                    .collect()
            };
            for t in strings("toggles")? {
                if !p.toggles.contains(&t) {
                    p.toggles.push(t);
                }
            }
            for s in strings("share")? {
                if !p.share.contains(&s) {
                    p.share.push(s);
                }
            }
            // Older shims print no heap_shared array.
            if v.get("heap_shared").is_some() {
                for s in strings("heap_shared")? {
                    if !p.heap_shared.contains(&s) {
                        p.heap_shared.push(s);
                    }
                }
            }
        }
        Ok(p)
    }

    /// Records why a group's fix is needed: the owner, the data and the
    /// code that touched it.
    fn add_reason(&mut self, g: &Json) {
        let s = |k: &str| g.get(k).and_then(Json::as_str).unwrap_or("");
        // Share groups name their fix as `IA2_SHARE=entry`; policies list
        // the bare entry.
        let fix = s("fix").trim_start_matches("IA2_SHARE=").to_string();
        if fix.is_empty() || self.reasons.iter().any(|(f, _)| *f == fix) {
            return;
        }
        let object = s("object").rsplit('/').next().unwrap_or("");
        let owner = match (object, s("symbol")) {
            ("", _) => s("class").to_string(),
            (o, "") => format!("{o} {}", s("section")),
            (o, sym) => format!("{o} {sym}"),
        };
        let running = g
            .get("running_compartment")
            .and_then(Json::as_u64)
            .map_or("shared code".to_string(), |c| format!("compartment {c}"));
        let by = match s("first_rip_symbol") {
            "" => s("first_rip").to_string(),
            sym => sym.to_string(),
        };
        let faults = g.get("faults").and_then(Json::as_u64).unwrap_or(0);
        self.reasons.push((
            fix,
            format!("{owner}: touched by {running} at {by} ({faults} faults)"),
        ));
    }

    /// A policy file for `IA2_POLICY`: one line per toggle and entry, each
    /// with the reason as a comment.
    pub fn to_file(&self, cmd: &str) -> String {
        let why = |f: &str| {
            self.reasons
                .iter()
                .find(|(x, _)| x == f)
                .map(|(_, w)| format!("  # {w}"))
                .unwrap_or_default()
        };
        let mut out = format!(
            "# ia2shim policy learned by `ia2run --learn` for: {cmd}\n\
             # Use: IA2_POLICY=<this file> LD_PRELOAD=libia2shim.so {cmd}\n\
             # Variables set in the environment override these lines.\n"
        );
        if self.is_empty() {
            out.push_str("# nothing to share: the audit run had no protection-key faults\n");
        }
        for t in &self.toggles {
            out.push_str(&format!("{t}{}\n", why(t)));
        }
        for e in &self.share {
            out.push_str(&format!("IA2_SHARE={e}{}\n", why(e)));
        }
        if !self.heap_shared.is_empty() {
            out.push_str(&format!(
                "# allocation sites whose blocks another compartment touched\nIA2_HEAP_SHARED={}\n",
                self.heap_shared.join(",")
            ));
        }
        out
    }

    /// Adds `other`'s toggles and entries; returns whether any was new.
    pub fn merge(&mut self, other: &Policy) -> bool {
        let before = (self.toggles.len(), self.share.len(), self.heap_shared.len());
        for t in &other.toggles {
            if !self.toggles.contains(t) {
                self.toggles.push(t.clone());
            }
        }
        for s in &other.share {
            if !self.share.contains(s) {
                self.share.push(s.clone());
            }
        }
        for r in &other.reasons {
            if !self.reasons.iter().any(|(f, _)| *f == r.0) {
                self.reasons.push(r.clone());
            }
        }
        for s in &other.heap_shared {
            if !self.heap_shared.contains(s) {
                self.heap_shared.push(s.clone());
            }
        }
        self.summaries += other.summaries;
        self.faults += other.faults;
        self.stopped |= other.stopped;
        before != (self.toggles.len(), self.share.len(), self.heap_shared.len())
    }

    pub fn is_empty(&self) -> bool {
        self.toggles.is_empty()
            && self.share.is_empty()
            && self.heap_shared.is_empty()
            && self.heap_shared.is_empty()
    }

    /// The variables to set: each toggle, and `IA2_SHARE` with `existing`
    /// entries (the user's own) first.
    pub fn env(&self, existing_share: Option<&str>) -> Vec<(String, String)> {
        self.env_with(existing_share, None)
    }

    /// [`Policy::env`], and `IA2_HEAP_SHARED` with the user's own sites
    /// (`existing_heap`) first.
    pub fn env_with(
        &self,
        existing_share: Option<&str>,
        existing_heap: Option<&str>,
    ) -> Vec<(String, String)> {
        let mut env = self.share_env(existing_share);
        let mut sites: Vec<&str> = existing_heap
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        for s in &self.heap_shared {
            if !sites.contains(&s.as_str()) {
                sites.push(s);
            }
        }
        if !sites.is_empty() {
            env.push(("IA2_HEAP_SHARED".into(), sites.join(",")));
        }
        env
    }

    fn share_env(&self, existing_share: Option<&str>) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .toggles
            .iter()
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut entries: Vec<&str> = existing_share
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        for s in &self.share {
            if !entries.contains(&s.as_str()) {
                entries.push(s);
            }
        }
        if !entries.is_empty() {
            env.push(("IA2_SHARE".into(), entries.join(",")));
        }
        env
    }
}

/// One compartment's private fraction, from `IA2_REPORT=summary`'s JSON
/// `privacy` lines.
#[derive(Clone, Debug, PartialEq)]
pub struct Privacy {
    pub compartment: u64,
    pub objects: Vec<String>,
    pub private_bytes: u64,
    pub shared_bytes: u64,
    pub private_percent: f64,
}

/// Every `privacy` line of a report file (the first process's only: one
/// per compartment, in order).
pub fn privacy_from_report(text: &str) -> Vec<Privacy> {
    let mut out: Vec<Privacy> = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let Ok(v) = Json::parse(line) else { continue };
        if v.get("type").and_then(Json::as_str) != Some("privacy") {
            continue;
        }
        let n = |k: &str| v.get(k).and_then(Json::as_u64).unwrap_or(0);
        let c = n("compartment");
        if out.iter().any(|p| p.compartment == c) {
            continue;
        }
        out.push(Privacy {
            compartment: c,
            objects: v
                .get("objects")
                .and_then(Json::as_array)
                .unwrap_or(&[])
                .iter()
                .filter_map(|o| o.as_str().map(str::to_string))
                .collect(),
            private_bytes: n("data_private") + n("tls_private"),
            shared_bytes: n("data_shared") + n("tls_shared"),
            private_percent: match v.get("private_percent") {
                Some(Json::Num(x)) => *x,
                _ => 0.0,
            },
        });
    }
    out
}

impl fmt::Display for Policy {
    /// The environment line: `IA2_SHARE_DTV=1 IA2_SHARE='libc.so.6:stdout'`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = self.toggles.clone();
        if !self.share.is_empty() {
            words.push(format!("IA2_SHARE='{}'", self.share.join(",")));
        }
        if !self.heap_shared.is_empty() {
            words.push(format!("IA2_HEAP_SHARED='{}'", self.heap_shared.join(",")));
        }
        f.write_str(&words.join(" "))
    }
}

/// One compartment's heap bytes from an `IA2_REPORT=heap` run (JSON
/// `heap_usage` lines): what stayed private.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapUsage {
    pub compartment: u64,
    pub private_total: u64,
    pub shared_total: u64,
    pub private_peak: u64,
    pub shared_peak: u64,
}

impl HeapUsage {
    /// Every `heap_usage` line of a report.
    pub fn from_report(text: &str) -> Vec<HeapUsage> {
        text.lines()
            .filter(|l| l.trim_start().starts_with('{'))
            .filter_map(|l| Json::parse(l).ok())
            .filter(|v| v.get("type").and_then(Json::as_str) == Some("heap_usage"))
            .map(|v| {
                let n = |k: &str| v.get(k).and_then(Json::as_u64).unwrap_or(0);
                HeapUsage {
                    compartment: n("compartment"),
                    private_total: n("private_total"),
                    shared_total: n("shared_total"),
                    private_peak: n("private_peak"),
                    shared_peak: n("shared_peak"),
                }
            })
            .collect()
    }
}

fn pct(a: u64, b: u64) -> f64 {
    if a + b == 0 {
        100.0
    } else {
        100.0 * a as f64 / (a + b) as f64
    }
}

impl fmt::Display for HeapUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "compartment {}: {:.1}% of heap bytes private ({} of {} allocated), {:.1}% at peak ({} private, {} shared bytes live)",
            self.compartment,
            pct(self.private_total, self.shared_total),
            self.private_total,
            self.private_total + self.shared_total,
            pct(self.private_peak, self.shared_peak),
            self.private_peak,
            self.shared_peak
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values() {
        let v = Json::parse(r#" {"a":[1,-2.5e3,true,false,null],"b":"x\"\\\u00e9\n","c":{}} "#)
            .unwrap();
        assert_eq!(
            v.get("a").unwrap().as_array().unwrap(),
            [
                Json::Num(1.0),
                Json::Num(-2500.0),
                Json::Bool(true),
                Json::Bool(false),
                Json::Null
            ]
        );
        assert_eq!(v.get("b").unwrap().as_str(), Some("x\"\\é\n"));
        assert_eq!(v.get("c"), Some(&Json::Obj(vec![])));
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "[1,]",
            "{\"a\":1,}",
            "\"\u{1}\"",
            "tru",
            "{} x",
            "01x",
            "-",
        ] {
            assert!(Json::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn policy_from_summaries() {
        let text = "\
not json
{\"type\":\"audit_fault\",\"site\":1}
{\"type\":\"audit_summary\",\"faults\":3,\"toggles\":[\"IA2_SHARE_DTV=1\"],\"share\":[\"libc.so.6:stdout\"]}
{\"type\":\"audit_summary\",\"faults\":1,\"toggles\":[],\"share\":[\"libc.so.6:stdout\",\"0x1000+4096\"]}
";
        let p = Policy::from_report(text).unwrap();
        assert_eq!(p.summaries, 2);
        assert_eq!(p.faults, 4);
        assert!(p.stopped, "summaries without reason \"exit\"");
        assert_eq!(p.toggles, ["IA2_SHARE_DTV=1"]);
        assert_eq!(p.share, ["libc.so.6:stdout", "0x1000+4096"]);
        assert_eq!(
            p.to_string(),
            "IA2_SHARE_DTV=1 IA2_SHARE='libc.so.6:stdout,0x1000+4096'"
        );
        assert_eq!(
            p.env(Some("x:y,libc.so.6:stdout")),
            [
                ("IA2_SHARE_DTV".to_string(), "1".to_string()),
                (
                    "IA2_SHARE".to_string(),
                    "x:y,libc.so.6:stdout,0x1000+4096".to_string()
                )
            ]
        );
        let mut q = Policy::from_report(
            "{\"type\":\"audit_summary\",\"reason\":\"exit\",\"faults\":0,\"toggles\":[\"IA2_SHARE_TCB=1\"],\"share\":[]}",
        )
        .unwrap();
        assert!(!q.stopped);
        assert!(q.merge(&p));
        assert!(!q.merge(&p));
        assert_eq!(q.toggles, ["IA2_SHARE_TCB=1", "IA2_SHARE_DTV=1"]);
        assert!(Policy::from_report("{\"type\":\"audit_summary\"").is_err());
        let h = Policy::from_report(
            "{\"type\":\"audit_summary\",\"reason\":\"exit\",\"faults\":2,\"toggles\":[],\"share\":[],\"heap_shared\":[\"libx.so+0x10@gate:x_new\"]}",
        )
        .unwrap();
        assert_eq!(h.heap_shared, ["libx.so+0x10@gate:x_new"]);
        assert_eq!(h.to_string(), "IA2_HEAP_SHARED='libx.so+0x10@gate:x_new'");
        assert_eq!(
            h.env_with(None, Some("gate:y")),
            [(
                "IA2_HEAP_SHARED".to_string(),
                "gate:y,libx.so+0x10@gate:x_new".to_string()
            )]
        );
        assert!(q.merge(&h));
        let u = HeapUsage::from_report("x\n{\"type\":\"heap_usage\",\"compartment\":2,\"private_total\":300,\"shared_total\":100,\"private_peak\":90,\"shared_peak\":10}");
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].to_string(), "compartment 2: 75.0% of heap bytes private (300 of 400 allocated), 90.0% at peak (90 private, 10 shared bytes live)");
        assert!(Policy::from_report("").unwrap().is_empty());
    }
}
