//! Interrupted backups and restores: the next run completes, reuses what was done, and restores bit-exact.
//!
//! The source is 48 MiB rather than the ~300 MiB of the issue, with 1 MiB volumes instead of 8 MiB
//! (so about as many volumes): a debug build stores new data at only ~5 MB/s, because the generic
//! AES-GCM code is instantiated in the unoptimised `brickbox-core`, and the suite must stay short.

use std::fs::{self, File};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

const FILES: u64 = 3;
const FILE_SIZE: u64 = 16 * MIB;
const VOLUME: &str = "1MiB";

/// 48 MiB of random data in a few files.
fn make_source(src: &Path, seed: u64) -> u64 {
    fs::create_dir_all(src.join("nested")).unwrap();
    for i in 0..FILES {
        let dir = if i % 2 == 0 { src.to_path_buf() } else { src.join("nested") };
        write_random(&dir.join(format!("data{i}.bin")), seed + i, FILE_SIZE);
    }
    fs::write(src.join("small.txt"), b"small file\n").unwrap();
    FILES * FILE_SIZE + 11
}

/// Volumes that have their index, i.e. were completely uploaded.
fn uploaded_volumes(repo: &Path) -> Vec<std::path::PathBuf> {
    let indexes: Vec<String> =
        objects(repo, "index").iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    objects(repo, "data")
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            indexes.iter().any(|i| name.starts_with(i.as_str()))
        })
        .collect()
}

/// Starts a backup with small volumes, sends `signal` once at least 3 volumes are stored, and
/// returns the exit code (None when killed by a signal) and stderr.
fn interrupted_backup(env: &Env, src: &Path, signal: i32) -> (Option<i32>, String) {
    let err_path = env.path().join("interrupted.stderr");
    let mut c = env.cmd(&args!["backup", src, "--volume-size", VOLUME, "--json"]);
    c.stdout(Stdio::null()).stderr(File::create(&err_path).unwrap());
    let mut child = c.spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the backup ended ({status}) before it could be interrupted; stderr: {}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        if uploaded_volumes(&env.repo).len() >= 3 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "no volumes stored after 4 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let stop = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stop.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the backup did not stop within 60 s of signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), fs::read_to_string(&err_path).unwrap())
}

fn check_rerun(env: &Env, src: &Path, total: u64) {
    assert!(objects(&env.repo, "versions").is_empty(), "an interrupted backup wrote a version");
    let reused: u64 = uploaded_volumes(&env.repo).iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert!(reused >= 3 * MIB, "only {reused} bytes of volumes survived");

    let s = env.backup(&args![src, "--volume-size", VOLUME]);
    let added = num(&s, "bytes_added");
    assert!(added < total, "the rerun added {added} bytes for {total} bytes of data: {s:#}");
    // Everything in completely uploaded volumes is reused (2% slack for per-block overhead).
    let limit = (total - reused) + total / 50 + MIB;
    assert!(
        added <= limit,
        "the rerun added {added} bytes but {reused} bytes were already stored (limit {limit}): {s:#}"
    );
    assert_eq!(env.versions().len(), 1);

    let t = env.path().join("t");
    env.restore(&args![], &t);
    assert_same_tree(src, &restored(&t, src), Compare::ALL);
}

#[test]
fn sigint_during_backup_then_rerun_reuses_volumes() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let total = make_source(&src, 500);
    let (code, stderr) = interrupted_backup(&env, &src, libc::SIGINT);
    assert!(code.is_some_and(|c| c != 0), "an interrupted backup must fail, got {code:?}: {stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    check_rerun(&env, &src, total);
}

#[test]
fn sigkill_during_backup_then_rerun_completes() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let total = make_source(&src, 600);
    let (code, _) = interrupted_backup(&env, &src, libc::SIGKILL);
    assert_eq!(code, None, "killed by the signal");
    check_rerun(&env, &src, total);
}

/// A restore stopped by Ctrl-C leaves no file it had begun looking restored (those it had
/// not finished are removed; it said they were zero-filled placeholders with the backed-up
/// size before), and a second run restores everything, without --overwrite.
#[test]
fn sigint_during_restore_leaves_no_unfinished_file_and_a_rerun_completes() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    make_source(&src, 700);
    env.backup(&args![&src, "--volume-size", VOLUME]);
    let t = env.path().join("t");
    let out = restored(&t, &src);
    let err_path = env.path().join("restore.stderr");
    let mut c = env.cmd(&args!["restore", "--target", &t]);
    c.stdout(Stdio::null()).stderr(File::create(&err_path).unwrap());
    let mut child = c.spawn().unwrap();
    // Stopped once the files are made and the first is being written.
    let start = Instant::now();
    while !out.join("data0.bin").exists() && child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(120), "the restore made no file");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let stderr = fs::read_to_string(&err_path).unwrap();
    eprintln!("restore stopped with {status}: {stderr}");
    for name in ["data0.bin", "small.txt", "nested/data1.bin", "data2.bin"] {
        let p = out.join(name);
        assert!(!p.exists() || same_content(&p, &src.join(name)), "{name} left unfinished ({status}): {stderr}");
    }
    env.restore(&args![], &t);
    assert_same_tree(&src, &out, Compare::ALL);
}
