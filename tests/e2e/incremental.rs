//! Incremental backups: every version restores to exactly the state it saw, and
//! `diff`, `history` and the change detection agree with what happened.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::*;

fn initial_tree(src: &Path) {
    fs::create_dir_all(src.join("docs/sub")).unwrap();
    fs::create_dir_all(src.join("photos/2023")).unwrap();
    fs::create_dir_all(src.join("doomed/inner")).unwrap();
    fs::write(src.join("edit.txt"), text_bytes(10, 40_000)).unwrap();
    fs::write(src.join("app.log"), text_bytes(11, 10_000)).unwrap();
    fs::write(src.join("trunc.bin"), random_bytes(12, 1_500_000)).unwrap();
    fs::write(src.join("rename_me.txt"), b"I will get a new name\n").unwrap();
    fs::write(src.join("delete_me.txt"), b"short-lived\n").unwrap();
    fs::write(src.join("docs/readme.md"), b"# readme\n").unwrap();
    fs::write(src.join("docs/sub/notes.txt"), text_bytes(13, 3000)).unwrap();
    fs::write(src.join("photos/2023/a.jpg"), random_bytes(14, 700_000)).unwrap();
    fs::write(src.join("photos/2023/b.jpg"), random_bytes(15, 900_000)).unwrap();
    fs::write(src.join("doomed/inner/x.txt"), b"x\n").unwrap();
    fs::write(src.join("mode.sh"), b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("docs/readme.md", src.join("readme-link")).unwrap();
}

/// Overwrites `len` bytes at `at` in place.
fn patch(p: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    OpenOptions::new().write(true).open(p).unwrap().write_all_at(bytes, at).unwrap();
}

fn append(p: &Path, bytes: &[u8]) {
    OpenOptions::new().append(true).open(p).unwrap().write_all(bytes).unwrap();
}

struct Saved {
    id: String,
    snap: Snapshot,
}

#[test]
fn each_version_restores_its_own_state_and_diff_history_agree() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let mut saved: Vec<Saved> = Vec::new();
    let backup = |env: &Env, saved: &mut Vec<Saved>| -> serde_json::Value {
        let snap = snapshot(&src, true);
        let s = env.backup(&args![&src]);
        assert_eq!(s["warnings"], serde_json::json!([]));
        saved.push(Saved { id: version_id(&s), snap });
        s
    };

    // v1: the initial tree.
    initial_tree(&src);
    let s1 = backup(&env, &mut saved);
    let nfiles = saved[0].snap.values().filter(|e| e.kind == Kind::File).count() as u64;
    assert_eq!(num(&s1, "files_new"), nfiles);

    // v2: edit in place, append, truncate, rename, delete, add, chmod.
    patch(&src.join("edit.txt"), 20_000, b"EDITED IN THE MIDDLE");
    append(&src.join("app.log"), b"\nanother log line\n");
    OpenOptions::new().write(true).open(src.join("trunc.bin")).unwrap().set_len(100_000).unwrap();
    fs::rename(src.join("rename_me.txt"), src.join("renamed.txt")).unwrap();
    fs::remove_file(src.join("delete_me.txt")).unwrap();
    fs::write(src.join("docs/new.txt"), b"brand new\n").unwrap();
    chmod(&src.join("mode.sh"), 0o755);
    let s2 = backup(&env, &mut saved);
    assert_eq!(num(&s2, "files_new"), 2, "renamed.txt and docs/new.txt are new: {s2:#}");
    assert_eq!(num(&s2, "files_changed"), 4, "edit, app.log, trunc.bin, mode.sh changed: {s2:#}");
    assert_eq!(num(&s2, "files_unchanged"), nfiles - 6, "{s2:#}");

    // v3: nothing changed.
    let s3 = backup(&env, &mut saved);
    let nfiles3 = saved[2].snap.values().filter(|e| e.kind == Kind::File).count() as u64;
    assert_eq!(num(&s3, "files_unchanged"), nfiles3, "{s3:#}");
    assert_eq!(num(&s3, "files_new") + num(&s3, "files_changed"), 0, "{s3:#}");
    assert_eq!(num(&s3, "bytes_read"), 0, "a backup without changes read file data: {s3:#}");

    // v4: edit again, rename a directory, delete a directory tree, replace a file by a directory.
    patch(&src.join("edit.txt"), 0, b"NEW START");
    fs::rename(src.join("photos"), src.join("pictures")).unwrap();
    fs::remove_dir_all(src.join("doomed")).unwrap();
    fs::remove_file(src.join("app.log")).unwrap();
    fs::create_dir(src.join("app.log")).unwrap();
    fs::write(src.join("app.log/now-a-dir.txt"), b"surprise\n").unwrap();
    let s4 = backup(&env, &mut saved);
    assert!(num(&s4, "bytes_read") > 0);

    // Every version restores exactly to the state it was taken from.
    for (i, v) in saved.iter().enumerate() {
        let t = env.path().join(format!("restore-v{}", i + 1));
        env.restore(&args![&v.id], &t);
        let out = restored(&t, &src);
        assert_snapshot_matches(&v.snap, &src, &snapshot(&out, false), &out, Compare::ALL);
    }

    // The versions list, newest first.
    let vs = env.versions();
    let ids: Vec<&str> = vs.iter().map(|v| v["id"].as_str().unwrap()).collect();
    let want: Vec<&str> = saved.iter().rev().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, want);

    // diff reports exactly the changes between each pair of consecutive versions.
    for pair in saved.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        let want = expected_diff(&old.snap, &new.snap, &src);
        let text = env.ok(&args!["diff", &old.id, &new.id]).stdout;
        let (inside, outside) = split_diff(parse_diff(&text), &src);
        assert_eq!(inside, want, "diff {} {}:\n{text}", old.id, new.id);
        assert_only_ancestors(&outside, &src);
        // The JSON form says the same.
        let json = env.json(&args!["diff", &old.id, &new.id]);
        let from_json = json
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let mark = match c["change"].as_str().unwrap() {
                    "added" => '+',
                    "removed" => '-',
                    "changed" => 'M',
                    other => panic!("unknown change {other}"),
                };
                (mark, PathBuf::from(c["path"].as_str().unwrap()))
            })
            .collect();
        assert_eq!(split_diff(from_json, &src).0, want);
    }
    // Spot checks that do not depend on the snapshot logic.
    let text = env.ok(&args!["diff", &saved[0].id, &saved[1].id]).stdout;
    for line in [
        format!("M {}", src.join("edit.txt").display()),
        format!("M {}", src.join("app.log").display()),
        format!("M {}", src.join("trunc.bin").display()),
        format!("M {}", src.join("mode.sh").display()),
        format!("- {}", src.join("rename_me.txt").display()),
        format!("+ {}", src.join("renamed.txt").display()),
        format!("- {}", src.join("delete_me.txt").display()),
        format!("+ {}", src.join("docs/new.txt").display()),
    ] {
        assert!(text.lines().any(|l| l == line), "diff lacks {line:?}:\n{text}");
    }
    assert!(!text.contains("readme.md"), "unchanged file reported:\n{text}");
    let text = env.ok(&args!["diff", "1", "0"]).stdout;
    assert!(text.lines().any(|l| l == format!("- {}", src.join("photos/2023/a.jpg").display())), "{text}");
    assert!(text.lines().any(|l| l == format!("+ {}", src.join("pictures/2023/a.jpg").display())), "{text}");
    let same = env.ok(&args!["diff", &saved[1].id, &saved[2].id]).stdout;
    let (inside, _) = split_diff(parse_diff(&same), &src);
    assert!(inside.is_empty(), "no-change backup differs:\n{same}");

    // history lists the distinct states of the edited file: v1, v2 and v4.
    let h = env.json(&args!["history", &src.join("edit.txt")]);
    let hv: Vec<&str> = h.as_array().unwrap().iter().map(|e| e["version"].as_str().unwrap()).collect();
    assert_eq!(hv, [saved[0].id.as_str(), saved[1].id.as_str(), saved[3].id.as_str()]);
    let sizes: Vec<u64> = h.as_array().unwrap().iter().map(|e| e["size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [40_000, 40_000, 40_000]);
    let text = env.ok(&args!["history", &src.join("edit.txt")]).stdout;
    assert_eq!(text.lines().count(), 3, "{text}");
    // A file that never changed has one state; a deleted one keeps its past.
    let h = env.json(&args!["history", &src.join("docs/readme.md")]);
    assert_eq!(h.as_array().unwrap().len(), 1);
    let h = env.json(&args!["history", &src.join("delete_me.txt")]);
    assert_eq!(h.as_array().unwrap().len(), 1);
    assert_eq!(h[0]["version"], saved[0].id.as_str());
    // app.log: v1, appended in v2, a directory in v4.
    let h = env.json(&args!["history", &src.join("app.log")]);
    let kinds: Vec<&str> = h.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["file", "file", "dir"]);
    // Paths never backed up are an error.
    let r = env.run(&args!["history", &src.join("never-existed")]);
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn restore_over_existing_files_needs_overwrite() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), b"original a\n").unwrap();
    fs::write(src.join("b.bin"), random_bytes(20, 600_000)).unwrap();
    env.backup(&args![&src]);
    let t = env.path().join("t");
    env.restore(&args![], &t);
    let out = restored(&t, &src);

    // Same files already there: nothing to do, exit 0.
    env.restore(&args![], &t);
    assert_same_tree(&src, &out, Compare::ALL);

    // A changed file is left alone (with a warning) unless --overwrite.
    fs::write(out.join("a.txt"), b"local change\n").unwrap();
    patch(&out.join("b.bin"), 300_000, b"CHANGED");
    let r = env.run(&args!["restore", "--target", &t]);
    r.expect_code(3);
    assert!(r.stderr.contains("a.txt"), "{r:?}");
    assert_eq!(fs::read(out.join("a.txt")).unwrap(), b"local change\n");
    env.restore(&args!["--overwrite"], &t);
    assert_same_tree(&src, &out, Compare::ALL);
}

/// `--overwrite` never writes through a file that other names share: hard links among the
/// restored files, or to a file outside what is restored, keep their own content. A file
/// rewritten in place keeps its holes.
#[test]
fn restore_over_existing_files_never_writes_through_hard_links() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("x"), b"content of x\n").unwrap();
    fs::write(src.join("y"), b"content of y, different\n").unwrap();
    let mut sparse = fs::File::create(src.join("sparse")).unwrap();
    sparse.write_all(b"head").unwrap();
    sparse.set_len(40 << 20).unwrap();
    env.backup(&args![&src]);

    // x and y became one file since; x also a name of a file outside the backup.
    fs::remove_file(src.join("y")).unwrap();
    fs::hard_link(src.join("x"), src.join("y")).unwrap();
    env.ok(&args!["restore", "--overwrite"]);
    assert_eq!(fs::read(src.join("x")).unwrap(), b"content of x\n");
    assert_eq!(fs::read(src.join("y")).unwrap(), b"content of y, different\n");

    let outside = env.path().join("outside");
    fs::write(&outside, b"not part of any backup\n").unwrap();
    fs::remove_file(src.join("x")).unwrap();
    fs::hard_link(&outside, src.join("x")).unwrap();
    env.ok(&args!["restore", "--overwrite"]);
    assert_eq!(fs::read(&outside).unwrap(), b"not part of any backup\n");
    assert_eq!(fs::read(src.join("x")).unwrap(), b"content of x\n");

    // A file replaced (not written through) keeps the owner it had, as one written in place.
    if is_root() {
        lchown(&src.join("x"), 65534, 65534);
        fs::write(&outside, b"shares x again\n").unwrap();
        fs::remove_file(src.join("x")).unwrap();
        fs::hard_link(&outside, src.join("x")).unwrap();
        lchown(&outside, 65534, 65534);
        env.ok(&args!["restore", "--overwrite"]);
        assert_eq!(fs::read(&outside).unwrap(), b"shares x again\n");
        let e = entry(&src.join("x"), true);
        assert_eq!((e.uid, e.nlink, e.data.as_deref()), (65534, 1, Some(&b"content of x\n"[..])));
    }

    // A short file in place of the sparse one: rewritten in place, the rest stays a hole.
    fs::write(src.join("sparse"), b"12345").unwrap();
    env.ok(&args!["restore", "--overwrite"]);
    let back = fs::read(src.join("sparse")).unwrap();
    assert!(back.starts_with(b"head") && back[4..].iter().all(|&b| b == 0));
    let m = fs::metadata(src.join("sparse")).unwrap();
    assert_eq!(m.len(), 40 << 20);
    assert!(m.blocks() * 512 < 1 << 20, "the holes were filled: {} bytes allocated", m.blocks() * 512);
}

/// What a restore refuses to replace is left exactly as it was, metadata included, and so is
/// everything below a folder's place that holds something else (a symlink there is not
/// followed); a new name of a hard-link group whose first name was refused gets the
/// backed-up content, not the refused file's.
#[test]
fn a_restore_leaves_what_it_refuses_as_it_was() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::create_dir_all(src.join("dir/sub")).unwrap();
    fs::write(src.join("dir/sub/deep.txt"), b"deep\n").unwrap();
    fs::create_dir_all(src.join("linked/sub")).unwrap();
    fs::write(src.join("linked/inner.txt"), b"inner\n").unwrap();
    fs::write(src.join("file"), b"backed up\n").unwrap();
    fs::write(src.join("a"), b"NEW content\n").unwrap();
    fs::hard_link(src.join("a"), src.join("b")).unwrap();
    env.backup(&args![&src]);

    let t = env.path().join("t");
    let out = t.join(src.strip_prefix("/").unwrap());
    fs::create_dir_all(out.join("file")).unwrap(); // a folder where the backup has a file
    fs::write(out.join("dir"), b"a file where the backup has a folder\n").unwrap();
    fs::write(out.join("a"), b"OLD user data\n").unwrap();
    // A symlink where the backup has a folder: what is behind it is not the restore's.
    let elsewhere = env.mkdir("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, out.join("linked")).unwrap();
    chmod(&elsewhere, 0o700);
    set_mtime(&elsewhere, 1_500_000_000_000_000_000);
    let elsewhere_before = snapshot(&elsewhere, true);
    chmod(&out.join("file"), 0o700);
    chmod(&out.join("dir"), 0o600);
    chmod(&out.join("a"), 0o640);
    for p in ["file", "dir", "a"] {
        set_mtime(&out.join(p), 1_500_000_000_000_000_000);
    }
    let before: Vec<Entry> = ["file", "dir", "a"].iter().map(|p| entry(&out.join(p), true)).collect();
    let r = env.run(&args!["restore", "--target", &t]);
    r.expect_code(3);
    let after: Vec<Entry> = ["file", "dir", "a"].iter().map(|p| entry(&out.join(p), true)).collect();
    assert_eq!(before, after, "{}", r.stderr);
    assert_eq!(fs::read(out.join("b")).unwrap(), b"NEW content\n", "{}", r.stderr);
    assert_eq!(snapshot(&elsewhere, true), elsewhere_before, "written through the symlink: {}", r.stderr);
    assert!(r.stderr.contains("nothing below it is restored"), "{}", r.stderr);

    // In place: a file changed since keeps its content, mode and time.
    fs::write(src.join("file"), b"edited since\n").unwrap();
    chmod(&src.join("file"), 0o600);
    set_mtime(&src.join("file"), 1_500_000_000_000_000_000);
    let before = entry(&src.join("file"), true);
    env.run(&args!["restore"]).expect_code(3);
    assert_eq!(entry(&src.join("file"), true), before);
}

/// A restore under a target never follows a symlink that stands where one of the folders
/// above what it restores belongs: it could lead out of the target. The summary counts what
/// was restored, not what was left as it was.
#[test]
fn a_restore_under_a_target_does_not_follow_symlinks_above_it() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f.txt"), b"f\n").unwrap();
    fs::write(src.join("kept.txt"), b"mine\n").unwrap();
    env.backup(&args![&src]);
    let t = env.path().join("t");
    let elsewhere = env.mkdir("elsewhere");
    let first = src.components().nth(1).unwrap(); // the top folder of the source's path
    fs::create_dir_all(&t).unwrap();
    std::os::unix::fs::symlink(&elsewhere, t.join(first)).unwrap();
    let r = env.run(&args!["restore", "latest", src.join("d"), "--target", &t]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("a symlink where a folder belongs"), "{r:?}");
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "written through the symlink");

    // Counted: the restored entries, not the file left as it was.
    let t2 = env.path().join("t2");
    let out = restored(&t2, &src);
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("kept.txt"), b"changed\n").unwrap();
    let r = env.run(&args!["restore", "--json", "--target", &t2]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(num(&r.json(), "files"), 1, "{}", r.stdout);
}

/// A file restored over an existing one gets exactly the backed-up extended attributes
/// (`user.*`; all of them with --restore-permissions). Set-user-ID and set-group-ID come back
/// only with the owner they belong to.
#[test]
fn restored_files_get_exactly_the_backed_up_attributes() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let f = src.join("f");
    fs::write(&f, b"v1\n").unwrap();
    if xattr::set(&f, "user.keep", b"k").is_err() {
        eprintln!("SKIP: no user extended attributes on this file system");
        return;
    }
    xattr::set(&f, "user.gone", b"g").unwrap();
    env.backup(&args![&src]);
    xattr::remove(&f, "user.gone").unwrap();
    env.backup(&args![&src]);
    let t = env.path().join("t");
    let out = restored(&t, &src);
    env.ok(&args!["restore", "1", "--target", &t]);
    assert!(xattr::get(out.join("f"), "user.gone").unwrap().is_some());
    env.ok(&args!["restore", "0", "--target", &t, "--overwrite"]);
    let names: Vec<_> = xattr::list(out.join("f")).unwrap().collect();
    assert_eq!(names, ["user.keep"]);
    // Without --overwrite, a file found the same is left with what was added to it.
    xattr::set(out.join("f"), "user.added", b"a").unwrap();
    env.ok(&args!["restore", "0", "--target", &t]);
    assert!(xattr::get(out.join("f"), "user.added").unwrap().is_some());
    // In place too, the file's content being the same.
    xattr::set(&f, "user.gone", b"g").unwrap();
    env.ok(&args!["restore", "--overwrite"]);
    let names: Vec<_> = xattr::list(&f).unwrap().collect();
    assert_eq!(names, ["user.keep"]);

    if !is_root() {
        eprintln!("SKIP set-user-ID part: needs root");
        return;
    }
    let p = src.join("p");
    fs::write(&p, b"#!/bin/sh\n").unwrap();
    lchown(&p, 65534, 65534);
    chmod(&p, 0o6755);
    env.backup(&args![&src]);
    let t2 = env.path().join("t2");
    let r = env.run(&args!["restore", "--target", &t2]);
    r.expect_code(3);
    assert!(r.stderr.contains("set-user/group-ID"), "{r:?}");
    let got = entry(&restored(&t2, &src).join("p"), false);
    assert_eq!(got.mode & 0o7777, 0o755, "owned by root now: no set-user-ID");
    let t3 = env.path().join("t3");
    env.ok(&args!["restore", "--target", &t3, "--restore-permissions"]);
    let got = entry(&restored(&t3, &src).join("p"), false);
    assert_eq!((got.mode & 0o7777, got.uid), (0o6755, 65534));
}

#[test]
fn restore_without_target_puts_files_back_in_place() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::create_dir(src.join("d")).unwrap();
    fs::write(src.join("d/lost.txt"), b"bring me back\n").unwrap();
    fs::write(src.join("kept.bin"), random_bytes(21, 200_000)).unwrap();
    stamp_mtimes(&src, 1_600_000_000_000_000_000);
    let before = snapshot(&src, true);
    env.backup(&args![&src]);

    fs::remove_dir_all(src.join("d")).unwrap();
    fs::write(src.join("kept.bin"), b"damaged locally").unwrap();
    // Without --overwrite the local change is kept (a warning), the lost file comes back.
    let r = env.run(&args!["restore"]);
    r.expect_code(3);
    assert_eq!(fs::read(src.join("d/lost.txt")).unwrap(), b"bring me back\n");
    assert_eq!(fs::read(src.join("kept.bin")).unwrap(), b"damaged locally");
    // With --overwrite, and only the one path asked for.
    env.ok(&args!["restore", "latest", src.join("kept.bin"), "--overwrite"]);
    assert_snapshot_matches(&before, &src, &snapshot(&src, false), &src, Compare::ALL);
}

/// A folder given as a source beside one of its own subfolders (`backup /a /a/b`) is backed
/// up whole: a restore gives it its times and mode back like any other, and a source given
/// twice is listed once.
#[test]
fn a_source_inside_another_does_not_hide_the_outer_ones_metadata() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::create_dir(src.join("inner")).unwrap();
    fs::write(src.join("inner/f.txt"), b"f\n").unwrap();
    chmod(&src, 0o750);
    set_mtime(&src.join("inner"), 1_300_000_000_000_000_000);
    set_mtime(&src, 1_400_000_000_000_000_000);
    let before = snapshot(&src, true);
    env.json(&args!["backup", &src, src.join("inner"), &src]);
    let t = env.path().join("t");
    env.restore(&args![], &t);
    let out = restored(&t, &src);
    assert_snapshot_matches(&before, &src, &snapshot(&out, true), &out, Compare::ALL);
    let versions = env.json(&args!["versions"]);
    assert_eq!(versions[0]["sources"].as_array().map(Vec::len), Some(2), "{versions}");
}

#[test]
fn restore_in_place_leaves_the_directories_above_the_source_alone() {
    let env = Env::with_box();
    let outer = env.mkdir("outer");
    let src = env.mkdir("outer/src");
    fs::write(src.join("f.txt"), b"in place\n").unwrap();
    chmod(&outer, 0o755);
    env.backup(&args![&src]);

    // The directory above the source changes after the backup; it is not part of the backup.
    chmod(&outer, 0o700);
    set_mtime(&outer, 1_234_567_890_123_456_789);
    fs::remove_file(src.join("f.txt")).unwrap();
    // Both when asked for the source path and when restoring the whole version.
    env.ok(&args!["restore", "latest", &src]);
    assert_eq!(fs::read(src.join("f.txt")).unwrap(), b"in place\n");
    let e = entry(&outer, false);
    assert_eq!((e.mode, e.mtime_ns), (0o700, 1_234_567_890_123_456_789), "restore of {}", src.display());
    fs::remove_file(src.join("f.txt")).unwrap();
    set_mtime(&outer, 1_234_567_890_123_456_789);
    env.ok(&args!["restore"]);
    assert_eq!(fs::read(src.join("f.txt")).unwrap(), b"in place\n");
    let e = entry(&outer, false);
    assert_eq!(
        (e.mode, e.mtime_ns),
        (0o700, 1_234_567_890_123_456_789),
        "restoring {} changed the metadata of its parent {}",
        src.display(),
        outer.display()
    );
}
