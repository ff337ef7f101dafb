//! Deduplication: copies, shifted content and renamed directories cost almost nothing.

use std::fs::{self, File};
use std::io::Write;

use crate::common::*;

const BIG: usize = 100 * 1024 * 1024;

#[test]
fn copy_of_100mib_file_adds_less_than_1mib() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let data = random_bytes(100, BIG);
    fs::write(src.join("original.bin"), &data).unwrap();
    let s1 = env.backup(&args![&src]);
    assert!(num(&s1, "bytes_added") >= BIG as u64, "random data cannot shrink: {s1:#}");

    fs::write(src.join("copy.bin"), &data).unwrap();
    let s2 = env.backup(&args![&src]);
    assert_eq!(num(&s2, "files_new"), 1, "{s2:#}");
    assert_eq!(num(&s2, "bytes_read"), BIG as u64, "only the copy is read: {s2:#}");
    let added = num(&s2, "bytes_added");
    assert!(added < MIB, "a copy of a 100 MiB file added {added} bytes");
    let versions = env.versions();
    assert_eq!(versions[0]["bytes_added"].as_u64(), Some(added), "versions shows the same bytes_added");
}

#[test]
fn inserting_one_byte_at_the_start_of_100mib_adds_under_3_blocks() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let data = random_bytes(101, BIG);
    let file = src.join("big.bin");
    fs::write(&file, &data).unwrap();
    let s1 = env.backup(&args![&src]);
    assert!(num(&s1, "blocks_added") > 50, "100 MiB in 0.5 MiB average blocks: {s1:#}");

    let mut f = File::create(&file).unwrap();
    f.write_all(b"!").unwrap();
    f.write_all(&data).unwrap();
    drop(f);
    let s2 = env.backup(&args![&src]);
    assert_eq!(num(&s2, "files_changed"), 1, "{s2:#}");
    let blocks = num(&s2, "blocks_added");
    let added = num(&s2, "bytes_added");
    // However blocks are counted, the new data must stay within what 3 of the largest (2 MiB) blocks hold.
    assert!(added < 6 * MIB, "a 1-byte insertion added {added} bytes: {s2:#}");
    let trees = src.components().count();
    assert!(
        blocks < 3,
        "a 1-byte insertion added {blocks} blocks (want < 3; the directory trees from / down to the source are {trees} of them): {s2:#}"
    );
}

#[test]
fn renaming_a_directory_adds_almost_nothing() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    let dir = src.join("projects/alpha");
    fs::create_dir_all(dir.join("assets")).unwrap();
    let mut total = 0u64;
    for i in 0..12u64 {
        let len = 300 * KIB + i * 77 * KIB;
        write_random(&dir.join(format!("file{i}.bin")), 200 + i, len);
        total += len;
    }
    fs::write(dir.join("assets/notes.txt"), text_bytes(7, 200_000)).unwrap();
    total += 200_000;
    env.backup(&args![&src]);

    fs::rename(&dir, src.join("projects/beta")).unwrap();
    let s = env.backup(&args![&src]);
    assert_eq!(num(&s, "files_new"), 13, "renamed files count as new paths: {s:#}");
    let added = num(&s, "bytes_added");
    assert!(added < total / 100 && added < 64 * KIB, "renaming a {total}-byte directory added {added} bytes: {s:#}");

    let t = env.path().join("t");
    env.restore(&args![], &t);
    assert_same_tree(&src, &restored(&t, &src), Compare::ALL);
}
