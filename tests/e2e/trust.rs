//! Trust: retention, deletion, purge, compaction, locks, verify, repair, recreate-db and
//! broken files, through the real binary on real boxes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// A source of a few files: two random ones of `big` bytes, text, a nested folder.
fn make_source(env: &Env, big: u64) -> PathBuf {
    let src = env.mkdir("src");
    fs::create_dir_all(src.join("docs/deep")).unwrap();
    write_random(&src.join("a.bin"), 1, big);
    write_random(&src.join("docs/b.bin"), 2, big);
    fs::write(src.join("docs/notes.txt"), text_bytes(3, 40_000)).unwrap();
    fs::write(src.join("docs/deep/small.txt"), b"small\n").unwrap();
    src
}

/// Volume objects of the box.
fn volumes(env: &Env) -> Vec<PathBuf> {
    objects(&env.repo, "data")
}

/// `verify --all --json`; returns (exit code, report).
fn verify_all(env: &Env) -> (i32, Value) {
    let r = env.run(&args!["verify", "--all", "--json"]);
    (r.code, r.json())
}

#[track_caller]
fn assert_clean(env: &Env) {
    let (code, report) = verify_all(env);
    assert_eq!(code, 0, "verify found problems: {report:#}");
    assert!(report["problems"].as_array().unwrap().is_empty());
}

/// Restores version `spec` into a new folder and returns where `src` landed.
fn restore_version(env: &Env, spec: &str, src: &Path, name: &str) -> PathBuf {
    let target = env.path().join(name);
    env.restore(&args![spec], &target);
    restored(&target, src)
}

#[test]
fn forget_keeps_what_the_rules_say_and_compaction_frees_the_space() {
    let env = Env::with_box();
    let src = make_source(&env, 2 * MIB);
    let mut copies = Vec::new();
    for i in 0..4u64 {
        // Each version replaces a.bin entirely: the old content becomes garbage once forgotten.
        write_random(&src.join("a.bin"), 100 + i, 2 * MIB);
        env.backup(&args![&src, "--volume-size", "1MiB", "--tag", if i == 0 { "keep" } else { "daily" }]);
        let copy = env.path().join(format!("copy{i}"));
        fs::create_dir_all(&copy).unwrap();
        fs::copy(src.join("a.bin"), copy.join("a.bin")).unwrap();
        copies.push(copy);
    }
    let before = folder_bytes(&env.repo, "data");

    // A dry run changes nothing.
    let dry = env.json(&args!["forget", "--keep-last", "2", "--dry-run"]);
    let would: Vec<&Value> = dry["versions"].as_array().unwrap().iter().filter(|v| v["keep"] == false).collect();
    assert_eq!(would.len(), 2, "{dry:#}");
    assert_eq!(env.versions().len(), 4);
    assert_eq!(folder_bytes(&env.repo, "data"), before);

    // Keep the last two and the tagged one.
    let out = env.json(&args!["forget", "--keep-last", "2", "--keep-tag", "keep"]);
    let kept: Vec<&Value> = out["versions"].as_array().unwrap().iter().filter(|v| v["keep"] == true).collect();
    assert_eq!(kept.len(), 3, "{out:#}");
    let vs = env.versions();
    assert_eq!(vs.len(), 3);
    assert!(out["compact"]["volumes_deleted"].as_u64().unwrap() >= 1, "{out:#}");
    let after = folder_bytes(&env.repo, "data");
    assert!(after + MIB < before, "compaction freed too little: {before} -> {after}");
    // What it says it gave back is what data/ lost (volumes deleted, less those written;
    // indexes are counted with what was written).
    let c = &out["compact"];
    let freed = num(c, "bytes_freed");
    assert_eq!(freed, num(c, "bytes_deleted").saturating_sub(num(c, "bytes_uploaded")), "{c:#}");
    assert!(freed <= before - after && before - after - freed < 64 << 10, "{before} -> {after}: {c:#}");
    assert_clean(&env);

    // Every kept version restores bit-exact: the oldest (tagged) and the last two.
    for (spec, copy) in [("0", &copies[3]), ("1", &copies[2]), ("2", &copies[0])] {
        let got = restore_version(&env, spec, &src, &format!("r{spec}"));
        assert!(same_content(&got.join("a.bin"), &copy.join("a.bin")), "version {spec}");
        assert!(same_content(&got.join("docs/b.bin"), &src.join("docs/b.bin")));
    }

    // Bad rules are clear errors.
    let r = env.run(&args!["forget"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no retention rule"), "{}", r.stderr);
    let r = env.run(&args!["forget", "--retention-policy", "1W:1X"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("1X"), "{}", r.stderr);
}

#[test]
fn retention_policy_never_removes_the_newest_version() {
    let env = Env::with_box();
    let src = make_source(&env, 64 * KIB);
    for i in 0..3 {
        fs::write(src.join("docs/notes.txt"), text_bytes(10 + i, 1000)).unwrap();
        env.backup(&args![&src]);
    }
    // Every version is seconds old: a 1-second timeframe holds none but the policy keeps the newest.
    std::thread::sleep(Duration::from_millis(1100));
    let out = env.json(&args!["forget", "--retention-policy", "1s:1s"]);
    assert_eq!(env.versions().len(), 1, "{out:#}");
    assert_clean(&env);
    let got = restore_version(&env, "latest", &src, "r");
    assert_same_tree(&src, &got, Compare::NO_OWNERS);
}

#[test]
fn delete_and_purge_rewrite_history() {
    let env = Env::with_box();
    let src = make_source(&env, 512 * KIB);
    fs::write(src.join("secret.key"), b"oops, this should never have been backed up\n").unwrap();
    env.backup(&args![&src]);
    fs::write(src.join("docs/notes.txt"), text_bytes(4, 5000)).unwrap();
    env.backup(&args![&src]);
    fs::write(src.join("docs/deep/small.txt"), b"changed\n").unwrap();
    env.backup(&args![&src]);
    assert_eq!(env.versions().len(), 3);

    // Purge a file from every version.
    let secret = src.join("secret.key");
    let dry = env.json(&args!["purge", &secret, "--dry-run"]);
    assert_eq!(dry["versions"].as_array().unwrap().len(), 3, "{dry:#}");
    assert!(env.json(&args!["find", "secret.key", "--all-versions"]).as_array().unwrap().len() == 3);
    env.json(&args!["purge", &secret]);
    assert!(env.json(&args!["find", "secret.key", "--all-versions"]).as_array().unwrap().is_empty());
    assert_eq!(env.versions().len(), 3);
    // Purging a path no version has changes nothing.
    let none = env.json(&args!["purge", src.join("nothing-here")]);
    assert!(none["versions"].as_array().unwrap().is_empty());

    // Delete the middle version.
    let before: Vec<String> = env.versions().iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    env.json(&args!["delete", "1"]);
    let after: Vec<String> = env.versions().iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(after, vec![before[0].clone(), before[2].clone()]);
    assert_clean(&env);
    let got = restore_version(&env, "latest", &src, "r");
    assert!(!got.join("secret.key").exists());
    for f in ["a.bin", "docs/b.bin", "docs/notes.txt", "docs/deep/small.txt"] {
        assert!(same_content(&got.join(f), &src.join(f)), "{f}");
    }

    let r = env.run(&args!["purge", "/"]);
    assert!(r.code != 0 && r.stderr.contains("brickbox delete"), "{}", r.stderr);
    let r = env.run(&args!["delete", "7"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
}

/// Ids of the versions a catalog sees, oldest first.
fn version_ids(env: &Env, db: &Path) -> Vec<String> {
    let r = env.run_with_db(db, &args!["versions", "--json"]);
    r.expect_code(0);
    let mut ids: Vec<String> =
        r.json().as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();
    ids.reverse();
    ids
}

#[test]
fn a_second_catalog_forgets_what_another_forgot_and_still_reports_what_was_lost() {
    // Two machines back up into one box, each with its own catalog; one of them applies the
    // retention rules, deletes and purges. The other must follow, not report those versions
    // lost nor bring them back, while a manifest lost for real is still reported and repaired.
    let env = Env::with_box();
    let src = make_source(&env, 256 * KIB);
    let other = env.path().join("other.sqlite");
    env.backup(&args![&src]);
    write_random(&src.join("a.bin"), 7, 256 * KIB);
    env.run_with_db(&other, &args!["backup", &src]).expect_code(0);
    write_random(&src.join("a.bin"), 8, 256 * KIB);
    env.backup(&args![&src]);
    let all = version_ids(&env, &other);
    assert_eq!(all.len(), 3);

    // The first machine keeps the newest version only, and compacts.
    let out = env.json(&args!["forget", "--keep-last", "1"]);
    assert!(out["compact"]["volumes_deleted"].as_u64().unwrap() >= 1, "{out:#}");
    let records = objects(&env.repo, "forgotten");
    assert_eq!(records.len(), 2, "one forget record per forgotten version: {records:?}");

    // The other catalog sees one version, verifies the box clean, compacts and repairs nothing.
    assert_eq!(version_ids(&env, &other), vec![all[2].clone()]);
    let r = env.run_with_db(&other, &args!["verify", "--all", "--json"]);
    r.expect_code(0);
    assert!(r.json()["problems"].as_array().unwrap().is_empty(), "{}", r.stdout);
    env.run_with_db(&other, &args!["compact"]).expect_code(0);
    let r = env.run_with_db(&other, &args!["repair", "--json"]);
    r.expect_code(0);
    assert_eq!(r.json()["manifests_restored"], 0, "{}", r.stdout);
    assert_eq!(version_ids(&env, &other), vec![all[2].clone()]);

    // A purge replaces the version: the other catalog follows it to the new one.
    env.json(&args!["purge", src.join("docs/notes.txt")]);
    let now = version_ids(&env, &env.db);
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], all[2]);
    assert_eq!(version_ids(&env, &other), now);
    env.run_with_db(&other, &args!["verify", "--json"]).expect_code(0);

    // A catalog that marked a version missing before its record was there (as after a
    // forget by an earlier build) forgets it once the record is there.
    env.backup(&args![&src]);
    let newest = version_ids(&env, &other).pop().unwrap();
    env.json(&args!["delete", "latest"]);
    let record = env.repo.join(format!("forgotten/{newest}.forgotten"));
    let aside = env.path().join("record");
    fs::rename(&record, &aside).unwrap();
    let r = env.run_with_db(&other, &args!["verify", "--json"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains(&format!("versions/{newest}.dlist")), "{}", r.stdout);
    fs::rename(&aside, &record).unwrap();
    assert_eq!(version_ids(&env, &other), now);
    env.run_with_db(&other, &args!["verify", "--json"]).expect_code(0);

    // A manifest lost without a record is still reported, and repair stores it again.
    env.backup(&args![&src]);
    let ids = version_ids(&env, &other);
    let lost = ids.last().unwrap().clone();
    fs::remove_file(env.repo.join(format!("versions/{lost}.dlist"))).unwrap();
    let r = env.run_with_db(&other, &args!["verify", "--json"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains(&format!("versions/{lost}.dlist")), "{}", r.stdout);
    // A record that does not open is not believed either.
    fs::write(env.repo.join(format!("forgotten/{lost}.forgotten")), b"not a record").unwrap();
    let r = env.run_with_db(&other, &args!["verify", "--json"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains(&format!("forgotten/{lost}.forgotten")), "{}", r.stdout);
    let r = env.run_with_db(&other, &args!["repair", "--json"]);
    r.expect_code(0);
    assert_eq!(r.json()["manifests_restored"], 1, "{}", r.stdout);
    assert!(!env.repo.join(format!("forgotten/{lost}.forgotten")).exists());
    assert_eq!(version_ids(&env, &other), ids);
    assert_clean(&env);
    let got = restore_version(&env, "latest", &src, "r");
    assert!(same_content(&got.join("a.bin"), &src.join("a.bin")));

    // A lost manifest that should go anyway: `delete ID` forgets it, with a record, so
    // both catalogs agree and verify clean.
    fs::remove_file(env.repo.join(format!("versions/{lost}.dlist"))).unwrap();
    env.run_with_db(&other, &args!["delete", &lost, "--no-compact"]).expect_code(0);
    let rest: Vec<String> = ids.iter().filter(|i| **i != lost).cloned().collect();
    assert_eq!(version_ids(&env, &other), rest);
    assert_eq!(version_ids(&env, &env.db), rest);
    env.run_with_db(&other, &args!["verify", "--json"]).expect_code(0);
    assert_clean(&env);
}

#[test]
fn a_damaged_manifest_that_is_whole_again_is_taken_up_and_no_longer_reported() {
    let env = Env::with_box();
    let src = make_source(&env, 256 * KIB);
    env.backup(&args![&src]);
    fs::write(src.join("docs/notes.txt"), text_bytes(7, 30_000)).unwrap();
    env.backup(&args![&src]);
    let ids = version_ids(&env, &env.db);
    assert_eq!(ids.len(), 2);
    // Another catalog meets the newer manifest damaged: reported, and that version unknown.
    let manifest = env.repo.join(format!("versions/{}.dlist", ids[1]));
    let good = fs::read(&manifest).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    fs::write(&manifest, &bad).unwrap();
    let other = env.path().join("other.sqlite");
    for _ in 0..2 {
        let r = env.run_with_db(&other, &args!["verify", "--json"]);
        assert_ne!(r.code, 0, "{}", r.stdout);
        assert!(r.stdout.contains(&format!("versions/{}.dlist", ids[1])), "{}", r.stdout);
        assert_eq!(version_ids(&env, &other), ids[..1]);
    }
    // Written back whole (as a repair from another machine would): that catalog takes the
    // version up and no longer reports the manifest.
    fs::write(&manifest, &good).unwrap();
    let r = env.run_with_db(&other, &args!["verify", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(version_ids(&env, &other), ids);
}

/// The check after a backup walks the version that backup stored, not the newest by time:
/// another machine's version dated days ahead (its clock is wrong) whose trees are damaged
/// does not fail this backup's check; `verify` reports it.
#[test]
fn the_check_after_a_backup_walks_the_version_it_stored() {
    if Command::new("faketime").arg("--version").output().is_err() {
        eprintln!("SKIP: the check-after-backup clock test needs faketime (apt-get install faketime)");
        return;
    }
    let env = Env::with_box();
    let ahead = env.mkdir("ahead");
    write_random(&ahead.join("x.bin"), 61, 200 * KIB);
    // The machine whose clock runs two days ahead.
    let c = env.cmd(&args!["backup", &ahead, "--no-verify"]);
    let mut skewed = Command::new("faketime");
    skewed.arg("+2 days").arg(c.get_program()).args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => skewed.env(k, v),
            None => skewed.env_remove(k),
        };
    }
    run_cmd(skewed).expect_code(0);
    let trees = volumes(&env).into_iter().min_by_key(|v| fs::metadata(v).unwrap().len()).unwrap();
    let mut bytes = fs::read(&trees).unwrap();
    let (off, len, _) = zip_entries(&bytes)[0];
    bytes[off + len / 2] ^= 0x01;
    fs::write(&trees, &bytes).unwrap();

    let src = env.mkdir("src");
    write_random(&src.join("y.bin"), 62, 100 * KIB);
    let r = env.run(&args!["backup", &src, "--verify-samples", "0"]);
    assert_eq!(r.code, 0, "the check walked another version: {}", r.stderr);
    let (code, report) = verify_all(&env);
    assert_eq!(code, 1, "{report:#}");
    assert!(report.to_string().contains("directory tree cannot be read"), "{report:#}");
}

#[test]
fn repair_mends_a_volume_a_backup_found_truncated() {
    let env = Env::with_box();
    let src = make_source(&env, 2 * MIB);
    env.backup(&args![&src, "--volume-size", "1MiB"]);
    // A volume cut short (a truncated upload): the next backup finds its size wrong, drops
    // its blocks from the catalog and stores them again from the source.
    let vol = volumes(&env).into_iter().max_by_key(|v| fs::metadata(v).unwrap().len()).unwrap();
    let len = fs::metadata(&vol).unwrap().len();
    fs::OpenOptions::new().write(true).open(&vol).unwrap().set_len(len / 2).unwrap();
    let r = env.run(&args!["backup", &src, "--json"]);
    assert!(r.code == 0 || r.code == 3, "{}\n{}", r.stdout, r.stderr);
    // repair takes the damaged volume up again (salvaging what it can) and leaves a clean box.
    let r = env.run(&args!["repair", "--json"]);
    r.expect_code(0);
    assert_clean(&env);
    let got = restore_version(&env, "latest", &src, "r");
    assert_same_tree(&src, &got, Compare::NO_OWNERS);
}

#[test]
fn compaction_is_not_held_up_by_what_is_gone_of_a_missing_version() {
    let env = Env::with_box();
    let src = make_source(&env, 256 * KIB);
    let other = env.path().join("other.sqlite");
    env.backup(&args![&src]);
    write_random(&src.join("a.bin"), 9, 256 * KIB);
    env.backup(&args![&src]);
    let ids = version_ids(&env, &other);
    assert_eq!(ids.len(), 2);
    // Forgotten and compacted away by a writer that leaves no forget record (one older than
    // records): to the other catalog the manifest is missing, and its trees are gone.
    env.json(&args!["forget", "--keep-last", "1"]);
    for p in objects(&env.repo, "forgotten") {
        fs::remove_file(p).unwrap();
    }
    let r = env.run_with_db(&other, &args!["verify", "--json"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains(&format!("versions/{}.dlist", ids[0])), "{}", r.stdout);
    // What is left of it is kept; what is gone does not stop the compaction.
    env.run_with_db(&other, &args!["compact"]).expect_code(0);
    assert_clean(&env);
}

/// Starts a backup that holds its lock, and stops it (SIGSTOP) once the lock is in the box.
fn held_backup(env: &Env, src: &Path) -> Child {
    let mut c = env.cmd(&args!["backup", src, "--volume-size", "256KiB"]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let child = c.spawn().unwrap();
    let start = Instant::now();
    while objects(&env.repo, "locks").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "the backup took no lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, libc::SIGSTOP);
    child
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

#[test]
fn locks_keep_writers_apart_and_stale_locks_never_block() {
    let env = Env::with_box();
    let src = make_source(&env, 4 * MIB);
    env.backup(&args![&src]);
    write_random(&src.join("a.bin"), 7, 4 * MIB);

    // A live backup holds an append lock.
    let mut a = held_backup(&env, &src);
    let locks = env.json(&args!["locks"]);
    let held = locks["locks"].as_array().unwrap();
    assert_eq!(held.len(), 1, "{locks:#}");
    assert_eq!(held[0]["command"], "backup");
    assert!(held[0]["stale"].is_null());
    // Another backup, a compaction and a forget are refused with a clear message…
    for cmd in [args!["backup", &src], args!["compact"], args!["forget", "--keep-last", "1"]] {
        let r = env.run(&cmd);
        assert_eq!(r.code, 1, "{cmd:?} ran beside a backup");
        assert!(r.stderr.contains("in use") && r.stderr.contains("'backup'"), "{}", r.stderr);
    }
    // …but reading goes on.
    restore_version(&env, "latest", &src, "r1");
    assert_eq!(env.run(&args!["verify"]).code, 0);
    // `locks --break` leaves a live lock alone.
    env.ok(&args!["locks", "--break"]);
    assert_eq!(objects(&env.repo, "locks").len(), 1);
    // A waiting backup goes ahead once the first finishes.
    let mut waiting = env.cmd(&args!["backup", &src, "--lock-wait", "2m"]);
    waiting.stdout(Stdio::null()).stderr(Stdio::piped());
    let waiting = waiting.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    signal(&a, libc::SIGCONT);
    assert!(a.wait().unwrap().success());
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(objects(&env.repo, "locks").is_empty());

    // A killed backup leaves a lock that is stale at once: the next backup is not blocked.
    write_random(&src.join("a.bin"), 8, 4 * MIB);
    let mut k = held_backup(&env, &src);
    signal(&k, libc::SIGKILL);
    k.wait().unwrap();
    let locks = env.json(&args!["locks"]);
    assert!(locks["locks"][0]["stale"].as_str().unwrap().contains("ended"), "{locks:#}");
    env.backup(&args![&src]);
    assert!(objects(&env.repo, "locks").is_empty(), "the stale lock was not removed");
    assert_clean(&env);
    let got = restore_version(&env, "latest", &src, "r2");
    assert_same_tree(&src, &got, Compare::NO_OWNERS);
    // The first backup, the stopped one, the one that waited, and the last one.
    assert_eq!(env.versions().len(), 4);
}

#[test]
fn concurrent_backups_with_lock_wait_both_complete() {
    let env = Env::with_box();
    let src = make_source(&env, 3 * MIB);
    let spawn = || {
        let mut c = env.cmd(&args!["backup", &src, "--lock-wait", "3m"]);
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for c in [a, b] {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(env.versions().len(), 2);
    assert_clean(&env);
}

#[test]
fn verify_finds_damage_and_repair_recovers_it_from_local_files() {
    let env = Env::with_box();
    let src = make_source(&env, 3 * MIB);
    env.backup(&args![&src, "--volume-size", "1MiB"]);
    assert_clean(&env);

    // One byte of ZIP framing (not inside any block) flipped: only the volume hash sees it.
    // Of the full volumes (file data), one is damaged that way and one deleted.
    let vols: Vec<PathBuf> =
        volumes(&env).into_iter().filter(|v| fs::metadata(v).unwrap().len() > 900 * 1024).collect();
    let mut bytes = fs::read(&vols[0]).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    fs::write(&vols[0], &bytes).unwrap();
    let (code, report) = verify_all(&env);
    assert_eq!(code, 1, "{report:#}");
    let text = report.to_string();
    assert!(text.contains("hash"), "{report:#}");
    // Every block of that volume is intact: no file is broken by it.
    let broken = env.run(&args!["list-broken-files"]);
    assert_eq!(broken.code, 0, "{broken:?}");

    // A whole volume deleted: the files that need it are named.
    fs::remove_file(&vols[1]).unwrap();
    let (code, report) = verify_all(&env);
    assert_eq!(code, 1);
    let name = vols[1].file_name().unwrap().to_string_lossy().into_owned();
    let p = report["problems"].as_array().unwrap().iter().find(|p| p["object"].as_str().unwrap().contains(&name));
    let p = p.unwrap_or_else(|| panic!("{name} not reported: {report:#}"));
    assert!(!p["affected"].as_array().unwrap().is_empty(), "{p:#}");
    let broken = env.run(&args!["list-broken-files", "--json"]);
    assert_eq!(broken.code, 1);
    assert!(!broken.json().as_array().unwrap().is_empty());

    // An index deleted and a manifest deleted.
    fs::remove_file(&objects(&env.repo, "index")[2]).unwrap();
    let manifest = objects(&env.repo, "versions")[0].clone();
    fs::remove_file(&manifest).unwrap();
    let (code, report) = verify_all(&env);
    assert_eq!(code, 1);
    assert!(report.to_string().contains("missing from the box"), "{report:#}");

    // The source is unchanged: repair brings everything back.
    let r = env.run(&args!["repair", "--json"]);
    let rep = r.json();
    assert_eq!(r.code, 0, "{rep:#}\n{}", r.stderr);
    assert!(rep["blocks_recovered"].as_u64().unwrap() > 0, "{rep:#}");
    assert_eq!(rep["manifests_restored"], 1);
    assert!(manifest.exists());
    assert_clean(&env);
    assert!(env.run(&args!["list-broken-files"]).code == 0);
    let got = restore_version(&env, "latest", &src, "r");
    assert_same_tree(&src, &got, Compare::NO_OWNERS);

    // A bit flipped inside a block, which only reading the data finds: `repair --read-data`
    // alone finds it and mends it from the unchanged source.
    let vol = volumes(&env).into_iter().max_by_key(|v| fs::metadata(v).unwrap().len()).unwrap();
    let mut bytes = fs::read(&vol).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&vol, &bytes).unwrap();
    let r = env.run(&args!["repair", "--read-data", "--json"]);
    let rep = r.json();
    assert_eq!(r.code, 0, "{rep:#}\n{}", r.stderr);
    assert!(rep["blocks_recovered"].as_u64().unwrap() > 0, "{rep:#}");
    assert_clean(&env);
    let got = restore_version(&env, "latest", &src, "r2");
    assert_same_tree(&src, &got, Compare::NO_OWNERS);
}

#[test]
fn purge_broken_files_leaves_a_clean_box_when_data_is_lost() {
    let env = Env::with_box();
    let src = make_source(&env, 3 * MIB);
    env.backup(&args![&src, "--volume-size", "1MiB"]);
    // a.bin changes on disk, so its old blocks cannot be recovered from it.
    write_random(&src.join("a.bin"), 99, 3 * MIB);
    // Lose full volumes (file data, not the small last one with the trees) until the old
    // a.bin is broken.
    let a_bin = src.join("a.bin").to_string_lossy().into_owned();
    let mut broken = Vec::new();
    for v in volumes(&env).into_iter().filter(|v| fs::metadata(v).unwrap().len() > 900 * 1024) {
        fs::remove_file(&v).unwrap();
        let list = env.run(&args!["list-broken-files", "--json"]).json();
        broken = list.as_array().unwrap().iter().map(|b| b["path"].as_str().unwrap().to_string()).collect();
        if broken.contains(&a_bin) {
            break;
        }
    }
    assert!(broken.contains(&a_bin), "{broken:?}");

    // Restore still restores everything else, naming what it cannot.
    let target = env.path().join("partial");
    let r = env.run(&args!["restore", "--target", &target]);
    assert_eq!(r.code, 1);
    for p in &broken {
        assert!(r.stderr.contains(p.as_str()), "{p} not named in:\n{}", r.stderr);
    }

    // Files still unchanged on disk are recovered; the old a.bin is gone from the version.
    env.ok(&args!["purge-broken-files"]);
    assert_clean(&env);
    assert_eq!(env.run(&args!["list-broken-files"]).code, 0);
    let got = restore_version(&env, "latest", &src, "r");
    assert!(!got.join("a.bin").exists(), "the broken a.bin is still in the version");
    for f in ["docs/b.bin", "docs/notes.txt", "docs/deep/small.txt"] {
        let p = got.join(f);
        let was_broken = broken.iter().any(|b| b.ends_with(f));
        assert!(same_content(&p, &src.join(f)) || (was_broken && !p.exists()), "{f}");
    }
    // The next backup stores what is on disk again, and the box stays clean.
    env.backup(&args![&src]);
    assert_clean(&env);
    let got = restore_version(&env, "latest", &src, "r2");
    assert_same_tree(&src, &got, Compare::NO_OWNERS);

    // A manifest no catalog knows that does not open: reported, and removed.
    let junk = env.repo.join("versions/00000000000000aa.dlist");
    fs::write(&junk, b"not a manifest").unwrap();
    let (code, report) = verify_all(&env);
    assert_eq!(code, 1, "{report:#}");
    assert!(report.to_string().contains("00000000000000aa.dlist"), "{report:#}");
    env.ok(&args!["purge-broken-files"]);
    assert!(!junk.exists());
    assert_clean(&env);
}

#[test]
fn recreate_db_rebuilds_the_catalog_and_the_next_backup_adds_no_data() {
    let env = Env::with_box();
    let src = make_source(&env, 2 * MIB);
    for i in 0..3 {
        fs::write(src.join("docs/notes.txt"), text_bytes(20 + i, 30_000)).unwrap();
        env.backup(&args![&src]);
    }
    fs::remove_file(&env.db).unwrap();
    let _ = fs::remove_file(env.db.with_extension("sqlite-wal"));
    let out = env.json(&args!["recreate-db"]);
    assert_eq!(out["versions"], 3);
    assert_eq!(env.versions().len(), 3);
    let s = env.backup(&args![&src]);
    // No file data; only the trees of the folders above the source, whose times changed
    // when the catalog was rebuilt next to it.
    assert_eq!(num(&s, "blocks_added"), 0, "{s:#}");
    assert!(num(&s, "trees_added") <= 3, "{s:#}");
    assert!(num(&s, "bytes_added") < 4000, "{s:#}");
    // recreate-db over an existing catalog also works, and knows the versions.
    let out = env.json(&args!["recreate-db"]);
    assert_eq!(out["versions"], 4);
    assert_clean(&env);
}

#[test]
fn compaction_merges_small_volumes_and_cleans_up_after_interruptions() {
    let env = Env::with_box();
    let src = make_source(&env, 64 * KIB);
    for i in 0..6 {
        fs::write(src.join(format!("f{i}.bin")), random_bytes(500 + i, 200_000)).unwrap();
        env.backup(&args![&src]);
    }
    let before = volumes(&env).len();
    assert!(before >= 6);
    // A volume without an index, as a killed backup leaves it.
    let orphan = env.repo.join("data").join(format!("{}.dblock.zip", "ab".repeat(16)));
    fs::write(&orphan, b"half a volume").unwrap();
    assert!(env.json(&args!["verify"])["notes"].to_string().contains("without an index"));
    let plan = env.json(&args!["compact", "--small-volumes", "3", "--dry-run"]);
    assert!(plan["plan"].as_array().unwrap().len() > 3, "{plan:#}");
    // The orphan is planned with its size (it is known to no index, only to the listing).
    let planned = plan["plan"].as_array().unwrap().iter().find(|p| p["action"] == "orphan").cloned();
    assert_eq!(planned.map(|p| p["bytes"].clone()), Some(serde_json::json!(13)), "{plan:#}");
    assert_eq!(volumes(&env).len(), before + 1);
    let out = env.json(&args!["compact", "--small-volumes", "3"]);
    assert!(!orphan.exists());
    let after = volumes(&env).len();
    assert!(after < before, "{before} -> {after}: {out:#}");
    assert_clean(&env);
    for (i, v) in ["0", "3", "5"].iter().enumerate() {
        let got = restore_version(&env, v, &src, &format!("r{i}"));
        assert!(same_content(&got.join("a.bin"), &src.join("a.bin")));
    }
    let got = restore_version(&env, "latest", &src, "last");
    assert_same_tree(&src, &got, Compare::NO_OWNERS);
}
