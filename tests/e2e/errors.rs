//! Bad input and damaged boxes: clear messages, the right exit codes, and no harm done.

use std::ffi::OsString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// A box with one small version of `src`.
fn box_with_version() -> (Env, PathBuf) {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    fs::write(src.join("b.bin"), random_bytes(30, 400_000)).unwrap();
    env.backup(&args![&src]);
    (env, src)
}

#[test]
fn wrong_password_is_refused_and_changes_nothing() {
    let (env, src) = box_with_version();
    fs::write(src.join("c.txt"), b"new file\n").unwrap();
    let before = dir_state(&env.repo);
    for cmd in
        [args!["backup", &src], args!["versions"], args!["restore", "--target", env.path().join("t")], args!["passwd"]]
    {
        let r = env.run_with_password("not the password", &cmd);
        assert_eq!(r.code, 1, "{cmd:?}: {r:?}");
        assert!(r.stderr.to_lowercase().contains("password"), "{cmd:?}: {}", r.stderr);
    }
    assert!(!env.path().join("t").exists(), "restore with a wrong password created the target");
    assert_eq!(dir_state(&env.repo), before, "a wrong password changed the box");
    // The right password still works.
    assert_eq!(env.versions().len(), 1);
}

/// The key file the catalog keeps a copy of is unwrapped ahead of time, but the box's own copy
/// decides: replaced under the same name by a key file for another password, the old password
/// no longer opens the box, however well the catalog's copy would unlock — with the catalog
/// named by `--db` (its key file also read ahead) and in its default place.
#[test]
fn a_key_file_replaced_under_its_name_is_judged_by_the_copy_in_the_box() {
    let (env, _src) = box_with_version();
    // The default catalog (under HOME's cache) holds a copy of the key file too.
    let default_catalog = |args: &[OsString]| env.run_default_catalog(args);
    default_catalog(&args!["versions"]).expect_code(0);
    let keys = objects(&env.repo, "keys");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let original = fs::read(&keys[0]).unwrap();
    let other = Env::new();
    other.run_with_password("another password", &args!["init"]).expect_code(0);
    fs::copy(&objects(&other.repo, "keys")[0], &keys[0]).unwrap();

    for r in [env.run(&args!["versions"]), default_catalog(&args!["versions"])] {
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.to_lowercase().contains("password"), "{}", r.stderr);
    }

    // The box's own key file back: the catalogs' copies work again, as before.
    fs::write(&keys[0], original).unwrap();
    assert_eq!(env.versions().len(), 1);
    default_catalog(&args!["versions"]).expect_code(0);
}

/// The repository id noted for a location (so that the default catalog, and the key file it
/// holds a copy of, are known before the box is read) is only a hint: another box moved to that
/// place, or a damaged note, opens with its own keys and catalog, and the note follows.
#[test]
fn another_box_at_a_noted_location_opens_with_its_own_keys() {
    let (a, src_a) = box_with_version();
    let at_default = |args: &[OsString]| a.run_default_catalog(args);
    let box_id = |repo: &Path| -> String {
        let config: serde_json::Value = serde_json::from_slice(&fs::read(repo.join("config")).unwrap()).unwrap();
        config["id"].as_str().unwrap().to_string()
    };
    let notes_dir = a.home.join(".cache/brickbox/locations");
    let notes = || -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(&notes_dir).unwrap().map(|e| fs::read_to_string(e.unwrap().path()).unwrap()).collect();
        v.sort();
        v
    };
    at_default(&args!["versions"]).expect_code(0);
    let id_a = box_id(&a.repo);
    assert_eq!(notes(), [format!("{id_a}\n")]);
    assert!(a.home.join(".cache/brickbox").join(&id_a).join("catalog.sqlite").exists());

    // Another box with the same password takes the place of the first.
    let b = Env::new();
    b.init();
    let src_b = b.mkdir("src");
    fs::write(src_b.join("only-in-b.txt"), b"bravo\n").unwrap();
    let version_b = version_id(&b.backup(&args![&src_b]));
    let key_a = objects(&a.repo, "keys");
    fs::rename(&a.repo, a.path().join("box-a")).unwrap();
    fs::rename(&b.repo, &a.repo).unwrap();
    // Even under the name of the first box's key file, the second box's opens as itself.
    let key_b = objects(&a.repo, "keys");
    fs::rename(&key_b[0], a.repo.join("keys").join(key_a[0].file_name().unwrap())).unwrap();
    let id_b = box_id(&a.repo);
    let listed = at_default(&args!["versions", "--json"]);
    listed.expect_code(0);
    let versions = listed.json();
    assert_eq!(versions.as_array().unwrap().len(), 1, "{versions}");
    assert_eq!(versions[0]["id"].as_str(), Some(version_b.as_str()), "{versions}");
    let target = a.path().join("t");
    at_default(&args!["restore", "--target", &target]).expect_code(0);
    assert_same_tree(&src_b, &restored(&target, &src_b), Compare::NO_OWNERS);
    assert_eq!(notes(), [format!("{id_b}\n")]);

    // The note points at the second box now. The first one back, without its config (the copy
    // in its key file stands in, so the id is not known before the keys): the noted catalog's
    // key file copy has the name of the first box's key file, not its bytes, and must not open it.
    fs::rename(&a.repo, a.path().join("box-b")).unwrap();
    fs::rename(a.path().join("box-a"), &a.repo).unwrap();
    fs::remove_file(a.repo.join("config")).unwrap();
    let target = a.path().join("t-a");
    at_default(&args!["restore", "--target", &target]).expect_code(0);
    assert_same_tree(&src_a, &restored(&target, &src_a), Compare::NO_OWNERS);
    assert_eq!(notes(), [format!("{id_a}\n")]);

    // A damaged note is a note missing.
    for entry in fs::read_dir(&notes_dir).unwrap() {
        fs::write(entry.unwrap().path(), b"not a repository id").unwrap();
    }
    at_default(&args!["versions"]).expect_code(0);
    assert_eq!(notes(), [format!("{id_a}\n")]);
}

/// Whether this process may mount file systems (root with CAP_SYS_ADMIN; not so in many
/// containers): tried once with a tiny tmpfs.
fn can_mount() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        if !is_root() {
            return false;
        }
        let probe = std::env::temp_dir().join(format!("brickbox-mount-probe-{}", std::process::id()));
        if fs::create_dir_all(&probe).is_err() {
            return false;
        }
        let quiet =
            |c: &mut Command| c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status();
        let mounted = quiet(Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"]).arg(&probe))
            .is_ok_and(|s| s.success());
        drop(mounted.then(|| Unmount(probe.clone())));
        let _ = fs::remove_dir(&probe);
        mounted
    })
}

/// Unmounts a mount (a bind mount, a tmpfs) when dropped (also when the test fails).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let done = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !done {
            // Busy: detached now, gone once the last user lets go.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A box on a read-only file system (a write-protected disk or share) is listed and restored
/// from without a lock; a backup into it fails, naming the cause, and leaves it as it was.
#[test]
fn a_box_on_a_read_only_file_system_is_read_without_a_lock() {
    if !can_mount() {
        eprintln!("SKIP: a read-only bind mount needs root with the right to mount (CAP_SYS_ADMIN)");
        return;
    }
    let (env, src) = box_with_version();
    let ro = env.path().join("ro-box");
    fs::create_dir(&ro).unwrap();
    let mounted = Command::new("mount").arg("--bind").arg(&env.repo).arg(&ro).status().unwrap();
    assert!(mounted.success(), "mount --bind failed");
    let _unmount = Unmount(ro.clone());
    let remounted = Command::new("mount").args(["-o", "remount,bind,ro"]).arg(&ro).status().unwrap();
    assert!(remounted.success(), "remount read-only failed");
    assert!(fs::write(ro.join("probe"), b"x").is_err(), "the bind mount is writable");
    let before = dir_state(&env.repo);
    let on_ro = |args: &[OsString]| {
        let mut c = env.bare_cmd();
        c.arg("-r").arg(&ro).arg("--db").arg(&env.db).args(args);
        run_cmd(c)
    };

    // Not a performance bound: a read-only disk was once retried like a network for minutes.
    let started = std::time::Instant::now();
    on_ro(&args!["versions"]).expect_code(0);
    let target = env.path().join("t");
    on_ro(&args!["restore", "--target", &target]).expect_code(0);
    assert_same_tree(&src, &restored(&target, &src), Compare::NO_OWNERS);

    let r = on_ro(&args!["backup", &src]);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "waited {:?}", started.elapsed());
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("Read-only file system"), "{}", r.stderr);
    assert!(r.stderr.contains("mount it read-write"), "no hint: {}", r.stderr);
    assert_eq!(dir_state(&env.repo), before, "the read-only box changed");
}

/// A 4 MiB tmpfs in the test's folder (needs root), unmounted when the guard goes.
fn small_disk(env: &Env) -> (PathBuf, Unmount) {
    let disk = env.mkdir("small-disk");
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"]).arg(&disk).status().unwrap();
    assert!(mounted.success(), "mounting a tmpfs failed");
    (disk.clone(), Unmount(disk))
}

/// A backup into a box whose disk fills up fails at once, naming the cause with a hint; the
/// box keeps its versions, and once there is space again the next backup goes on and restores.
#[test]
fn a_backup_into_a_full_disk_fails_with_a_hint_and_the_next_one_goes_on() {
    if !can_mount() {
        eprintln!("SKIP: a small tmpfs needs root with the right to mount (CAP_SYS_ADMIN)");
        return;
    }
    let env = Env::new();
    let (disk, _unmount) = small_disk(&env);
    let repo = disk.join("box");
    let on_disk = |args: &[OsString]| {
        let mut c = env.bare_cmd();
        c.arg("-r").arg(&repo).arg("--db").arg(&env.db).args(args);
        run_cmd(c)
    };
    on_disk(&args!["init"]).expect_code(0);
    let src = env.mkdir("src");
    fs::write(src.join("small.bin"), random_bytes(41, 1 << 20)).unwrap();
    on_disk(&args!["backup", &src]).expect_code(0);

    // 6 MiB more on a 4 MiB disk.
    fs::write(src.join("large.bin"), random_bytes(42, 6 << 20)).unwrap();
    let started = std::time::Instant::now();
    let r = on_disk(&args!["backup", &src]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    assert!(r.stderr.contains("hint: the disk holding that path is full"), "no hint: {}", r.stderr);
    // Not a performance bound: a full disk must not be retried like a network.
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "waited {:?}", started.elapsed());
    let versions = on_disk(&args!["versions", "--json"]);
    versions.expect_code(0);
    assert_eq!(versions.json().as_array().unwrap().len(), 1);
    let target = env.path().join("t1");
    on_disk(&args!["restore", "--target", &target]).expect_code(0);
    let back = restored(&target, &src);
    let names: Vec<_> = fs::read_dir(&back).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["small.bin"]);
    assert_eq!(fs::read(back.join("small.bin")).unwrap(), fs::read(src.join("small.bin")).unwrap());

    // Space again: the next backup goes on, and both versions restore.
    let grown = Command::new("mount").args(["-o", "remount,size=64m"]).arg(&disk).status().unwrap();
    assert!(grown.success(), "growing the tmpfs failed");
    on_disk(&args!["backup", &src]).expect_code(0);
    on_disk(&args!["verify", "--all", "--read-data"]).expect_code(0);
    let target = env.path().join("t2");
    on_disk(&args!["restore", "--target", &target]).expect_code(0);
    assert_same_tree(&src, &restored(&target, &src), Compare::NO_OWNERS);
}

/// A restore onto a disk that fills up (its space, or its inodes) stops at once with the
/// hint: into a new folder (files created while the downloads run) and into one holding a
/// file already (each file looked at first).
#[test]
fn a_restore_onto_a_full_disk_stops_at_once_with_a_hint() {
    if !can_mount() {
        eprintln!("SKIP: a small tmpfs needs root with the right to mount (CAP_SYS_ADMIN)");
        return;
    }
    let env = Env::with_box();
    let src = env.mkdir("src");
    for i in 0..200 {
        fs::write(src.join(format!("small-{i:03}.txt")), text_bytes(i, 4000)).unwrap();
    }
    fs::write(src.join("large.bin"), random_bytes(43, 6 << 20)).unwrap();
    env.backup(&args![&src]);
    let (disk, _unmount) = small_disk(&env);
    // 6 MiB on 4 MiB, then 200 files on a disk with room for 64.
    for (options, full) in [("remount,size=4m", "space"), ("remount,size=64m,nr_inodes=64", "inodes")] {
        let remounted = Command::new("mount").args(["-o", options]).arg(&disk).status().unwrap();
        assert!(remounted.success(), "remounting the tmpfs with {options} failed");
        for existing in [false, true] {
            let target = disk.join(if existing { "existing" } else { "new" });
            if existing {
                fs::create_dir(&target).unwrap();
                fs::write(target.join("already-there.txt"), b"kept").unwrap();
            }
            let started = std::time::Instant::now();
            let r = env.run(&args!["restore", "--target", &target]);
            let case = format!("full {full}, existing folder {existing}: {r:?}");
            assert_eq!(r.code, 1, "{case}");
            assert!(r.stderr.contains("No space left on device"), "{case}");
            assert!(r.stderr.contains("hint: the disk holding that path is full"), "no hint: {case}");
            // Not a performance bound: a full disk must not be written to file after file.
            assert!(started.elapsed() < std::time::Duration::from_secs(20), "waited {:?}", started.elapsed());
            if existing {
                assert_eq!(fs::read(target.join("already-there.txt")).unwrap(), b"kept");
            }
            fs::remove_dir_all(&target).unwrap();
        }
    }
}

#[test]
fn not_a_repository() {
    let env = Env::new();
    // An empty directory.
    fs::create_dir(&env.repo).unwrap();
    let r = env.run(&args!["versions"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not a Brickbox repository"), "{}", r.stderr);
    // A directory with unrelated files.
    fs::write(env.repo.join("hello.txt"), b"hi").unwrap();
    let before = dir_state(&env.repo);
    let r = env.run(&args!["backup", env.path()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not a Brickbox repository"), "{}", r.stderr);
    assert_eq!(dir_state(&env.repo), before);
}

#[test]
fn missing_repository_path_is_reported_and_not_created() {
    let env = Env::new();
    let missing = env.path().join("no/such/box");
    let mut c = env.bare_cmd();
    c.args(args!["-r", &missing, "--db", &env.db, "versions"]);
    let r = run_cmd(c);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not a Brickbox repository"), "{}", r.stderr);
    assert!(!missing.exists(), "a read-only command created the missing repository directory {}", missing.display());
}

#[test]
fn unsupported_format_version_is_a_clear_error() {
    let (env, src) = box_with_version();
    let cfg_path = env.repo.join("config");
    let mut cfg: serde_json::Value = serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
    assert_eq!(cfg["version"], 1);
    cfg["version"] = 99.into();
    fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    // A box written by a newer Brickbox has the new config in its key files too (else the
    // config alone would be read as damaged and its copy used): here, key files without a copy.
    for key in objects(&env.repo, "keys") {
        let mut k: serde_json::Value = serde_json::from_slice(&fs::read(&key).unwrap()).unwrap();
        let obj = k.as_object_mut().unwrap();
        obj.remove("config");
        obj.remove("check");
        fs::write(&key, serde_json::to_vec_pretty(&k).unwrap()).unwrap();
    }
    let before = dir_state(&env.repo);
    for cmd in [args!["versions"], args!["backup", &src], args!["restore", "--target", env.path().join("t")]] {
        let r = env.run(&cmd);
        assert_eq!(r.code, 1, "{cmd:?}: {r:?}");
        assert!(r.stderr.contains("99") && r.stderr.contains("not supported"), "{cmd:?}: {}", r.stderr);
    }
    assert_eq!(dir_state(&env.repo), before);
}

#[test]
fn missing_source_path_writes_nothing() {
    let (env, src) = box_with_version();
    let before = dir_state(&env.repo);
    let missing = env.path().join("does-not-exist");
    for cmd in [args!["backup", &missing], args!["backup", &src, &missing]] {
        let r = env.run(&cmd);
        assert_eq!(r.code, 1, "{cmd:?}: {r:?}");
        assert!(r.stderr.contains("does-not-exist"), "the message names the path: {}", r.stderr);
    }
    assert_eq!(objects(&env.repo, "versions").len(), 1);
    assert_eq!(dir_state(&env.repo), before, "a failed backup wrote to the box");
    assert_eq!(env.versions().len(), 1);
}

#[test]
fn unwritable_restore_target() {
    let (env, _src) = box_with_version();
    let file = env.path().join("plain-file");
    fs::write(&file, b"I am a file").unwrap();
    for target in [file.join("sub"), file.clone()] {
        let r = env.run(&args!["restore", "--target", &target]);
        assert_eq!(r.code, 1, "{target:?}: {r:?}");
        assert!(r.stderr.contains("plain-file"), "the message names the target: {}", r.stderr);
    }
    assert_eq!(fs::read(&file).unwrap(), b"I am a file");
}

#[test]
fn init_on_an_existing_box_fails_and_keeps_it() {
    let (env, _src) = box_with_version();
    let before = dir_state(&env.repo);
    let r = env.run(&args!["init"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("already"), "{}", r.stderr);
    assert_eq!(dir_state(&env.repo), before);
    assert_eq!(objects(&env.repo, "keys").len(), 1);
    assert_eq!(env.versions().len(), 1);
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::with_box();
    for cmd in [
        args![],
        args!["frobnicate"],
        args!["backup"],
        args!["backup", env.path(), "--no-such-flag"],
        args!["backup", env.path(), "--compression", "brotli"],
        args!["backup", env.path(), "--volume-size", "5 parsecs"],
        args!["backup", env.path(), "--max-file-size", "lots"],
        args!["ls", "latest", "/", "extra"],
        args!["diff", "0"],
    ] {
        let r = env.run(&cmd);
        assert_eq!(r.code, 2, "{cmd:?}: {r:?}");
        assert!(!r.stderr.is_empty());
    }
    assert!(objects(&env.repo, "versions").is_empty());
    // A bad version spec is an ordinary error with a message.
    let r = env.run(&args!["restore", "nonsense-version", "--target", env.path().join("t")]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no version"), "{}", r.stderr);
}

/// A box whose versions keep `victim.bin` alone in the first data volume and the other files
/// in later ones.
fn box_with_separate_volumes() -> (Env, PathBuf, PathBuf) {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let victim = src.join("victim.bin");
    fs::write(&victim, random_bytes(40, 1_200_000)).unwrap();
    env.backup(&args![&src]);
    // One volume of file data and one of directory trees.
    let first: Vec<PathBuf> = objects(&env.repo, "data");
    assert_eq!(first.len(), 2);
    let victim_volume = first.iter().max_by_key(|v| fs::metadata(v).unwrap().len()).unwrap().clone();
    fs::write(src.join("good1.txt"), text_bytes(41, 100_000)).unwrap();
    fs::write(src.join("good2.bin"), random_bytes(42, 300_000)).unwrap();
    fs::create_dir(src.join("sub")).unwrap();
    fs::write(src.join("sub/good3.txt"), b"third\n").unwrap();
    env.backup(&args![&src]);
    assert_eq!(objects(&env.repo, "data").len(), 4);
    (env, src, victim_volume)
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn damaged_volume_fails_only_the_affected_file() {
    let (env, src, volume) = box_with_separate_volumes();
    // Flip one byte in the middle of the largest entry (a block of victim.bin).
    let mut bytes = fs::read(&volume).unwrap();
    let (off, len, _) = zip_entries(&bytes).into_iter().max_by_key(|e| e.1).unwrap();
    assert!(len > 100_000);
    bytes[off + len / 2] ^= 0x40;
    fs::write(&volume, &bytes).unwrap();

    let t = env.path().join("t");
    let r = env.run(&args!["restore", "--target", &t]);
    assert_eq!(r.code, 1, "restore from a damaged volume must fail: {r:?}");
    assert!(r.stderr.contains(&file_name(&volume)), "the message names the damaged object: {}", r.stderr);
    assert!(r.stderr.contains("victim.bin"), "the message names the affected file: {}", r.stderr);
    let out = restored(&t, &src);
    for good in ["good1.txt", "good2.bin", "sub/good3.txt"] {
        assert!(same_content(&src.join(good), &out.join(good)), "{good} not restored intact");
        assert_eq!(entry(&src.join(good), false), entry(&out.join(good), false), "{good} metadata");
    }
    // A restore of only the good files succeeds.
    let t2 = env.path().join("t2");
    env.restore(&args![&src.join("good1.txt"), &src.join("sub")], &t2);
    assert!(same_content(&src.join("good1.txt"), &restored(&t2, &src.join("good1.txt"))));
    // Paths that overlap (a folder and a file in it) restore that file once, quietly.
    let t3 = env.path().join("t3");
    let r = env.restore(&args![&src.join("sub"), &src.join("sub/good3.txt"), "--json"], &t3);
    assert_eq!(num(&r.json(), "files"), 1, "{r:?}");
    assert!(r.stderr.is_empty(), "{r:?}");
    assert!(same_content(&src.join("sub/good3.txt"), &restored(&t3, &src.join("sub/good3.txt"))));
}

#[test]
fn missing_volume_fails_only_the_affected_file() {
    let (env, src, volume) = box_with_separate_volumes();
    fs::remove_file(&volume).unwrap();
    let t = env.path().join("t");
    let r = env.run(&args!["restore", "--target", &t]);
    assert!(r.stderr.contains(&file_name(&volume)), "the message names the missing object: {}", r.stderr);
    assert_only_the_victim_lost(&r, &restored(&t, &src), &src);
}

/// The restore `r` into `out` named victim.bin once (however many of its blocks are lost),
/// counted one lost file, and restored the others of `src` intact.
fn assert_only_the_victim_lost(r: &Run, out: &Path, src: &Path) {
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.stderr.matches("victim.bin").count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("1 file(s) could not be restored"), "{}", r.stderr);
    for good in ["good1.txt", "good2.bin", "sub/good3.txt"] {
        assert!(same_content(&src.join(good), &out.join(good)), "{good} not restored intact");
    }
}

#[test]
fn blocks_no_index_lists_fail_their_file_once() {
    let (env, src, volume) = box_with_separate_volumes();
    // The index of victim.bin's volume is gone: a new catalog knows none of its blocks.
    let hex = file_name(&volume).trim_end_matches(".dblock.zip").to_string();
    fs::remove_file(env.repo.join("index").join(format!("{hex}.dindex"))).unwrap();
    let t = env.path().join("t");
    let fresh = env.path().join("fresh.sqlite");
    let r = env.run_with_db(&fresh, &args!["restore", "--target", &t]);
    assert!(
        r.stderr.contains("is in no volume the catalog knows") && r.stderr.contains("brickbox repair"),
        "{}",
        r.stderr
    );
    assert_only_the_victim_lost(&r, &restored(&t, &src), &src);
    // verify names the volume as one that may hold them, and repair as the fix.
    let v = env.run_with_db(&fresh, &args!["verify", "--json"]);
    let report = v.json();
    let notes = report["notes"].to_string();
    assert!(
        notes.contains(&hex) && notes.contains("rebuilds its index") && !notes.contains("no version uses it"),
        "{report:#}"
    );
}

#[test]
fn missing_manifest_drops_only_that_version() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("f.txt"), b"one\n").unwrap();
    let v1 = version_id(&env.backup(&args![&src]));
    fs::write(src.join("f.txt"), b"two\n").unwrap();
    let v2 = version_id(&env.backup(&args![&src]));
    fs::remove_file(env.repo.join(format!("versions/{v1}.dlist"))).unwrap();

    // The catalog follows the box, and a fresh catalog agrees.
    let ids = |vs: Vec<serde_json::Value>| vs.iter().map(|v| v["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(ids(env.versions()), std::slice::from_ref(&v2));
    let r = env.run_with_db(&env.path().join("fresh.sqlite"), &args!["versions", "--json"]);
    r.expect_code(0);
    assert_eq!(ids(r.json().as_array().unwrap().clone()), std::slice::from_ref(&v2));

    let r = env.run(&args!["restore", &v1, "--target", env.path().join("t")]);
    assert_eq!(r.code, 1, "{r:?}");
    let t = env.path().join("t2");
    env.restore(&args![&v2], &t);
    assert_eq!(fs::read(restored(&t, &src.join("f.txt"))).unwrap(), b"two\n");
}

#[test]
fn missing_index_is_reported_and_the_next_backup_stores_the_data_again() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), text_bytes(50, 50_000)).unwrap();
    fs::write(src.join("b.bin"), random_bytes(51, 700_000)).unwrap();
    let v1 = version_id(&env.backup(&args![&src]));
    for idx in objects(&env.repo, "index") {
        fs::remove_file(idx).unwrap();
    }

    // With a fresh catalog the version is still listed, but its data cannot be found.
    let fresh_db = env.path().join("fresh.sqlite");
    let r = env.run_with_db(&fresh_db, &args!["restore", &v1, "--target", env.path().join("t-fresh")]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("is in no volume the catalog knows"), "{}", r.stderr);

    // With the usual catalog: the same, and a new backup must store the data again.
    let r = env.run(&args!["restore", &v1, "--target", env.path().join("t-old")]);
    assert_eq!(r.code, 1, "{r:?}");
    let s = env.backup(&args![&src]);
    assert!(num(&s, "bytes_added") > 700_000, "the lost data was not stored again: {s:#}");
    let t = env.path().join("t");
    env.restore(&args![], &t);
    assert_same_tree(&src, &restored(&t, &src), Compare::ALL);
}

/// Runs `cmd` without the capabilities that let root read any file.
fn without_dac_override(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            for cap in [1, 2] {
                // CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[test]
fn unreadable_file_is_skipped_with_a_warning_and_exit_3() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("readable.txt"), b"fine\n").unwrap();
    fs::write(src.join("locked.txt"), b"you cannot read me\n").unwrap();
    chmod(&src.join("locked.txt"), 0o000);
    fs::create_dir(src.join("locked_dir")).unwrap();
    fs::write(src.join("locked_dir/inside.txt"), b"hidden\n").unwrap();
    chmod(&src.join("locked_dir"), 0o000);

    if is_root() {
        // Root reads everything; drop the capabilities that allow it, if this system lets us.
        let mut probe = Command::new("cat");
        probe.arg(src.join("locked.txt")).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        without_dac_override(&mut probe);
        if probe.status().map(|s| s.success()).unwrap_or(true) {
            eprintln!("skipped: cannot make a file unreadable for root here");
            return;
        }
    }
    let mut c = env.cmd(&args!["backup", &src, "--json"]);
    if is_root() {
        without_dac_override(&mut c);
    }
    let r = run_cmd(c);
    chmod(&src.join("locked.txt"), 0o644);
    chmod(&src.join("locked_dir"), 0o755);
    assert_eq!(r.code, 3, "{r:?}");
    let s = r.json();
    let warnings: Vec<&str> = s["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    assert!(warnings.iter().any(|w| w.contains("locked.txt")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("locked_dir")), "{warnings:?}");
    // The version exists and holds the readable file.
    let v = version_id(&s);
    let t = env.path().join("t");
    env.restore(&args![&v], &t);
    assert_eq!(fs::read(restored(&t, &src.join("readable.txt"))).unwrap(), b"fine\n");
    assert!(!restored(&t, &src.join("locked.txt")).exists());
    // Without --json the warnings go to stderr, and the exit code is still 3.
    let mut c = env.cmd(&args!["backup", &src]);
    chmod(&src.join("locked.txt"), 0o000);
    if is_root() {
        without_dac_override(&mut c);
    }
    let r = run_cmd(c);
    chmod(&src.join("locked.txt"), 0o644);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("locked.txt"), "{}", r.stderr);
}

/// A listing piped into a reader that stops early (`brickbox ls -R | head`) ends quietly,
/// as other tools do (128 + SIGPIPE), in text or in JSON.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let env = Env::with_box();
    let src = env.mkdir("src");
    for i in 0..3000 {
        fs::write(src.join(format!("a-file-with-a-rather-long-name-{i:05}.txt")), b"x").unwrap();
    }
    env.backup(&args![&src]);
    // The same with every file broken (the volume of their contents gone, not that of the
    // trees): a listing printed line by line.
    let env2 = Env::with_box();
    let src2 = env2.mkdir("src");
    for i in 0..3000 {
        fs::write(src2.join(format!("a-file-with-a-rather-long-name-{i:05}.bin")), random_bytes(i, 1000)).unwrap();
    }
    env2.backup(&args![&src2]);
    let contents = objects(&env2.repo, "data").into_iter().max_by_key(|v| fs::metadata(v).unwrap().len()).unwrap();
    fs::remove_file(contents).unwrap();
    assert!(env2.run(&args!["list-broken-files"]).stdout.lines().count() > 2000);
    let commands = [
        (&env, args!["ls", "-R", "latest"]),
        (&env, args!["ls", "-R", "latest", "--json"]),
        (&env2, args!["list-broken-files"]),
    ];
    for (env, a) in commands {
        let mut c = env.cmd(&a);
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 100];
        out.read_exact(&mut first).unwrap();
        drop(out);
        let done = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(141), "{a:?}: {stderr}");
        assert!(stderr.is_empty(), "{a:?}: {stderr}");
    }
}

/// A modification time beyond what a version can hold (after 2262) is stored as the latest
/// one it can, with a warning naming the file (it was clamped silently).
#[test]
fn a_modification_time_out_of_range_is_named() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let f = src.join("from-the-future.txt");
    fs::write(&f, b"x").unwrap();
    // The year 2400 (ext4 and tmpfs hold it).
    let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
    let t = libc::timespec { tv_sec: 13_569_465_600, tv_nsec: 0 };
    // SAFETY: a valid path and two timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) } != 0 {
        eprintln!("SKIP: this file system does not hold times after 2262");
        return;
    }
    let r = env.run(&args!["backup", &src]);
    r.expect_code(3);
    assert!(r.stderr.contains("from-the-future.txt: modification time out of range; stored as 2262-"), "{r:?}");
    // The rest of the backup is whole.
    let t = env.path().join("t");
    env.restore(&args![], &t);
    assert_eq!(fs::read(restored(&t, &src).join("from-the-future.txt")).unwrap(), b"x");
}

/// An SFTP box given a key file that cannot be read says so, naming it (ssh would only say
/// the login was refused, after trying other keys).
#[test]
fn an_sftp_key_that_is_not_there_is_named() {
    let env = Env::new();
    let key = env.path().join("no-such-key");
    let mut c = env.bare_cmd();
    c.args(["-r", "sftp://someone@127.0.0.1:9/box", "--retries", "0", "--option"]);
    c.arg(format!("key={}", key.display())).arg("versions");
    let r = run_cmd(c);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("cannot be read") && r.stderr.contains("no-such-key"), "{r:?}");
}
