"""The content-addressed store: objects (blobs, trees), the snapshot catalog, the writer
lock, and maintenance (gc, check). `Store` in `store.store` ties them together."""
