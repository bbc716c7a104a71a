//! Runs `starling-dig` (this package's binary) inside a host's namespace: what that host's DNS
//! server answers, asked on the host's own loopback (where a node serves DNS by default).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// One resource record of an answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    /// Owner name, as the server wrote it.
    pub name: String,
    /// `A`, `AAAA`, `SRV`, `SOA`, …
    pub kind: String,
    /// The address of an A or AAAA record.
    pub ip: Option<String>,
    /// The port of an SRV record.
    pub port: Option<u16>,
    /// The target of an SRV record.
    pub target: Option<String>,
}

/// A server's answer to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The response code (`NoError`, `NameError`, `Refused`, …).
    pub rcode: String,
    /// The ANSWER section.
    pub answers: Vec<Record>,
    /// The AUTHORITY section.
    pub authority: Vec<Record>,
    /// The ADDITIONAL section.
    pub additional: Vec<Record>,
}

fn records(v: &Value) -> Vec<Record> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|r| Record {
            name: r["name"].as_str().unwrap_or_default().to_owned(),
            kind: r["type"].as_str().unwrap_or_default().to_owned(),
            ip: r["ip"].as_str().map(str::to_owned),
            port: r["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
            target: r["target"].as_str().map(str::to_owned),
        })
        .collect()
}

/// Asks the DNS server at `server` (such as `127.0.0.1:8600`), from namespace `ns`, each of
/// `questions` (`(name, type)`, type `A`, `AAAA`, `SRV`, `SOA` or `ANY`) over UDP. One
/// answer per question, in order; `Err` when the probe could not run or a question had no
/// answer.
pub fn query(
    dig: &Path,
    ns: &str,
    server: &str,
    questions: &[(&str, &str)],
) -> Result<Vec<Answer>, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(dig)
        .arg(server)
        .args(questions.iter().flat_map(|(n, t)| [*n, *t]))
        .output()
        .map_err(|e| format!("cannot run starling-dig: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "starling-dig in {ns}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<Answer> = text
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
            if let Some(e) = v["error"].as_str() {
                return Err(e.to_owned());
            }
            Ok(Answer {
                rcode: v["rcode"].as_str().unwrap_or_default().to_owned(),
                answers: records(&v["answers"]),
                authority: records(&v["authority"]),
                additional: records(&v["additional"]),
            })
        })
        .collect::<Result<_, String>>()?;
    if answers.len() != questions.len() {
        return Err(format!(
            "starling-dig in {ns}: {} answers to {} questions",
            answers.len(),
            questions.len()
        ));
    }
    Ok(answers)
}
