//! Round trip of a tree with every kind of entry and metadata the tool promises to keep.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::common::*;

/// Paths of interest in the generated tree.
struct Tree {
    sparse: PathBuf,
    hard_a: PathBuf,
    hard_b: PathBuf,
    owned: Vec<PathBuf>,
    long_file: PathBuf,
}

/// Builds the tree below `src` and stamps nanosecond mtimes on everything.
fn build_tree(src: &Path) -> Tree {
    // Nested and empty directories.
    fs::create_dir_all(src.join("a/b/c/d")).unwrap();
    fs::write(src.join("a/b/c/d/deep.txt"), b"deep inside\n").unwrap();
    fs::write(src.join("a/top.txt"), text_bytes(1, 5000)).unwrap();
    fs::create_dir_all(src.join("empty_dir")).unwrap();
    fs::create_dir_all(src.join("a/b/empty_too")).unwrap();

    // Files of all sizes and modes.
    fs::write(src.join("empty.txt"), b"").unwrap();
    fs::write(src.join("private.txt"), b"secret stuff\n").unwrap();
    chmod(&src.join("private.txt"), 0o600);
    fs::write(src.join("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    chmod(&src.join("script.sh"), 0o755);
    fs::write(src.join("readonly.txt"), b"read only\n").unwrap();
    chmod(&src.join("readonly.txt"), 0o444);
    fs::write(src.join("medium.bin"), random_bytes(2, 200 * 1024)).unwrap();
    write_random(&src.join("big.bin"), 3, 5 * MIB + 12345);
    fs::write(src.join("text.log"), text_bytes(4, 3 * 1024 * 1024 + 7)).unwrap();

    // A sparse file: 24 MiB with three small data islands.
    let sparse = src.join("sparse.img");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&sparse).unwrap();
        f.set_len(24 * MIB).unwrap();
        f.write_all_at(&random_bytes(5, 4096), 0).unwrap();
        f.write_all_at(&random_bytes(6, 64 * 1024), 9 * MIB + 4096).unwrap();
        f.write_all_at(b"end", 24 * MIB - 3).unwrap();
    }

    // Symlinks: relative, absolute, dangling.
    fs::create_dir(src.join("links")).unwrap();
    std::os::unix::fs::symlink("../private.txt", src.join("links/relative")).unwrap();
    std::os::unix::fs::symlink(src.join("a/top.txt"), src.join("links/absolute")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("links/absolute_outside")).unwrap();
    std::os::unix::fs::symlink("no/such/target", src.join("links/dangling")).unwrap();
    std::os::unix::fs::symlink("../a", src.join("links/to_dir")).unwrap();

    // A hard-link pair.
    fs::create_dir(src.join("hard")).unwrap();
    let hard_a = src.join("hard/one.bin");
    let hard_b = src.join("hard/two.bin");
    fs::write(&hard_a, random_bytes(7, 300 * 1024)).unwrap();
    fs::hard_link(&hard_a, &hard_b).unwrap();

    // A FIFO.
    mkfifo(&src.join("pipe"), 0o640);

    // Awkward names.
    fs::create_dir(src.join("names")).unwrap();
    fs::write(raw_name(&src.join("names"), b"latin1-\xe9t\xe9-\xff\xfe.bin"), b"not utf-8 name\n").unwrap();
    fs::write(src.join("names/line\nbreak.txt"), b"newline in name\n").unwrap();
    fs::write(src.join("names/sp ace & *star?[x].txt"), b"glob characters\n").unwrap();
    fs::write(src.join("names/ünïcødé-日本語.txt"), b"unicode\n").unwrap();
    fs::write(src.join("names/-dash"), b"leading dash\n").unwrap();
    fs::create_dir(raw_name(&src.join("names"), b"dir-\x80\x81")).unwrap();
    fs::write(raw_name(&src.join("names"), b"dir-\x80\x81/inner\xc0.txt"), b"inner").unwrap();

    // A very long path: 5 nested directories of 230-byte names, > 1024 bytes in total.
    let mut long = src.join("long");
    for i in 0..5 {
        long.push(format!("{i}{}", "x".repeat(229)));
    }
    fs::create_dir_all(&long).unwrap();
    let long_file = long.join(format!("file-{}", "y".repeat(200)));
    fs::write(&long_file, b"far away\n").unwrap();
    assert!(long_file.as_os_str().len() > 1024);

    // Extended attributes on a file and a directory.
    fs::write(src.join("xattr.txt"), b"has attributes\n").unwrap();
    xattr::set(src.join("xattr.txt"), "user.test", b"value \x00\xff binary").unwrap();
    xattr::set(src.join("xattr.txt"), "user.empty", b"").unwrap();
    xattr::set(src.join("a"), "user.dir", b"on a directory").unwrap();

    // A setgid directory.
    fs::create_dir(src.join("sgid")).unwrap();
    fs::write(src.join("sgid/inside.txt"), b"in a setgid dir\n").unwrap();
    chmod(&src.join("sgid"), 0o2775);

    // Entries owned by someone else.
    let mut owned = Vec::new();
    if is_root() {
        fs::create_dir(src.join("owned_dir")).unwrap();
        fs::write(src.join("owned_dir/owned.txt"), b"owned by 1234\n").unwrap();
        chmod(&src.join("owned_dir/owned.txt"), 0o640);
        std::os::unix::fs::symlink("owned.txt", src.join("owned_dir/owned_link")).unwrap();
        for p in ["owned_dir", "owned_dir/owned.txt", "owned_dir/owned_link"] {
            lchown(&src.join(p), 1234, 1234);
            owned.push(src.join(p));
        }
    }

    stamp_mtimes(src, 1_500_000_000_000_000_000);
    Tree { sparse, hard_a, hard_b, owned, long_file }
}

#[test]
fn round_trip_of_every_kind_of_entry() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let tree = build_tree(&src);
    let before = snapshot(&src, false);

    let summary = env.backup(&args![&src]);
    assert_eq!(summary["warnings"], serde_json::json!([]), "{summary:#}");
    let files = before.values().filter(|e| e.kind == Kind::File).count() as u64;
    let dirs = before.values().filter(|e| e.kind == Kind::Dir).count() as u64;
    assert_eq!(num(&summary, "files_new"), files, "{summary:#}");
    assert_eq!(num(&summary, "files_changed") + num(&summary, "files_unchanged"), 0);
    assert_eq!(num(&summary, "dirs"), dirs, "{summary:#}");
    // The backup must not touch the source.
    assert_snapshot_matches(&before, &src, &snapshot(&src, false), &src, Compare::ALL);

    // Default restore: everything but owners, which become the restoring user's.
    let t1 = env.path().join("restore-default");
    let r = env.restore(&args![], &t1);
    assert!(r.stderr.trim().is_empty(), "restore printed warnings: {}", r.stderr);
    let out1 = restored(&t1, &src);
    assert_same_tree(&src, &out1, Compare::NO_OWNERS);
    let me = unsafe { libc::geteuid() };
    for p in &tree.owned {
        let md = fs::symlink_metadata(restored(&t1, p)).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (me, unsafe { libc::getegid() }),
            "{} got its owner restored without --restore-permissions",
            p.display()
        );
    }

    // Restore with permissions: owners too.
    let t2 = env.path().join("restore-perms");
    env.restore(&args!["--restore-permissions", "-q"], &t2);
    let out2 = restored(&t2, &src);
    assert_same_tree(&src, &out2, Compare::ALL);
    for p in &tree.owned {
        let md = fs::symlink_metadata(restored(&t2, p)).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 1234), "owner of {}", p.display());
    }

    for out in [&out1, &out2] {
        // The sparse file keeps its holes.
        let sp = fs::metadata(out.join("sparse.img")).unwrap();
        assert_eq!(sp.len(), 24 * MIB);
        assert!(sp.blocks() * 512 < sp.len() / 4, "sparse file restored without holes: {} blocks", sp.blocks());
        assert!(fs::metadata(&tree.sparse).unwrap().blocks() * 512 < 24 * MIB / 4);
        // The hard-link pair shares one inode.
        let rel = |p: &Path| out.join(p.strip_prefix(&src).unwrap());
        let (a, b) = (fs::metadata(rel(&tree.hard_a)).unwrap(), fs::metadata(rel(&tree.hard_b)).unwrap());
        assert_eq!(a.ino(), b.ino(), "hard links restored as separate files");
        assert_eq!(a.nlink(), 2);
        // Special entries.
        assert_eq!(entry(&out.join("pipe"), false).kind, Kind::Fifo);
        assert_eq!(fs::read_link(out.join("links/dangling")).unwrap(), Path::new("no/such/target"));
        let long_rel = tree.long_file.strip_prefix(&src).unwrap();
        assert_eq!(fs::read(out.join(long_rel)).unwrap(), b"far away\n");
        assert_eq!(xattr::get(out.join("xattr.txt"), "user.test").unwrap().unwrap(), b"value \x00\xff binary");
    }
}

#[test]
fn ls_find_and_single_path_restore_see_awkward_names() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    build_tree(&src);
    let v = version_id(&env.backup(&args![&src]));

    // ls of the source directory lists its children.
    let rows = env.json(&args!["ls", &v, &src]);
    let names: Vec<&str> = rows.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    for want in ["a", "big.bin", "empty_dir", "hard", "links", "names", "pipe", "sparse.img", "xattr.txt"] {
        assert!(names.contains(&want), "ls misses {want}: {names:?}");
    }
    let pipe = rows.as_array().unwrap().iter().find(|r| r["name"] == "pipe").unwrap();
    assert_eq!(pipe["type"], "fifo");
    let text = env.ok(&args!["ls", "latest", &src]).stdout;
    assert!(text.contains("prw-r-----"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("drwxrwsr-x") && l.ends_with("/sgid")), "setgid dir in ls:\n{text}");

    // ls -R reaches the far end of the long path.
    let all = env.json(&args!["ls", "latest", &src, "-R"]);
    let paths: Vec<String> = all.as_array().unwrap().iter().map(|r| r["path"].as_str().unwrap().to_string()).collect();
    assert!(paths.iter().any(|p| p.len() > 1024 && p.contains("file-yyy")), "long path not listed");
    assert_eq!(paths.len(), walk(&src).len() - 1, "ls -R lists every entry below the source");

    // find by name glob.
    let hits = env.json(&args!["find", "*.bin"]);
    let mut found: Vec<String> =
        hits.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_string()).collect();
    found.sort();
    // A name that is not UTF-8 comes escaped, byte by byte.
    assert_eq!(found, ["big.bin", r"latin1-\xe9t\xe9-\xff\xfe.bin", "medium.bin", "one.bin", "two.bin"]);

    // Restoring one path with a newline in its name and one with a non-UTF-8 name.
    let t = env.path().join("one");
    let nl = src.join("names/line\nbreak.txt");
    env.restore(&args![&nl], &t);
    assert_eq!(fs::read(restored(&t, &nl)).unwrap(), b"newline in name\n");
    let bad = raw_name(&src.join("names"), b"dir-\x80\x81");
    env.restore(&args!["latest", &bad], &t);
    assert_same_tree(&bad, &restored(&t, &bad), Compare::ALL);
    assert!(!restored(&t, &src.join("big.bin")).exists(), "a single-path restore restored more");
}

/// Listings show every name on one line and without loss: bytes that are not UTF-8, control
/// characters and newlines escaped (`\xff`, `\n`), in text and in JSON (marked `escaped`),
/// so two names that differ only there are told apart.
#[test]
fn listings_show_odd_names_on_one_line_without_loss() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(raw_name(&src, b"bad\xff\xfe"), b"1").unwrap();
    fs::write(raw_name(&src, b"bad\xff\xfd"), b"2").unwrap();
    fs::write(raw_name(&src, b"two\nlines"), b"3").unwrap();
    fs::write(src.join("back\\slash"), b"4").unwrap();
    std::os::unix::fs::symlink(raw_name(Path::new("."), b"to\xff"), src.join("link")).unwrap();
    env.backup(&args![&src]);

    let out = env.ok(&args!["ls", "latest", &src]).stdout;
    let at = |name: &str| out.lines().any(|l| l.ends_with(&format!("/{name}")));
    assert!(at(r"bad\xff\xfe") && at(r"bad\xff\xfd") && at(r"two\nlines") && at(r"back\\slash"), "{out}");
    assert!(out.lines().any(|l| l.ends_with(r"link -> ./to\xff")), "{out}");
    assert_eq!(out.lines().count(), 5, "one line per entry: {out}");
    let found = env.ok(&args!["find", "bad*"]).stdout;
    assert_eq!(found.lines().count(), 2, "{found}");

    let json = env.json(&args!["ls", "latest", &src]);
    let entries = json.as_array().unwrap();
    let names: std::collections::BTreeSet<&str> = entries.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 5, "{json:#}");
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let odd = name.starts_with("bad") || name == "link";
        assert_eq!(e.get("escaped").is_some(), odd, "{e}");
    }
    // Names that are UTF-8 are given as they are, control characters included.
    assert!(names.contains("two\nlines") && names.contains("back\\slash"), "{names:?}");
}
