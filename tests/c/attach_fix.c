/* A replacement plugin for attach_compute (built with a hotpatch plugin
 * descriptor appended by the test): results move from 1xxx to 2xxx. */
long attach_compute_fixed(long x) { return 2000 + x % 7; }
