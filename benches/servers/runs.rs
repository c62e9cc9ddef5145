//! What the benches that compare servers in processes of their own share (benches/chat,
//! benches/udp, benches/tls) besides [`super::process`]: the reps (every group of runs, a case
//! or a size, on every server, the server order reversed on odd reps, a run that other
//! processes disturbed run again), the end of a bench (the failed runs, the totals line, the
//! `.md`, `.csv` and `_raw.csv` files), the tables of medians and ranges, and the command
//! line's common pieces.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use super::process::median;

// ---------------------------------------------------------------------------------------------
// The command line

/// `PROACTOR_BENCH_QUICK=1`: `--quick` by default.
pub fn quick_env() -> bool {
    env::var("PROACTOR_BENCH_QUICK").is_ok_and(|v| v.trim() == "1")
}

/// `target/bench`, where the benches write their files unless `--out` says otherwise.
pub fn default_out() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("bench")
}

/// A comma-separated list, blank items dropped.
pub fn list(v: String) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The number `v` given to `flag`.
pub fn num<T: FromStr>(flag: &str, v: String) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse().map_err(|e| format!("{flag} {v:?}: {e}"))
}

/// Checks that every one of `names` is one of `all`: `unknown WHAT ...` if not.
pub fn known(what: &str, names: &[String], all: &[&str]) -> Result<(), String> {
    match names.iter().find(|n| !all.contains(&n.as_str())) {
        Some(n) => Err(format!("unknown {what} {n:?} ({what}s: {})", all.join(","))),
        None => Ok(()),
    }
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Exits with status 1 unless `r` says every run went through (the error, if any, printed
/// after `bench: `).
pub fn conclude(bench: &str, r: Result<bool, String>) {
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("{bench}: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reps

/// What the reps need of a run's figures.
pub trait Figures {
    /// The share of the server's CPU, and of the load generator's, that other processes took
    /// over the measured part (NaN when not pinned).
    fn others(&self) -> (f64, f64);

    /// The larger share of either CPU that other processes took (0 when not pinned).
    fn noise(&self) -> f64 {
        let (others, others_gen) = self.others();
        let n = others.max(others_gen);
        if n.is_finite() {
            n
        } else {
            0.0
        }
    }
}

/// Which runs to make, and how.
pub struct Plan {
    pub reps: usize,
    /// A run in which other processes took more than `max_others` percent of the server's or
    /// the generator's CPU is run again, up to `retries` times; the last try is kept.
    pub retries: usize,
    pub max_others: f64,
    /// The pause after each run.
    pub pause: Duration,
    /// How many groups of runs (cases, sizes), and servers.
    pub groups: usize,
    pub servers: usize,
    /// The raw CSV's columns that say which run a row is (between `rep,attempt` and `ok,kept`),
    /// and those of its figures (between `ok,kept` and `error`).
    pub raw_keys: &'static str,
    pub raw_figures: &'static str,
}

/// What the runs gave.
pub struct Runs<S> {
    /// (group, server) -> the kept samples.
    pub got: BTreeMap<(usize, usize), Vec<S>>,
    raw: String,
    failures: Vec<String>,
    retried: usize,
    noisy_kept: usize,
    max_others: f64,
    started: Instant,
}

impl Plan {
    /// Every group on every server, `reps` times, the server order reversed on odd reps.
    /// `name(group, server)`: the run's name in the progress lines (after `[rep R/N] `) and
    /// its key columns in the raw CSV; `run(group, server)` makes it; `show(group, sample)`:
    /// what its progress line says (before `(S s)`) and its figures in the raw CSV.
    pub fn run<S: Figures>(
        &self,
        name: impl Fn(usize, usize) -> (String, String),
        mut run: impl FnMut(usize, usize) -> Result<S, String>,
        show: impl Fn(usize, &S) -> (String, String),
    ) -> Runs<S> {
        let mut runs = Runs {
            got: BTreeMap::new(),
            raw: format!(
                "rep,attempt,{},ok,kept,{},error\n",
                self.raw_keys, self.raw_figures
            ),
            failures: Vec::new(),
            retried: 0,
            noisy_kept: 0,
            max_others: self.max_others,
            started: Instant::now(),
        };
        // A failed run's figures are blank.
        let blanks = ",".repeat(self.raw_figures.split(',').count());
        for rep in 0..self.reps {
            for gi in 0..self.groups {
                let mut order: Vec<usize> = (0..self.servers).collect();
                if rep % 2 == 1 {
                    order.reverse();
                }
                for si in order {
                    let (what, keys) = name(gi, si);
                    let label = format!("[rep {}/{}] {what}", rep + 1, self.reps);
                    for attempt in 0..=self.retries {
                        let t = Instant::now();
                        let r = run(gi, si);
                        let took = t.elapsed().as_secs_f64();
                        let s = match r {
                            Ok(s) => s,
                            Err(e) => {
                                println!("{label}: FAILED ({took:.1} s): {e}");
                                let _ = writeln!(
                                    runs.raw,
                                    "{rep},{attempt},{keys},0,0,{blanks}\"{}\"",
                                    e.replace('"', "'")
                                );
                                runs.failures.push(format!("{label}: {e}"));
                                break;
                            }
                        };
                        let noisy = s.noise() * 100.0 > self.max_others;
                        let keep = !noisy || attempt == self.retries;
                        let note = match (noisy, keep) {
                            (false, _) => "",
                            (true, false) => " [noisy: run again]",
                            (true, true) => " [noisy, kept: out of retries]",
                        };
                        let (text, figures) = show(gi, &s);
                        println!("{label}: {text} ({took:.1} s){note}");
                        let _ = writeln!(
                            runs.raw,
                            "{rep},{attempt},{keys},1,{},{figures},",
                            u8::from(keep)
                        );
                        thread::sleep(self.pause);
                        if keep {
                            if noisy {
                                runs.noisy_kept += 1;
                            }
                            runs.got.entry((gi, si)).or_default().push(s);
                            break;
                        }
                        runs.retried += 1;
                    }
                }
            }
        }
        runs
    }
}

impl<S> Runs<S> {
    /// Prints the tables `md`, the failed runs and the totals, and writes `BENCH.md` (`header`
    /// and `md`), `BENCH.csv` (`csv`) and `BENCH_raw.csv` (every run) under `out`: whether
    /// every run went through.
    pub fn finish(
        self,
        bench: &str,
        out: &Path,
        header: &str,
        md: &str,
        csv: String,
    ) -> Result<bool, String> {
        println!("\n{md}");
        if !self.failures.is_empty() {
            println!("FAILED runs:");
            for f in &self.failures {
                println!("- {f}");
            }
        }
        println!(
            "(all runs: {:.0} s; {} run(s) repeated and {} kept with other processes above {}% \
             of the server's or the generator's CPU)",
            self.started.elapsed().as_secs_f64(),
            self.retried,
            self.noisy_kept,
            self.max_others
        );
        for (name, text) in [
            (format!("{bench}.md"), format!("{header}\n{md}")),
            (format!("{bench}.csv"), csv),
            (format!("{bench}_raw.csv"), self.raw),
        ] {
            let path = out.join(name);
            fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
        Ok(self.failures.is_empty())
    }
}

// ---------------------------------------------------------------------------------------------
// The tables

/// A table row: a label and how to get the figure from a sample.
pub struct Metric<S> {
    pub label: &'static str,
    /// Its name in the CSV.
    pub key: &'static str,
    pub get: fn(&S) -> f64,
    pub show: fn(f64) -> String,
    /// Whether a ratio to the baseline means something.
    pub ratio: bool,
}

/// The medians (with the ratios to the baseline), the range over the reps, and the medians'
/// CSV, built a row at a time.
pub struct Table {
    names: Vec<String>,
    /// The baseline's column, if it ran, and the others' (every server's when it did not).
    pub base: Option<usize>,
    pub others: Vec<usize>,
    reps: usize,
    md: String,
    spread: String,
    csv: String,
}

impl Table {
    /// Tables headed `### TITLE: medians of N rep(s)` and `### TITLE: range over the reps`,
    /// their first column `group` (case, size), a column a server of `names` and, if
    /// `baseline` is among them, one for every other server's ratio to it; a CSV with the
    /// columns `csv_keys` before `metric,server,median,min,max,runs`.
    pub fn new(
        title: &str,
        group: &str,
        csv_keys: &str,
        names: &[&str],
        baseline: &str,
        reps: usize,
    ) -> Table {
        let base = names.iter().position(|&n| n == baseline);
        let others: Vec<usize> = (0..names.len()).filter(|&i| Some(i) != base).collect();
        let mut md = format!("### {title}: medians of {reps} rep(s)\n\n| {group} | metric |");
        for n in names {
            let _ = write!(md, " {n} |");
        }
        if base.is_some() {
            for &i in &others {
                let _ = write!(md, " {} / {baseline} |", names[i]);
            }
        }
        md.push_str("\n|---|---|");
        md.push_str(&"---:|".repeat(names.len() + if base.is_some() { others.len() } else { 0 }));
        md.push('\n');
        let spread = format!(
            "\n### {title}: range over the reps (min-max)\n\n| {group} | metric |{}\n|---|---|{}\n",
            names.iter().map(|n| format!(" {n} |")).collect::<String>(),
            "---:|".repeat(names.len())
        );
        Table {
            names: names.iter().map(|n| n.to_string()).collect(),
            base,
            others,
            reps,
            md,
            spread,
            csv: format!("{csv_keys},metric,server,median,min,max,runs\n"),
        }
    }

    /// Metric `m`'s row for group `gi` of `got` (`group` in the tables' first column, `keys`
    /// in the CSV's first ones): its medians, a server's NaN where it has no sample.
    pub fn row<S>(
        &mut self,
        gi: usize,
        group: &str,
        keys: &str,
        m: &Metric<S>,
        got: &BTreeMap<(usize, usize), Vec<S>>,
    ) -> Vec<f64> {
        let label = format!("| {group} | {} |", m.label);
        self.md.push_str(&label);
        self.spread.push_str(&label);
        let mut row = Vec::new();
        for (si, name) in self.names.iter().enumerate() {
            let mut v: Vec<f64> = got
                .get(&(gi, si))
                .map(|s| s.iter().map(m.get).collect())
                .unwrap_or_default();
            let med = median(&mut v);
            row.push(med);
            if v.is_empty() {
                self.md.push_str(" fail |");
                self.spread.push_str(" fail |");
                continue;
            }
            let _ = write!(self.md, " {} |", (m.show)(med));
            let (lo, hi) = (v[0], v[v.len() - 1]);
            let _ = write!(self.spread, " {}-{} |", (m.show)(lo), (m.show)(hi));
            let _ = writeln!(
                self.csv,
                "{keys},{},{name},{med},{lo},{hi},{}",
                m.key,
                v.len()
            );
        }
        if let Some(b) = self.base {
            for &i in &self.others {
                let r = row[i] / row[b];
                if m.ratio && r.is_finite() {
                    let _ = write!(self.md, " {r:.2}x |");
                } else {
                    self.md.push_str(" - |");
                }
            }
        }
        self.md.push('\n');
        self.spread.push('\n');
        row
    }

    /// The Markdown (the medians, then `more`, then the range if there were several reps) and
    /// the CSV.
    pub fn finish(self, more: &str) -> (String, String) {
        let mut md = self.md;
        md.push_str(more);
        if self.reps > 1 {
            md.push_str(&self.spread);
        }
        (md, self.csv)
    }
}
