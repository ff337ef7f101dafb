//! Backup filters, tags, compression, dry runs, version specs, passwords and JSON output.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::common::*;

/// Paths below `src` (relative) stored in the latest version, from `ls -R --json`.
fn stored_paths(env: &Env, src: &Path) -> BTreeSet<PathBuf> {
    env.json(&args!["ls", "latest", src, "-R"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Path::new(r["path"].as_str().unwrap()).strip_prefix(src).unwrap().to_path_buf())
        .collect()
}

fn set(paths: &[&str]) -> BTreeSet<PathBuf> {
    paths.iter().map(PathBuf::from).collect()
}

fn filter_tree(src: &Path) {
    for d in ["docs", "cache", "build/out", "keep/deep", "skipme", "node/modules"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::write(src.join("a.txt"), b"a").unwrap();
    fs::write(src.join("b.tmp"), b"b").unwrap();
    fs::write(src.join("docs/c.txt"), b"c").unwrap();
    fs::write(src.join("docs/d.tmp"), b"d").unwrap();
    fs::write(src.join("docs/e.md"), b"e").unwrap();
    fs::write(src.join("cache/f.txt"), b"f").unwrap();
    fs::write(src.join("build/out/g.o"), b"g").unwrap();
    fs::write(src.join("build/h.txt"), b"h").unwrap();
    fs::write(src.join("keep/deep/i.txt"), b"i").unwrap();
    fs::write(src.join("skipme/.nobackup"), b"").unwrap();
    fs::write(src.join("skipme/j.txt"), b"j").unwrap();
    fs::write(src.join("node/modules/k.js"), b"k").unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
}

#[test]
fn exclude_by_name_and_by_path() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    filter_tree(&src);
    let build = format!("{}/build/**", src.display());
    env.backup(&args![&src, "--exclude", "*.tmp", "--exclude", "cache", "--exclude", &build]);
    let want = set(&[
        "a.txt",
        "docs",
        "docs/c.txt",
        "docs/e.md",
        "build",
        "keep",
        "keep/deep",
        "keep/deep/i.txt",
        "skipme",
        "skipme/.nobackup",
        "skipme/j.txt",
        "node",
        "node/modules",
        "node/modules/k.js",
        "link",
    ]);
    assert_eq!(stored_paths(&env, &src), want);
}

#[test]
fn include_keeps_only_matching_files_but_walks_all_directories() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    filter_tree(&src);
    env.backup(&args![&src, "--include", "*.txt"]);
    let want = set(&[
        "a.txt",
        "docs",
        "docs/c.txt",
        "cache",
        "cache/f.txt",
        "build",
        "build/out",
        "build/h.txt",
        "keep",
        "keep/deep",
        "keep/deep/i.txt",
        "skipme",
        "skipme/j.txt",
        "node",
        "node/modules",
    ]);
    assert_eq!(stored_paths(&env, &src), want);
}

#[test]
fn exclude_if_present_leaves_out_marked_directories() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    filter_tree(&src);
    env.backup(&args![&src, "--exclude-if-present", ".nobackup"]);
    let got = stored_paths(&env, &src);
    assert!(!got.iter().any(|p| p.starts_with("skipme")), "{got:?}");
    assert!(got.contains(Path::new("keep/deep/i.txt")) && got.contains(Path::new("b.tmp")), "{got:?}");
    assert_eq!(got.len(), walk(&src).len() - 1 - 3);
}

#[test]
fn max_file_size_leaves_out_larger_files() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("small.bin"), random_bytes(1, 1000)).unwrap();
    fs::write(src.join("exact.bin"), random_bytes(2, MIB as usize)).unwrap();
    fs::write(src.join("over.bin"), random_bytes(3, MIB as usize + 1)).unwrap();
    let s = env.backup(&args![&src, "--max-file-size", "1MiB"]);
    assert_eq!(stored_paths(&env, &src), set(&["small.bin", "exact.bin"]));
    assert_eq!(num(&s, "files_new"), 2);
    assert!(num(&s, "bytes_read") <= MIB + 1000, "{s:#}");
}

#[test]
fn tags_show_in_versions() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("f"), b"x").unwrap();
    let s = env.backup(&args![&src, "--tag", "daily", "--tag", "before upgrade"]);
    assert_eq!(s["version"]["tags"], serde_json::json!(["daily", "before upgrade"]));
    env.backup(&args![&src]);
    let vs = env.versions();
    assert_eq!(vs[0]["tags"], serde_json::json!([]));
    assert_eq!(vs[1]["tags"], serde_json::json!(["daily", "before upgrade"]));
    let text = env.ok(&args!["versions"]).stdout;
    assert!(text.contains("daily,before upgrade"), "{text}");
}

#[test]
fn every_compression_codec_round_trips() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let mut versions = Vec::new();
    for (i, codec) in ["zstd", "deflate", "lzma", "none"].into_iter().enumerate() {
        // Fresh content for each codec, so nothing deduplicates against the previous one.
        let text = text_bytes(300 + i as u64, 2 * MIB as usize);
        let file = src.join(format!("{codec}.log"));
        fs::write(&file, &text).unwrap();
        let s = env.backup(&args![&src, "--compression", codec]);
        let added = num(&s, "bytes_added");
        if codec == "none" {
            assert!(added >= 2 * MIB, "{codec}: stored {added} bytes for 2 MiB of text");
        } else {
            assert!(added < MIB, "{codec}: stored {added} bytes for 2 MiB of text");
        }
        versions.push((version_id(&s), src.clone(), codec));
    }
    for (id, src, codec) in versions {
        let t = env.path().join(format!("t-{codec}"));
        env.restore(&args![&id], &t);
        let got = restored(&t, &src);
        let names: Vec<String> =
            fs::read_dir(&got).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.contains(&format!("{codec}.log")), "{names:?}");
        for n in names {
            assert!(same_content(&src.join(&n), &got.join(&n)), "{codec}: {n} differs");
        }
    }
    // An unknown codec is a usage error.
    assert_eq!(env.run(&args!["backup", &src, "--compression", "brotli"]).code, 2);
}

#[test]
fn dry_run_stores_nothing() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("a.bin"), random_bytes(9, 700_000)).unwrap();
    fs::write(src.join("b.txt"), text_bytes(9, 100_000)).unwrap();
    let before = file_state(&env.repo);
    let s = env.backup(&args![&src, "--dry-run"]);
    assert!(s["version"].is_null(), "{s:#}");
    assert_eq!(num(&s, "files_new"), 2);
    assert!(num(&s, "bytes_added") > 700_000, "a dry run estimates what it would add: {s:#}");
    assert_eq!(file_state(&env.repo), before, "a dry run stored something in the box");
    assert!(env.versions().is_empty());
    let text = env.ok(&args!["backup", &src, "--dry-run"]).stdout;
    assert!(text.contains("dry run"), "{text}");
    // The real backup afterwards still reads and stores everything.
    let s = env.backup(&args![&src]);
    assert_eq!(num(&s, "files_new"), 2, "{s:#}");
    assert_eq!(num(&s, "files_unchanged"), 0, "{s:#}");
    assert!(num(&s, "bytes_added") > 700_000);
}

/// A box with three versions of `f.txt` ("v1", "v2", "v3") taken at least a second apart.
fn three_versions() -> (Env, PathBuf, Vec<String>) {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let mut ids = Vec::new();
    for i in 1..=3 {
        if i > 1 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        fs::write(src.join("f.txt"), format!("v{i}")).unwrap();
        ids.push(version_id(&env.backup(&args![&src])));
    }
    (env, src, ids)
}

/// Content of `f.txt` in the version `spec` names.
fn content_at(env: &Env, src: &Path, spec: &str) -> String {
    let t = env.path().join(format!("t-{}", spec.replace(['/', ' ', ':'], "_")));
    let _ = fs::remove_dir_all(&t);
    env.restore(&args![spec, &src.join("f.txt")], &t);
    fs::read_to_string(restored(&t, &src.join("f.txt"))).unwrap()
}

#[test]
fn version_specs_number_id_prefix_and_date() {
    let (env, src, ids) = three_versions();
    assert_eq!(content_at(&env, &src, "latest"), "v3");
    assert_eq!(content_at(&env, &src, "0"), "v3");
    assert_eq!(content_at(&env, &src, "1"), "v2");
    assert_eq!(content_at(&env, &src, "2"), "v1");
    assert_eq!(content_at(&env, &src, &ids[1][..8]), "v2");
    assert_eq!(content_at(&env, &src, &ids[0].to_uppercase()), "v1");

    // Dates as the versions table shows them (local time, whole seconds).
    let table = env.ok(&args!["versions"]).stdout;
    let row = |id: &str| -> String {
        let line = table.lines().find(|l| l.contains(id)).unwrap_or_else(|| panic!("{id} not in\n{table}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        format!("{} {}", cols[2], cols[3])
    };
    assert_eq!(content_at(&env, &src, &row(&ids[1])), "v2");
    assert_eq!(content_at(&env, &src, &row(&ids[0])), "v1");
    assert_eq!(content_at(&env, &src, &row(&ids[0]).replace(' ', "T")), "v1");
    // A bare date means the end of that day: the newest version.
    assert_eq!(content_at(&env, &src, &row(&ids[2])[..10]), "v3");
    // Before the first version, after the last, or beyond the count.
    let r = env.run(&args!["restore", "2001-01-01", "--target", env.path().join("x")]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no version"), "{}", r.stderr);
    let r = env.run(&args!["restore", "3", "--target", env.path().join("x")]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no version 3"), "{}", r.stderr);
    // ls and diff take the same specs.
    let rows = env.json(&args!["ls", &ids[0][..8], &src]);
    assert_eq!(rows[0]["size"], 2);
    let d = env.ok(&args!["diff", "2", &ids[2][..8]]).stdout;
    assert!(d.lines().any(|l| l == format!("M {}", src.join("f.txt").display())), "{d}");
}

#[test]
fn version_spec_time_from_versions_json_selects_that_version() {
    let (env, src, ids) = three_versions();
    let vs = env.versions();
    for (i, id) in ids.iter().enumerate() {
        let v = vs.iter().find(|v| v["id"] == id.as_str()).unwrap();
        let time = v["time"].as_str().unwrap();
        assert_eq!(
            content_at(&env, &src, time),
            format!("v{}", i + 1),
            "version spec {time:?} (the time `versions --json` shows for {id})"
        );
    }
}

#[test]
fn passwd_replaces_the_password() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("f.txt"), b"secret").unwrap();
    env.backup(&args![&src]);
    let mut c = env.cmd(&args!["passwd", "--json"]);
    c.env("BRICKBOX_NEW_PASSWORD", "the new one");
    let r = run_cmd(c);
    r.expect_code(0);
    let key = r.json()["key"].as_str().unwrap().to_string();
    let keys = objects(&env.repo, "keys");
    assert_eq!(keys.len(), 1, "the old key must be gone: {keys:?}");
    assert!(key.ends_with(&*keys[0].file_name().unwrap().to_string_lossy()), "{key} vs {keys:?}");

    let r = env.run(&args!["versions"]);
    assert_eq!(r.code, 1, "the old password still works: {r:?}");
    assert!(r.stderr.to_lowercase().contains("password"), "{}", r.stderr);
    let r = env.run_with_password("the new one", &args!["versions", "--json"]);
    r.expect_code(0);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    let t = env.path().join("t");
    let r = env.run_with_password("the new one", &args!["restore", "--target", &t]);
    r.expect_code(0);
    assert_eq!(fs::read(restored(&t, &src.join("f.txt"))).unwrap(), b"secret");

    // The password can also come from a file.
    let pw = env.path().join("pw.txt");
    fs::write(&pw, "the new one\n").unwrap();
    let mut c = env.bare_cmd();
    c.env_remove("BRICKBOX_PASSWORD").args(args!["-r", &env.repo, "--db", &env.db, "--password-file", &pw, "versions"]);
    run_cmd(c).expect_code(0);
}

fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':'
}

#[test]
fn json_outputs_parse_and_global_flags_go_anywhere() {
    let env = Env::new();
    let init = env.json(&args!["init"]);
    assert!(init["id"].as_str().is_some_and(|s| s.len() == 32), "{init:#}");
    let src = env.mkdir("src");
    fs::create_dir(src.join("d")).unwrap();
    fs::write(src.join("d/f.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink("d/f.txt", src.join("l")).unwrap();

    // Global flags after the subcommand.
    let mut c = env.bare_cmd();
    c.args(args!["backup", &src, "--json", "-r", &env.repo, "--db", &env.db, "--tag", "first"]);
    let r = run_cmd(c);
    r.expect_code(0);
    let s1 = r.json();
    for key in [
        "files_new",
        "files_changed",
        "files_unchanged",
        "dirs",
        "bytes_read",
        "bytes_added",
        "blocks_added",
        "volumes",
    ] {
        assert!(s1[key].is_u64(), "backup summary lacks {key}: {s1:#}");
    }
    assert_eq!(s1["warnings"], serde_json::json!([]));
    assert_eq!(num(&s1, "files_new"), 1);
    assert_eq!(num(&s1, "dirs"), 2);
    assert_eq!(num(&s1, "bytes_read"), 5);
    assert!(num(&s1, "volumes") >= 1);
    let v1 = version_id(&s1);

    fs::write(src.join("d/f.txt"), b"hello again").unwrap();
    // -q and -v before the subcommand.
    let r = env.ok(&args!["-q", "backup", &src]);
    assert!(r.stdout.is_empty(), "-q printed {:?}", r.stdout);
    let r = env.ok(&args!["-v", "backup", &src]);
    assert!(r.stdout.contains("version"), "{}", r.stdout);

    let vs = env.versions();
    assert_eq!(vs.len(), 3);
    for (i, v) in vs.iter().enumerate() {
        assert_eq!(v["index"], i);
        assert!(v["id"].is_string() && v["files"].is_u64() && v["bytes_added"].is_u64() && v["tags"].is_array());
        assert!(is_rfc3339(v["time"].as_str().unwrap()), "{v:#}");
    }
    assert_eq!(vs[2]["id"], v1.as_str(), "versions are listed newest first");
    assert!(vs[0]["time_ns"].as_i64() >= vs[1]["time_ns"].as_i64());
    assert_eq!(vs[2]["tags"], serde_json::json!(["first"]));

    let ls = env.json(&args!["ls", "latest", &src.join("d")]);
    assert_eq!(ls[0]["name"], "f.txt");
    assert_eq!(ls[0]["type"], "file");
    assert_eq!(ls[0]["size"], 11);
    let ls = env.json(&args!["ls", "latest", &src, "-R"]);
    assert_eq!(ls.as_array().unwrap().len(), 3);
    let link = ls.as_array().unwrap().iter().find(|e| e["name"] == "l").unwrap();
    assert_eq!(link["type"], "symlink");
    assert_eq!(link["target"], "d/f.txt");

    let found = env.json(&args!["find", "f.txt", "--all-versions"]);
    assert_eq!(found.as_array().unwrap().len(), 3, "{found:#}");
    assert!(found.as_array().unwrap().iter().all(|e| e["version"].is_string()));
    let found = env.json(&args!["find", &format!("{}/d/*", src.display())]);
    assert_eq!(found.as_array().unwrap().len(), 1);
    let r = env.run(&args!["find", "nothing-matches-this"]);
    assert_eq!(r.code, 1, "find without hits: {r:?}");

    let h = env.json(&args!["history", &src.join("d/f.txt")]);
    assert_eq!(h.as_array().unwrap().len(), 2);
    let d = env.json(&args!["diff", "2", "0"]);
    let changes: BTreeSet<(char, PathBuf)> = d
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["change"], "changed", "{d:#}");
            ('M', PathBuf::from(c["path"].as_str().unwrap()))
        })
        .collect();
    let (inside, outside) = split_diff(changes, &src);
    assert_eq!(inside, BTreeSet::from([('M', src.join("d/f.txt"))]));
    assert_only_ancestors(&outside, &src);

    let t = env.path().join("t");
    let r = env.json(&args!["restore", "--target", &t]);
    assert_eq!(r["files"], 1);
    assert_eq!(r["errors"], serde_json::json!([]));
    assert!(r["version"].is_string());

    let cfg = env.json(&args!["config"]);
    assert_eq!(cfg["format_version"], 1);
    assert_eq!(cfg["versions"], 3);
    assert_eq!(cfg["chunker"], serde_json::json!({"min_size": 65536, "avg_size": 262144, "max_size": 1048576}));
    assert!(cfg["volumes"].as_u64().unwrap() >= 1);
    let text = env.ok(&args!["config"]).stdout;
    assert!(text.contains("format version:  1"), "{text}");
    // The box layout.
    for folder in ["keys", "data", "index", "versions"] {
        assert!(!objects(&env.repo, folder).is_empty(), "{folder}/ is empty");
    }
    assert!(objects(&env.repo, "data").iter().all(|p| p.to_string_lossy().ends_with(".dblock.zip")));
    assert!(objects(&env.repo, "index").iter().all(|p| p.to_string_lossy().ends_with(".dindex")));
    assert!(objects(&env.repo, "versions").iter().all(|p| p.to_string_lossy().ends_with(".dlist")));
    assert!(objects(&env.repo, "keys").iter().all(|p| p.to_string_lossy().ends_with(".key")));
    assert!(env.repo.join("config").is_file());
}

#[test]
fn relative_paths_are_taken_from_the_current_directory() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("f.txt"), b"relative").unwrap();
    let in_dir = |a: Vec<std::ffi::OsString>| {
        let mut c = env.cmd(&a);
        c.current_dir(env.path());
        run_cmd(c)
    };
    in_dir(args!["backup", "src"]).expect_code(0);
    assert_eq!(stored_paths(&env, &src), set(&["f.txt"]));
    let h = in_dir(args!["history", "src/f.txt", "--json"]);
    h.expect_code(0);
    assert_eq!(h.json()[0]["path"], src.join("f.txt").to_string_lossy().as_ref());
    let t = env.path().join("t");
    in_dir(args!["restore", "src/f.txt", "--target", "t"]).expect_code(0);
    assert_eq!(fs::read(restored(&t, &src.join("f.txt"))).unwrap(), b"relative");
}

#[test]
fn backup_leaves_out_the_box_and_the_catalog() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), b"kept\n").unwrap();
    // The folder backed up holds the box and the catalog (as `/` or a home folder would).
    let root = fs::canonicalize(env.path()).unwrap();
    env.backup(&args![&root]);
    env.backup(&args![&root]);
    let stored = stored_paths(&env, &root);
    assert!(stored.contains(Path::new("src/a.txt")), "{stored:?}");
    let own: Vec<_> =
        stored.iter().filter(|p| p.starts_with("box") || p.to_string_lossy().starts_with("catalog.sqlite")).collect();
    assert!(own.is_empty(), "Brickbox's own files were backed up: {own:?}");
}

#[test]
fn block_size_is_chosen_at_init_and_kept_by_the_box() {
    let env = Env::new();
    // Out of range: a clear error, and no box is created.
    let r = env.run(&args!["init", "--block-size", "16KiB"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--block-size") && r.stderr.contains("out of range"), "{}", r.stderr);
    assert!(env.run(&args!["config"]).code != 0, "a box was created by a failed init");

    env.ok(&args!["init", "--block-size", "64KiB"]);
    let info = env.json(&args!["config"]);
    assert_eq!(info["chunker"]["avg_size"], 65536, "{info}");
    assert_eq!(info["chunker"]["min_size"], 16384, "{info}");
    assert_eq!(info["chunker"]["max_size"], 262144, "{info}");

    let src = env.mkdir("src");
    write_random(&src.join("data.bin"), 77, 4 * MIB);
    env.backup(&args![&src]);
    // 4 MiB in blocks of 16–256 KiB: far more blocks than the 2–8 the default size gives.
    let blocks = num(&env.json(&args!["config"]), "blocks");
    assert!((16..=256).contains(&blocks), "{blocks} blocks for 4 MiB at 64 KiB on average");
    let t = env.path().join("t");
    env.restore(&[], &t);
    assert!(same_content(&src.join("data.bin"), &restored(&t, &src).join("data.bin")));
}

/// `--repo-config FILE` (or BRICKBOX_REPO_CONFIG) names the box and the password file;
/// paths in it are relative to it; `-r` wins over it; bad lines are named by number.
#[test]
fn repo_config_file_names_the_box_and_its_password() {
    let env = Env::new();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), b"alpha").unwrap();
    let conf_dir = env.mkdir("conf");
    fs::write(conf_dir.join("box.password"), format!("{}\n", env.password)).unwrap();
    let conf = conf_dir.join("office.conf");
    fs::write(&conf, "# the office box\nrepo = office-box\nrepo_password_file = \"box.password\"\n").unwrap();
    let cmd_db = |db: &Path, args: &[std::ffi::OsString]| {
        let mut c = env.bare_cmd();
        c.env_remove("BRICKBOX_PASSWORD").arg("--db").arg(db).args(args);
        c
    };
    let cmd = |args: &[std::ffi::OsString]| cmd_db(&env.db, args);
    run_cmd(cmd(&args!["--repo-config", &conf, "init"])).expect_code(0);
    assert!(conf_dir.join("office-box/config").exists(), "the box is beside the config file");
    run_cmd(cmd(&args!["--repo-config", &conf, "backup", &src])).expect_code(0);
    let mut c = cmd(&args!["versions", "--json"]);
    c.env("BRICKBOX_REPO_CONFIG", &conf);
    assert_eq!(run_cmd(c).json().as_array().unwrap().len(), 1);

    // -r wins over the file's repo (and the file's password file still serves).
    let other = env.path().join("other-box");
    let other_db = env.path().join("other.sqlite");
    run_cmd(cmd_db(&other_db, &args!["--repo-config", &conf, "-r", &other, "init"])).expect_code(0);
    assert!(other.join("config").exists());

    // A bad line: the file and line are named, the line's text is not echoed.
    fs::write(&conf, "repo = office-box\nsecret_access_key hunter2-never-printed\n").unwrap();
    let r = run_cmd(cmd(&args!["--repo-config", &conf, "versions"]));
    r.expect_code(1);
    assert!(r.stderr.contains("office.conf:2: expected 'key = value'"), "{}", r.stderr);
    assert!(!r.stderr.contains("hunter2"), "{}", r.stderr);
    let r = run_cmd(cmd(&args!["--repo-config", &conf_dir.join("missing.conf"), "versions"]));
    r.expect_code(1);
    assert!(r.stderr.contains("cannot read the repository config file"), "{}", r.stderr);
}
