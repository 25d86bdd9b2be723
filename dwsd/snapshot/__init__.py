"""Working-tree side of snapshots: walking and capturing resources (`capture`),
exclusion rules (`exclude`), the stat cache (`statcache`), diff, restore and retention."""
