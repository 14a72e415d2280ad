"""fan-driver's tests, a package so that bench/ and the QEMU guest import the
harness as tests.harness."""
