use super::*;

#[test]
fn json_strings_are_escaped() {
    let mut b = StackBuf::<64>::new();
    let _ = write!(b, "{}", J("a\"b\\c\n"));
    assert_eq!(b.as_str(), "\"a\\\"b\\\\c\\u000a\"");
}

#[test]
fn hash_stays_in_the_table() {
    for i in 0..1000usize {
        assert!(hash(i << 12 | 3, 0x5555_0000 + i) < SITE_CAP);
    }
}
