"""Watching resources: `inotify.TreeWatcher` (one recursive inotify instance per resource,
on its own thread) and `watcher.Watcher` (the trio side: dirty paths, change counts and
health per resource)."""
