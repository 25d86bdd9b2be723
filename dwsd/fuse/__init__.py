"""The read-only view of a store: `vfs` (names -> catalog and trees, an inode table; no
pyfuse3), `ops` (the pyfuse3 adapter over it) and `mount` (mounting, serving, live
updates, clearing dead mounts). See docs/concurrency.md for what runs where."""
