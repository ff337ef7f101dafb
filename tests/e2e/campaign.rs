//! Proof campaigns, sized for CI: crashes at random moments and random corruption of every
//! kind of object. Each campaign prints its figures (cases, detected, lost); the seed comes
//! from `BRICKBOX_CAMPAIGN_SEED` (default fixed) so a failure can be replayed. Bigger runs:
//! `BRICKBOX_CAMPAIGN_SCALE=10 cargo test -p brickbox --test e2e campaign -- --nocapture`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;

fn seed() -> u64 {
    std::env::var("BRICKBOX_CAMPAIGN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261128)
}

fn scale() -> usize {
    std::env::var("BRICKBOX_CAMPAIGN_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

/// A tree of a few MiB: random and text files in nested folders.
fn make_tree(src: &Path, rng: &mut StdRng) {
    for d in 0..4 {
        let dir = src.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..4 {
            let name = dir.join(format!("f{f}.bin"));
            write_random(&name, rng.gen(), rng.gen_range(20_000..400_000));
        }
        fs::write(dir.join("notes.txt"), text_bytes(rng.gen(), 20_000)).unwrap();
    }
}

/// A day of changes: rewrite, append, add, remove.
fn mutate(src: &Path, rng: &mut StdRng, round: usize) {
    let d = src.join(format!("d{}", rng.gen_range(0..4)));
    let f = d.join(format!("f{}.bin", rng.gen_range(0..4)));
    write_random(&f, rng.gen(), rng.gen_range(20_000..400_000));
    let mut notes = fs::read(d.join("notes.txt")).unwrap_or_default();
    notes.extend(text_bytes(rng.gen(), 3000));
    fs::write(d.join("notes.txt"), notes).unwrap();
    fs::write(src.join(format!("new{round}.bin")), random_bytes(rng.gen(), rng.gen_range(1000..100_000))).unwrap();
    if round >= 2 {
        let _ = fs::remove_file(src.join(format!("new{}.bin", round - 2)));
    }
}

/// Copies a folder tree (files and folders only).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// The regular files under `root` with their contents, by relative path.
fn contents(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if !root.exists() {
        return out;
    }
    for p in walk(root) {
        if p.is_file() {
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), fs::read(&p).unwrap());
        }
    }
    out
}

#[track_caller]
fn verify_read_data_clean(env: &Env, what: &str) {
    let r = env.run(&args!["verify", "--all", "--read-data", "--json"]);
    assert_eq!(r.code, 0, "{what}: verify found problems:\n{}\n{}", r.stdout, r.stderr);
}

/// Runs `args` and kills it with SIGKILL after `after`; returns whether it finished first.
fn run_and_kill(env: &Env, args: &[std::ffi::OsString], after: Duration) -> bool {
    let mut c = env.cmd(args);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let start = Instant::now();
    while start.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    child.wait().unwrap();
    false
}

/// How long a command takes, to spread kill moments over it.
fn timed(env: &Env, args: &[std::ffi::OsString]) -> Duration {
    let t = Instant::now();
    env.ok(args);
    t.elapsed()
}

#[test]
fn crash_campaign_backup() {
    let rounds = 30 * scale();
    let mut rng = StdRng::seed_from_u64(seed());
    let env = Env::with_box();
    let src = env.mkdir("src");
    make_tree(&src, &mut rng);
    let backup = args!["backup", &src, "--volume-size", "256KiB", "--no-verify"];
    let mut last = timed(&env, &backup);
    let mut expected: Vec<(String, BTreeMap<PathBuf, Vec<u8>>)> = Vec::new();
    expected.push((env.versions()[0]["id"].as_str().unwrap().to_string(), contents(&src)));
    let (mut killed, mut finished, mut round) = (0, 0, 0);
    // Until enough runs were really interrupted (bounded, in case the machine is very fast).
    while (killed < rounds || round < rounds) && round < rounds * 3 {
        mutate(&src, &mut rng, round);
        // Kill anywhere in a backup of this kind (start-up included), timed by the last one.
        let after = Duration::from_micros(rng.gen_range(0..(last.as_micros() as u64 * 11 / 10).max(1000)));
        if run_and_kill(&env, &backup, after) {
            finished += 1;
        } else {
            killed += 1;
        }
        // The next backup completes, whatever the killed one left behind.
        let t = Instant::now();
        let s = env.backup(&backup[1..]);
        last = t.elapsed();
        expected.push((version_id(&s), contents(&src)));
        verify_read_data_clean(&env, &format!("round {round} (killed after {after:?})"));
        round += 1;
    }
    // Every committed version restores bit-exact.
    let versions = env.versions();
    for (id, want) in &expected {
        assert!(versions.iter().any(|v| v["id"] == id.as_str()), "version {id} is gone");
        let target = env.path().join(format!("r-{id}"));
        env.restore(&args![id], &target);
        assert_eq!(&contents(&restored(&target, &src)), want, "version {id} restores different data");
        fs::remove_dir_all(&target).unwrap();
    }
    eprintln!(
        "crash campaign (backup, seed {}): {round} rounds, {killed} killed mid-run, {finished} finished before the kill; \
         {} versions restored bit-exact, 0 lost",
        seed(),
        expected.len()
    );
    assert!(killed >= rounds, "too few runs were actually interrupted ({killed} of {round})");
}

#[test]
fn crash_campaign_forget_and_compact() {
    let rounds = 30 * scale();
    let mut rng = StdRng::seed_from_u64(seed() ^ 0xf0f0);
    let env = Env::with_box();
    let src = env.mkdir("src");
    make_tree(&src, &mut rng);
    let backup = args!["backup", &src, "--volume-size", "128KiB", "--no-verify"];
    let mut expected: BTreeMap<String, BTreeMap<PathBuf, Vec<u8>>> = BTreeMap::new();
    let add_version = |expected: &mut BTreeMap<_, _>, rng: &mut StdRng, round: usize| {
        mutate(&src, rng, round);
        let s = env.backup(&backup[1..]);
        expected.insert(version_id(&s), contents(&src));
    };
    for round in 0..6 {
        add_version(&mut expected, &mut rng, round);
    }
    let compact = args!["compact", "--small-volumes", "4", "--volume-size", "512KiB"];
    let (mut killed, mut finished, mut round) = (0, 0, 0);
    // How long the last forget and compaction that ran to the end took.
    let mut last = [Duration::from_millis(300); 2];
    while (killed < rounds || round < rounds) && round < rounds * 4 {
        add_version(&mut expected, &mut rng, 100 + round);
        let keep = rng.gen_range(2..5).to_string();
        let forget = args!["forget", "--keep-last", &keep, "--small-volumes", "4", "--volume-size", "512KiB"];
        let which = round % 2;
        let cmd = if which == 0 { forget } else { compact.clone() };
        let after = Duration::from_micros(rng.gen_range(0..last[which].as_micros() as u64 * 11 / 10 + 1000));
        if run_and_kill(&env, &cmd, after) {
            finished += 1;
        } else {
            killed += 1;
        }
        // The same command then runs to the end (timed for the next kill), and the box is clean.
        let t = Instant::now();
        env.ok(&cmd);
        last[which] = t.elapsed();
        env.ok(&compact);
        verify_read_data_clean(&env, &format!("round {round} ({cmd:?} killed after {after:?})"));
        // Whatever versions are left restore bit-exact; the newest is always among them.
        let versions = env.versions();
        let newest = versions[0]["id"].as_str().unwrap().to_string();
        assert!(expected.contains_key(&newest));
        expected.retain(|id, _| versions.iter().any(|v| v["id"] == id.as_str()));
        assert_eq!(expected.len(), versions.len(), "a version appeared that no backup made");
        let (id, want) = expected.iter().nth(rng.gen_range(0..expected.len())).unwrap();
        let target = env.path().join("r");
        env.restore(&args![id], &target);
        assert_eq!(&contents(&restored(&target, &src)), want, "version {id} restores different data (round {round})");
        fs::remove_dir_all(&target).unwrap();
        round += 1;
    }
    assert!(killed >= rounds, "too few runs were actually interrupted ({killed} of {round})");
    for (id, want) in &expected {
        let target = env.path().join(format!("r-{id}"));
        env.restore(&args![id], &target);
        assert_eq!(&contents(&restored(&target, &src)), want, "version {id}");
        fs::remove_dir_all(&target).unwrap();
    }
    eprintln!(
        "crash campaign (forget/compact, seed {}): {round} rounds, {killed} killed mid-run, {finished} finished first; \
         {} versions left, all restore bit-exact",
        seed() ^ 0xf0f0,
        expected.len()
    );
}

/// A base box for corruption cases: three versions of a small tree.
struct Base {
    env: Env,
    src: PathBuf,
    /// Id, time and contents of each version, newest first.
    versions: Vec<(String, i64, BTreeMap<PathBuf, Vec<u8>>)>,
}

fn base(seed: u64) -> Base {
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::with_box();
    let src = env.mkdir("src");
    make_tree(&src, &mut rng);
    let mut versions = Vec::new();
    for round in 0..3 {
        if round > 0 {
            mutate(&src, &mut rng, round);
        }
        let s = env.backup(&args![&src, "--volume-size", "256KiB"]);
        let time = s["version"]["time_ns"].as_i64().unwrap();
        versions.insert(0, (version_id(&s), time, contents(&src)));
    }
    Base { env, src, versions }
}

/// A copy of the base box and catalog for one case.
fn case_env(base: &Base) -> Env {
    let env = Env::new();
    copy_tree(&base.env.repo, &env.repo);
    fs::copy(&base.env.db, &env.db).unwrap();
    let _ = fs::copy(base.env.db.with_extension("sqlite-wal"), env.db.with_extension("sqlite-wal"));
    env
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    Flip,
    Truncate,
    Delete,
}

/// Damages one object of `kind`; returns its name and what was done.
fn damage(env: &Env, kind: &str, how: Damage, rng: &mut StdRng) -> String {
    let candidates: Vec<PathBuf> =
        if kind == "config" { vec![env.repo.join("config")] } else { objects(&env.repo, kind) };
    let target = &candidates[rng.gen_range(0..candidates.len())];
    let mut bytes = fs::read(target).unwrap();
    match how {
        Damage::Flip => {
            let i = rng.gen_range(0..bytes.len());
            bytes[i] ^= 1 << rng.gen_range(0..8);
            fs::write(target, bytes).unwrap();
        }
        Damage::Truncate => {
            let n = rng.gen_range(0..bytes.len());
            bytes.truncate(n);
            fs::write(target, bytes).unwrap();
        }
        Damage::Delete => fs::remove_file(target).unwrap(),
    }
    format!("{how:?} {}", target.strip_prefix(&env.repo).unwrap().display())
}

/// Runs corruption cases over `kinds`; returns (cases, detected, files lost).
fn corruption_cases(kinds: &[&str], cases_per_kind: usize, seed: u64) -> (usize, usize, usize) {
    let base = base(seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xdead);
    let (mut cases, mut detected, mut lost) = (0, 0, 0);
    let hows = [Damage::Flip, Damage::Truncate, Damage::Delete];
    for kind in kinds {
        for i in 0..cases_per_kind {
            let env = case_env(&base);
            let how = hows[i % hows.len()];
            let what = damage(&env, kind, how, &mut rng);
            cases += 1;
            // Verify sees it, whatever it is.
            let v = env.run(&args!["verify", "--all", "--json"]);
            if v.code != 0 {
                detected += 1;
            } else {
                panic!("case {cases} ({what}): verify did not notice:\n{}\n{}", v.stdout, v.stderr);
            }
            // Restore restores every file it does not name as damaged.
            for (id, _, want) in &base.versions {
                let target = env.path().join("restore");
                let r = env.run(&args!["restore", id, "--target", &target]);
                let got = contents(&restored(&target, &base.src));
                if r.code != 0 && got.is_empty() {
                    // The version as a whole cannot be read (its manifest or root is damaged):
                    // that must be a clear error.
                    assert!(r.stderr.contains("error"), "case {cases} ({what}): no clear error: {}", r.stderr);
                }
                for (path, data) in want.iter().filter(|_| !got.is_empty() || r.code == 0) {
                    let abs = base.src.join(path);
                    // A file not restored must be named, or a folder above it (unreadable tree).
                    let named = abs
                        .ancestors()
                        .take_while(|a| a.starts_with(&base.src))
                        .any(|a| r.stderr.contains(a.to_string_lossy().as_ref()));
                    match got.get(path) {
                        Some(d) if d == data => {}
                        _ => assert!(
                            named,
                            "case {cases} ({what}): {} of version {id} neither restored nor named:\n{}",
                            abs.display(),
                            r.stderr
                        ),
                    }
                }
                let _ = fs::remove_dir_all(&target);
            }
            // Repair fixes what local data allows (the source still holds the newest version).
            let r = env.run(&args!["repair", "--json"]);
            assert!(r.code == 0 || r.code == 1, "case {cases} ({what}): repair failed: {}", r.stderr);
            // What is still broken goes, and the box is clean.
            let broken = env.run(&args!["list-broken-files", "--json"]);
            if broken.code == 1 {
                lost += broken.json().as_array().map_or(0, Vec::len);
            }
            env.ok(&args!["purge-broken-files"]);
            let v = env.run(&args!["verify", "--all", "--json"]);
            assert_eq!(
                v.code, 0,
                "case {cases} ({what}): not clean after repair and purge-broken-files:\n{}",
                v.stdout
            );
            // Every version left (rewritten versions keep their time) restores its surviving
            // files bit-exact.
            for v in env.versions() {
                let time = v["time_ns"].as_i64().unwrap();
                let Some(original) = base.versions.iter().find(|b| b.1 == time) else {
                    panic!("case {cases} ({what}): version {v} was never made")
                };
                let target = env.path().join("after");
                env.restore(&args![v["id"].as_str().unwrap()], &target);
                let got = contents(&restored(&target, &base.src));
                for (p, d) in &got {
                    let want = original.2.get(p);
                    if want != Some(d) {
                        let dir = env.path().to_path_buf();
                        std::mem::forget(env);
                        panic!(
                            "case {cases} ({what}): {} of version {} differs after repair ({} bytes, want {:?}); box kept in {}",
                            p.display(),
                            original.0,
                            d.len(),
                            want.map(Vec::len),
                            dir.display()
                        );
                    }
                }
                fs::remove_dir_all(&target).unwrap();
            }
        }
    }
    (cases, detected, lost)
}

fn report(name: &str, (cases, detected, lost): (usize, usize, usize)) {
    eprintln!(
        "corruption campaign ({name}): {cases} cases, {detected} detected, {lost} file entries lost after repair"
    );
    assert_eq!(cases, detected);
}

#[test]
fn corruption_campaign_data_volumes() {
    report("data volumes", corruption_cases(&["data"], 21 * scale(), seed() ^ 1));
}

#[test]
fn corruption_campaign_indexes_and_manifests() {
    report("indexes, manifests", corruption_cases(&["index", "versions"], 12 * scale(), seed() ^ 2));
}

#[test]
fn corruption_campaign_config_and_keys() {
    report("config, key files", corruption_cases(&["config", "keys"], 6 * scale(), seed() ^ 3));
}
