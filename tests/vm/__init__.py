"""Tests that boot Debian's kernel in a QEMU guest (see guest.py): for kernel
features this machine's kernel lacks, such as IPIP."""
