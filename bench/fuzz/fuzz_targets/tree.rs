//! Tree blocks (`Tree::decode`).
#![no_main]
use brickbox_core::tree::Tree;
use brickbox_fuzz::assert_format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Tree::decode(data) {
        Ok(tree) => {
            // Over-long varints are accepted, so the bytes need not round-trip; the tree must.
            assert_eq!(Tree::decode(&tree.encode()).unwrap(), tree);
            for w in tree.nodes.windows(2) {
                assert!(w[0].name < w[1].name);
            }
        }
        Err(e) => assert_format(&e),
    }
});
