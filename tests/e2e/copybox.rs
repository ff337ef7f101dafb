//! `copy-box`: a whole box copied to another location, object by object — from a local box to
//! real S3, SFTP and WebDAV servers on 127.0.0.1 (`.ci/servers.sh`) and back, resumed after
//! Ctrl-C, brought up to date after later backups, and refused where the destination is not
//! its own.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::remote::{make_tree, remote, unique, Mode, Proto, Proxy, Remote, Session};

/// `copy-box DEST` on the local box of `env`, the destination's options given the way
/// copy-box takes them: each `--option` of `dest` as `--to-option`, each `BRICKBOX_OPT_*` as
/// `BRICKBOX_TO_OPT_*` (other variables, like `AWS_*`, as they are).
fn copy_cmd(env: &Env, dest: &Remote, extra: &[&str]) -> Command {
    let mut c = env.cmd(&args!["copy-box", &dest.url]);
    for (k, _) in std::env::vars() {
        if k.starts_with("BRICKBOX_OPT_") || k.starts_with("BRICKBOX_TO_OPT_") || k.starts_with("AWS_") {
            c.env_remove(k);
        }
    }
    for a in &dest.args {
        c.arg(if a == "--option" { "--to-option" } else { a.as_str() });
    }
    for (k, v) in &dest.vars {
        match k.strip_prefix("BRICKBOX_OPT_") {
            Some(key) => c.env(format!("BRICKBOX_TO_OPT_{key}"), v),
            None => c.env(k, v),
        };
    }
    if !extra.contains(&"--retry-delay") {
        c.args(["--retry-delay", "200ms"]);
    }
    c.args(extra);
    c
}

/// Runs copy-box with `--json`, expecting exit code `code`; returns the report.
#[track_caller]
fn copy_json(env: &Env, dest: &Remote, code: i32) -> serde_json::Value {
    let r = run_cmd(copy_cmd(env, dest, &["--json"]));
    r.expect_code(code);
    for s in &dest.secrets {
        assert!(!r.stdout.contains(s.as_str()) && !r.stderr.contains(s.as_str()), "a secret was printed:\n{r:?}");
    }
    r.json()
}

/// Every object file of a local box (locks and scratch space left out), with its bytes.
fn box_files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = walk(root)
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
        .filter(|rel| !rel.starts_with("locks") && !rel.starts_with(".tmp"))
        .map(|rel| {
            let bytes = fs::read(root.join(&rel)).unwrap();
            (rel, bytes)
        })
        .collect();
    out.sort();
    out
}

/// A local box with two versions of the remote tests' tree, in small volumes.
fn local_box_with_versions() -> (Env, PathBuf) {
    let env = Env::with_box();
    let src = env.mkdir("src");
    make_tree(&src);
    env.backup(&args![&src, "--volume-size", "512KiB"]);
    fs::write(src.join("docs/second.bin"), random_bytes(21, 600_000)).unwrap();
    env.backup(&args![&src, "--volume-size", "512KiB"]);
    (env, src)
}

/// A local box copied to a remote one and read there with a fresh catalog (versions, a
/// bit-exact restore, `verify --read-data`); copied again (nothing sent), again after a
/// backup (only its objects sent), and back to a local folder byte for byte.
fn copy_to(proto: Proto) {
    let Some(dest) = remote(proto, &unique("copy")) else { return };
    let (env, src) = local_box_with_versions();
    let objects = box_files(&env.repo).len() as u64;

    let r = copy_json(&env, &dest, 0);
    assert_eq!(r["objects"], objects, "{r}");
    assert_eq!(r["copied"], objects, "{r}");
    assert_eq!(r["already_there"], 0, "{r}");
    assert_eq!(r["damaged"].as_array().unwrap().len(), 0, "{r}");
    assert!(r["destination"].as_str().unwrap().starts_with(&format!("{}://", proto.name())), "{r}");

    let mut there = Session::new(&env, dest.clone());
    there.db = env.path().join("there.sqlite");
    assert_eq!(there.json(&args!["versions"]).as_array().unwrap().len(), 2);
    let t = env.path().join("restored");
    there.ok(&args!["restore", "--target", &t]);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);
    let v = there.json(&args!["verify", "--read-data"]);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");

    // Nothing to send the second time.
    let again = copy_json(&env, &dest, 0);
    assert_eq!(again["copied"], 0, "{again}");
    assert_eq!(again["already_there"], objects, "{again}");

    // A later backup: only its objects (a volume, its index, a manifest) go.
    fs::write(src.join("docs/third.txt"), text_bytes(22, 40_000)).unwrap();
    env.backup(&args![&src]);
    let later = copy_json(&env, &dest, 0);
    let added = box_files(&env.repo).len() as u64 - objects;
    assert_eq!(later["copied"], added, "{later}");
    assert_eq!(later["already_there"], objects, "{later}");
    assert_eq!(there.json(&args!["versions"]).as_array().unwrap().len(), 3);

    // And back from the remote box to a local folder: the same bytes as the original.
    let home = env.path().join("home-again");
    let mut back = there.command(&args!["copy-box", &home, "--json"]);
    back.stdin(Stdio::null());
    let back = run_cmd(back);
    back.expect_code(0);
    assert_eq!(box_files(&home), box_files(&env.repo), "the copy of the copy differs from the box");
    there.assert_no_secrets();
}

#[test]
fn copy_box_to_s3() {
    copy_to(Proto::S3);
}

#[test]
fn copy_box_to_sftp() {
    copy_to(Proto::Sftp);
}

#[test]
fn copy_box_to_webdav() {
    copy_to(Proto::Webdav);
}

/// A copy to S3 through a proxy that breaks about 10% of the requests, and one through a
/// proxy that damages an upload in transit: both complete, and the copies read back intact.
#[test]
fn copy_box_survives_faults_and_damage_in_transit() {
    if remote(Proto::S3, "probe").is_none() {
        return;
    }
    let (env, src) = local_box_with_versions();
    for i in 0..4 {
        fs::write(src.join(format!("more{i}.bin")), random_bytes(30 + i, 400_000)).unwrap();
    }
    env.backup(&args![&src, "--volume-size", "512KiB"]);
    let objects = box_files(&env.repo).len() as u64;
    let flaky = ["--retries", "8", "--retry-delay", "100ms", "--timeout", "20s", "--json"];

    for (mode, tag) in [(Mode::Faulty { percent: 10, setup: 1 }, "faulty"), (Mode::Corrupt, "corrupt")] {
        let Some(dest) = remote(Proto::S3, &unique(tag)) else { return };
        let mut proxy = Proxy::start(dest.addr, mode);
        let r = run_cmd(copy_cmd(&env, &dest.via(proxy.addr), &flaky));
        r.expect_code(0);
        assert_eq!(r.json()["copied"], objects, "{tag}: {}", r.stdout);
        assert!(proxy.faults() > 0, "{tag}: the proxy injected no fault");
        proxy.stop();

        let mut there = Session::new(&env, dest);
        there.db = env.path().join(format!("{tag}.sqlite"));
        let v = there.json(&args!["verify", "--read-data"]);
        assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{tag}: {v}");
        let t = env.path().join(format!("restored-{tag}"));
        there.ok(&args!["restore", "--target", &t]);
        assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);
        there.assert_no_secrets();
    }
}

/// A volume larger than one upload part (8 MiB) goes up in one request like every copied
/// object: its upload is checked against the MD5 of the whole object, so damage in transit
/// is found and the volume sent again.
#[test]
fn copy_box_checks_a_large_volume_against_its_md5() {
    if remote(Proto::S3, "probe").is_none() {
        return;
    }
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("large.bin"), random_bytes(33, 12 << 20)).unwrap();
    env.backup(&args![&src]);
    assert!(
        objects(&env.repo, "data").iter().any(|v| fs::metadata(v).unwrap().len() > 8 << 20),
        "no volume larger than 8 MiB"
    );
    let Some(dest) = remote(Proto::S3, &unique("large")) else { return };
    let mut proxy = Proxy::start(dest.addr, Mode::Corrupt);
    let r = run_cmd(copy_cmd(&env, &dest.via(proxy.addr), &["--json"]));
    r.expect_code(0);
    assert_eq!(proxy.faults(), 1, "the proxy damaged no upload");
    proxy.stop();
    let mut there = Session::new(&env, dest);
    there.db = env.path().join("there.sqlite");
    let v = there.json(&args!["verify", "--read-data"]);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");
    let t = env.path().join("restored");
    there.ok(&args!["restore", "--target", &t]);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);
}

/// Ctrl-C in the middle of a copy leaves no box at the destination (no config), and the next
/// run sends only what is missing.
#[test]
fn copy_box_resumes_after_ctrl_c() {
    let (env, src) = local_box_with_versions();
    fs::write(src.join("big.bin"), random_bytes(23, 6_000_000)).unwrap();
    env.backup(&args![&src, "--volume-size", "512KiB"]);
    let dest = env.path().join("copy");
    let objects = box_files(&env.repo).len() as u64;

    // 1 MiB/s: the copy of ~9 MB takes seconds; it is interrupted after the first objects.
    let mut c = env.cmd(&args!["copy-box", &dest, "--throttle-upload", "1MiB"]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let started = Instant::now();
    while objects_under(&dest.join("data")) < 3 {
        assert!(started.elapsed() < Duration::from_secs(30), "the copy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "an interrupted copy must not succeed:\n{stderr}");
    assert!(stderr.contains("run it again"), "{stderr}");
    assert!(!dest.join("config").exists(), "an unfinished copy must not look like a box");
    let copied_before = box_files(&dest).len() as u64;
    assert!(copied_before > 0 && copied_before < objects, "{copied_before} of {objects}");

    // A dry run says what is left and writes nothing.
    let plan = env.json(&args!["copy-box", &dest, "--dry-run"]);
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(plan["copied"], objects - copied_before, "{plan}");
    assert_eq!(plan["already_there"], copied_before, "{plan}");
    assert_eq!(box_files(&dest).len() as u64, copied_before);
    assert!(!dest.join("config").exists() && objects_under(&dest.join("locks")) == 0);

    let r = env.json(&args!["copy-box", &dest]);
    assert_eq!(r["objects"], objects, "{r}");
    assert_eq!(r["already_there"], copied_before, "only what was missing is sent: {r}");
    assert_eq!(r["copied"], objects - copied_before, "{r}");
    assert_eq!(box_files(&dest), box_files(&env.repo));
    let t = env.path().join("restored");
    let copy_cmd = |password: &str, args: &[&str]| {
        let mut c = env.bare_cmd();
        c.env("BRICKBOX_PASSWORD", password).arg("-r").arg(&dest).arg("--db").arg(env.path().join("copy.sqlite"));
        c.args(args);
        run_cmd(c)
    };
    copy_cmd(&env.password, &["restore", "--target", t.to_str().unwrap()]).expect_code(0);
    assert_same_tree(&src, &restored(&t, &src), Compare::NO_OWNERS);

    // The password changes: copied again, the copy opens with the new one only.
    let mut c = env.cmd(&args!["passwd"]);
    c.env("BRICKBOX_NEW_PASSWORD", "a new password");
    run_cmd(c).expect_code(0);
    let mut c = env.cmd(&args!["copy-box", &dest, "--json"]);
    c.env("BRICKBOX_PASSWORD", "a new password");
    let r = run_cmd(c);
    r.expect_code(0);
    assert_eq!(r.json()["removed"].as_array().unwrap().len(), 1, "{}", r.stdout);
    assert_eq!(box_files(&dest), box_files(&env.repo));
    assert_eq!(copy_cmd("a new password", &["versions"]).code, 0);
    let old = copy_cmd(&env.password, &["versions"]);
    assert_ne!(old.code, 0, "the old password still opens the copy");

    // An unfinished copy (no config) whose box forgot versions and compacted since: taken up
    // all the same; what the box no longer has stays, unless --delete.
    fs::remove_file(dest.join("config")).unwrap();
    let as_new = |args: &[OsString]| {
        let mut c = env.cmd(args);
        c.env("BRICKBOX_PASSWORD", "a new password");
        let r = run_cmd(c);
        r.expect_code(0);
        r
    };
    as_new(&args!["forget", "--keep-last", "1"]);
    let r = as_new(&args!["copy-box", &dest, "--json"]).json();
    let left = r["no_longer_in_box"].as_array().unwrap().len();
    assert!(left >= 2, "the two forgotten manifests at least: {r}");
    assert!(dest.join("config").exists());
    let r = as_new(&args!["copy-box", &dest, "--delete", "--json"]).json();
    assert_eq!(r["removed"].as_array().unwrap().len(), left, "{r}");
    assert_eq!(r["copied"], 2, "the forget records of the two versions: {r}");
    assert_eq!(box_files(&dest), box_files(&env.repo));
    // The box's forget records came along: the copy's catalog, which knew the removed
    // versions, forgets them too, as a fresh one reads the mirror as it is.
    for db in ["copy.sqlite", "fresh.sqlite"] {
        let mut c = env.bare_cmd();
        c.env("BRICKBOX_PASSWORD", "a new password").arg("-r").arg(&dest).arg("--db").arg(env.path().join(db));
        c.args(["verify", "--read-data", "--json"]);
        let r = run_cmd(c);
        r.expect_code(0);
        let v = r.json();
        assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{db}: {v}");
        assert_eq!(v["versions"], 1, "{db}: {v}");
    }
}

fn objects_under(dir: &Path) -> usize {
    fs::read_dir(dir).map(|rd| rd.flatten().count()).unwrap_or(0)
}

/// A destination holding another box or other objects is refused before anything is written;
/// a damaged object of the box is copied as it is and reported (exit code 3); a destination
/// that does not answer is a clear error.
#[test]
fn copy_box_refuses_what_is_not_its_own_and_reports_damage() {
    let (env, _src) = local_box_with_versions();

    // Another box.
    let other = Env::new();
    other.init();
    let before = box_files(&other.repo);
    let r = env.run(&args!["copy-box", &other.repo]);
    r.expect_code(1);
    assert!(r.stderr.contains("already holds another box"), "{}", r.stderr);
    assert_eq!(box_files(&other.repo), before, "the other box was changed");

    // Objects that are no part of this box.
    let stranger = env.path().join("stranger");
    let vol = fs::read_dir(env.repo.join("data")).unwrap().flatten().next().unwrap().file_name();
    fs::create_dir_all(stranger.join("data")).unwrap();
    fs::write(stranger.join("data").join(format!("{}.dblock.zip", "ab".repeat(16))), b"not ours").unwrap();
    let r = env.run(&args!["copy-box", &stranger]);
    r.expect_code(1);
    assert!(r.stderr.contains("is not empty") && r.stderr.contains("abab"), "{}", r.stderr);
    assert_eq!(objects_under(&stranger.join("data")), 1);
    assert!(!stranger.join("index").exists() && !stranger.join("config").exists());

    // A damaged volume: copied as it is, named, exit code 3.
    let damaged = env.repo.join("data").join(&vol);
    let mut bytes = fs::read(&damaged).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&damaged, &bytes).unwrap();
    let dest = env.path().join("copy");
    let r = env.run(&args!["copy-box", &dest]);
    r.expect_code(3);
    let name = format!("data/{}", vol.to_string_lossy());
    assert!(r.stderr.contains(&name) && r.stderr.contains("damaged"), "{}", r.stderr);
    assert!(r.stderr.contains("brickbox repair"), "{}", r.stderr);
    assert_eq!(box_files(&dest), box_files(&env.repo));

    // Nobody listening at the destination.
    let dead = "s3://bucket/box?endpoint=http://127.0.0.1:9&region=us-east-1";
    let mut c = env.cmd(&args!["copy-box", dead, "--retries", "1", "--retry-delay", "100ms"]);
    c.env("BRICKBOX_TO_OPT_ACCESS_KEY_ID", "id").env("BRICKBOX_TO_OPT_SECRET_ACCESS_KEY", "copy-secret-never-shown");
    let started = Instant::now();
    let r = run_cmd(c);
    r.expect_code(1);
    assert!(started.elapsed() < Duration::from_secs(30), "a dead destination must fail fast");
    assert!(r.stderr.contains("127.0.0.1:9") || r.stderr.contains("s3://bucket/box"), "{}", r.stderr);
    assert!(!r.stderr.contains("copy-secret-never-shown"), "{}", r.stderr);
}
