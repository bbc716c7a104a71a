//! Idle memory: a fresh manager (`starling init`) and a worker joined to it, their resident
//! memory read from `/proc` once they have idled, beside a fresh single etcd member idle as
//! long; and how much of the release binary's startup order
//! (`crates/node/link/startup.order`) the measured binary carries.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::cluster::{Etcd, starling_binary};

/// Resident memory of one process, KiB (`/proc/<pid>/status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resident {
    /// `VmRSS`: everything resident.
    pub total: u64,
    /// `RssAnon`: the process's own memory (heap, stacks, written data).
    pub anon: u64,
    /// `RssFile`: pages of mapped files (the binary's code and data, the C library).
    pub file: u64,
}

impl Resident {
    /// Parses the `VmRSS`, `RssAnon` and `RssFile` lines of a `/proc/<pid>/status` text.
    pub fn parse(status: &str) -> anyhow::Result<Resident> {
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))
                .with_context(|| format!("no {name} in the process status"))?;
            line[name.len() + 1..]
                .trim()
                .strip_suffix("kB")
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("unreadable {line:?}"))
        };
        Ok(Resident {
            total: field("VmRSS")?,
            anon: field("RssAnon")?,
            file: field("RssFile")?,
        })
    }

    /// Of a running process.
    pub fn of(pid: u32) -> anyhow::Result<Resident> {
        let path = format!("/proc/{pid}/status");
        Resident::parse(&std::fs::read_to_string(&path).with_context(|| path.clone())?)
    }
}

/// Functions by name: (address, size).
pub type Functions<'a> = HashMap<&'a [u8], (u64, u64)>;

/// The functions (`STT_FUNC` symbols) of a 64-bit little-endian ELF file, and the size of its
/// `.text` section.
pub fn elf_functions(data: &[u8]) -> anyhow::Result<(Functions<'_>, u64)> {
    let bytes = |at: u64, n: u64| -> anyhow::Result<&[u8]> {
        let start = usize::try_from(at)?;
        let end = start
            .checked_add(usize::try_from(n)?)
            .context("offset overflows")?;
        data.get(start..end)
            .with_context(|| format!("{n} bytes at {at} are past the file's end"))
    };
    let u16_at = |at: u64| -> anyhow::Result<u64> {
        Ok(u64::from(u16::from_le_bytes(bytes(at, 2)?.try_into()?)))
    };
    let u32_at = |at: u64| -> anyhow::Result<u64> {
        Ok(u64::from(u32::from_le_bytes(bytes(at, 4)?.try_into()?)))
    };
    let u64_at =
        |at: u64| -> anyhow::Result<u64> { Ok(u64::from_le_bytes(bytes(at, 8)?.try_into()?)) };
    let cstr = |table: u64, table_size: u64, at: u64| -> anyhow::Result<&[u8]> {
        anyhow::ensure!(at < table_size, "a name past its string table");
        let rest = bytes(table.saturating_add(at), table_size - at)?;
        Ok(&rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())])
    };
    anyhow::ensure!(
        bytes(0, 6)? == b"\x7fELF\x02\x01",
        "not a 64-bit little-endian ELF file"
    );
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    anyhow::ensure!(shentsize >= 64, "section headers of {shentsize} bytes");
    // (type, offset, size, link) of section `i`, and its name's offset.
    let section = |i: u64| -> anyhow::Result<(u64, u64, u64, u64, u64)> {
        let h = shoff.saturating_add(i.saturating_mul(shentsize));
        Ok((
            u32_at(h.saturating_add(4))?,
            u64_at(h.saturating_add(24))?,
            u64_at(h.saturating_add(32))?,
            u32_at(h.saturating_add(40))?,
            u32_at(h)?,
        ))
    };
    let (_, names_at, names_size, _, _) = section(shstrndx)?;
    let mut text = 0;
    let mut symtab = None;
    for i in 0..shnum {
        let (kind, offset, size, link, name) = section(i)?;
        if cstr(names_at, names_size, name)? == b".text" {
            text = size;
        }
        const SHT_SYMTAB: u64 = 2;
        if kind == SHT_SYMTAB {
            symtab = Some((offset, size, link));
        }
    }
    let (offset, size, link) = symtab.context("no symbol table (a stripped binary)")?;
    let (_, strings_at, strings_size, _, _) = section(link)?;
    let mut functions = HashMap::new();
    for i in 0..size / 24 {
        let sym = offset.saturating_add(i * 24);
        const STT_FUNC: u8 = 2;
        if bytes(sym.saturating_add(4), 1)?[0] & 0xf == STT_FUNC {
            let name = cstr(strings_at, strings_size, u32_at(sym)?)?;
            functions.insert(
                name,
                (
                    u64_at(sym.saturating_add(8))?,
                    u64_at(sym.saturating_add(16))?,
                ),
            );
        }
    }
    Ok((functions, text))
}

/// Where the startup order's functions are in a binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Names listed in the order.
    pub listed: usize,
    /// Of those, functions the binary has.
    pub found: usize,
    /// Their sizes added up (bytes).
    pub size: u64,
    /// From the first of them to the end of the last (bytes): about `size` when the order
    /// was applied, most of `.text` when not.
    pub span: u64,
    /// The binary's `.text` (bytes).
    pub text: u64,
}

/// How the functions listed in `order` (a startup order file) lie in the ELF binary `data`.
pub fn startup_layout(data: &[u8], order: &str) -> anyhow::Result<Layout> {
    let (functions, text) = elf_functions(data)?;
    let names: Vec<&str> = order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let found: Vec<(u64, u64)> = names
        .iter()
        .filter_map(|n| functions.get(n.as_bytes()).copied())
        .collect();
    let first = found.iter().map(|f| f.0).min().unwrap_or(0);
    let end = found
        .iter()
        .map(|f| f.0.saturating_add(f.1))
        .max()
        .unwrap_or(0);
    Ok(Layout {
        listed: names.len(),
        found: found.len(),
        size: found.iter().map(|f| f.1).sum(),
        span: end.saturating_sub(first),
        text,
    })
}

/// The median and range of KiB figures.
fn spread(mut v: Vec<u64>) -> (u64, u64, u64) {
    v.sort_unstable();
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `rounds` fresh clusters (one manager, one worker) and fresh etcd members, each read after
/// `idle`.
pub async fn run(base: &Path, rounds: usize, idle: Duration) -> anyhow::Result<String> {
    anyhow::ensure!(rounds > 0, "no rounds");
    let mut manager = Vec::new();
    let mut worker = Vec::new();
    let mut etcd = Vec::new();
    for round in 0..rounds {
        let dir = base.join(format!("round-{round}"));
        let (procs, _client, _) = crate::certs::start(&dir.join("starling"), 1, 1, false).await?;
        tokio::time::sleep(idle).await;
        manager.push(Resident::of(procs[0].pid())?);
        worker.push(Resident::of(procs[1].pid())?);
        drop(procs);
        let e = Etcd::start(&dir.join("etcd"), 1).await?;
        tokio::time::sleep(idle).await;
        let pid = *e.pids().first().context("no etcd member running")?;
        etcd.push(Resident::of(pid)?);
        drop(e);
    }
    let bin = starling_binary()?;
    let order_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/node/link/startup.order");
    let order = std::fs::read_to_string(&order_path)
        .with_context(|| format!("{}", order_path.display()))?;
    let data = std::fs::read(&bin).with_context(|| format!("{}", bin.display()))?;
    let layout = startup_layout(&data, &order)?;
    let mut out = format!(
        "### Idle memory\n\nA fresh manager (`starling init`, default threads, no DNS listener) \
         and one worker joined to it on loopback, resident memory from `/proc/<pid>/status` \
         after {:.0} s idle; beside a fresh single etcd member (`GOMAXPROCS=1`) idle as long; \
         {rounds} rounds, each on new data directories. Median (min–max) in MiB. Targets: idle \
         worker ≤ 15 MiB, idle manager ≤ 40 MiB.\n\n\
         | process | VmRSS | RssAnon (its own memory) | RssFile (mapped files: code, libc) |\n\
         |---|---|---|---|\n",
        idle.as_secs_f64()
    );
    for (name, samples) in [
        ("Starling worker", &worker),
        ("Starling manager", &manager),
        ("etcd member", &etcd),
    ] {
        let cell = |pick: fn(&Resident) -> u64| {
            let (median, lo, hi) = spread(samples.iter().map(pick).collect());
            format!("{:.1} ({:.1}–{:.1})", mib(median), mib(lo), mib(hi))
        };
        writeln!(
            out,
            "| {name} | **{}** | {} | {} |",
            cell(|r| r.total),
            cell(|r| r.anon),
            cell(|r| r.file)
        )?;
    }
    write!(
        out,
        "\nThe release `starling` lays out the functions an idle node runs first and together \
         (`crates/node/link/startup.order`, written by `crates/node/link/regenerate.sh`). In \
         the binary measured (`{}`): {} of the {} names listed, {:.1} MiB of code together, \
         spanning {:.1} MiB of its {:.1} MiB of `.text` (about their own size when the order \
         was applied; fewer names found means the list is stale — a dependency or toolchain \
         upgrade renames symbols — and RssFile grows back){}.\n\n",
        bin.display(),
        layout.found,
        layout.listed,
        mib(layout.size / 1024),
        mib(layout.span / 1024),
        mib(layout.text / 1024),
        if cfg!(debug_assertions) {
            "; this is a debug build, whose symbols differ and which is never ordered"
        } else {
            ""
        },
    )?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_status_text() {
        let status = "Name:\tstarling\nVmRSS:\t   8716 kB\nRssAnon:\t    2412 kB\n\
                      RssFile:\t    6304 kB\nRssShmem:\t       0 kB\n";
        assert_eq!(
            Resident::parse(status).unwrap(),
            Resident {
                total: 8716,
                anon: 2412,
                file: 6304
            }
        );
        let err = Resident::parse("VmRSS:\t1 kB\nRssAnon:\tmany kB\n").unwrap_err();
        assert!(format!("{err:#}").contains("RssAnon"), "{err:#}");
    }

    #[test]
    fn finds_the_listed_functions_in_an_elf_binary() {
        // This test's own binary: a debug build keeps its symbol table.
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let (functions, text) = elf_functions(&data).unwrap();
        assert!(text > 0);
        let mut ours: Vec<(&[u8], (u64, u64))> = functions
            .iter()
            .filter(|(n, _)| String::from_utf8_lossy(n).contains("6memory5tests"))
            .map(|(n, f)| (*n, *f))
            .collect();
        ours.sort_by_key(|(_, f)| f.0);
        assert!(ours.len() >= 2, "{} functions of memory::tests", ours.len());
        let names: Vec<String> = ours
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect();
        let order = format!("# comment\n{}\n\n_ZN4gone4fromE\n", names.join("\n"));
        let layout = startup_layout(&data, &order).unwrap();
        let last = ours[ours.len() - 1].1;
        assert_eq!(layout.listed, names.len() + 1);
        assert_eq!(layout.found, names.len());
        assert_eq!(layout.size, ours.iter().map(|(_, f)| f.1).sum::<u64>());
        assert_eq!(layout.span, last.0 + last.1 - ours[0].1.0);
        assert!(layout.span <= text);
    }

    #[test]
    fn a_file_not_elf_or_cut_short_is_an_error() {
        assert!(elf_functions(b"#!/bin/sh\necho hi\n").is_err());
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        for len in [0, 5, 64, 4096] {
            assert!(elf_functions(&data[..len]).is_err(), "{len} bytes");
        }
    }
}
