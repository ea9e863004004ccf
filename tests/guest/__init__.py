"""A Debian guest kernel under QEMU (TCG) for the tests that need kernel features this host lacks, such as IPVS."""
