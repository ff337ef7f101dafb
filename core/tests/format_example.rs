//! Checks the worked example of docs/FORMAT.md against the implementation, so the
//! specification and the code cannot drift apart.

use brickbox_core::crypto::{self, BlockId, Keys};
use brickbox_core::objects::{self, ObjectKind, VolumeIndex};
use brickbox_core::tree::{BlockRef, Node, Tree};
use brickbox_platform::FileKind;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.replace(' ', "")).unwrap()
}

fn master() -> [u8; 32] {
    let mut m = [0u8; 32];
    for (i, b) in m.iter_mut().enumerate() {
        *b = i as u8;
    }
    m
}

#[test]
fn block_of_the_worked_example_opens() {
    let keys = Keys::from_master(master());
    let p = b"Hello, Brickbox!\n";
    let id = keys.block_id(p);
    assert_eq!(id.to_hex(), "fc4fc7b1729f8120e2be8001b110196d6ae968f8913633993167b419cb8efc26");
    let vid: [u8; 16] = h("00112233445566778899aabbccddeeff").try_into().unwrap();
    let sealed = h("000102030405060708090a0b d5c0e652c27f77c35f74a7bdff89ac00198c b2783c1b675d284575f387af12310ee4");
    let plain = crypto::open(&keys.volume_cipher(&vid), &id.0, &sealed, "example").unwrap();
    assert_eq!(plain[0], 0);
    assert_eq!(&plain[1..], p);
}

#[test]
fn index_object_of_the_worked_example_opens() {
    let keys = Keys::from_master(master());
    let name = "index/00112233445566778899aabbccddeeff.dindex";
    let obj = h("42424f3101a0a1a2a3a4a5a6a7a8a9aaabf3ae2f8254e5bf9625acec5164b2f40ed8fba2ff64ed6d3b9cc3ad7db3da663d53e3bf7c157e300a91716557f4f14c67b0ec3ca04bcb76f821b0c66972569cfd12656df9ed92eec51e9536");
    let payload = objects::open_object(&keys, ObjectKind::Index, name, &obj).unwrap();
    let index = VolumeIndex::decode(&payload).unwrap();
    assert_eq!(index.volume_size, 272);
    assert_eq!(index.entries.len(), 1);
    let e = index.entries[0];
    assert_eq!((e.offset, e.length, e.raw_len), (94, 46, 17));
    assert_eq!(objects::volume_id_from_name(name), Some(index.volume_id));
}

#[test]
fn tree_of_the_worked_example_encodes_as_documented() {
    let mut n = Node::new(b"hello.txt".to_vec(), FileKind::File);
    n.mode = 0o644;
    n.uid = 1000;
    n.gid = 1000;
    n.user = "alice".into();
    n.group = "users".into();
    n.size = 17;
    n.mtime_ns = 1_732_000_000_123_456_789;
    n.atime_ns = n.mtime_ns;
    let id = BlockId::from_hex("fc4fc7b1729f8120e2be8001b110196d6ae968f8913633993167b419cb8efc26").unwrap();
    n.content = vec![BlockRef { id, len: 17 }];
    let enc = Tree { nodes: vec![n] }.encode();
    let expected = h("42425431 01 09 68656c6c6f2e747874 00 a403 e807 e807 05 616c696365 05 7573657273 11 aab4aee5dab4a68930 aab4aee5dab4a68930 00 00 00 00 00 01 fc4fc7b1729f8120e2be8001b110196d6ae968f8913633993167b419cb8efc26 11");
    assert_eq!(enc, expected);
    assert_eq!(enc.len(), 92);
}
